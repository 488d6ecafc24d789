//! This device's identity: an ed25519 key pair stored in `identity.key` under the home.
//!
//! The device ID people see is the public key in Syncthing's format (see `types`); the
//! libp2p PeerId derives from the same key, so a Noise handshake proves the device ID.
//! The file holds the 32-byte secret seed, mode 0600, written atomically; an existing
//! key is never replaced (`init` on an existing home keeps its identity).

use std::fs;
use std::path::Path;

use libp2p::identity::{ed25519, Keypair};

use crate::error::{Error, IoContext, Result};
use crate::types::DeviceId;

pub const IDENTITY_FILE: &str = "identity.key";

/// The device's key pair.
#[derive(Clone)]
pub struct Identity {
    keypair: ed25519::Keypair,
}

impl Identity {
    pub fn generate() -> Self {
        Identity {
            keypair: ed25519::Keypair::generate(),
        }
    }

    /// Loads the key at `path`, or creates it (mode 0600) if the file does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self> {
        if path.exists() {
            return Self::load(path);
        }
        let id = Self::generate();
        id.save(path)?;
        Ok(id)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bytes = fs::read(path).at(path)?;
        let mut seed: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
            Error::Config(format!(
                "{}: not a Ferry identity key (expected 32 bytes, found {})",
                path.display(),
                bytes.len()
            ))
        })?;
        let secret = ed25519::SecretKey::try_from_bytes(&mut seed)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Ok(Identity {
            keypair: ed25519::Keypair::from(secret),
        })
    }

    /// Writes the secret seed with mode 0600 through a temp file and rename.
    fn save(&self, path: &Path) -> Result<()> {
        crate::fsutil::write_atomic_mode(path, self.keypair.secret().as_ref(), 0o600)
    }

    pub fn device_id(&self) -> DeviceId {
        DeviceId(self.keypair.public().to_bytes())
    }

    pub fn libp2p_keypair(&self) -> Keypair {
        Keypair::from(self.keypair.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn key_is_created_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(IDENTITY_FILE);
        let a = Identity::load_or_create(&p).unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = Identity::load_or_create(&p).unwrap();
        assert_eq!(a.device_id(), b.device_id());
        assert_eq!(
            a.libp2p_keypair().public().to_peer_id(),
            b.libp2p_keypair().public().to_peer_id()
        );
    }

    #[test]
    fn garbage_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(IDENTITY_FILE);
        fs::write(&p, b"nope").unwrap();
        let err = Identity::load(&p).err().unwrap().to_string();
        assert!(err.contains("not a Ferry identity key"), "{err}");
    }
}
