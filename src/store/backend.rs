//! The storage seam: where verified content lives once committed. The
//! filesystem (`fs`) is the first backend; an S3-compatible object store is
//! the next (issue 13). The `Store` puts a backend together with the index,
//! the temp area and the size accounting, so `mirror` never learns which
//! backend it talks to.
//!
//! Downloads are always written to the local temp area (`temp`), where
//! readers follow them while they run; a backend only takes over verified
//! content at `commit`. Every method blocks: callers run them on the
//! blocking pool.

use std::fmt;
use std::path::PathBuf;

use super::error::Result;
use super::reader::BlobReader;
use super::temp::VerifiedBlob;
use crate::reference::Digest;

/// One entry found by `Backend::list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listed {
    /// Content under its digest, with its size.
    Blob(Digest, u64),
    /// Something that is not content (a stray file): where it is.
    Stray(PathBuf),
}

/// Content-addressed storage of verified blobs and manifests.
pub trait Backend: Send + Sync + fmt::Debug {
    /// Opens committed content for reading; `None` if it is not there.
    fn open(&self, digest: &Digest) -> Result<Option<BlobReader>>;
    /// Makes verified content durable and visible under its digest; returns
    /// its size. Nothing is visible under the digest before this returns.
    fn commit(&self, verified: VerifiedBlob) -> Result<u64>;
    /// Removes committed content; readers that have it open finish.
    fn remove(&self, digest: &Digest) -> Result<()>;
    /// Moves content that failed verification out of the served set, where
    /// an operator can look at it; returns where it went.
    fn quarantine(&self, digest: &Digest) -> Result<PathBuf>;
    /// Everything stored, for reconciling with the index.
    fn list(&self) -> Result<Vec<Listed>>;
    /// Removes a stray entry `list` reported.
    fn remove_stray(&self, stray: &std::path::Path) -> Result<()>;
    /// Hashes committed content again: its digest and size.
    fn rehash(&self, digest: &Digest) -> Result<(Digest, u64)>;
    /// Bytes the backend can still take (the free space of the file system
    /// for `fs`).
    fn available_space(&self) -> Result<u64>;
}
