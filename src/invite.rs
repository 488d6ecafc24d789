//! One-line invites: "pair with me (and take this folder)" in a string a person can
//! paste (or scan as a QR code).
//!
//! An invite holds the inviter's device ID, its addresses, a one-time 32-byte secret,
//! an optional folder ID and an expiry time, in a compact binary form (below), base32
//! encoded, prefixed with `FERRY1-` and ending in a 4-byte BLAKE3 checksum, so a damaged
//! copy is caught before any connection is made. The secret is what the inviter checks
//! (once, before expiry); the device ID is proven by the Noise handshake, so altering it
//! cannot redirect a join.
//!
//! Binary form: device key (32) · secret (32) · expiry, Unix seconds (8, big endian) ·
//! folder ID length (1) and bytes · address count (1), then per address its length (2)
//! and multiaddr bytes. Upper-case base32 fits the QR code alphanumeric mode.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::types::DeviceId;
use data_encoding::BASE32_NOPAD;

const PREFIX: &str = "FERRY1-";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invite {
    pub device: DeviceId,
    pub addrs: Vec<String>,
    pub secret: Vec<u8>,
    pub folder: Option<String>,
    /// Seconds since the Unix epoch.
    pub expires: u64,
}

impl Invite {
    fn to_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(128);
        b.extend_from_slice(&self.device.0);
        b.extend_from_slice(&self.secret);
        b.extend_from_slice(&self.expires.to_be_bytes());
        let folder = self.folder.as_deref().unwrap_or("").as_bytes();
        b.push(folder.len().min(255) as u8);
        b.extend_from_slice(&folder[..folder.len().min(255)]);
        let addrs: Vec<Vec<u8>> = self
            .addrs
            .iter()
            .filter_map(|a| a.parse::<libp2p::Multiaddr>().ok())
            .map(|a| a.to_vec())
            .take(16)
            .collect();
        b.push(addrs.len() as u8);
        for a in addrs {
            b.extend_from_slice(&(a.len() as u16).to_be_bytes());
            b.extend_from_slice(&a);
        }
        b
    }

    fn from_bytes(b: &[u8]) -> Option<Invite> {
        let mut r = b;
        let mut take = |n: usize| -> Option<&[u8]> {
            if r.len() < n {
                return None;
            }
            let (h, t) = r.split_at(n);
            r = t;
            Some(h)
        };
        let device = DeviceId(take(32)?.try_into().ok()?);
        let secret = take(32)?.to_vec();
        let expires = u64::from_be_bytes(take(8)?.try_into().ok()?);
        let flen = take(1)?[0] as usize;
        let folder = String::from_utf8(take(flen)?.to_vec()).ok()?;
        let n = take(1)?[0] as usize;
        let mut addrs = Vec::with_capacity(n);
        for _ in 0..n {
            let len = u16::from_be_bytes(take(2)?.try_into().ok()?) as usize;
            let a = libp2p::Multiaddr::try_from(take(len)?.to_vec()).ok()?;
            addrs.push(a.to_string());
        }
        // Trailing bytes mean a different (newer) format or damage.
        if !r.is_empty() {
            return None;
        }
        Some(Invite {
            device,
            addrs,
            secret,
            folder: (!folder.is_empty()).then_some(folder),
            expires,
        })
    }

    pub fn encode(&self) -> String {
        let mut payload = self.to_bytes();
        let sum = blake3::hash(&payload);
        payload.extend_from_slice(&sum.as_bytes()[..4]);
        format!("{PREFIX}{}", BASE32_NOPAD.encode(&payload))
    }

    pub fn decode(s: &str) -> Result<Invite> {
        let s = s.trim();
        let body = s.strip_prefix(PREFIX).ok_or_else(|| {
            Error::Invalid("this is not a Ferry invite (it should start with FERRY1-)".into())
        })?;
        let damaged = || {
            Error::Invalid(
                "this invite is damaged or was altered (checksum mismatch); copy it again".into(),
            )
        };
        let payload = BASE32_NOPAD
            .decode(body.to_ascii_uppercase().as_bytes())
            .map_err(|_| damaged())?;
        if payload.len() < 5 {
            return Err(damaged());
        }
        let (bytes, sum) = payload.split_at(payload.len() - 4);
        if &blake3::hash(bytes).as_bytes()[..4] != sum {
            return Err(damaged());
        }
        Invite::from_bytes(bytes).ok_or_else(damaged)
    }

    pub fn expired(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        now > self.expires
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Invite {
        Invite {
            device: DeviceId([3; 32]),
            addrs: vec!["/ip4/127.0.0.1/tcp/4000".into()],
            secret: vec![9; 32],
            folder: Some("docs".into()),
            expires: u64::MAX / 2,
        }
    }

    #[test]
    fn round_trip() {
        let s = sample().encode();
        assert!(s.starts_with(PREFIX));
        assert!(!s.contains(char::is_whitespace));
        assert_eq!(Invite::decode(&s).unwrap(), sample());
    }

    #[test]
    fn altered_invites_are_refused() {
        let s = sample().encode();
        let mut chars: Vec<char> = s.chars().collect();
        let i = PREFIX.len() + 20;
        chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
        let altered: String = chars.into_iter().collect();
        let err = Invite::decode(&altered).unwrap_err().to_string();
        assert!(err.contains("damaged"), "{err}");
        assert!(Invite::decode("hello").is_err());
    }

    #[test]
    fn expiry() {
        let mut i = sample();
        assert!(!i.expired());
        i.expires = 1;
        assert!(i.expired());
    }
}
