//! Request handling: route, admit (who may pull what is decided in
//! `access`), one call into the mirror, response headers as the spec and
//! the clients expect them. No cache policy and no I/O of its own.

use std::net::IpAddr;
use std::time::Instant;

use super::access::{Refusal, Who};
use super::app::{App, Surface};
use super::body::{json_response, AccessLog, Body};
use super::error::{failed, not_ready, response as error, ApiError, Code};
use super::multipart;
use super::routes::{self, Route, RouteError};
use crate::mirror::{Accept, Caller, Outcome, Ranged, Relayed, CHECKED_AT_HEADER};
use crate::ranges::{RangeError, Ranges};
use crate::reference::{Digest, Reference, Repository};
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};

const API_VERSION: &str = "registry/2.0";

/// Answers one request from `peer` on a `Full` or `MetricsOnly` listener.
pub async fn handle<B>(
    app: &App,
    surface: Surface,
    peer: Option<IpAddr>,
    request: Request<B>,
) -> Response<Body> {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    // Registry queries carry only `ns`, `n` and `last`: safe to log, and
    // `ns` says which upstream a containerd request meant.
    let query = request.uri().query().unwrap_or("").to_owned();
    let routed = routes::route(&path, request.uri().query());
    let label = match &routed {
        Ok(Route::Manifest { .. }) => "manifest",
        Ok(Route::Blob { .. }) => "blob",
        Ok(Route::Tags { .. }) => "tags",
        Ok(Route::Referrers { .. }) => "referrers",
        Ok(Route::Base) => "base",
        Ok(Route::Metrics) => "metrics",
        Ok(Route::Healthz) => "healthz",
        Ok(Route::Ui) => "ui",
        Ok(Route::Unsupported) | Err(_) => "other",
    };
    let (mut response, result) = match routed {
        Ok(route) => match admit(app, surface, peer, &route, request.headers()).await {
            Err(refusal) => (refused(app, &refusal), None),
            Ok(who) => match route {
                route @ (Route::Metrics | Route::Healthz) => (meta(app, &method, route), None),
                Route::Ui if surface == Surface::Full => {
                    (super::ui::handle(app, &who, &method, &path).await, None)
                }
                _ if surface == Surface::MetricsOnly => (
                    error(&ApiError::new(Code::NotFound, "no such endpoint")),
                    None,
                ),
                route => {
                    let answer = dispatch(app, &method, route, &path, request.headers());
                    match tokio::time::timeout(app.response_deadline, answer).await {
                        Ok(answered) => answered,
                        Err(_) => {
                            // Only the wait ends: fetches run in their own
                            // tasks and finish for the next request.
                            app.metrics.deadline_exceeded.inc();
                            (error(&not_ready()), None)
                        }
                    }
                }
            },
        },
        Err(RouteError::NotFound) => (
            error(&ApiError::new(Code::NotFound, "no such endpoint")),
            None,
        ),
        Err(RouteError::Invalid(e)) => (error(&ApiError::from(&e)), None),
        Err(RouteError::TooLong) => (
            error(&ApiError::new(Code::UriTooLong, "request target too long")),
            None,
        ),
    };
    response.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static(API_VERSION),
    );
    if let Some(outcome) = result {
        // How the cache answered (hit, miss, revalidated, stale, coalesced),
        // like nginx's X-Cache-Status: for operators and `hoard warm`.
        response
            .headers_mut()
            .insert("x-hoard-cache", HeaderValue::from_static(outcome.as_str()));
    }
    let status = response.status();
    app.metrics
        .http_requests
        .with_label_values(&[method.as_str(), status.as_str()])
        .inc();
    app.metrics
        .http_duration
        .with_label_values(&[label])
        .observe(started.elapsed().as_secs_f64());
    let mut log = AccessLog::new(method, path, query, status.as_u16(), result, started);
    log.expected = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .or_else(|| http_body::Body::size_hint(response.body()).exact());
    response.map(|body| body.logged(log))
}

/// Checks the client may make this request (always, without auth), and
/// says who it is.
async fn admit(
    app: &App,
    surface: Surface,
    peer: Option<IpAddr>,
    route: &Route,
    headers: &http::HeaderMap,
) -> Result<Who, Refusal> {
    let Some(access) = &app.access else {
        return Ok(Who::Anonymous);
    };
    let needs_user = match route {
        Route::Metrics | Route::Healthz => access.protects_metrics(),
        // The page shows what the mirror holds: with logins on, only to
        // someone logged in (and then only what they may pull). Where it
        // is off, or on a listener without it, it is simply not there.
        Route::Ui => app.ui.is_some() && surface == Surface::Full,
        // The base check is how clients learn they should log in (docker
        // sends credentials only after a challenge), so it always asks.
        Route::Base => true,
        _ => false,
    };
    let who = access
        .authenticate(peer, headers.get(header::AUTHORIZATION))
        .await?;
    let repo = match route {
        Route::Manifest { repo, .. }
        | Route::Blob { repo, .. }
        | Route::Tags { repo, .. }
        | Route::Referrers { repo, .. } => Some(repo),
        _ => None,
    };
    match (&who, repo) {
        (Who::Anonymous, _) if needs_user => Err(Refusal::Unauthenticated),
        (_, Some(repo)) if !access.may_pull(&who, repo) => match who {
            Who::Anonymous => Err(Refusal::Unauthenticated),
            Who::User(_) => Err(Refusal::Denied),
        },
        _ => Ok(who),
    }
}

/// The error answer of a refused request; a 401 carries the challenge.
fn refused(app: &App, refusal: &Refusal) -> Response<Body> {
    let mut response = error(&refusal.error());
    if let (Refusal::Unauthenticated, Some(access)) = (refusal, &app.access) {
        if let Ok(value) = HeaderValue::from_str(&access.challenge()) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, value);
        }
    }
    response
}

async fn dispatch(
    app: &App,
    method: &Method,
    route: Route,
    path: &str,
    headers: &http::HeaderMap,
) -> (Response<Body>, Option<Outcome>) {
    let head = *method == Method::HEAD;
    if *method != Method::GET && !head {
        // Push, delete and anything else: a pull-through mirror is read-only.
        return (
            error(&ApiError::new(
                Code::Unsupported,
                "this registry mirror is read-only",
            )),
            None,
        );
    }
    let result = match route {
        Route::Base => Ok((json_response(Bytes::from_static(b"{}"), head), None)),
        Route::Manifest { repo, reference } => {
            manifest(app, &repo, &reference, head, headers).await
        }
        Route::Blob { repo, digest } if head => blob_head(app, &repo, &digest).await,
        Route::Blob { repo, digest } => blob(app, &repo, &digest, headers).await,
        Route::Tags { repo, query } => tags(app, &repo, &query, path, head).await,
        Route::Referrers {
            repo,
            digest,
            artifact_type,
        } => super::referrers::referrers(app, &repo, &digest, artifact_type.as_deref(), head).await,
        Route::Unsupported => Err(ApiError::new(
            Code::Unsupported,
            "this registry mirror is read-only",
        )),
        Route::Metrics | Route::Healthz | Route::Ui => {
            unreachable!("handled before dispatch")
        }
    };
    result.unwrap_or_else(|e| (error(&e), None))
}

fn meta(app: &App, method: &Method, route: Route) -> Response<Body> {
    if *method != Method::GET && *method != Method::HEAD {
        return error(&ApiError::new(Code::Unsupported, "method not allowed"));
    }
    let (body, content_type) = match route {
        Route::Metrics => (app.metrics.render(), "text/plain; version=0.0.4"),
        _ => ("ok\n".to_owned(), "text/plain"),
    };
    let mut response = Response::new(Body::unless_head(body, *method == Method::HEAD));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A handled request: the response and how the cache answered it.
type Handled = Result<(Response<Body>, Option<Outcome>), ApiError>;

async fn manifest(
    app: &App,
    repo: &Repository,
    reference: &Reference,
    head: bool,
    headers: &http::HeaderMap,
) -> Handled {
    let accept = Accept::parse(
        headers
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    let caller = Caller::from_headers(headers);
    let (manifest, outcome) = app
        .mirror
        .manifest(repo, reference, &accept, &caller)
        .await
        .map_err(|e| failed(&e))?;
    if !head && outcome != Outcome::Miss && counts_as_pull(&manifest.media_type) {
        // Docker Hub counts a GET of an image manifest as a pull (an index
        // GET before it is free, a HEAD always is): this one never left.
        app.metrics
            .pulls_saved
            .with_label_values(&[app.mirror.registry_label(repo.registry())])
            .inc();
    }
    let etag = format!("\"{}\"", manifest.digest);
    let not_modified = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let len = manifest.bytes.len();
    let (status, body) = if not_modified {
        (StatusCode::NOT_MODIFIED, Body::empty())
    } else if head {
        (StatusCode::OK, Body::empty())
    } else {
        let source = match outcome {
            Outcome::Miss | Outcome::Coalesced => "upstream",
            Outcome::Hit | Outcome::Revalidated | Outcome::Stale => "cache",
        };
        app.metrics
            .served_bytes
            .with_label_values(&[source])
            .inc_by(len as u64);
        (StatusCode::OK, Body::full(manifest.bytes.clone()))
    };
    let mut response = Response::builder();
    if let (true, Reference::Tag(tag)) = (caller.from_peer, reference) {
        // The replica that asked runs the tag's TTL from when upstream
        // last confirmed it, not from now.
        if let Some(checked_at) = app.mirror.tag_checked_at(repo, tag) {
            response = response.header(CHECKED_AT_HEADER, checked_at);
        }
    }
    let response = response
        .status(status)
        .header(header::CONTENT_TYPE, &manifest.media_type)
        .header(header::CONTENT_LENGTH, len)
        .header("docker-content-digest", manifest.digest.to_string())
        .header(header::ETAG, etag)
        .body(body)
        .map_err(|_| ApiError::new(Code::Unknown, "invalid upstream content type"))?;
    Ok((response, Some(outcome)))
}

/// Whether a GET of a manifest of this type is a pull on Docker Hub's
/// count: image manifests are, indexes (multi-platform lists) are not.
/// <https://docs.docker.com/docker-hub/usage/pulls/>
fn counts_as_pull(media_type: &str) -> bool {
    matches!(
        media_type,
        "application/vnd.oci.image.manifest.v1+json"
            | "application/vnd.docker.distribution.manifest.v2+json"
            | "application/vnd.docker.distribution.manifest.v1+json"
            | "application/vnd.docker.distribution.manifest.v1+prettyjws"
    )
}

async fn blob_head(app: &App, repo: &Repository, digest: &Digest) -> Handled {
    let (len, outcome) = app
        .mirror
        .blob_head(repo, digest)
        .await
        .map_err(|e| failed(&e))?;
    let mut response = blob_headers(digest, StatusCode::OK);
    if let Some(len) = len {
        response = response.header(header::CONTENT_LENGTH, len);
    }
    Ok((
        response.body(Body::empty()).expect("valid response"),
        Some(outcome),
    ))
}

async fn blob(app: &App, repo: &Repository, digest: &Digest, headers: &http::HeaderMap) -> Handled {
    let range_header = headers
        .get(header::RANGE)
        .map(|v| v.to_str().unwrap_or("invalid"));
    // A unit other than bytes is ignored (RFC 9110 §14.2): the whole blob.
    let ranges = match range_header.map(Ranges::parse).transpose() {
        Ok(ranges) => ranges.flatten(),
        Err(e) => return Ok((range_error(e, None), None)),
    };
    let caller = Caller::from_headers(headers);
    // Object stores answer several ranges with the whole object: those
    // are served here, not redirected.
    if ranges.as_ref().is_none_or(Ranges::is_single) {
        let redirect = app
            .mirror
            .blob_redirect(repo, digest, &caller)
            .await
            .map_err(|e| failed(&e))?;
        if let Some(url) = redirect {
            // 307 keeps the method and the client's Range; the URL carries a
            // signature, never the secret (OCI distribution spec: "the
            // registry MAY redirect" blob GETs). Not logged: the access log
            // has the path.
            let response = blob_headers(digest, StatusCode::TEMPORARY_REDIRECT)
                .header(header::LOCATION, url.as_str())
                .body(Body::empty())
                .expect("valid response");
            return Ok((response, Some(Outcome::Hit)));
        }
    }
    let blob = match (&ranges, range_header) {
        (Some(ranges), Some(header)) => {
            let ranged = app
                .mirror
                .blob_range(repo, digest, &caller, ranges, header)
                .await
                .map_err(|e| failed(&e))?;
            match ranged {
                Ranged::Here(blob) => blob,
                Ranged::Relayed(relayed) => {
                    return Ok((relayed_range(digest, relayed), Some(Outcome::Miss)))
                }
            }
        }
        _ => app
            .mirror
            .blob(repo, digest, &caller)
            .await
            .map_err(|e| failed(&e))?,
    };
    let outcome = Some(blob.outcome);
    if blob.len.is_none() && ranges.as_ref().is_some_and(|r| !r.is_single()) {
        // Several ranges need the length; never the whole blob instead.
        return Err(failed(&crate::mirror::Error::RangesRefused));
    }
    let (Some(len), Some(ranges)) = (blob.len, ranges) else {
        // No range, or upstream sent no length (then the whole blob,
        // chunked: ranges need a known length).
        let mut response = blob_headers(digest, StatusCode::OK);
        if let Some(len) = blob.len {
            response = response.header(header::CONTENT_LENGTH, len);
        }
        let response = response.body(Body::stream(blob.stream(None)));
        return Ok((response.expect("valid response"), outcome));
    };
    let parts = match ranges.resolve(len) {
        Ok(parts) => parts,
        Err(e) => return Ok((range_error(e, Some(len)), outcome)),
    };
    let response = match parts.as_slice() {
        [(start, end)] => blob_headers(digest, StatusCode::PARTIAL_CONTENT)
            .header(header::CONTENT_LENGTH, end - start)
            .header(
                header::CONTENT_RANGE,
                format!("bytes {start}-{}/{len}", end - 1),
            )
            .body(Body::stream(blob.stream(Some((*start, *end))))),
        // Relayed uncached (the disk is full): one pass over upstream's
        // body cannot serve ranges out of order.
        _ if !blob.serves_parts() => {
            return Ok((range_error(RangeError::TooMany, Some(len)), outcome))
        }
        _ => {
            let body = multipart::byteranges(&parts, len, BLOB_TYPE);
            response_builder(digest, StatusCode::PARTIAL_CONTENT, &body.content_type)
                .header(header::CONTENT_LENGTH, body.len)
                .body(Body::stream(blob.stream_pieces(body.pieces)))
        }
    };
    Ok((response.expect("valid response"), outcome))
}

/// The 416 answer to a `Range` that cannot be served; with the blob's
/// length when known (`Content-Range: bytes */len`, RFC 9110 §15.5.17).
fn range_error(e: RangeError, len: Option<u64>) -> Response<Body> {
    let message = match e {
        RangeError::Malformed => "invalid range",
        RangeError::Unsatisfiable => "range not satisfiable",
        RangeError::TooMany => "too many ranges, or ranges overlapping beyond the blob's size",
    };
    let mut response = error(&ApiError::new(Code::RangeInvalid, message));
    if let Some(len) = len {
        response.headers_mut().insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!("bytes */{len}")).expect("valid header"),
        );
    }
    response
}

/// Upstream's partial answer for a blob not cached, as it came: its
/// `Content-Range`, or its multipart type for several ranges.
fn relayed_range(digest: &Digest, relayed: Relayed) -> Response<Body> {
    let content_type = relayed.content_type.as_deref().unwrap_or(BLOB_TYPE);
    let mut response = response_builder(digest, StatusCode::PARTIAL_CONTENT, content_type);
    if let Some(range) = &relayed.content_range {
        response = response.header(header::CONTENT_RANGE, range);
    }
    if let Some(len) = relayed.len {
        response = response.header(header::CONTENT_LENGTH, len);
    }
    response
        .body(Body::stream(relayed.body))
        .unwrap_or_else(|_| {
            error(&ApiError::new(
                Code::Unavailable,
                "invalid upstream range answer",
            ))
        })
}

/// The type of a blob's bytes.
const BLOB_TYPE: &str = "application/octet-stream";

fn blob_headers(digest: &Digest, status: StatusCode) -> http::response::Builder {
    response_builder(digest, status, BLOB_TYPE)
}

fn response_builder(
    digest: &Digest,
    status: StatusCode,
    content_type: &str,
) -> http::response::Builder {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header("docker-content-digest", digest.to_string())
        .header(header::ETAG, format!("\"{digest}\""))
        .header(header::ACCEPT_RANGES, "bytes")
}

async fn tags(app: &App, repo: &Repository, query: &str, path: &str, head: bool) -> Handled {
    let (list, outcome) = app.mirror.tags(repo, query).await.map_err(|e| failed(&e))?;
    let len = list.bytes.len();
    let mut response = Response::builder()
        .header(header::CONTENT_TYPE, &list.content_type)
        .header(header::CONTENT_LENGTH, len);
    // Point the next-page link at this mirror's path for the repository.
    if let Some(link) = list.link.as_deref().and_then(|l| rewrite_link(l, path)) {
        response = response.header(header::LINK, link);
    }
    let response = response
        .body(Body::unless_head(list.bytes, head))
        .map_err(|_| ApiError::new(Code::Unavailable, "invalid upstream tag list"))?;
    Ok((response, Some(outcome)))
}

fn rewrite_link(link: &str, path: &str) -> Option<String> {
    let (_, after) = link.split_once("/tags/list")?;
    let prefix = path.strip_suffix("/tags/list")?;
    HeaderValue::from_str(&format!("<{prefix}/tags/list{after}")).ok()?;
    Some(format!("<{prefix}/tags/list{after}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_page_link_points_at_the_mirror_path() {
        assert_eq!(
            rewrite_link(
                r#"</v2/library/alpine/tags/list?last=b&n=2>; rel="next""#,
                "/v2/alpine/tags/list"
            )
            .as_deref(),
            Some(r#"</v2/alpine/tags/list?last=b&n=2>; rel="next""#)
        );
        assert_eq!(rewrite_link("garbage", "/v2/a/tags/list"), None);
    }
}
