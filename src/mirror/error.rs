//! The mirror's error type: what a lookup can end in, before the registry
//! layer turns it into a spec error code and status.

use crate::reference::{Digest, Repository};
use crate::{cluster, store, upstream};

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
    /// Upstream answered 404 for the referrers of `subject`: it has no
    /// referrers API (or no such repository).
    #[error("upstream lists no referrers of {subject} in {repo}")]
    ReferrersUnknown { repo: Repository, subject: Digest },
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
    /// A replica's request came back to it (it is in the replica list
    /// under a second name).
    #[error("a request from this replica came back to it")]
    Loop,
    /// The replica that owns the object could not serve it.
    #[error(transparent)]
    Peer(#[from] cluster::Error),
    /// Upstream sent other bytes for a blob when a cut download asked again
    /// (or a length that does not add up): one of the two versions is
    /// wrong, so nothing is kept.
    #[error("upstream sent different content for {digest} of {repo} when asked again")]
    UpstreamChanged { repo: Repository, digest: Digest },
    /// Several ranges of a blob not cached, which upstream would only
    /// answer whole: refused rather than sent whole as a silent `200`.
    #[error("upstream cannot serve several ranges of a blob not cached")]
    RangesRefused,
    #[error("internal error: {0}")]
    Internal(String),
}

/// How an upstream failure shows to a client, as the mirror classifies it,
/// so the registry layer answers without looking inside upstream errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// The registry is not one this mirror serves.
    NotMirrored,
    /// Upstream has no such repository or object.
    NotFound,
    /// Upstream refused hoard's credentials.
    Unauthorized,
    /// Upstream denied access.
    Denied,
    /// Upstream's rate limit; come back after this long, if it said.
    RateLimited(Option<std::time::Duration>),
    /// Upstream did not answer in time.
    TimedOut,
    /// Upstream keeps failing and is not contacted for a while (circuit open).
    Down,
    /// A destination `allow_any_upstream` does not open (an internal
    /// address, a port not allowed): nothing was sent.
    Refused(upstream::Rule),
    /// No connection: why, as far as it could be told.
    Unreachable(upstream::Cause),
    /// Anything else: an error status, a broken connection, body, token
    /// exchange or response.
    Unavailable,
}

impl Error {
    /// The client-facing class of an upstream failure; `None` for the
    /// mirror's own errors.
    pub fn upstream_failure(&self) -> Option<UpstreamFailure> {
        let Error::Upstream(e) = self else {
            return None;
        };
        use upstream::Error as U;
        Some(match e {
            U::UnknownRegistry(_) => UpstreamFailure::NotMirrored,
            U::NotFound { .. } => UpstreamFailure::NotFound,
            U::Unauthorized { .. } => UpstreamFailure::Unauthorized,
            U::Denied { .. } => UpstreamFailure::Denied,
            U::TooManyRequests { retry_after, .. } => UpstreamFailure::RateLimited(*retry_after),
            U::Timeout { .. } => UpstreamFailure::TimedOut,
            U::CircuitOpen { .. } => UpstreamFailure::Down,
            U::Refused { rule, .. } => UpstreamFailure::Refused(*rule),
            U::Connect { cause, .. } => UpstreamFailure::Unreachable(*cause),
            U::Status { .. }
            | U::Token { .. }
            | U::TokenRefused { .. }
            | U::CredentialHelper { .. }
            | U::Body { .. }
            | U::Redirects { .. }
            | U::BadResponse { .. }
            | U::ManifestTooLarge { .. } => UpstreamFailure::Unavailable,
        })
    }
}

/// Results of mirror lookups.
pub type Result<T> = std::result::Result<T, Error>;

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Error {
        Error::Internal(format!("background task failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn every_upstream_error_is_classified() {
        let reg = || "docker.io".to_string();
        let cases = [
            (
                upstream::Error::UnknownRegistry(reg()),
                UpstreamFailure::NotMirrored,
            ),
            (
                upstream::Error::NotFound { registry: reg() },
                UpstreamFailure::NotFound,
            ),
            (
                upstream::Error::Unauthorized {
                    registry: reg(),
                    envelope: None,
                },
                UpstreamFailure::Unauthorized,
            ),
            (
                upstream::Error::Denied {
                    registry: reg(),
                    envelope: None,
                },
                UpstreamFailure::Denied,
            ),
            (
                upstream::Error::TooManyRequests {
                    registry: reg(),
                    retry_after: Some(Duration::from_secs(9)),
                },
                UpstreamFailure::RateLimited(Some(Duration::from_secs(9))),
            ),
            (
                upstream::Error::Timeout {
                    registry: reg(),
                    what: "x",
                },
                UpstreamFailure::TimedOut,
            ),
            (
                upstream::Error::CircuitOpen {
                    registry: reg(),
                    retry_in: Duration::ZERO,
                },
                UpstreamFailure::Down,
            ),
            (
                upstream::Error::Status {
                    registry: reg(),
                    status: 500,
                    envelope: None,
                },
                UpstreamFailure::Unavailable,
            ),
            (
                upstream::Error::Connect {
                    registry: reg(),
                    cause: upstream::Cause::Refused,
                    message: "x".into(),
                },
                UpstreamFailure::Unreachable(upstream::Cause::Refused),
            ),
            (
                upstream::Error::Refused {
                    registry: reg(),
                    rule: upstream::Rule::LinkLocal,
                },
                UpstreamFailure::Refused(upstream::Rule::LinkLocal),
            ),
            (
                upstream::Error::Token {
                    registry: reg(),
                    message: "x".into(),
                },
                UpstreamFailure::Unavailable,
            ),
            (
                upstream::Error::TokenRefused {
                    registry: reg(),
                    status: 401,
                },
                UpstreamFailure::Unavailable,
            ),
            (
                upstream::Error::CredentialHelper {
                    registry: reg(),
                    helper: "ecr-login".into(),
                    message: "timed out after 10s, killed".into(),
                },
                UpstreamFailure::Unavailable,
            ),
            (
                upstream::Error::Body {
                    registry: reg(),
                    message: "x".into(),
                },
                UpstreamFailure::Unavailable,
            ),
            (
                upstream::Error::Redirects { registry: reg() },
                UpstreamFailure::Unavailable,
            ),
            (
                upstream::Error::BadResponse {
                    registry: reg(),
                    message: "x".into(),
                },
                UpstreamFailure::Unavailable,
            ),
            (
                upstream::Error::ManifestTooLarge {
                    registry: reg(),
                    limit: 1,
                },
                UpstreamFailure::Unavailable,
            ),
        ];
        for (e, class) in cases {
            assert_eq!(
                Error::from(e.clone()).upstream_failure(),
                Some(class),
                "{e:?}"
            );
        }
        assert_eq!(Error::Internal("x".into()).upstream_failure(), None);
    }
}
