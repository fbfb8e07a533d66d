//! The upstream client's error type. Keeps what the mirror's policy needs
//! (status class, `Retry-After`, the registry's own error code) and nothing
//! secret: URLs of redirected requests and credentials are never included.

use std::time::Duration;

/// The first entry of a registry error envelope (`{"errors":[...]}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub code: String,
    pub message: String,
}

/// A failed exchange with an upstream registry.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("registry {0} is not configured")]
    UnknownRegistry(String),
    #[error("{registry}: not found")]
    NotFound { registry: String },
    #[error("{registry}: unauthorized")]
    Unauthorized {
        registry: String,
        envelope: Option<Envelope>,
    },
    #[error("{registry}: access denied")]
    Denied {
        registry: String,
        envelope: Option<Envelope>,
    },
    #[error("{registry}: too many requests")]
    TooManyRequests {
        registry: String,
        retry_after: Option<Duration>,
    },
    #[error("{registry}: unexpected status {status}")]
    Status {
        registry: String,
        status: u16,
        envelope: Option<Envelope>,
    },
    #[error("{registry}: timed out waiting for {what}")]
    Timeout {
        registry: String,
        what: &'static str,
    },
    #[error("{registry}: connection failed: {cause} ({message})")]
    Connect {
        registry: String,
        cause: super::Cause,
        message: String,
    },
    /// A destination `allow_any_upstream` does not open: an internal
    /// address or a port not allowed (nothing was sent).
    #[error("{registry}: destination not allowed: {rule}")]
    Refused { registry: String, rule: super::Rule },
    #[error("{registry}: token endpoint failed: {message}")]
    Token { registry: String, message: String },
    /// The token endpoint answered 401 or 403: the credentials were refused
    /// (a credential helper's answer is then fetched again).
    #[error("{registry}: token endpoint refused the credentials (status {status})")]
    TokenRefused { registry: String, status: u16 },
    /// A credential helper failed; the message never holds its output.
    #[error("{registry}: credential helper docker-credential-{helper} {message}")]
    CredentialHelper {
        registry: String,
        helper: String,
        message: String,
    },
    #[error("{registry}: manifest larger than {limit} bytes")]
    ManifestTooLarge { registry: String, limit: u64 },
    #[error("{registry}: body failed: {message}")]
    Body { registry: String, message: String },
    #[error("{registry}: failing, not contacted for {retry_in:?}")]
    CircuitOpen {
        registry: String,
        retry_in: Duration,
    },
    #[error("{registry}: too many redirects")]
    Redirects { registry: String },
    #[error("{registry}: invalid response: {message}")]
    BadResponse { registry: String, message: String },
}

/// Results of upstream calls.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Whether the upstream is down or refusing load rather than saying "no":
    /// the cases where serving stale content is right (5xx, 429, timeouts,
    /// connection and body failures). Never a 404.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Error::Status { status, .. } => *status >= 500,
            Error::TooManyRequests { .. }
            | Error::Timeout { .. }
            | Error::Connect { .. }
            | Error::Body { .. }
            | Error::CircuitOpen { .. }
            | Error::Token { .. }
            | Error::TokenRefused { .. }
            | Error::CredentialHelper { .. } => true,
            _ => false,
        }
    }
}
