//! The crate's error type: one enum, carrying the context a person needs to act
//! (which file, which folder, which peer). `anyhow` is used only in `main`.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error("invalid device ID: {0}")]
    DeviceId(#[from] crate::types::DeviceIdError),
    #[error("index database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("index database: {0}")]
    Index(String),
    #[error("folder {folder}: {msg}")]
    Folder { folder: String, msg: String },
    #[error("network: {0}")]
    Net(String),
    #[error("peer {peer}: {msg}")]
    Peer { peer: String, msg: String },
    #[error("{0}")]
    Invalid(String),
    #[error("the engine has stopped")]
    Stopped,
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Attaches a path to an I/O result: `fs::read(&p).at(&p)?`.
pub trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
