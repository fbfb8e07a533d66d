//! The mirror's error type: what a lookup can end in, before the registry
//! layer turns it into a spec error code and status.

use crate::reference::{Digest, Repository};
use crate::{store, upstream};

/// Why a manifest, blob or tag list could not be served.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("registry {0} is not mirrored")]
    RegistryDenied(String),
    #[error("manifest {reference} of {repo} is unknown")]
    ManifestUnknown { repo: Repository, reference: String },
    #[error("blob {digest} of {repo} is unknown")]
    BlobUnknown { repo: Repository, digest: Digest },
    #[error("repository {0} is unknown")]
    NameUnknown(Repository),
    #[error("upstream content for {expected} of {repo} hashed to {actual}")]
    DigestMismatch {
        repo: Repository,
        expected: Digest,
        actual: Digest,
    },
    #[error(transparent)]
    Upstream(#[from] upstream::Error),
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("internal error: {0}")]
    Internal(String),
}

/// Results of mirror lookups.
pub type Result<T> = std::result::Result<T, Error>;

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Error {
        Error::Internal(format!("background task failed: {e}"))
    }
}
