//! The store's error type: a data dir another process holds, file system
//! and index failures, and digest mismatches found at commit time.

use std::path::PathBuf;
use std::sync::Arc;

use crate::reference::Digest;

/// A failure in the blob files or the sled index.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },
    #[error("the store in {} is in use by another hoard process{}", path.display(), holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default())]
    Locked { path: PathBuf, holder: Option<u32> },
    #[error("index error: {0}")]
    Index(Arc<sled::Error>),
    #[error("corrupt index record for {0}")]
    CorruptRecord(String),
    #[error("digest mismatch: expected {expected}, got {actual} ({size} bytes)")]
    DigestMismatch {
        expected: Digest,
        actual: Digest,
        size: u64,
    },
}

/// Results of store operations.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An I/O failure on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source: Arc::new(source),
        }
    }
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Error {
        Error::Index(Arc::new(e))
    }
}
