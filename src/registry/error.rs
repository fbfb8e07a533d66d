//! The one place where failures become registry errors: spec code, HTTP
//! status and JSON body (`{"errors":[{"code","message","detail"}]}`), and
//! where the failures a client is not told about in detail are logged.
//! Both the registry API and the admin API answer errors through here.
//! Codes: <https://github.com/opencontainers/distribution-spec/blob/main/spec.md#error-codes>

use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use serde_json::json;
use tracing::warn;

use super::body::{json_response, Body};
use crate::mirror::{self, UpstreamFailure};
use crate::reference::ReferenceError;

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
    /// A query parameter the request may carry is malformed (a referrers
    /// `artifactType` that is no media type).
    ParameterInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    NotFound,
    UriTooLong,
    TooManyRequests,
    Unavailable,
    UpstreamTimeout,
    UpstreamDown,
    /// The shared bucket failed: 503, as the replica itself cannot serve.
    StoreUnavailable,
    /// A replica's request came back to it (508).
    LoopDetected,
    /// The answer was not ready within `limits.response_deadline` (503).
    NotReady,
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
            // The spec's UNSUPPORTED covers "an invalid set of parameters".
            Code::Unsupported | Code::NotFound | Code::UriTooLong | Code::ParameterInvalid => {
                "UNSUPPORTED"
            }
            Code::TooManyRequests => "TOOMANYREQUESTS",
            Code::Unavailable
            | Code::UpstreamTimeout
            | Code::UpstreamDown
            | Code::StoreUnavailable
            | Code::LoopDetected
            | Code::NotReady => "UNAVAILABLE",
            Code::Unknown => "UNKNOWN",
        }
    }

    /// The HTTP status it is sent with.
    pub fn status(self) -> StatusCode {
        match self {
            Code::BlobUnknown | Code::ManifestUnknown | Code::NameUnknown | Code::NotFound => {
                StatusCode::NOT_FOUND
            }
            Code::DigestInvalid | Code::NameInvalid | Code::TagInvalid | Code::ParameterInvalid => {
                StatusCode::BAD_REQUEST
            }
            Code::RangeInvalid => StatusCode::RANGE_NOT_SATISFIABLE,
            Code::UriTooLong => StatusCode::URI_TOO_LONG,
            Code::Unauthorized => StatusCode::UNAUTHORIZED,
            Code::Denied => StatusCode::FORBIDDEN,
            Code::Unsupported => StatusCode::METHOD_NOT_ALLOWED,
            Code::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable => StatusCode::BAD_GATEWAY,
            Code::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Code::UpstreamDown | Code::StoreUnavailable | Code::NotReady => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Code::LoopDetected => StatusCode::LOOP_DETECTED,
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
            ReferenceError::InvalidMediaType(_) => Code::ParameterInvalid,
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
            // Spec, "Listing Referrers": a registry with the API never
            // answers 404, so clients read one as "no API" and fall back to
            // the `sha256-<hex>` tag; it must stay a 404 through the mirror.
            M::ReferrersUnknown { repo, .. } => ApiError::new(
                Code::NotFound,
                "the upstream registry serves no referrers for this repository",
            )
            .with_detail(json!({ "name": repo.name() })),
            M::UpstreamChanged { digest, .. } => ApiError::new(
                Code::Unavailable,
                "upstream sent different content when a cut download resumed",
            )
            .with_detail(json!({ "digest": digest.to_string() })),
            M::DigestMismatch { expected, .. } => ApiError::new(
                Code::Unavailable,
                "upstream sent content that does not match its digest",
            )
            .with_detail(json!({ "digest": expected.to_string() })),
            M::Upstream(_) => e.upstream_failure().map(ApiError::from).unwrap_or_else(|| {
                ApiError::new(Code::Unavailable, "upstream registry unavailable")
            }),
            // The bucket is down or slow: like an upstream outage, the
            // client may come back (its detail names no key or endpoint).
            // The owning replica failed (its upstream is down, it died
            // mid-body): like an upstream failure, worth a retry.
            M::Peer(_) => ApiError::new(Code::Unavailable, "the replica fetching it failed"),
            M::Loop => ApiError::new(
                Code::LoopDetected,
                "this replica is in the replica list under two names",
            ),
            M::Store(e) if e.is_bucket() => {
                ApiError::new(Code::StoreUnavailable, "the shared store is unavailable")
            }
            // stargz-snapshotter falls back to single ranges on an error.
            M::RangesRefused => ApiError::new(
                Code::RangeInvalid,
                "several ranges of a blob not cached yet: ask for one at a time",
            ),
            M::Store(_) | M::Internal(_) => ApiError::new(Code::Unknown, "internal error"),
        }
    }
}

impl From<UpstreamFailure> for ApiError {
    fn from(failure: UpstreamFailure) -> ApiError {
        match failure {
            UpstreamFailure::NotMirrored => {
                ApiError::new(Code::Denied, "registry is not mirrored here")
            }
            UpstreamFailure::NotFound => ApiError::new(Code::NameUnknown, "not found upstream"),
            UpstreamFailure::Unauthorized => {
                ApiError::new(Code::Unauthorized, "upstream registry refused access")
            }
            UpstreamFailure::Denied => {
                ApiError::new(Code::Denied, "upstream registry denied access")
            }
            UpstreamFailure::RateLimited(retry_after) => ApiError {
                retry_after,
                ..ApiError::new(
                    Code::TooManyRequests,
                    "upstream registry rate limit reached",
                )
            },
            UpstreamFailure::TimedOut => {
                ApiError::new(Code::UpstreamTimeout, "upstream registry timed out")
            }
            UpstreamFailure::Down => ApiError::new(Code::UpstreamDown, "upstream registry is down"),
            // The client learns whether the port or the address refused,
            // not which range the address is in (loopback, private, link
            // local): that would map the office's internal DNS for anyone
            // who asks. The operator's log and metric name the range.
            UpstreamFailure::Refused(rule) => {
                let (kind, message) = match rule {
                    crate::mirror::Rule::Port => (
                        "port",
                        "destination not allowed: port not allowed for registries that are not configured",
                    ),
                    _ => (
                        "address",
                        "destination not allowed: the registry does not resolve to a public address",
                    ),
                };
                ApiError::new(Code::Denied, message).with_detail(json!({ "rule": kind }))
            }
            UpstreamFailure::Unreachable(cause) => {
                ApiError::new(Code::Unavailable, "upstream registry unreachable")
                    .with_detail(json!({ "cause": cause.as_str() }))
            }
            UpstreamFailure::Unavailable => {
                ApiError::new(Code::Unavailable, "upstream registry unavailable")
            }
        }
    }
}

/// The answer to a failed mirror call. What the client is not told in
/// detail (server-side failures, rate limits) is logged here, once, for the
/// registry API and the admin API alike.
pub fn failed(e: &mirror::Error) -> ApiError {
    let api = ApiError::from(e);
    if api.code.status().is_server_error() || api.code.status() == StatusCode::TOO_MANY_REQUESTS {
        warn!(error = %e, "request failed");
    }
    api
}

/// The answer to a request whose response was not ready within the
/// deadline: the client comes back (or falls back to another host) while
/// the fetch it waited for goes on.
pub fn not_ready() -> ApiError {
    ApiError {
        retry_after: Some(std::time::Duration::from_secs(5)),
        ..ApiError::new(
            Code::NotReady,
            "the answer is not ready yet (the upstream is slow or busy): retry",
        )
    }
}

/// The spec's JSON error response.
pub fn response(e: &ApiError) -> Response<Body> {
    let mut response = json_response(e.body(), false);
    *response.status_mut() = e.code.status();
    let headers = response.headers_mut();
    if let Some(after) = e.retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(after.as_secs()));
    }
    if e.code == Code::Unsupported {
        headers.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    response
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
                mirror::Error::ReferrersUnknown {
                    repo: repo(),
                    subject: d.clone(),
                },
                StatusCode::NOT_FOUND,
                "UNSUPPORTED",
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
                mirror::Error::Store(crate::store::Error::Bucket {
                    op: "get",
                    key: "fleet/blobs/sha256/ab".into(),
                    message: "503".into(),
                }),
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
            ),
            (
                mirror::Error::Peer(crate::cluster::Error::Status {
                    peer: "http://10.0.0.2:5000".into(),
                    status: 500,
                }),
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
            ),
            (
                mirror::Error::Loop,
                StatusCode::LOOP_DETECTED,
                "UNAVAILABLE",
            ),
            (
                mirror::Error::UpstreamChanged {
                    repo: repo(),
                    digest: d.clone(),
                },
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
            ),
            (
                mirror::Error::RangesRefused,
                StatusCode::RANGE_NOT_SATISFIABLE,
                "RANGE_INVALID",
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
    }

    #[test]
    fn every_upstream_failure_maps() {
        let nine = Some(Duration::from_secs(9));
        for (failure, status, code) in [
            (
                UpstreamFailure::NotMirrored,
                StatusCode::FORBIDDEN,
                "DENIED",
            ),
            (
                UpstreamFailure::NotFound,
                StatusCode::NOT_FOUND,
                "NAME_UNKNOWN",
            ),
            (
                UpstreamFailure::Unauthorized,
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
            ),
            (UpstreamFailure::Denied, StatusCode::FORBIDDEN, "DENIED"),
            (
                UpstreamFailure::RateLimited(nine),
                StatusCode::TOO_MANY_REQUESTS,
                "TOOMANYREQUESTS",
            ),
            (
                UpstreamFailure::TimedOut,
                StatusCode::GATEWAY_TIMEOUT,
                "UNAVAILABLE",
            ),
            (
                UpstreamFailure::Down,
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
            ),
            (
                UpstreamFailure::Unavailable,
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
            ),
            (
                UpstreamFailure::Refused(crate::mirror::Rule::Loopback),
                StatusCode::FORBIDDEN,
                "DENIED",
            ),
            (
                UpstreamFailure::Unreachable(crate::mirror::Cause::Dns),
                StatusCode::BAD_GATEWAY,
                "UNAVAILABLE",
            ),
        ] {
            let api = ApiError::from(failure);
            assert_eq!(
                (api.code.status(), api.code.as_str()),
                (status, code),
                "{failure:?}"
            );
        }
        assert_eq!(
            ApiError::from(UpstreamFailure::RateLimited(nine)).retry_after,
            nine
        );
        for rule in [
            crate::mirror::Rule::Loopback,
            crate::mirror::Rule::Private,
            crate::mirror::Rule::LinkLocal,
        ] {
            let refused = ApiError::from(UpstreamFailure::Refused(rule));
            assert_eq!(
                refused.message,
                "destination not allowed: the registry does not resolve to a public address"
            );
            assert_eq!(refused.detail["rule"], "address");
        }
        let unreachable =
            ApiError::from(UpstreamFailure::Unreachable(crate::mirror::Cause::Refused));
        assert_eq!(unreachable.detail["cause"], "connection refused");
    }

    #[tokio::test]
    async fn the_response_carries_status_headers_and_envelope() {
        let mut e = ApiError::new(Code::TooManyRequests, "slow down");
        e.retry_after = Some(Duration::from_secs(7));
        let r = response(&e);
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "7");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        let body = http_body_util::BodyExt::collect(r.into_body())
            .await
            .unwrap()
            .to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["errors"][0]["code"], "TOOMANYREQUESTS");
        let r = response(&ApiError::new(Code::Unsupported, "read-only"));
        assert_eq!(r.headers()[header::ALLOW], "GET, HEAD");
    }

    #[test]
    fn reference_errors_map_to_400s() {
        let api = ApiError::from(&ReferenceError::InvalidMediaType("x".into()));
        assert_eq!(
            (api.code.status(), api.code.as_str()),
            (StatusCode::BAD_REQUEST, "UNSUPPORTED")
        );
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
