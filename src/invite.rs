//! One-line invites: "pair with me (and take this folder)" in a string a person can
//! paste (or scan as a QR code).
//!
//! An invite holds the inviter's device ID, its addresses, a one-time 32-byte secret,
//! an optional folder ID and an expiry time. It is JSON, base32-encoded, prefixed with
//! `FERRY1-` and followed by a 4-byte BLAKE3 checksum, so a damaged copy is caught before
//! any connection is made. The secret is what the inviter checks (once, before expiry);
//! the device ID is proven by the Noise handshake, so altering it cannot redirect a join.

use std::time::{SystemTime, UNIX_EPOCH};

use data_encoding::BASE32_NOPAD;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::types::DeviceId;

const PREFIX: &str = "FERRY1-";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invite {
    pub device: DeviceId,
    pub addrs: Vec<String>,
    #[serde(with = "hex_bytes")]
    pub secret: Vec<u8>,
    pub folder: Option<String>,
    /// Seconds since the Unix epoch.
    pub expires: u64,
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&data_encoding::HEXLOWER.encode(b))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        data_encoding::HEXLOWER
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

impl Invite {
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        let mut payload = json.clone();
        payload.extend_from_slice(&blake3::hash(&json).as_bytes()[..4]);
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
        let (json, sum) = payload.split_at(payload.len() - 4);
        if &blake3::hash(json).as_bytes()[..4] != sum {
            return Err(damaged());
        }
        let inv: Invite = serde_json::from_slice(json).map_err(|_| damaged())?;
        if inv.secret.len() != 32 {
            return Err(damaged());
        }
        Ok(inv)
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
