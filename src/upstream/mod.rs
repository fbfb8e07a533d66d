//! The upstream registry client: one per daemon, shared by every request.
//! Speaks the pull side of the distribution API to each configured
//! registry, answers auth challenges, follows blob redirects without
//! credentials, and reads rate-limit headers into metrics. Streams blob
//! bodies; buffers only manifests, with a size cap. Knows nothing of the
//! store or of caching policy.

mod auth;
mod cause;
mod error;
mod guard;
mod health;
mod helper;
mod partial;
mod ratelimit;
mod referrers;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, Method, StatusCode};

pub use auth::Challenge;
pub use cause::{describe as describe_error, Cause};
pub use error::{Envelope, Error, Result};
pub use guard::Rule;
pub use health::{Condition, Snapshot as RegistryHealth};
pub use partial::ContentRange;
pub use referrers::ReferrersResponse;

use crate::config::{Credentials, RegistryConfig, UpstreamConfig};
use crate::metrics::Metrics;
use crate::reference::{Digest, Reference, Repository};

/// Redirect hops followed for one request (Docker Hub uses one).
const MAX_REDIRECTS: usize = 5;
/// Upstream error bodies read for their envelope, at most.
const MAX_ERROR_BODY: u64 = 64 * 1024;

/// A manifest fetched from upstream.
#[derive(Debug, Clone)]
pub struct ManifestResponse {
    pub bytes: Bytes,
    pub media_type: String,
    /// `Docker-Content-Digest`, when upstream sent it.
    pub digest: Option<Digest>,
}

/// A manifest `HEAD` answer.
#[derive(Debug, Clone)]
pub struct ManifestHead {
    pub digest: Option<Digest>,
    pub media_type: Option<String>,
}

/// A tag list page from upstream.
#[derive(Debug, Clone)]
pub struct TagsResponse {
    pub bytes: Bytes,
    pub content_type: Option<String>,
    /// The `Link` header for the next page, as upstream sent it.
    pub link: Option<String>,
}

/// A blob body being received.
pub struct BlobResponse {
    response: reqwest::Response,
    /// Held while the body streams: caps concurrent downloads per registry.
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    registry: String,
    stall_timeout: Duration,
    /// `Content-Length`, when upstream sent it.
    pub len: Option<u64>,
    /// Position in the blob of the first body byte (non-zero for a 206).
    pub offset: u64,
    /// A strong `ETag`, to guard a resume with `If-Range`.
    pub etag: Option<String>,
}

/// The right to run one blob download against a registry.
pub type FetchPermit = tokio::sync::OwnedSemaphorePermit;

impl BlobResponse {
    /// Drops the body (its connection) and keeps its download permit, for
    /// the request that resumes it.
    pub fn into_permit(self) -> Option<FetchPermit> {
        self.permit
    }

    /// The next chunk, `None` at the end; fails if nothing arrives within the
    /// stall timeout or the connection breaks.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>> {
        match tokio::time::timeout(self.stall_timeout, self.response.chunk()).await {
            Ok(Ok(chunk)) => Ok(chunk),
            Ok(Err(e)) => Err(Error::Body {
                registry: self.registry.clone(),
                message: e.without_url().to_string(),
            }),
            Err(_) => Err(Error::Timeout {
                registry: self.registry.clone(),
                what: "blob body",
            }),
        }
    }
}

/// Upstream's answer to a client's own `Range`.
pub struct RangeResponse {
    /// `206`: upstream honoured the range (else it sent all of the blob).
    pub partial: bool,
    /// `Content-Type`: `multipart/byteranges; boundary=…` for several ranges.
    pub content_type: Option<String>,
    /// `Content-Range` of a single-range answer.
    pub content_range: Option<String>,
    pub body: BlobResponse,
}

/// Client for all upstream registries.
pub struct Client {
    /// For configured registries, their token services and redirects.
    http: reqwest::Client,
    /// For registries only `allow_any_upstream` lets in: its resolver
    /// refuses internal addresses (see `guard`).
    guarded: reqwest::Client,
    /// Ports an unconfigured registry may be reached on.
    any_ports: Vec<u16>,
    registries: BTreeMap<String, RegistryConfig>,
    allow_any_upstream: bool,
    auth: auth::Authenticator,
    helpers: helper::Helpers,
    metrics: Arc<Metrics>,
    response_timeout: Duration,
    stall_timeout: Duration,
    max_manifest_bytes: u64,
    health: health::Health,
    max_concurrent_fetches: usize,
    fetch_permits:
        parking_lot::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

impl Client {
    /// Builds the shared HTTP client from the upstream section.
    pub fn new(config: &UpstreamConfig, metrics: Arc<Metrics>) -> Result<Client> {
        let build = |guarded: bool| {
            let builder = reqwest::Client::builder();
            // Through an HTTP proxy, the proxy would resolve and connect to
            // the client-named host, past every check here: registries that
            // are not configured are reached directly or not at all.
            let builder = if guarded { builder.no_proxy() } else { builder };
            builder
                .redirect(reqwest::redirect::Policy::none())
                .connect_timeout(config.connect_timeout)
                .pool_idle_timeout(Duration::from_secs(90))
                .user_agent(concat!("hoard/", env!("CARGO_PKG_VERSION")))
                .dns_resolver(Arc::new(guard::Resolver { guarded }))
                .build()
                .map_err(|e| Error::Connect {
                    registry: "-".into(),
                    cause: Cause::Other,
                    message: e.to_string(),
                })
        };
        Ok(Client {
            http: build(false)?,
            guarded: build(true)?,
            any_ports: config.any_ports.clone(),
            registries: config.registries.clone(),
            allow_any_upstream: config.allow_any,
            auth: auth::Authenticator::default(),
            helpers: helper::Helpers::new(&config.registries, metrics.clone()),
            metrics,
            response_timeout: config.response_timeout,
            stall_timeout: config.stall_timeout,
            max_manifest_bytes: config.max_manifest_bytes,
            health: health::Health::new(config.rate_limit_floor, config.registries.keys()),
            max_concurrent_fetches: config.max_concurrent_fetches,
            fetch_permits: Default::default(),
        })
    }

    /// The largest manifest accepted.
    pub fn max_manifest_bytes(&self) -> u64 {
        self.max_manifest_bytes
    }

    /// How long a body may send nothing before it is abandoned.
    pub fn stall_timeout(&self) -> Duration {
        self.stall_timeout
    }

    /// `registry` as a metric label: its name if configured, else `other`.
    /// Under `allow_any_upstream` clients name the hosts, and a label per
    /// host would grow the metrics without bound.
    pub fn label<'a>(&self, registry: &'a str) -> &'a str {
        if self.registries.contains_key(registry) {
            registry
        } else {
            "other"
        }
    }

    /// Every configured registry and how it is doing (the status page).
    pub fn registries(&self) -> Vec<(String, RegistryHealth)> {
        self.registries
            .keys()
            .map(|name| (name.clone(), self.health.snapshot(name)))
            .collect()
    }

    /// Whether requests for this registry host may be sent at all.
    pub fn serves(&self, registry: &str) -> bool {
        self.allow_any_upstream || self.registries.contains_key(registry)
    }

    /// `GET` a manifest, buffered up to the manifest size cap.
    pub async fn get_manifest(
        &self,
        repo: &Repository,
        reference: &Reference,
        accept: &str,
    ) -> Result<ManifestResponse> {
        let path = format!("manifests/{reference}");
        let response = self
            .send(repo, Method::GET, &path, &[(header::ACCEPT, accept)])
            .await?;
        let registry = repo.registry();
        let limit = self.max_manifest_bytes;
        if response.content_length().is_some_and(|n| n > limit) {
            return Err(Error::ManifestTooLarge {
                registry: registry.to_owned(),
                limit,
            });
        }
        let media_type =
            header_string(response.headers(), header::CONTENT_TYPE).ok_or_else(|| {
                Error::BadResponse {
                    registry: registry.to_owned(),
                    message: "manifest without content-type".into(),
                }
            })?;
        let digest = content_digest(response.headers());
        let registry = registry.to_owned();
        let body = read_bounded(response, limit, self.stall_timeout)
            .await
            .map_err(|e| match e {
                ReadError::TooLarge => Error::ManifestTooLarge { registry, limit },
                ReadError::Stalled => Error::Timeout {
                    registry,
                    what: "manifest body",
                },
                ReadError::Broken(message) => Error::Body { registry, message },
            })?;
        Ok(ManifestResponse {
            bytes: body,
            media_type,
            digest,
        })
    }

    /// `HEAD` a manifest: what a tag points to now, without spending a pull
    /// (Docker Hub does not count `HEAD` against the rate limit).
    pub async fn head_manifest(
        &self,
        repo: &Repository,
        reference: &Reference,
        accept: &str,
    ) -> Result<ManifestHead> {
        let path = format!("manifests/{reference}");
        let response = self
            .send(repo, Method::HEAD, &path, &[(header::ACCEPT, accept)])
            .await?;
        Ok(ManifestHead {
            digest: content_digest(response.headers()),
            media_type: header_string(response.headers(), header::CONTENT_TYPE),
        })
    }

    /// Whether `registry`'s rate-limit budget is under the configured floor:
    /// then tags should be served without revalidation.
    pub fn budget_low(&self, registry: &str) -> bool {
        self.health.budget_low(registry)
    }

    /// `GET` a blob, following redirects; the body is streamed by the caller.
    /// At most `max_concurrent_fetches` run per registry; others wait.
    pub async fn get_blob(&self, repo: &Repository, digest: &Digest) -> Result<BlobResponse> {
        self.get_blob_from(repo, digest, 0).await
    }

    /// `GET` a blob from byte `offset` on (`Range: bytes=offset-`). Check
    /// `BlobResponse::offset`: a registry may ignore the range and send it all.
    pub async fn get_blob_from(
        &self,
        repo: &Repository,
        digest: &Digest,
        offset: u64,
    ) -> Result<BlobResponse> {
        self.resume_blob(repo, digest, offset, None, &mut None)
            .await
    }

    /// `get_blob_from` guarded by `if_range` (the `ETag` of an earlier
    /// answer): a registry whose blob changed since answers `200` with all
    /// of it rather than splicing two versions (RFC 9110 §13.1.5). A `206`
    /// whose `Content-Range` does not start at `offset` is refused. With a
    /// permit `held` (the body being resumed had it), no new one is waited
    /// for, and a failed request leaves it there for the next attempt.
    pub async fn resume_blob(
        &self,
        repo: &Repository,
        digest: &Digest,
        offset: u64,
        if_range: Option<&str>,
        held: &mut Option<FetchPermit>,
    ) -> Result<BlobResponse> {
        let permit = match held.take() {
            Some(permit) => permit,
            None => {
                let semaphore = self
                    .fetch_permits
                    .lock()
                    .entry(repo.registry().to_owned())
                    .or_insert_with(|| {
                        Arc::new(tokio::sync::Semaphore::new(self.max_concurrent_fetches))
                    })
                    .clone();
                semaphore
                    .acquire_owned()
                    .await
                    .expect("semaphore never closed")
            }
        };
        let range = format!("bytes={offset}-");
        let mut headers = Vec::new();
        if offset > 0 {
            headers.push((header::RANGE, range.as_str()));
            if let Some(etag) = if_range {
                headers.push((header::IF_RANGE, etag));
            }
        }
        let response = match self
            .send(repo, Method::GET, &format!("blobs/{digest}"), &headers)
            .await
        {
            Ok(response) => response,
            Err(e) => {
                *held = Some(permit);
                return Err(e);
            }
        };
        let offset = if response.status() == StatusCode::PARTIAL_CONTENT {
            match ContentRange::of(response.headers()) {
                Some(range) if range.start == offset => offset,
                _ => {
                    *held = Some(permit);
                    return Err(Error::BadResponse {
                        registry: repo.registry().to_owned(),
                        message: format!("206 without a content-range starting at {offset}"),
                    });
                }
            }
        } else {
            0
        };
        Ok(BlobResponse {
            offset,
            permit: Some(permit),
            len: response.content_length(),
            etag: partial::strong_etag(response.headers()),
            response,
            registry: repo.registry().to_owned(),
            stall_timeout: self.stall_timeout,
        })
    }

    /// `GET` with the client's own `Range` header (one range or several),
    /// for a blob not cached: the answer is relayed as upstream gave it. No
    /// download permit is taken: a range is one short request, like a
    /// manifest, and must not queue behind whole-blob downloads (a lazy
    /// puller reads ranges while the layer downloads).
    pub async fn get_blob_range(
        &self,
        repo: &Repository,
        digest: &Digest,
        range: &str,
    ) -> Result<RangeResponse> {
        let response = self
            .send(
                repo,
                Method::GET,
                &format!("blobs/{digest}"),
                &[(header::RANGE, range)],
            )
            .await?;
        let partial = response.status() == StatusCode::PARTIAL_CONTENT;
        let content_type = header_string(response.headers(), header::CONTENT_TYPE);
        let content_range = header_string(response.headers(), header::CONTENT_RANGE);
        Ok(RangeResponse {
            partial,
            content_type,
            content_range,
            body: BlobResponse {
                offset: 0,
                permit: None,
                len: response.content_length(),
                etag: None,
                response,
                registry: repo.registry().to_owned(),
                stall_timeout: self.stall_timeout,
            },
        })
    }

    /// `HEAD` a blob: confirms `repo` has it (used before serving content
    /// cached for another repository) and returns its length if given.
    pub async fn head_blob(&self, repo: &Repository, digest: &Digest) -> Result<Option<u64>> {
        let response = self
            .send(repo, Method::HEAD, &format!("blobs/{digest}"), &[])
            .await?;
        Ok(header_string(response.headers(), header::CONTENT_LENGTH).and_then(|v| v.parse().ok()))
    }

    /// `GET /v2/<name>/tags/list`, with the client's pagination query.
    pub async fn get_tags(&self, repo: &Repository, query: &str) -> Result<TagsResponse> {
        let path = if query.is_empty() {
            "tags/list".to_owned()
        } else {
            format!("tags/list?{query}")
        };
        let response = self
            .send(
                repo,
                Method::GET,
                &path,
                &[(header::ACCEPT, "application/json")],
            )
            .await?;
        let content_type = header_string(response.headers(), header::CONTENT_TYPE);
        let link = header_string(response.headers(), header::LINK);
        let registry = repo.registry().to_owned();
        let bytes = read_bounded(response, self.max_manifest_bytes, self.stall_timeout)
            .await
            .map_err(|e| match e {
                ReadError::Stalled => Error::Timeout {
                    registry,
                    what: "tag list",
                },
                ReadError::TooLarge => Error::Body {
                    registry,
                    message: "tag list too large".into(),
                },
                ReadError::Broken(message) => Error::Body { registry, message },
            })?;
        Ok(TagsResponse {
            bytes,
            content_type,
            link,
        })
    }

    /// Sends one request to `repo`'s registry, answering one auth challenge
    /// and following redirects. Non-success statuses become errors.
    async fn send(
        &self,
        repo: &Repository,
        method: Method,
        tail: &str,
        extra: &[(header::HeaderName, &str)],
    ) -> Result<reqwest::Response> {
        let registry = repo.registry();
        let (base, credentials) = self.endpoint(registry)?;
        let guarded = !self.registries.contains_key(registry);
        let http = if guarded { &self.guarded } else { &self.http };
        self.health.admit(registry)?;
        let url = base
            .join(&format!("v2/{}/{tail}", repo.name()))
            .map_err(|e| Error::BadResponse {
                registry: registry.to_owned(),
                message: format!("cannot build url: {e}"),
            })?;
        let scope = format!("repository:{}:pull", repo.name());
        let mut login = self.helpers.login(registry, credentials).await?;
        // What the next authorization answers: nothing yet (a cached token,
        // or one for the challenge this registry made before), then a 401's
        // challenge.
        let mut challenge = None;
        loop {
            let authorization = self
                .authorize(http, registry, &scope, challenge.as_ref(), &mut login)
                .await?;
            let sent = self
                .follow(
                    http,
                    guarded,
                    registry,
                    &method,
                    url.clone(),
                    extra,
                    authorization.as_ref(),
                )
                .await;
            let response = self.judge(registry, sent)?;
            let status = response.status();
            if status.is_success() {
                return Ok(response);
            }
            // Refused credentials (a helper's, rotated since) are renewed
            // once: new ones from the helper, then the request again.
            if refuses_login(&response, &url, challenge.is_some())
                && login.renew(&self.helpers).await
            {
                self.auth.forget(registry, &scope);
                challenge = None;
                continue;
            }
            // Only the registry's own challenge is answered: one from a
            // redirect's target (a blob store) would get the login.
            let from_registry = response.url().origin() == url.origin();
            if status == StatusCode::UNAUTHORIZED && challenge.is_none() && from_registry {
                if let Some(offered) = challenges(response.headers()).find_map(Challenge::parse) {
                    if guarded {
                        self.check_realm(registry, &offered)?;
                    }
                    self.auth.forget(registry, &scope);
                    challenge = Some(offered);
                    continue;
                }
            }
            return Err(self.status_error(registry, response).await);
        }
    }

    /// The authorization for `scope`: an answer to `challenge`, or what
    /// `auth` has before any. A token endpoint that refuses the `login`
    /// (or a Basic registry's challenge it has nothing for) renews it once.
    async fn authorize(
        &self,
        http: &reqwest::Client,
        registry: &str,
        scope: &str,
        challenge: Option<&Challenge>,
        login: &mut helper::Login<'_>,
    ) -> Result<Option<auth::Authorization>> {
        loop {
            let credentials = login.credentials();
            let result = match challenge {
                Some(challenge) => self
                    .auth
                    .answer(http, registry, credentials, challenge, scope)
                    .await
                    .map(Some),
                None => self.auth.prepare(http, registry, credentials, scope).await,
            }
            .map_err(|e| self.tally(e));
            match result {
                Err(Error::TokenRefused { .. } | Error::Unauthorized { .. })
                    if login.renew(&self.helpers).await => {}
                result => return result,
            }
        }
    }

    /// One request and its redirects. Credentials go only to the registry's
    /// own origin: a redirect elsewhere (Docker Hub's blob CDN) gets none.
    /// For an unconfigured registry (`guarded`) every hop is checked: a
    /// redirect to `http://169.254.169.254/` is refused. A configured
    /// registry's redirects are followed anywhere: the operator chose to
    /// trust it, and an internal registry's blob store (a Harbor's MinIO)
    /// is often on a private address.
    #[allow(clippy::too_many_arguments)]
    async fn follow(
        &self,
        http: &reqwest::Client,
        guarded: bool,
        registry: &str,
        method: &Method,
        mut url: reqwest::Url,
        extra: &[(header::HeaderName, &str)],
        authorization: Option<&auth::Authorization>,
    ) -> Result<reqwest::Response> {
        let origin = url.origin();
        for hop in 0..=MAX_REDIRECTS {
            if guarded && hop > 0 {
                self.check(registry, &url)?;
            }
            let mut request = http.request(method.clone(), url.clone());
            for (name, value) in extra {
                request = request.header(name.clone(), *value);
            }
            if let (Some(auth), true) = (authorization, url.origin() == origin) {
                request = auth.apply(request);
            }
            let sent = tokio::time::timeout(self.response_timeout, request.send()).await;
            let response = match sent {
                Err(_) => {
                    self.count(registry, method, "timeout");
                    return Err(Error::Timeout {
                        registry: registry.to_owned(),
                        what: "response",
                    });
                }
                Ok(Err(e)) => {
                    if let Some(rule) = guard::refusal_in(&e) {
                        return Err(self.refuse(registry, rule));
                    }
                    self.count(registry, method, "error");
                    let cause = cause::classify(&e);
                    return Err(Error::Connect {
                        registry: registry.to_owned(),
                        cause,
                        message: cause::describe(e),
                    });
                }
                Ok(Ok(response)) => response,
            };
            self.count(registry, method, response.status().as_str());
            if hop == 0 {
                self.record_ratelimit(registry, response.headers());
            }
            let location = response.headers().get(header::LOCATION);
            if !response.status().is_redirection() || location.is_none() {
                return Ok(response);
            }
            let location = location.and_then(|l| l.to_str().ok()).unwrap_or_default();
            url = url.join(location).map_err(|_| Error::BadResponse {
                registry: registry.to_owned(),
                message: "invalid redirect location".into(),
            })?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(Error::BadResponse {
                    registry: registry.to_owned(),
                    message: "redirect to a non-http url".into(),
                });
            }
        }
        Err(Error::Redirects {
            registry: registry.to_owned(),
        })
    }

    fn endpoint(&self, registry: &str) -> Result<(reqwest::Url, Option<&Credentials>)> {
        if let Some(config) = self.registries.get(registry) {
            return Ok((config.url.clone(), config.credentials.as_ref()));
        }
        if self.allow_any_upstream {
            let url = format!("https://{registry}/")
                .parse()
                .map_err(|_| Error::UnknownRegistry(registry.to_owned()))?;
            self.check(registry, &url)?;
            return Ok((url, None));
        }
        Err(Error::UnknownRegistry(registry.to_owned()))
    }

    /// The port and IP-literal rules for a URL of an unconfigured registry
    /// (names are checked by the resolver, on the addresses connected to).
    fn check(&self, registry: &str, url: &reqwest::Url) -> Result<()> {
        guard::check_url(url, &self.any_ports).map_err(|rule| self.refuse(registry, rule))
    }

    /// The token service an unconfigured registry names is held to the same
    /// rules as the registry (the resolver sees its name, not an IP literal
    /// or its port). A realm that is not a URL fails later, as before.
    fn check_realm(&self, registry: &str, challenge: &Challenge) -> Result<()> {
        match challenge {
            Challenge::Bearer { realm, .. } => match realm.parse::<reqwest::Url>() {
                Ok(realm) => self.check(registry, &realm),
                Err(_) => Ok(()),
            },
            Challenge::Basic => Ok(()),
        }
    }

    /// Accounts for what the token exchange ran into: a 429 (the login
    /// endpoint's own limit: counted as `kind="login"` and backed off like
    /// any 429) or a refusal (the guarded resolver refused the realm's
    /// host name). The error passes unchanged.
    fn tally(&self, e: Error) -> Error {
        if let Error::TooManyRequests {
            registry,
            retry_after,
        } = &e
        {
            // Only the token endpoint answers here: its own (login) limit.
            self.metrics
                .upstream_throttled
                .with_label_values(&[self.label(registry), "login"])
                .inc();
            self.health
                .record(registry, health::Verdict::RateLimited(*retry_after));
        }
        if let Error::Refused { registry, rule } = &e {
            tracing::warn!(
                registry,
                rule = rule.as_str(),
                "upstream token service not allowed"
            );
            self.metrics
                .upstream_refused
                .with_label_values(&[rule.as_str()])
                .inc();
        }
        e
    }

    /// A refused destination, counted by rule (never by host: the client
    /// chose it, so the label would be unbounded).
    fn refuse(&self, registry: &str, rule: Rule) -> Error {
        // The client's 403 does not reach the operator's log otherwise.
        tracing::warn!(
            registry,
            rule = rule.as_str(),
            "upstream destination not allowed"
        );
        self.metrics
            .upstream_refused
            .with_label_values(&[rule.as_str()])
            .inc();
        Error::Refused {
            registry: registry.to_owned(),
            rule,
        }
    }

    fn count(&self, registry: &str, method: &Method, status: &str) {
        self.metrics
            .upstream_requests
            .with_label_values(&[self.label(registry), method.as_str(), status])
            .inc();
    }

    /// Tells the health tracker what a request showed of the registry.
    fn judge(&self, registry: &str, sent: Result<reqwest::Response>) -> Result<reqwest::Response> {
        let verdict = match &sent {
            Err(Error::Connect { .. } | Error::Timeout { .. }) => health::Verdict::Failed,
            Err(_) => health::Verdict::Answered,
            Ok(r) if r.status() == StatusCode::TOO_MANY_REQUESTS => {
                health::Verdict::RateLimited(ratelimit::retry_after(r.headers()))
            }
            Ok(r) if r.status().is_server_error() => health::Verdict::Failed,
            Ok(_) => health::Verdict::Answered,
        };
        self.health.record(registry, verdict);
        self.metrics
            .circuit_open
            .with_label_values(&[self.label(registry)])
            .set(self.health.is_open(registry) as i64);
        sent
    }

    fn record_ratelimit(&self, registry: &str, headers: &HeaderMap) {
        if let Some(remaining) = ratelimit::parse(headers, "ratelimit-remaining") {
            self.health.observe_remaining(registry, remaining);
            self.metrics
                .ratelimit_remaining
                .with_label_values(&[self.label(registry)])
                .set(remaining);
        }
        if let Some(limit) = ratelimit::parse(headers, "ratelimit-limit") {
            self.metrics
                .ratelimit_limit
                .with_label_values(&[self.label(registry)])
                .set(limit);
        }
        let window = ratelimit::window(headers, "ratelimit-limit")
            .or_else(|| ratelimit::window(headers, "ratelimit-remaining"));
        self.health.observe_limit(
            registry,
            ratelimit::parse(headers, "ratelimit-limit"),
            window,
        );
        if let Some(window) = window {
            self.metrics
                .ratelimit_window
                .with_label_values(&[self.label(registry)])
                .set(window);
        }
    }

    async fn status_error(&self, registry: &str, response: reqwest::Response) -> Error {
        let status = response.status();
        let retry_after = ratelimit::retry_after(response.headers());
        let headers = response.headers().clone();
        let envelope = read_bounded(response, MAX_ERROR_BODY, self.stall_timeout)
            .await
            .ok()
            .and_then(|body| parse_envelope(&body));
        if status == StatusCode::TOO_MANY_REQUESTS {
            let kind = ratelimit::Throttle::of(&headers, envelope.as_ref());
            self.metrics
                .upstream_throttled
                .with_label_values(&[self.label(registry), kind.as_str()])
                .inc();
            tracing::warn!(registry, kind = kind.as_str(), retry_after = ?retry_after, "upstream rate limit");
        }
        let registry = registry.to_owned();
        match status {
            StatusCode::NOT_FOUND => Error::NotFound { registry },
            StatusCode::UNAUTHORIZED => Error::Unauthorized { registry, envelope },
            StatusCode::FORBIDDEN => Error::Denied { registry, envelope },
            StatusCode::TOO_MANY_REQUESTS => Error::TooManyRequests {
                registry,
                retry_after,
            },
            _ => Error::Status {
                registry,
                status: status.as_u16(),
                envelope,
            },
        }
    }
}

fn header_string(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn content_digest(headers: &HeaderMap) -> Option<Digest> {
    headers
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Digest::parse(v.trim()).ok())
}

/// Why a buffered body could not be read.
pub(crate) enum ReadError {
    TooLarge,
    Stalled,
    Broken(String),
}

/// Whether `response` refuses the login itself, so that new credentials
/// could help: a 403 from the registry (ECR says so of an expired token),
/// or a 401 after its challenge was answered (`answered`). Not a 403 from
/// a redirect's target (a blob store's signed URL), nor a 401 saying the
/// token lacks the scope (a repository missing or not readable: Docker Hub
/// answers that for both).
fn refuses_login(response: &reqwest::Response, asked: &reqwest::Url, answered: bool) -> bool {
    let from_registry = response.url().origin() == asked.origin();
    match response.status() {
        StatusCode::FORBIDDEN => from_registry,
        StatusCode::UNAUTHORIZED => {
            answered
                && from_registry
                && !challenges(response.headers()).any(auth::insufficient_scope)
        }
        _ => false,
    }
}

/// The `WWW-Authenticate` values of an answer.
fn challenges(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
}

/// Reads a whole (small) body, refusing more than `limit` bytes and giving
/// up if nothing arrives for `stall`.
pub(crate) async fn read_bounded(
    mut response: reqwest::Response,
    limit: u64,
    stall: Duration,
) -> std::result::Result<Bytes, ReadError> {
    let mut body = Vec::new();
    loop {
        let chunk = tokio::time::timeout(stall, response.chunk())
            .await
            .map_err(|_| ReadError::Stalled)?
            .map_err(|e| ReadError::Broken(e.without_url().to_string()))?;
        let Some(chunk) = chunk else {
            return Ok(body.into());
        };
        if (body.len() + chunk.len()) as u64 > limit {
            return Err(ReadError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
}

/// The first error of a registry error body.
fn parse_envelope(body: &[u8]) -> Option<Envelope> {
    #[derive(serde::Deserialize)]
    struct Body {
        errors: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        code: String,
        #[serde(default)]
        message: String,
    }
    let body: Body = serde_json::from_slice(body).ok()?;
    let first = body.errors.into_iter().next()?;
    Some(Envelope {
        code: first.code,
        message: first.message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A client with `allow_any_upstream` and these ports.
    fn client(any_ports: Vec<u16>) -> Client {
        let args = crate::config::ServeArgs {
            allow_any_upstream: Some(true),
            any_ports,
            ..Default::default()
        };
        let config = crate::config::Config::load(&args, []).unwrap();
        Client::new(&config.upstream, Arc::new(Metrics::new())).unwrap()
    }

    /// A server on 127.0.0.1 answering each connection's first request with
    /// `head`; counts connections.
    async fn answering(head: String) -> (u16, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let head = head.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = stream.read(&mut buf).await;
                    let _ = stream.write_all(head.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        (port, seen)
    }

    fn redirect_to(location: &str) -> String {
        format!(
            "HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
    }

    #[tokio::test]
    async fn redirects_of_unconfigured_registries_to_internal_places_are_refused() {
        // Nothing is sent to these: each is refused before connecting
        // (IP literal and port by `check`, `localhost` by the resolver).
        for (location, rule) in [
            ("http://169.254.169.254/latest/meta-data/", Rule::LinkLocal),
            ("http://[::ffff:10.0.0.1]/", Rule::Private),
            ("http://localhost/", Rule::Loopback),
            ("https://registry.example:8443/", Rule::Port),
        ] {
            let (port, seen) = answering(redirect_to(location)).await;
            let c = client(vec![80, 443]);
            // The first hop is the caller's (`endpoint` checks it); a
            // loopback one stands in for a public registry here.
            let url = format!("http://127.0.0.1:{port}/v2/").parse().unwrap();
            let e = c
                .follow(&c.guarded, true, "r.example", &Method::GET, url, &[], None)
                .await
                .unwrap_err();
            assert!(
                matches!(e, Error::Refused { rule: r, .. } if r == rule),
                "{location}: {e:?}"
            );
            assert_eq!(seen.load(Ordering::SeqCst), 1, "{location}");
            assert_eq!(
                c.metrics
                    .upstream_refused
                    .with_label_values(&[rule.as_str()])
                    .get(),
                1
            );
        }
    }

    #[tokio::test]
    async fn redirects_of_configured_registries_are_followed_anywhere() {
        let (target, reached) =
            answering("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".into()).await;
        let (port, _) = answering(redirect_to(&format!("http://127.0.0.1:{target}/"))).await;
        let c = client(vec![80, 443]);
        let url = format!("http://127.0.0.1:{port}/v2/").parse().unwrap();
        let r = c
            .follow(&c.http, false, "docker.io", &Method::GET, url, &[], None)
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(reached.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn token_realms_of_unconfigured_registries_are_checked() {
        let c = client(vec![80, 443]);
        let challenge = |realm: &str| {
            Challenge::parse(&format!(r#"Bearer realm="{realm}",service="s""#)).unwrap()
        };
        assert!(matches!(
            c.check_realm("r.example", &challenge("http://169.254.169.254/token")),
            Err(Error::Refused {
                rule: Rule::LinkLocal,
                ..
            })
        ));
        assert!(matches!(
            c.check_realm("r.example", &challenge("https://auth.example:5001/token")),
            Err(Error::Refused {
                rule: Rule::Port,
                ..
            })
        ));
        assert!(c
            .check_realm("r.example", &challenge("https://auth.example/token"))
            .is_ok());
        assert!(c.check_realm("r.example", &Challenge::Basic).is_ok());
    }

    #[tokio::test]
    async fn a_token_realm_resolving_to_loopback_is_refused() {
        let (port, seen) = answering("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}".into()).await;
        let c = client(vec![port]);
        let challenge = Challenge::parse(&format!(
            r#"Bearer realm="http://localhost:{port}/token",service="s""#
        ))
        .unwrap();
        c.check_realm("r.example", &challenge).unwrap();
        let e = c
            .auth
            .answer(
                &c.guarded,
                "r.example",
                None,
                &challenge,
                "repository:x:pull",
            )
            .await
            .map_err(|e| c.tally(e))
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::Refused {
                    rule: Rule::Loopback,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(seen.load(Ordering::SeqCst), 0);
        assert_eq!(
            c.metrics
                .upstream_refused
                .with_label_values(&["loopback"])
                .get(),
            1
        );
    }

    #[test]
    fn unconfigured_hosts_are_checked_before_anything_is_sent() {
        let c = client(vec![443, 5000]);
        for (host, rule) in [
            ("127.0.0.1:5000", Some(Rule::Loopback)),
            ("[::1]:5000", Some(Rule::Loopback)),
            ("10.1.2.3", Some(Rule::Private)),
            ("169.254.169.254", Some(Rule::LinkLocal)),
            ("registry.example:22", Some(Rule::Port)),
            ("registry.example:5000", None),
            ("registry.example", None),
        ] {
            match (c.endpoint(host), rule) {
                (Err(Error::Refused { rule: got, .. }), Some(rule)) => assert_eq!(got, rule),
                (Ok(_), None) => {}
                (other, _) => panic!("{host}: {:?}", other.map(|(url, _)| url)),
            }
        }
    }

    #[test]
    fn envelope_is_read_from_error_bodies() {
        let body =
            br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{}}]}"#;
        assert_eq!(
            parse_envelope(body),
            Some(Envelope {
                code: "MANIFEST_UNKNOWN".into(),
                message: "manifest unknown".into()
            })
        );
        assert_eq!(parse_envelope(b"<html>"), None);
        assert_eq!(parse_envelope(br#"{"errors":[]}"#), None);
    }
}
