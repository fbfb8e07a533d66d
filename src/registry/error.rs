//! The one place where failures become registry errors: spec code, HTTP
//! status and JSON body (`{"errors":[{"code","message","detail"}]}`).
//! Internal detail is logged by the caller, never sent.
//! Codes: <https://github.com/opencontainers/distribution-spec/blob/main/spec.md#error-codes>

use std::time::Duration;

use http::StatusCode;
use serde_json::json;

use crate::mirror;
use crate::reference::ReferenceError;
use crate::upstream;

/// A registry error code and its HTTP status, each registered once here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    BlobUnknown,
    DigestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    TagInvalid,
    RangeInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    NotFound,
    UriTooLong,
    TooManyRequests,
    Unavailable,
    UpstreamTimeout,
    UpstreamDown,
    Unknown,
}

impl Code {
    /// The code string of the JSON body.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::BlobUnknown => "BLOB_UNKNOWN",
            Code::DigestInvalid => "DIGEST_INVALID",
            Code::ManifestUnknown => "MANIFEST_UNKNOWN",
            Code::NameInvalid => "NAME_INVALID",
            Code::NameUnknown => "NAME_UNKNOWN",
            // Not in the spec's table; distribution answers a plain 404.
            Code::TagInvalid => "TAG_INVALID",
            Code::RangeInvalid => "RANGE_INVALID",
            Code::Unauthorized => "UNAUTHORIZED",
            Code::Denied => "DENIED",
            Code::Unsupported | Code::NotFound | Code::UriTooLong => "UNSUPPORTED",
            Code::TooManyRequests => "TOOMANYREQUESTS",
            Code::Unavailable | Code::UpstreamTimeout | Code::UpstreamDown => "UNAVAILABLE",
            Code::Unknown => "UNKNOWN",
        }
    }

    /// The HTTP status it is sent with.
    pub fn status(self) -> StatusCode {
        match self {
            Code::BlobUnknown | Code::ManifestUnknown | Code::NameUnknown | Code::NotFound => {
                StatusCode::NOT_FOUND
            }
            Code::DigestInvalid | Code::NameInvalid | Code::TagInvalid => StatusCode::BAD_REQUEST,
            Code::RangeInvalid => StatusCode::RANGE_NOT_SATISFIABLE,
            Code::UriTooLong => StatusCode::URI_TOO_LONG,
            Code::Unauthorized => StatusCode::UNAUTHORIZED,
            Code::Denied => StatusCode::FORBIDDEN,
            Code::Unsupported => StatusCode::METHOD_NOT_ALLOWED,
            Code::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable => StatusCode::BAD_GATEWAY,
            Code::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Code::UpstreamDown => StatusCode::SERVICE_UNAVAILABLE,
            Code::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// An error answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub code: Code,
    pub message: String,
    pub detail: serde_json::Value,
    /// Sent as `Retry-After` (upstream 429s).
    pub retry_after: Option<Duration>,
}

impl ApiError {
    /// An error with a message and no detail.
    pub fn new(code: Code, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            detail: serde_json::Value::Null,
            retry_after: None,
        }
    }

    fn with_detail(mut self, detail: serde_json::Value) -> ApiError {
        self.detail = detail;
        self
    }

    /// The spec's JSON error body.
    pub fn body(&self) -> Vec<u8> {
        let mut entry = json!({ "code": self.code.as_str(), "message": self.message });
        if !self.detail.is_null() {
            entry["detail"] = self.detail.clone();
        }
        serde_json::to_vec(&json!({ "errors": [entry] })).expect("json")
    }
}

impl From<&ReferenceError> for ApiError {
    fn from(e: &ReferenceError) -> ApiError {
        let code = match e {
            ReferenceError::InvalidName(_)
            | ReferenceError::NameTooLong
            | ReferenceError::InvalidRegistry(_) => Code::NameInvalid,
            ReferenceError::InvalidTag(_) => Code::TagInvalid,
            ReferenceError::InvalidDigest(_) | ReferenceError::UnsupportedAlgorithm(_) => {
                Code::DigestInvalid
            }
        };
        ApiError::new(code, e.to_string())
    }
}

impl From<&mirror::Error> for ApiError {
    fn from(e: &mirror::Error) -> ApiError {
        use mirror::Error as M;
        match e {
            M::RegistryDenied(registry) => ApiError::new(
                Code::Denied,
                format!("registry {registry} is not mirrored here"),
            )
            .with_detail(json!({ "registry": registry })),
            M::ManifestUnknown { repo, reference } => {
                ApiError::new(Code::ManifestUnknown, "manifest unknown")
                    .with_detail(json!({ "name": repo.name(), "reference": reference }))
            }
            M::BlobUnknown { digest, .. } => ApiError::new(Code::BlobUnknown, "blob unknown")
                .with_detail(json!({ "digest": digest.to_string() })),
            M::NameUnknown(repo) => {
                ApiError::new(Code::NameUnknown, "repository name not known to registry")
                    .with_detail(json!({ "name": repo.name() }))
            }
            M::DigestMismatch { expected, .. } => ApiError::new(
                Code::Unavailable,
                "upstream sent content that does not match its digest",
            )
            .with_detail(json!({ "digest": expected.to_string() })),
            M::Upstream(e) => ApiError::from(e),
            M::Store(_) | M::Internal(_) => ApiError::new(Code::Unknown, "internal error"),
        }
    }
}

impl From<&upstream::Error> for ApiError {
    fn from(e: &upstream::Error) -> ApiError {
        use upstream::Error as U;
        match e {
            U::UnknownRegistry(registry) => ApiError::new(
                Code::Denied,
                format!("registry {registry} is not mirrored here"),
            ),
            U::NotFound { .. } => ApiError::new(Code::NameUnknown, "not found upstream"),
            U::Unauthorized { .. } => {
                ApiError::new(Code::Unauthorized, "upstream registry refused access")
            }
            U::Denied { .. } => ApiError::new(Code::Denied, "upstream registry denied access"),
            U::TooManyRequests { retry_after, .. } => ApiError {
                retry_after: *retry_after,
                ..ApiError::new(
                    Code::TooManyRequests,
                    "upstream registry rate limit reached",
                )
            },
            U::Timeout { .. } => {
                ApiError::new(Code::UpstreamTimeout, "upstream registry timed out")
            }
            U::Status { .. }
            | U::Connect { .. }
            | U::Token { .. }
            | U::Body { .. }
            | U::Redirects { .. }
            | U::BadResponse { .. }
            | U::ManifestTooLarge { .. } => {
                ApiError::new(Code::Unavailable, "upstream registry unavailable")
            }
            U::CircuitOpen { .. } => ApiError::new(Code::UpstreamDown, "upstream registry is down"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::{Digest, Repository};

    fn repo() -> Repository {
        Repository::new("docker.io", "alpine").unwrap()
    }

    #[test]
    fn body_is_the_spec_envelope() {
        let e =
            ApiError::new(Code::BlobUnknown, "blob unknown").with_detail(json!({"digest": "x"}));
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["errors"][0]["code"], "BLOB_UNKNOWN");
        assert_eq!(v["errors"][0]["message"], "blob unknown");
        assert_eq!(v["errors"][0]["detail"]["digest"], "x");
        let plain: serde_json::Value =
            serde_json::from_slice(&ApiError::new(Code::Unknown, "x").body()).unwrap();
        assert!(plain["errors"][0].get("detail").is_none());
    }

    #[test]
    fn every_mirror_error_maps() {
        let d = Digest::of(b"x");
        let reg = || "docker.io".to_string();
        let cases: Vec<(mirror::Error, StatusCode, &str)> = vec![
            (
                mirror::Error::RegistryDenied(reg()),
                StatusCode::FORBIDDEN,
                "DENIED",
            ),
            (
                mirror::Error::ManifestUnknown {
                    repo: repo(),
                    reference: "1".into(),
                },
                StatusCode::NOT_FOUND,
                "MANIFEST_UNKNOWN",
            ),
            (
                mirror::Error::BlobUnknown {
                    repo: repo(),
                    digest: d.clone(),
                },
                StatusCode::NOT_FOUND,
                "BLOB_UNKNOWN",
            ),
            (
                mirror::Error::NameUnknown(repo()),
                StatusCode::NOT_FOUND,
                "NAME_UNKNOWN",
            ),
            (
                mirror::Error::DigestMismatch {
                    repo: repo(),
                    expected: d.clone(),
                    actual: d.clone(),
                },
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
            ),
            (
                mirror::Error::Internal("x".into()),
                StatusCode::INTERNAL_SERVER_ERROR,
                "UNKNOWN",
            ),
            (
                mirror::Error::Store(crate::store::Error::CorruptRecord("k".into())),
                StatusCode::INTERNAL_SERVER_ERROR,
                "UNKNOWN",
            ),
            (
                upstream::Error::TooManyRequests {
                    registry: reg(),
                    retry_after: Some(Duration::from_secs(9)),
                }
                .into(),
                StatusCode::TOO_MANY_REQUESTS,
                "TOOMANYREQUESTS",
            ),
            (
                upstream::Error::Timeout {
                    registry: reg(),
                    what: "x",
                }
                .into(),
                StatusCode::GATEWAY_TIMEOUT,
                "UNAVAILABLE",
            ),
            (
                upstream::Error::Status {
                    registry: reg(),
                    status: 500,
                    envelope: None,
                }
                .into(),
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
            ),
            (
                upstream::Error::Connect {
                    registry: reg(),
                    message: "x".into(),
                }
                .into(),
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
            ),
            (
                upstream::Error::Token {
                    registry: reg(),
                    message: "x".into(),
                }
                .into(),
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
            ),
            (
                upstream::Error::Body {
                    registry: reg(),
                    message: "x".into(),
                }
                .into(),
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
            ),
            (
                upstream::Error::Redirects { registry: reg() }.into(),
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
            ),
            (
                upstream::Error::BadResponse {
                    registry: reg(),
                    message: "x".into(),
                }
                .into(),
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
            ),
            (
                upstream::Error::ManifestTooLarge {
                    registry: reg(),
                    limit: 1,
                }
                .into(),
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
            ),
            (
                upstream::Error::Unauthorized {
                    registry: reg(),
                    envelope: None,
                }
                .into(),
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
            ),
            (
                upstream::Error::Denied {
                    registry: reg(),
                    envelope: None,
                }
                .into(),
                StatusCode::FORBIDDEN,
                "DENIED",
            ),
            (
                upstream::Error::NotFound { registry: reg() }.into(),
                StatusCode::NOT_FOUND,
                "NAME_UNKNOWN",
            ),
            (
                upstream::Error::UnknownRegistry(reg()).into(),
                StatusCode::FORBIDDEN,
                "DENIED",
            ),
        ];
        for (err, status, code) in cases {
            let api = ApiError::from(&err);
            assert_eq!(
                (api.code.status(), api.code.as_str()),
                (status, code),
                "{err:?}"
            );
            assert!(
                !api.message.contains("sha256:"),
                "no internal detail in {:?}",
                api.message
            );
        }
        let e = ApiError::from(&mirror::Error::from(upstream::Error::TooManyRequests {
            registry: reg(),
            retry_after: Some(Duration::from_secs(9)),
        }));
        assert_eq!(e.retry_after, Some(Duration::from_secs(9)));
    }

    #[test]
    fn reference_errors_map_to_400s() {
        for (e, code) in [
            (ReferenceError::InvalidName("A".into()), "NAME_INVALID"),
            (ReferenceError::NameTooLong, "NAME_INVALID"),
            (ReferenceError::InvalidRegistry("x".into()), "NAME_INVALID"),
            (ReferenceError::InvalidTag("x".into()), "TAG_INVALID"),
            (ReferenceError::InvalidDigest("x".into()), "DIGEST_INVALID"),
            (
                ReferenceError::UnsupportedAlgorithm("md5".into()),
                "DIGEST_INVALID",
            ),
        ] {
            let api = ApiError::from(&e);
            assert_eq!(api.code.as_str(), code);
            assert_eq!(api.code.status(), StatusCode::BAD_REQUEST);
        }
    }
}
