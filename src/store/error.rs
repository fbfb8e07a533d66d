//! The store's error type: a data dir another process holds, file system,
//! index and bucket failures, and digest mismatches found at commit time.

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
    /// A request to the shared bucket failed (5xx, timeout, refused).
    #[error("object store {op} of {key} failed: {message}")]
    Bucket {
        op: &'static str,
        key: String,
        message: String,
    },
    /// The bucket cannot be used as configured: `key` says what to fix.
    #[error("invalid value for {key}: {message}")]
    Config { key: &'static str, message: String },
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

impl Error {
    /// Whether the shared bucket failed (not this replica's disk).
    pub fn is_bucket(&self) -> bool {
        matches!(self, Error::Bucket { .. })
    }
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Error {
        Error::Index(Arc::new(e))
    }
}
