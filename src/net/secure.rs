//! The security handshake for TCP and relayed connections: TLS 1.3 as libp2p specifies it
//! (`/tls/1.0.0`: a self-signed certificate carrying the device key's signature) when the
//! other side speaks it, Noise (`/noise`) when it does not. Both prove the remote's
//! [`PeerId`].
//!
//! Why not Noise alone: Noise encrypts with ChaCha20-Poly1305, about 2.6 GB/s per core
//! here, and a 1 GiB transfer spent ~16 % of both daemons' CPU in it. TLS lets us pick
//! AES-GCM, which a CPU with AES instructions runs at 13–19 GB/s. libp2p's own TLS upgrade
//! always prefers ChaCha20, so this module builds its own `rustls` configurations (on
//! libp2p's certificate code) that prefer AES-GCM where the CPU has it. The wire format is
//! libp2p's: any libp2p TLS peer can talk to it.
//!
//! Multistream-select offers TLS first, so two Ferry devices use TLS, and a Ferry from
//! before TLS (Noise only) is still answered with Noise.

use std::sync::Arc;

use futures::{future::BoxFuture, AsyncRead, AsyncWrite, FutureExt};
use futures_rustls::TlsStream;
use libp2p::{
    core::{
        upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade},
        UpgradeInfo,
    },
    identity, noise,
    tls::certificate,
    PeerId,
};
use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        ResolvesClientCert,
    },
    crypto::{aws_lc_rs, CryptoProvider},
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        danger::{ClientCertVerified, ClientCertVerifier},
        ClientHello, ResolvesServerCert,
    },
    sign::CertifiedKey,
    CertificateError, CommonState, DigitallySignedStruct, DistinguishedName, SignatureScheme,
    SupportedCipherSuite,
};

use super::coalesce::Coalesce;

/// libp2p's TLS protocol name and ALPN token.
const TLS_PROTOCOL: &str = "/tls/1.0.0";
const ALPN: &[u8] = b"libp2p";
/// Noise's protocol name (what [`noise::Config`] answers to).
const NOISE_PROTOCOL: &str = "/noise";

/// The stream a secured connection carries: TLS or Noise, under [`Coalesce`] so that the
/// muxer's small writes go out together.
pub(crate) type Secured<C> = Coalesce<futures::future::Either<TlsStream<C>, noise::Output<C>>>;

#[derive(Debug, thiserror::Error)]
pub(crate) enum SecureError {
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    #[error("TLS: the peer's certificate: {0}")]
    Certificate(String),
    #[error("Noise handshake: {0}")]
    Noise(#[from] noise::Error),
}

/// The upgrade: TLS preferred, Noise as fallback (or Noise only, to play an older peer).
#[derive(Clone)]
pub(crate) struct Secure {
    tls: Option<Tls>,
    noise: noise::Config,
}

#[derive(Clone)]
struct Tls {
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

impl Secure {
    /// TLS and Noise, for a device with this key.
    pub(crate) fn new(keypair: &identity::Keypair) -> Result<Self, String> {
        let noise = noise::Config::new(keypair).map_err(|e| format!("noise setup: {e}"))?;
        let tls = Tls::new(keypair).map_err(|e| format!("TLS setup: {e}"))?;
        Ok(Secure {
            tls: Some(tls),
            noise,
        })
    }

    /// Noise only: what a Ferry from before TLS offers.
    #[cfg(test)]
    pub(crate) fn noise_only(keypair: &identity::Keypair) -> Result<Self, String> {
        let noise = noise::Config::new(keypair).map_err(|e| format!("noise setup: {e}"))?;
        Ok(Secure { tls: None, noise })
    }
}

/// TLS alone, as [`Secure`] does it, for the block lanes (`super::lane`): a connection of
/// their own, the same kind of certificate, the remote's PeerId proven the same way.
#[derive(Clone)]
pub(crate) struct LaneTls(Tls);

impl LaneTls {
    pub(crate) fn new(keypair: &identity::Keypair) -> Result<Self, String> {
        Tls::new(keypair)
            .map(LaneTls)
            .map_err(|e| format!("TLS setup: {e}"))
    }

    /// The client side of the handshake; returns the server's PeerId and the stream.
    pub(crate) async fn connect<C>(&self, socket: C) -> Result<(PeerId, TlsStream<C>), SecureError>
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        self.0.connect(socket).await
    }

    /// The server side; the client must present its certificate too.
    pub(crate) async fn accept<C>(&self, socket: C) -> Result<(PeerId, TlsStream<C>), SecureError>
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        self.0.accept(socket).await
    }
}

impl Tls {
    /// The client side: libp2p's TLS sends no server name (the certificate names the
    /// peer). Returns the server's PeerId, from its verified certificate.
    async fn connect<C>(&self, socket: C) -> Result<(PeerId, TlsStream<C>), SecureError>
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let unnamed = ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into());
        let stream = futures_rustls::TlsConnector::from(self.client.clone())
            .connect(unnamed, socket)
            .await
            .map_err(SecureError::Tls)?;
        let peer = peer_of(stream.get_ref().1)?;
        log_suite(peer, stream.get_ref().1);
        Ok((peer, stream.into()))
    }

    /// The server side; the client must present its certificate too.
    async fn accept<C>(&self, socket: C) -> Result<(PeerId, TlsStream<C>), SecureError>
    where
        C: AsyncRead + AsyncWrite + Unpin,
    {
        let stream = futures_rustls::TlsAcceptor::from(self.server.clone())
            .accept(socket)
            .await
            .map_err(SecureError::Tls)?;
        let peer = peer_of(stream.get_ref().1)?;
        log_suite(peer, stream.get_ref().1);
        Ok((peer, stream.into()))
    }

    fn new(keypair: &identity::Keypair) -> Result<Self, Box<dyn std::error::Error>> {
        // One certificate (and its own key, unrelated to the device key) for every
        // connection; the certificate carries the device key's signature over its key.
        let (cert, key) = certificate::generate(keypair)?;
        let provider = Arc::new(CryptoProvider {
            cipher_suites: cipher_suites(has_aes_instructions()),
            ..aws_lc_rs::default_provider()
        });
        let versions = &[&rustls::version::TLS13];

        // rustls's own checks of a certificate we present would refuse libp2p's critical
        // extension, so ours is handed over as a ready `CertifiedKey`.
        let signing = provider.key_provider.load_private_key(key)?;
        let own = Arc::new(OwnCertificate(Arc::new(CertifiedKey::new(
            vec![cert],
            signing,
        ))));

        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)?
            .with_client_cert_verifier(Arc::new(PeerCertificate))
            .with_cert_resolver(own.clone());
        // Our order, not the client's: a libp2p client lists ChaCha20 first.
        server.ignore_client_order = true;
        server.alpn_protocols = vec![ALPN.to_vec()];
        // Connections are long-lived and never resumed.
        server.send_tls13_tickets = 0;

        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PeerCertificate))
            .with_client_cert_resolver(own);
        client.alpn_protocols = vec![ALPN.to_vec()];
        client.resumption = rustls::client::Resumption::disabled();

        Ok(Tls {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// The one certificate this device presents, as server and as client.
#[derive(Debug)]
struct OwnCertificate(Arc<CertifiedKey>);

impl ResolvesServerCert for OwnCertificate {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl ResolvesClientCert for OwnCertificate {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// TLS 1.3's three suites, AES-GCM first where the CPU has AES instructions (ChaCha20 is
/// the faster one without them).
fn cipher_suites(aes_in_hardware: bool) -> Vec<SupportedCipherSuite> {
    use aws_lc_rs::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    if aes_in_hardware {
        vec![
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
        ]
    } else {
        vec![
            TLS13_CHACHA20_POLY1305_SHA256,
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
        ]
    }
}

pub(crate) fn has_aes_instructions() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

impl UpgradeInfo for Secure {
    type Info = &'static str;
    type InfoIter = std::vec::IntoIter<&'static str>;

    fn protocol_info(&self) -> Self::InfoIter {
        let mut names = Vec::with_capacity(2);
        if self.tls.is_some() {
            names.push(TLS_PROTOCOL);
        }
        names.push(NOISE_PROTOCOL);
        names.into_iter()
    }
}

type Upgraded<C> = BoxFuture<'static, Result<(PeerId, Secured<C>), SecureError>>;

impl<C> InboundConnectionUpgrade<C> for Secure
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, Secured<C>);
    type Error = SecureError;
    type Future = Upgraded<C>;

    fn upgrade_inbound(self, socket: C, info: Self::Info) -> Self::Future {
        match (info, self.tls) {
            (TLS_PROTOCOL, Some(tls)) => async move {
                let (peer, stream) = tls.accept(socket).await?;
                Ok((peer, Coalesce::new(futures::future::Either::Left(stream))))
            }
            .boxed(),
            _ => {
                let noise = self.noise.upgrade_inbound(socket, NOISE_PROTOCOL);
                async move {
                    let (peer, out) = noise.await?;
                    tracing::debug!(%peer, "connection secured by Noise");
                    #[cfg(test)]
                    record(peer, "Noise".into());
                    Ok((peer, Coalesce::new(futures::future::Either::Right(out))))
                }
                .boxed()
            }
        }
    }
}

impl<C> OutboundConnectionUpgrade<C> for Secure
where
    C: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Output = (PeerId, Secured<C>);
    type Error = SecureError;
    type Future = Upgraded<C>;

    fn upgrade_outbound(self, socket: C, info: Self::Info) -> Self::Future {
        match (info, self.tls) {
            (TLS_PROTOCOL, Some(tls)) => async move {
                let (peer, stream) = tls.connect(socket).await?;
                Ok((peer, Coalesce::new(futures::future::Either::Left(stream))))
            }
            .boxed(),
            _ => {
                let noise = self.noise.upgrade_outbound(socket, NOISE_PROTOCOL);
                async move {
                    let (peer, out) = noise.await?;
                    tracing::debug!(%peer, "connection secured by Noise");
                    #[cfg(test)]
                    record(peer, "Noise".into());
                    Ok((peer, Coalesce::new(futures::future::Either::Right(out))))
                }
                .boxed()
            }
        }
    }
}

/// The PeerId the (already verified) certificate of a finished handshake names.
fn peer_of(state: &CommonState) -> Result<PeerId, SecureError> {
    match state.peer_certificates() {
        Some([cert]) => certificate::parse(cert)
            .map(|c| c.peer_id())
            .map_err(|e| SecureError::Certificate(e.to_string())),
        _ => Err(SecureError::Certificate(
            "not exactly one certificate".into(),
        )),
    }
}

fn log_suite(peer: PeerId, state: &CommonState) {
    let suite = state.negotiated_cipher_suite().map(|s| s.suite());
    tracing::debug!(%peer, ?suite, "connection secured by TLS");
    #[cfg(test)]
    record(peer, format!("{suite:?}"));
}

/// Tests only: what the last handshake with each remote peer (keys are unique per test)
/// settled on, in this process.
#[cfg(test)]
static NEGOTIATED: std::sync::Mutex<Vec<(PeerId, String)>> = std::sync::Mutex::new(Vec::new());

#[cfg(test)]
fn record(peer: PeerId, what: String) {
    let mut all = NEGOTIATED.lock().unwrap_or_else(|p| p.into_inner());
    all.retain(|(p, _)| *p != peer);
    all.push((peer, what));
}

/// Tests only: "Some(TLS13_AES_128_GCM_SHA256)", "Noise", … for the last handshake with
/// `peer`.
#[cfg(test)]
pub(crate) fn negotiated_with(peer: PeerId) -> Option<String> {
    let all = NEGOTIATED.lock().unwrap_or_else(|p| p.into_inner());
    all.iter().find(|(p, _)| *p == peer).map(|(_, w)| w.clone())
}

/// Checks a peer's certificate as libp2p's TLS requires: exactly one, self-signed, with a
/// valid libp2p extension (the device key's signature over the certificate key); and the
/// handshake signed by that certificate's key. Who the peer is (its PeerId) is checked by
/// the swarm (the dialed PeerId) and by the pairing gate, as for Noise.
#[derive(Debug)]
struct PeerCertificate;

/// The signature schemes a libp2p certificate may use, most preferred first.
const SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ED25519,
    SignatureScheme::RSA_PSS_SHA512,
    SignatureScheme::RSA_PSS_SHA384,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PKCS1_SHA512,
    SignatureScheme::RSA_PKCS1_SHA384,
    SignatureScheme::RSA_PKCS1_SHA256,
];

fn check_chain(end_entity: &CertificateDer, intermediates: &[CertificateDer]) -> CertResult<()> {
    if !intermediates.is_empty() {
        return Err(rustls::Error::General(
            "a libp2p peer presents exactly one certificate".into(),
        ));
    }
    certificate::parse(end_entity).map_err(|e| bad_certificate(e.to_string()))?;
    Ok(())
}

fn check_signature(
    cert: &CertificateDer,
    message: &[u8],
    dss: &DigitallySignedStruct,
) -> CertResult<HandshakeSignatureValid> {
    let parsed = certificate::parse(cert).map_err(|e| bad_certificate(e.to_string()))?;
    parsed
        .verify_signature(dss.scheme, message, dss.signature())
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadSignature))?;
    Ok(HandshakeSignatureValid::assertion())
}

type CertResult<T> = Result<T, rustls::Error>;

fn bad_certificate(why: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        SecureError::Certificate(why),
    ))))
}

fn no_tls12() -> rustls::Error {
    rustls::Error::General("TLS 1.2 is not offered".into())
}

impl ServerCertVerifier for PeerCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer,
        intermediates: &[CertificateDer],
        _: &ServerName,
        _: &[u8],
        _: UnixTime,
    ) -> CertResult<ServerCertVerified> {
        check_chain(end_entity, intermediates)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer,
        _: &DigitallySignedStruct,
    ) -> CertResult<HandshakeSignatureValid> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer,
        dss: &DigitallySignedStruct,
    ) -> CertResult<HandshakeSignatureValid> {
        check_signature(cert, message, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

impl ClientCertVerifier for PeerCertificate {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer,
        intermediates: &[CertificateDer],
        _: UnixTime,
    ) -> CertResult<ClientCertVerified> {
        check_chain(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer,
        _: &DigitallySignedStruct,
    ) -> CertResult<HandshakeSignatureValid> {
        Err(no_tls12())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer,
        dss: &DigitallySignedStruct,
    ) -> CertResult<HandshakeSignatureValid> {
        check_signature(cert, message, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_gcm_leads_only_with_aes_instructions() {
        let first = |hw| cipher_suites(hw)[0].suite();
        assert_eq!(first(true), rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert_eq!(
            first(false),
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        );
        assert_eq!(cipher_suites(true).len(), 3);
    }

    use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_util::compat::TokioAsyncReadCompatExt;

    /// A connected pair of loopback sockets, as futures-io streams.
    async fn socket_pair() -> (
        tokio_util::compat::Compat<TcpStream>,
        tokio_util::compat::Compat<TcpStream>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (dialed, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (dialed.unwrap().compat(), accepted.unwrap().0.compat())
    }

    /// Our TLS against libp2p's own, both ways round: each side learns the other's
    /// PeerId, and as server we pick AES-GCM although libp2p's client lists ChaCha20 first.
    #[tokio::test]
    async fn speaks_libp2p_tls_both_ways() {
        let ours = identity::Keypair::generate_ed25519();
        let theirs = identity::Keypair::generate_ed25519();
        let (ours_id, theirs_id) = (ours.public().to_peer_id(), theirs.public().to_peer_id());

        let (dialer, listener) = socket_pair().await;
        let (mine, stock) = tokio::join!(
            Secure::new(&ours)
                .unwrap()
                .upgrade_outbound(dialer, TLS_PROTOCOL),
            libp2p::tls::Config::new(&theirs)
                .unwrap()
                .upgrade_inbound(listener, "/tls/1.0.0"),
        );
        assert_eq!(mine.unwrap().0, theirs_id);
        assert_eq!(stock.unwrap().0, ours_id);

        let (dialer, listener) = socket_pair().await;
        let (stock, mine) = tokio::join!(
            libp2p::tls::Config::new(&theirs)
                .unwrap()
                .upgrade_outbound(dialer, "/tls/1.0.0"),
            Secure::new(&ours)
                .unwrap()
                .upgrade_inbound(listener, TLS_PROTOCOL),
        );
        let (peer, stream) = stock.unwrap();
        assert_eq!(peer, ours_id);
        assert_eq!(mine.unwrap().0, theirs_id);
        let suite = stream
            .get_ref()
            .1
            .negotiated_cipher_suite()
            .unwrap()
            .suite();
        assert_eq!(suite, cipher_suites(has_aes_instructions())[0].suite());
    }

    /// A Noise-only peer (a Ferry from before TLS) and ours settle on Noise.
    #[tokio::test]
    async fn noise_still_works() {
        let ours = identity::Keypair::generate_ed25519();
        let old = identity::Keypair::generate_ed25519();
        let (dialer, listener) = socket_pair().await;
        let (a, b) = tokio::join!(
            Secure::noise_only(&old)
                .unwrap()
                .upgrade_outbound(dialer, NOISE_PROTOCOL),
            Secure::new(&ours)
                .unwrap()
                .upgrade_inbound(listener, NOISE_PROTOCOL),
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.0, ours.public().to_peer_id());
        assert_eq!(b.0, old.public().to_peer_id());
        assert!(matches!(b.1.inner, futures::future::Either::Right(_)));
    }

    #[test]
    fn tls_is_offered_before_noise() {
        let key = identity::Keypair::generate_ed25519();
        let both: Vec<_> = Secure::new(&key).unwrap().protocol_info().collect();
        assert_eq!(both, vec![TLS_PROTOCOL, NOISE_PROTOCOL]);
        let old: Vec<_> = Secure::noise_only(&key).unwrap().protocol_info().collect();
        assert_eq!(old, vec![NOISE_PROTOCOL]);
    }
}
