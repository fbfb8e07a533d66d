//! An in-process fake upstream registry for fault injection: counts every
//! request, can demand bearer tokens, redirect blobs to a second "CDN"
//! server, and misbehave on purpose (429, 500, wrong bytes, cut or slow
//! bodies, a failing token endpoint).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Notify};

pub type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

pub fn digest_of(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// A misbehaviour for requests whose path contains a given string.
#[derive(Clone)]
pub enum Fault {
    /// Answer this status (with `Retry-After` if given).
    Status(u16, Option<u64>),
    /// Serve these bytes instead of the real content.
    WrongBody(Bytes),
    /// Announce the full length, send half, then close.
    CutBody,
    /// Send the first half, then wait for the gate before the rest.
    Gate(Arc<Notify>),
    /// Pause this long between 64 KiB chunks.
    Slow(Duration),
    /// Wait this long before the response head.
    Delay(Duration),
    /// Answer 500 to this percentage of matching requests (deterministic
    /// pseudo-random sequence). Used by tests/e2e_load.rs.
    #[allow(dead_code)]
    Random(u32),
    /// Cut the body after this many bytes, for as many responses as the
    /// counter says (each matching GET takes one), then behave.
    CutAfter(usize, Arc<std::sync::atomic::AtomicUsize>),
    /// Ignore `Range` headers: always the whole blob with 200.
    IgnoreRange,
    /// `IgnoreRange` and `CutAfter` at once, for as many responses as the
    /// counter says.
    IgnoreRangeCutAfter(usize, Arc<std::sync::atomic::AtomicUsize>),
    /// `Gate`, for requests without a `Range` only.
    GateWhole(Arc<Notify>),
    /// Answer a single range with a 206 that lacks `Content-Range`.
    NoContentRange,
    /// Docker Hub's pull-limit 429: its error body and spent quota headers.
    PullLimit,
    /// Docker Hub's answer for a repository that does not exist (or that the
    /// token may not read): 401 with `error="insufficient_scope"`.
    InsufficientScope,
    /// The first GET serves these bytes instead (under another `ETag`), cut
    /// after half of them; later requests get the real blob.
    ChangedOnce(Bytes, Arc<std::sync::atomic::AtomicBool>),
}

impl Fault {
    fn is_spent(&self) -> bool {
        match self {
            Fault::CutAfter(_, left) | Fault::IgnoreRangeCutAfter(_, left) => {
                left.load(std::sync::atomic::Ordering::SeqCst) == 0
            }
            _ => false,
        }
    }
}

#[derive(Default)]
pub struct State {
    manifests: Mutex<HashMap<(String, String), (Bytes, String)>>,
    blobs: Mutex<HashMap<(String, String), Bytes>>,
    tags: Mutex<HashMap<String, Vec<String>>>,
    hits: Mutex<Vec<String>>,
    faults: Mutex<Vec<(String, Fault)>>,
    /// Authorization headers seen, per request line.
    pub authorizations: Mutex<Vec<(String, Option<String>)>>,
    /// Require `Bearer <token>` issued by /token.
    token_auth: Mutex<Option<TokenAuth>>,
    /// The token service the challenge names, if not this fake's /token.
    realm: Mutex<Option<String>>,
    /// Require this `Authorization` (Basic) on the registry API, answering
    /// a Basic challenge without it (as ECR and distribution's htpasswd do).
    basic_auth: Mutex<Option<String>>,
    token_posts: Mutex<Vec<String>>,
    /// Redirect blob GETs to this base URL.
    redirect: Mutex<Option<String>>,
    /// Failures injected by `Fault::Random`.
    pub injected: std::sync::atomic::AtomicU64,
    /// Request lines that carried a `Range` header.
    ranges: Mutex<Vec<String>>,
    /// Answer several ranges with 416 instead of `multipart/byteranges`.
    single_range_only: std::sync::atomic::AtomicBool,
    /// How the referrers API behaves (see the referrers block below).
    referrers: Mutex<ReferrersMode>,
}

fn next_random() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STATE: AtomicU64 = AtomicU64::new(0x2545_f491_4f6c_dd1d);
    let mut x = STATE.load(Ordering::Relaxed);
    loop {
        let mut next = x;
        next ^= next << 13;
        next ^= next >> 7;
        next ^= next << 17;
        match STATE.compare_exchange_weak(x, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(current) => x = current,
        }
    }
}

#[derive(Clone)]
struct TokenAuth {
    token: String,
    basic: Option<String>,
    /// Tokens only for a POST with this OAuth2 refresh token.
    refresh: Option<String>,
    fail: bool,
}

/// A running fake registry. Stops when dropped.
pub struct Fake {
    pub addr: SocketAddr,
    pub state: Arc<State>,
    _stop: oneshot::Sender<()>,
}

impl Fake {
    pub async fn start() -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let (stop, mut stopped) = oneshot::channel();
        let served = state.clone();
        tokio::spawn(async move {
            // Dropping the set on stop aborts open connections too, so a
            // stopped fake looks like a dead upstream, pooled connections included.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let (stream, _) = tokio::select! {
                    _ = &mut stopped => return,
                    accepted = listener.accept() => accepted.unwrap(),
                };
                let state = served.clone();
                connections.spawn(async move {
                    let service = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(state, addr, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Fake {
            addr,
            state,
            _stop: stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn put_blob(&self, name: &str, data: impl Into<Bytes>) -> String {
        let data = data.into();
        let digest = digest_of(&data);
        self.state
            .blobs
            .lock()
            .unwrap()
            .insert((name.to_owned(), digest.clone()), data);
        digest
    }

    /// Stores a manifest under its digest and, if given, a tag.
    pub fn put_manifest(
        &self,
        name: &str,
        tag: Option<&str>,
        media_type: &str,
        data: impl Into<Bytes>,
    ) -> String {
        let data = data.into();
        let digest = digest_of(&data);
        let mut manifests = self.state.manifests.lock().unwrap();
        manifests.insert(
            (name.to_owned(), digest.clone()),
            (data.clone(), media_type.to_owned()),
        );
        if let Some(tag) = tag {
            manifests.insert(
                (name.to_owned(), tag.to_owned()),
                (data, media_type.to_owned()),
            );
            self.state
                .tags
                .lock()
                .unwrap()
                .entry(name.to_owned())
                .or_default()
                .push(tag.to_owned());
        }
        digest
    }

    /// A small image: config + one layer + manifest tagged `tag`.
    /// Returns (manifest digest, layer digest).
    pub fn put_image(&self, name: &str, tag: &str, layer: &[u8]) -> (String, String) {
        let layer_digest = self.put_blob(name, layer.to_vec());
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{layer_digest}"]}}}}"#
        );
        let config_digest = self.put_blob(name, config.clone().into_bytes());
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer_digest}","size":{}}}]}}"#,
            config.len(),
            layer.len()
        );
        let digest = self.put_manifest(
            name,
            Some(tag),
            "application/vnd.oci.image.manifest.v1+json",
            manifest.into_bytes(),
        );
        (digest, layer_digest)
    }

    /// Removes a tag (or digest) so upstream answers 404 for it.
    pub fn remove_manifest(&self, name: &str, reference: &str) {
        self.state
            .manifests
            .lock()
            .unwrap()
            .remove(&(name.to_owned(), reference.to_owned()));
    }

    pub fn fault(&self, path_contains: &str, fault: Fault) {
        self.state
            .faults
            .lock()
            .unwrap()
            .push((path_contains.to_owned(), fault));
    }

    pub fn clear_faults(&self) {
        self.state.faults.lock().unwrap().clear();
    }

    pub fn require_token(&self, token: &str, basic: Option<&str>) {
        *self.state.token_auth.lock().unwrap() = Some(TokenAuth {
            token: token.to_owned(),
            basic: basic.map(str::to_owned),
            refresh: None,
            fail: false,
        });
    }

    /// Challenges name this token service instead of the fake's own.
    pub fn token_realm(&self, realm: &str) {
        *self.state.realm.lock().unwrap() = Some(realm.to_owned());
    }

    /// The registry API answers only requests carrying `basic`.
    pub fn require_basic(&self, basic: &str) {
        *self.state.basic_auth.lock().unwrap() = Some(basic.to_owned());
    }

    /// Tokens only in exchange for `refresh` (grant_type=refresh_token).
    pub fn require_refresh_token(&self, token: &str, refresh: &str) {
        *self.state.token_auth.lock().unwrap() = Some(TokenAuth {
            token: token.to_owned(),
            basic: None,
            refresh: Some(refresh.to_owned()),
            fail: false,
        });
    }

    /// The form bodies POSTed to /token.
    pub fn token_posts(&self) -> Vec<String> {
        self.state.token_posts.lock().unwrap().clone()
    }

    pub fn fail_token_endpoint(&self) {
        if let Some(auth) = self.state.token_auth.lock().unwrap().as_mut() {
            auth.fail = true;
        }
    }

    pub fn redirect_blobs_to(&self, base: &str) {
        *self.state.redirect.lock().unwrap() = Some(base.to_owned());
    }

    /// How many requests matched `method` and a path containing `path`.
    pub fn hits(&self, method: &str, path: &str) -> usize {
        self.state
            .hits
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.starts_with(&format!("{method} ")) && line.contains(path))
            .count()
    }

    /// How many requests with a `Range` header matched `path`.
    pub fn range_hits(&self, path: &str) -> usize {
        let ranges = self.state.ranges.lock().unwrap();
        ranges.iter().filter(|line| line.contains(path)).count()
    }

    /// Makes the fake refuse requests for several ranges (416), as many
    /// registries do.
    pub fn single_range_only(&self) {
        self.state
            .single_range_only
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn all_hits(&self) -> Vec<String> {
        self.state.hits.lock().unwrap().clone()
    }
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<BoxBody> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r
}

/// A 401 with a Bearer challenge naming the token service (`token_realm`,
/// else this fake's /token); `extra` is appended to its parameters.
fn challenge(state: &State, me: SocketAddr, extra: &str) -> Response<BoxBody> {
    let realm = state
        .realm
        .lock()
        .unwrap()
        .clone()
        .unwrap_or_else(|| format!("http://{me}/token"));
    let mut r = full(StatusCode::UNAUTHORIZED, error_body("UNAUTHORIZED"));
    r.headers_mut().insert(
        "www-authenticate",
        format!(r#"Bearer realm="{realm}",service="fake",scope="repository:x:pull"{extra}"#)
            .parse()
            .unwrap(),
    );
    r
}

fn error_body(code: &str) -> String {
    format!(r#"{{"errors":[{{"code":"{code}","message":"fake says {code}"}}]}}"#)
}

async fn handle(state: Arc<State>, me: SocketAddr, req: Request<Incoming>) -> Response<BoxBody> {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let line = format!("{method} {}", req.uri());
    state.hits.lock().unwrap().push(line.clone());
    let authorization = req
        .headers()
        .get("authorization")
        .map(|v| v.to_str().unwrap_or("?").to_owned());
    let ranges = Ranges {
        range: req
            .headers()
            .get("range")
            .map(|v| v.to_str().unwrap_or("?").to_owned()),
        if_range: req
            .headers()
            .get("if-range")
            .map(|v| v.to_str().unwrap_or("?").to_owned()),
        single_only: state
            .single_range_only
            .load(std::sync::atomic::Ordering::SeqCst),
    };
    if ranges.range.is_some() {
        state.ranges.lock().unwrap().push(line.clone());
    }
    state
        .authorizations
        .lock()
        .unwrap()
        .push((line.clone(), authorization.clone()));

    let fault = state
        .faults
        .lock()
        .unwrap()
        .iter()
        // A spent `CutAfter` no longer matches: the next fault for the
        // path (if any) does.
        .find(|(p, f)| path.contains(p.as_str()) && !f.is_spent())
        .map(|(_, f)| f.clone());
    if let Some(Fault::Delay(d)) = &fault {
        tokio::time::sleep(*d).await;
    }
    if let Some(Fault::Random(percent)) = &fault {
        if next_random() % 100 < u64::from(*percent) {
            state
                .injected
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return full(StatusCode::INTERNAL_SERVER_ERROR, error_body("INJECTED"));
        }
    }
    if let Some(Fault::PullLimit) = &fault {
        let body = r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"You have reached your unauthenticated pull rate limit. https://www.docker.com/increase-rate-limit"}]}"#;
        let mut r = full(StatusCode::TOO_MANY_REQUESTS, body);
        r.headers_mut()
            .insert("ratelimit-limit", "100;w=21600".parse().unwrap());
        r.headers_mut()
            .insert("ratelimit-remaining", "0;w=21600".parse().unwrap());
        return r;
    }
    if let Some(Fault::InsufficientScope) = &fault {
        return challenge(&state, me, r#",error="insufficient_scope""#);
    }
    if let Some(Fault::Status(code, retry)) = &fault {
        let mut r = full(StatusCode::from_u16(*code).unwrap(), error_body("FAULT"));
        if let Some(retry) = retry {
            r.headers_mut().insert("retry-after", (*retry).into());
        }
        return r;
    }

    if path == "/token" {
        let auth = state.token_auth.lock().unwrap().clone();
        let Some(auth) = auth else {
            return full(StatusCode::NOT_FOUND, "");
        };
        if auth.fail {
            return full(StatusCode::INTERNAL_SERVER_ERROR, "token server down");
        }
        if let Some(basic) = &auth.basic {
            if authorization.as_deref() != Some(basic.as_str()) {
                return full(StatusCode::UNAUTHORIZED, "bad credentials");
            }
        }
        if let Some(refresh) = &auth.refresh {
            if method != "POST" {
                return full(StatusCode::METHOD_NOT_ALLOWED, "POST a refresh token");
            }
            let body = http_body_util::BodyExt::collect(req.into_body())
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            state.token_posts.lock().unwrap().push(body.clone());
            let wanted = format!("refresh_token={refresh}");
            if !body.split('&').any(|kv| kv == wanted) || !body.contains("grant_type=refresh_token")
            {
                return full(StatusCode::UNAUTHORIZED, "bad refresh token");
            }
            return full(
                StatusCode::OK,
                format!(r#"{{"access_token":"{}","expires_in":300}}"#, auth.token),
            );
        }
        return full(
            StatusCode::OK,
            format!(r#"{{"token":"{}","expires_in":300}}"#, auth.token),
        );
    }
    if path.starts_with("/cdn/") {
        // The redirected blob host: serves blobs by digest, no auth.
        let digest = path.rsplit('/').next().unwrap_or("");
        let data = state
            .blobs
            .lock()
            .unwrap()
            .iter()
            .find(|((_, d), _)| d == digest)
            .map(|(_, v)| v.clone());
        return match data {
            Some(data) => blob_response(data, digest, fault, &method, &ranges).await,
            None => full(StatusCode::NOT_FOUND, ""),
        };
    }
    if path == "/v2/" {
        return full(StatusCode::OK, "{}");
    }

    let basic_auth = state.basic_auth.lock().unwrap().clone();
    if basic_auth.is_some() && authorization != basic_auth {
        let mut r = full(StatusCode::UNAUTHORIZED, error_body("UNAUTHORIZED"));
        r.headers_mut()
            .insert("www-authenticate", r#"Basic realm="fake""#.parse().unwrap());
        return r;
    }
    let token_auth = state.token_auth.lock().unwrap().clone();
    if let Some(auth) = token_auth {
        if authorization.as_deref() != Some(&format!("Bearer {}", auth.token)) {
            return challenge(&state, me, "");
        }
    }

    let Some(rest) = path.strip_prefix("/v2/") else {
        return full(StatusCode::NOT_FOUND, "");
    };
    if let Some((name, subject)) = rest.rsplit_once("/referrers/") {
        return referrers_response(&state, name, subject, req.uri().query());
    }
    let mut r = if let Some((name, reference)) = rest.rsplit_once("/manifests/") {
        let found = state
            .manifests
            .lock()
            .unwrap()
            .get(&(name.to_owned(), reference.to_owned()))
            .cloned();
        match found {
            Some((data, media_type)) => {
                let digest = digest_of(&data);
                let mut r = body_response(data, fault, &method).await;
                r.headers_mut()
                    .insert("content-type", media_type.parse().unwrap());
                r.headers_mut()
                    .insert("docker-content-digest", digest.parse().unwrap());
                r
            }
            None => full(StatusCode::NOT_FOUND, error_body("MANIFEST_UNKNOWN")),
        }
    } else if let Some((name, digest)) = rest.rsplit_once("/blobs/") {
        let found = state
            .blobs
            .lock()
            .unwrap()
            .get(&(name.to_owned(), digest.to_owned()))
            .cloned();
        let redirect = state.redirect.lock().unwrap().clone();
        match (found, redirect) {
            (Some(_), Some(base)) if method == "GET" => {
                let mut r = full(StatusCode::TEMPORARY_REDIRECT, "");
                r.headers_mut()
                    .insert("location", format!("{base}/cdn/{digest}").parse().unwrap());
                r
            }
            (Some(data), _) => {
                let mut r = blob_response(data, digest, fault, &method, &ranges).await;
                r.headers_mut()
                    .insert("docker-content-digest", digest.parse().unwrap());
                r
            }
            (None, _) => full(StatusCode::NOT_FOUND, error_body("BLOB_UNKNOWN")),
        }
    } else if let Some(name) = rest.strip_suffix("/tags/list") {
        match state.tags.lock().unwrap().get(name) {
            Some(tags) => full(
                StatusCode::OK,
                serde_json::json!({ "name": name, "tags": tags }).to_string(),
            ),
            None => full(StatusCode::NOT_FOUND, error_body("NAME_UNKNOWN")),
        }
    } else {
        full(StatusCode::NOT_FOUND, "")
    };
    r.headers_mut()
        .insert("ratelimit-limit", "100;w=21600".parse().unwrap());
    r.headers_mut()
        .insert("ratelimit-remaining", "42;w=21600".parse().unwrap());
    r
}

/// The `Range` and `If-Range` headers of a request.
struct Ranges {
    range: Option<String>,
    if_range: Option<String>,
    /// Refuse several ranges.
    single_only: bool,
}

/// `[start, end)` ranges of a `bytes=` header for a blob of `len` bytes, as
/// the spec reads them (an independent reading, not hoard's parser).
fn parse_ranges(header: &str, len: usize) -> Option<Vec<(usize, usize)>> {
    let spec = header.strip_prefix("bytes=")?;
    let mut out = Vec::new();
    for part in spec.split(',') {
        let (a, b) = part.trim().split_once('-')?;
        let range = if a.is_empty() {
            let n: usize = b.parse().ok()?;
            (len.saturating_sub(n), len)
        } else {
            let a: usize = a.parse().ok()?;
            let b = if b.is_empty() {
                len - 1
            } else {
                b.parse().ok()?
            };
            (a, (b + 1).min(len))
        };
        if range.0 >= range.1 {
            return None;
        }
        out.push(range);
    }
    Some(out)
}

/// A blob, whole or the ranges asked (`ETag` is its digest), then the
/// fault applied to that body.
async fn blob_response(
    data: Bytes,
    digest: &str,
    fault: Option<Fault>,
    method: &str,
    ranges: &Ranges,
) -> Response<BoxBody> {
    use std::sync::atomic::Ordering;
    let etag = format!("\"{digest}\"");
    if let Some(Fault::ChangedOnce(other, used)) = &fault {
        if method == "GET" && !used.swap(true, Ordering::SeqCst) {
            let mut r = body_response(
                other.clone(),
                Some(Fault::CutAfter(
                    other.len() / 2,
                    Arc::new(std::sync::atomic::AtomicUsize::new(1)),
                )),
                method,
            )
            .await;
            r.headers_mut()
                .insert("etag", "\"other-version\"".parse().unwrap());
            return r;
        }
    }
    let fault = match fault {
        Some(Fault::GateWhole(gate)) if ranges.range.is_none() => Some(Fault::Gate(gate)),
        Some(Fault::GateWhole(_)) => None,
        fault => fault,
    };
    let validator_ok = ranges.if_range.as_deref().is_none_or(|v| v == etag);
    let honour = !matches!(
        fault,
        Some(Fault::IgnoreRange | Fault::IgnoreRangeCutAfter(..))
    ) && validator_ok;
    let fault = match fault {
        Some(Fault::IgnoreRangeCutAfter(at, left)) => Some(Fault::CutAfter(at, left)),
        fault => fault,
    };
    let asked = match (&ranges.range, honour) {
        (Some(header), true) => parse_ranges(header, data.len()),
        _ => None,
    };
    let len = data.len();
    let mut r = match asked.as_deref() {
        None => body_response(data, fault, method).await,
        Some([(start, end)]) => {
            let broken = matches!(fault, Some(Fault::NoContentRange));
            let mut r = body_response(data.slice(*start..*end), fault, method).await;
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
            if !broken {
                r.headers_mut().insert(
                    "content-range",
                    format!("bytes {start}-{}/{len}", end - 1).parse().unwrap(),
                );
            }
            r
        }
        Some(_) if ranges.single_only => {
            let mut r = full(StatusCode::RANGE_NOT_SATISFIABLE, "");
            r.headers_mut()
                .insert("content-range", format!("bytes */{len}").parse().unwrap());
            r
        }
        Some(parts) => {
            let boundary = "fake-boundary";
            let mut body = Vec::new();
            for (start, end) in parts {
                body.extend_from_slice(
                    format!(
                        "--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {start}-{}/{len}\r\n\r\n",
                        end - 1
                    )
                    .as_bytes(),
                );
                body.extend_from_slice(&data[*start..*end]);
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
            let mut r = body_response(body.into(), fault, method).await;
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
            r.headers_mut().insert(
                "content-type",
                format!("multipart/byteranges; boundary={boundary}")
                    .parse()
                    .unwrap(),
            );
            r
        }
    };
    r.headers_mut().insert("etag", etag.parse().unwrap());
    r.headers_mut()
        .insert("accept-ranges", "bytes".parse().unwrap());
    r
}

/// The content, as the fault (if any) says.
async fn body_response(data: Bytes, fault: Option<Fault>, method: &str) -> Response<BoxBody> {
    let len = data.len();
    let head_only = method == "HEAD";
    let body: BoxBody = match fault {
        _ if head_only => Full::new(Bytes::new())
            .map_err(|never| match never {})
            .boxed(),
        Some(Fault::WrongBody(other)) => {
            let mut r = full(StatusCode::OK, other.clone());
            r.headers_mut().insert("content-length", other.len().into());
            return r;
        }
        Some(Fault::CutBody) => {
            let half = data.slice(..len / 2);
            let stream = futures_stream(
                vec![Ok(half), Err(std::io::Error::other("cut"))],
                None,
                None,
            );
            StreamBody::new(stream).boxed()
        }
        Some(Fault::Gate(gate)) => {
            let chunks = vec![Ok(data.slice(..len / 2)), Ok(data.slice(len / 2..))];
            StreamBody::new(futures_stream(chunks, Some((1, gate)), None)).boxed()
        }
        Some(Fault::CutAfter(at, left))
            if left
                .fetch_update(
                    std::sync::atomic::Ordering::SeqCst,
                    std::sync::atomic::Ordering::SeqCst,
                    |n| n.checked_sub(1),
                )
                .is_ok() =>
        {
            let stream = futures_stream(
                vec![
                    Ok(data.slice(..at.min(len))),
                    Err(std::io::Error::other("cut")),
                ],
                None,
                None,
            );
            StreamBody::new(stream).boxed()
        }
        Some(Fault::Slow(pause)) => {
            let chunks = (0..len)
                .step_by(64 * 1024)
                .map(|i| Ok(data.slice(i..(i + 64 * 1024).min(len))))
                .collect();
            StreamBody::new(futures_stream(chunks, None, Some(pause))).boxed()
        }
        _ => Full::new(data).map_err(|never| match never {}).boxed(),
    };
    let mut r = Response::new(body);
    r.headers_mut().insert("content-length", len.into());
    r
}

/// A body from chunks, optionally waiting on a gate before chunk `i` or
/// pausing between chunks.
fn futures_stream(
    chunks: Vec<std::io::Result<Bytes>>,
    gate: Option<(usize, Arc<Notify>)>,
    pause: Option<Duration>,
) -> impl futures_core::Stream<Item = std::io::Result<Frame<Bytes>>> + Send + Sync + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        for (i, chunk) in chunks.into_iter().enumerate() {
            if let Some((at, gate)) = &gate {
                if i == *at {
                    gate.notified().await;
                }
            }
            if i > 0 {
                if let Some(pause) = pause {
                    tokio::time::sleep(pause).await;
                }
            }
            if tx.send(chunk.map(Frame::data)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream(rx)
}

struct ReceiverStream(tokio::sync::mpsc::Receiver<std::io::Result<Frame<Bytes>>>);

impl futures_core::Stream for ReceiverStream {
    type Item = std::io::Result<Frame<Bytes>>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

// ---------------------------------------------------------------------------
// Referrers API (OCI distribution spec 1.1, issue 14). Kept apart from the
// manifest and blob code above: the list is computed from the stored
// manifests that carry a `subject`, as a registry with the API does.
// ---------------------------------------------------------------------------

/// Toggles of the fake's referrers API.
#[derive(Default, Clone)]
struct ReferrersMode {
    /// Answer 404, like a registry without the API (distribution 2.8).
    no_api: bool,
    /// Apply `artifactType` filters and say so (`OCI-Filters-Applied`);
    /// otherwise ignore them, as the spec allows.
    filters: bool,
    /// Descriptors per page (with a `Link` to the next), if set.
    page_size: Option<usize>,
}

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const EMPTY_CONFIG: &str = "application/vnd.oci.empty.v1+json";

impl Fake {
    /// Answer 404 on the referrers API (`false`), or serve it (default).
    pub fn referrers_api(&self, on: bool) {
        self.state.referrers.lock().unwrap().no_api = !on;
    }

    /// Apply `artifactType` filters upstream (and send the header).
    pub fn referrers_filter(&self, on: bool) {
        self.state.referrers.lock().unwrap().filters = on;
    }

    /// Page referrers lists `size` descriptors at a time.
    pub fn referrers_page_size(&self, size: usize) {
        self.state.referrers.lock().unwrap().page_size = Some(size);
    }

    /// Attaches an artifact to the manifest `subject` of `name`, as cosign
    /// or oras do on a registry with the API: an image manifest with an
    /// empty config, one layer `payload`, `artifactType`, `subject` and an
    /// annotation. Returns (artifact manifest digest, payload digest).
    pub fn put_referrer(
        &self,
        name: &str,
        subject: &str,
        artifact_type: &str,
        payload: &[u8],
    ) -> (String, String) {
        let (subject_bytes, subject_type) = self
            .state
            .manifests
            .lock()
            .unwrap()
            .get(&(name.to_owned(), subject.to_owned()))
            .cloned()
            .expect("the subject is stored");
        let config = self.put_blob(name, b"{}".to_vec());
        let layer = self.put_blob(name, payload.to_vec());
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": {"mediaType": EMPTY_CONFIG, "digest": config, "size": 2},
            "layers": [{"mediaType": "application/octet-stream", "digest": layer, "size": payload.len()}],
            "subject": {"mediaType": subject_type, "digest": subject, "size": subject_bytes.len()},
            "annotations": {"org.example.kind": artifact_type},
        });
        let digest = self.put_manifest(name, None, OCI_MANIFEST, manifest.to_string());
        (digest, layer)
    }

    /// The referrers index the API would answer for `subject`, unfiltered
    /// (what a client pushes to the `sha256-<hex>` fallback tag).
    pub fn referrers_index(&self, name: &str, subject: &str) -> String {
        index_json(&referrer_descriptors(&self.state, name, subject))
    }
}

/// Descriptors of the stored manifests of `name` whose `subject` is
/// `subject`, sorted by digest (stable pages), as the spec describes them:
/// `artifactType` (else the config's media type) and the annotations.
fn referrer_descriptors(state: &State, name: &str, subject: &str) -> Vec<serde_json::Value> {
    let manifests = state.manifests.lock().unwrap();
    let mut out: Vec<serde_json::Value> = manifests
        .iter()
        .filter(|((n, reference), _)| n == name && reference.starts_with("sha256:"))
        .filter_map(|((_, digest), (data, media_type))| {
            let body: serde_json::Value = serde_json::from_slice(data).ok()?;
            if body["subject"]["digest"].as_str() != Some(subject) {
                return None;
            }
            let artifact_type = body["artifactType"]
                .as_str()
                .or(body["config"]["mediaType"].as_str());
            let mut descriptor = serde_json::json!({
                "mediaType": media_type,
                "digest": digest,
                "size": data.len(),
            });
            if let Some(t) = artifact_type {
                descriptor["artifactType"] = t.into();
            }
            if let Some(a) = body.get("annotations") {
                descriptor["annotations"] = a.clone();
            }
            Some(descriptor)
        })
        .collect();
    out.sort_by(|a, b| a["digest"].as_str().cmp(&b["digest"].as_str()));
    out
}

fn index_json(manifests: &[serde_json::Value]) -> String {
    serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})
        .to_string()
}

fn referrers_response(
    state: &State,
    name: &str,
    subject: &str,
    query: Option<&str>,
) -> Response<BoxBody> {
    let mode = state.referrers.lock().unwrap().clone();
    if mode.no_api {
        return full(StatusCode::NOT_FOUND, "404 page not found\n");
    }
    let mut filter = None;
    let mut page = 0;
    for pair in query.unwrap_or("").split('&') {
        match pair.split_once('=') {
            Some(("artifactType", v)) => {
                filter = Some(v.replace("%2B", "+").replace("%2F", "/"));
            }
            Some(("page", v)) => page = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    let mut manifests = referrer_descriptors(state, name, subject);
    let filtered = mode.filters && filter.is_some();
    if let (true, Some(filter)) = (filtered, &filter) {
        manifests.retain(|d| d["artifactType"].as_str() == Some(filter.as_str()));
    }
    let mut link = None;
    if let Some(size) = mode.page_size {
        let total = manifests.len();
        manifests = manifests.into_iter().skip(page * size).take(size).collect();
        if (page + 1) * size < total {
            let mut next = format!("/v2/{name}/referrers/{subject}?page={}", page + 1);
            if let Some(filter) = &filter {
                next.push_str(&format!("&artifactType={filter}"));
            }
            link = Some(format!("<{next}>; rel=\"next\""));
        }
    }
    let mut r = full(StatusCode::OK, index_json(&manifests));
    r.headers_mut()
        .insert("content-type", OCI_INDEX.parse().unwrap());
    if filtered {
        r.headers_mut()
            .insert("oci-filters-applied", "artifactType".parse().unwrap());
    }
    if let Some(link) = link {
        r.headers_mut().insert("link", link.parse().unwrap());
    }
    r
}
