//! Prometheus metrics. One `Metrics` per server (tests run several side by
//! side), each with its own registry. Labels stay bounded: kinds, outcomes,
//! configured registry hosts and status codes, never repositories or digests.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric hoard exports.
pub struct Metrics {
    registry: Registry,
    /// `hoard_cache_requests_total{kind,result}`: lookups by outcome.
    pub cache_requests: IntCounterVec,
    /// `hoard_referrers_requests_total{result}`: referrers list lookups by
    /// how they ended (a cache outcome, `not_found` or `error`).
    pub referrers_requests: IntCounterVec,
    /// `hoard_served_bytes_total{source}`: body bytes sent to clients.
    pub served_bytes: IntCounterVec,
    /// `hoard_upstream_requests_total{registry,method,status}`.
    pub upstream_requests: IntCounterVec,
    /// `hoard_upstream_refused_total{reason}`: destinations of unconfigured
    /// registries refused (internal address, port); nothing was sent.
    pub upstream_refused: IntCounterVec,
    /// `hoard_upstream_ratelimit_remaining{registry}` from `ratelimit-remaining`.
    pub ratelimit_remaining: IntGaugeVec,
    /// `hoard_upstream_ratelimit_limit{registry}` from `ratelimit-limit`.
    pub ratelimit_limit: IntGaugeVec,
    /// `hoard_upstream_ratelimit_window_seconds{registry}`: the window the
    /// limit counts over (`;w=`, 21600 on Docker Hub).
    pub ratelimit_window: IntGaugeVec,
    /// `hoard_upstream_throttled_total{registry,kind}`: 429s by limit,
    /// `pull_limit` (the window's quota) or `abuse` (a bare 429).
    pub upstream_throttled: IntCounterVec,
    /// `hoard_upstream_pulls_saved_total{registry}`: client manifest GETs
    /// answered without an upstream GET, each one a pull that would have
    /// counted against the registry's limit.
    pub pulls_saved: IntCounterVec,
    /// `hoard_http_deadline_exceeded_total`: requests answered 503 because
    /// their response was not ready within `limits.response_deadline`.
    pub deadline_exceeded: IntCounter,
    /// `hoard_upstream_circuit_open{registry}`: 1 while a failing upstream
    /// is not contacted.
    pub circuit_open: IntGaugeVec,
    /// `hoard_credential_helper_runs_total{registry,result}`: runs of Docker
    /// credential helpers (`ok`, `not_found`, `failed`, `timeout`); only
    /// configured hosts have helpers, so `registry` is bounded.
    pub credential_helper_runs: IntCounterVec,
    /// `hoard_store_bytes`: size of the committed blobs.
    pub store_bytes: IntGauge,
    /// `hoard_store_max_bytes`: the size limit eviction keeps the store under.
    pub store_max_bytes: IntGauge,
    /// `hoard_evicted_blobs_total`: blobs and manifests removed by eviction.
    pub evicted_blobs: IntCounter,
    /// `hoard_evicted_bytes_total`: bytes freed by eviction.
    pub evicted_bytes: IntCounter,
    /// `hoard_store_bypassed_total`: blobs relayed without caching because
    /// the disk was nearly full.
    pub store_bypassed: IntCounter,
    /// `hoard_store_write_errors_total`: downloads that could not be written
    /// (disk full, I/O errors); their clients were served from upstream.
    pub store_write_errors: IntCounter,
    /// `hoard_sendfile_bytes_total`: blob bytes sent from the page cache
    /// with `sendfile` (plain HTTP/1), never copied through hoard.
    pub sendfile_bytes: IntCounter,
    /// `hoard_inflight_fetches`: upstream downloads running now.
    pub inflight_fetches: IntGauge,
    /// `hoard_digest_mismatches_total`: upstream content that failed verification.
    pub digest_mismatches: IntCounter,
    /// `hoard_http_requests_total{method,status}`: client requests answered.
    pub http_requests: IntCounterVec,
    /// `hoard_http_request_duration_seconds{route}`: time to the response head.
    pub http_duration: HistogramVec,
    /// `hoard_upstream_fetch_duration_seconds`: time to fill a blob.
    pub fetch_duration: Histogram,
    /// `hoard_bucket_uploads_total{result}`: copies of upstream downloads
    /// to the shared bucket: ok, abandoned (the download failed), error.
    pub bucket_uploads: IntCounterVec,
    /// `hoard_peer_requests_total{result}`: misses forwarded to the replica
    /// that owns them: ok, error (it answered an error), unreachable.
    pub peer_requests: IntCounterVec,
    /// `hoard_bucket_redirects_total`: blob GETs answered with a redirect
    /// to the bucket (`store.s3.redirect`).
    pub bucket_redirects: IntCounter,
    /// `hoard_bucket_bytes`: bytes in the shared bucket, as the last GC
    /// pass listed them (set by the replica that holds the GC lease).
    pub bucket_bytes: IntGauge,
    /// `hoard_bucket_gc_leader`: 1 on the replica holding the bucket's GC
    /// lease, 0 on the others.
    pub bucket_gc_leader: IntGauge,
    /// `hoard_bucket_request_duration_seconds{op}` and
    /// `hoard_bucket_errors_total{op}`: the object store's latency and
    /// failures, by operation.
    pub bucket_duration: HistogramVec,
    pub bucket_errors: IntCounterVec,
    /// `hoard_blob_ranges_total{source}`: `Range` requests on blobs by where
    /// the bytes came from: cache (stored), download (a download running
    /// here had or soon had them), upstream (forwarded as a range).
    pub blob_ranges: IntCounterVec,
    /// `hoard_upstream_resumes_total{result}`: attempts to resume a cut or
    /// stalled upstream blob body: resumed (`206` from the next byte),
    /// reread (upstream sent it all again, the repeated bytes matched),
    /// changed (the repeated bytes differed: the download failed), failed
    /// (the attempt got no body).
    pub upstream_resumes: IntCounterVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let cache_requests = counter_vec(
            "hoard_cache_requests_total",
            "Manifest and blob lookups by cache outcome.",
            &["kind", "result"],
        );
        let referrers_requests = counter_vec(
            "hoard_referrers_requests_total",
            "Referrers list lookups (OCI 1.1) by result: hit, miss, revalidated, stale, coalesced, not_found (upstream has no referrers API), error.",
            &["result"],
        );
        let served_bytes = counter_vec(
            "hoard_served_bytes_total",
            "Body bytes sent to clients, from the local store or streamed from upstream.",
            &["source"],
        );
        let upstream_requests = counter_vec(
            "hoard_upstream_requests_total",
            "Requests sent to upstream registries by status (or error kind).",
            &["registry", "method", "status"],
        );
        let upstream_refused = counter_vec(
            "hoard_upstream_refused_total",
            "Upstream destinations refused by the allow_any_upstream rules, by rule.",
            &["reason"],
        );
        let ratelimit_remaining = gauge_vec(
            "hoard_upstream_ratelimit_remaining",
            "Last ratelimit-remaining header seen from each upstream registry.",
            &["registry"],
        );
        let ratelimit_limit = gauge_vec(
            "hoard_upstream_ratelimit_limit",
            "Last ratelimit-limit header seen from each upstream registry.",
            &["registry"],
        );
        let ratelimit_window = gauge_vec(
            "hoard_upstream_ratelimit_window_seconds",
            "The window the upstream's rate limit counts over (the ;w= of ratelimit-limit).",
            &["registry"],
        );
        let credential_helper_runs = counter_vec(
            "hoard_credential_helper_runs_total",
            "Runs of Docker credential helpers by outcome.",
            &["registry", "result"],
        );
        let circuit_open = gauge_vec(
            "hoard_upstream_circuit_open",
            "1 while an upstream that kept failing is not contacted (circuit breaker open).",
            &["registry"],
        );
        let store_bytes = gauge(
            "hoard_store_bytes",
            "Bytes of verified content in the store.",
        );
        let store_max_bytes = gauge(
            "hoard_store_max_bytes",
            "Size limit of the store; least recently used blobs are evicted above it.",
        );
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let evicted_blobs = counter(
            "hoard_evicted_blobs_total",
            "Blobs and manifests removed by eviction.",
        );
        let evicted_bytes = counter("hoard_evicted_bytes_total", "Bytes freed by eviction.");
        let sendfile_bytes = counter(
            "hoard_sendfile_bytes_total",
            "Blob bytes sent from the page cache with sendfile (plain HTTP/1), without a copy through hoard.",
        );
        let store_write_errors = counter(
            "hoard_store_write_errors_total",
            "Downloads that could not be written to the store (disk full, I/O errors).",
        );
        let store_bypassed = counter(
            "hoard_store_bypassed_total",
            "Blobs relayed to a client without caching because the disk was nearly full.",
        );
        let inflight_fetches = gauge(
            "hoard_inflight_fetches",
            "Upstream blob downloads in progress.",
        );
        let digest_mismatches = counter(
            "hoard_digest_mismatches_total",
            "Upstream content discarded because its sha256 did not match.",
        );
        let http_requests = counter_vec(
            "hoard_http_requests_total",
            "Client requests by method and response status.",
            &["method", "status"],
        );
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "hoard_http_request_duration_seconds",
                "Time from request to response head, by route.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
            &["route"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(http_duration.clone()))
            .expect("unique metric");
        let fetch_duration = Histogram::with_opts(
            HistogramOpts::new(
                "hoard_upstream_fetch_duration_seconds",
                "Time to download and verify a blob from upstream.",
            )
            .buckets(vec![
                0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]),
        )
        .expect("valid metric");
        registry
            .register(Box::new(fetch_duration.clone()))
            .expect("unique metric");
        let bucket_uploads = counter_vec(
            "hoard_bucket_uploads_total",
            "Upstream downloads copied to the shared bucket, by result (ok, abandoned, error).",
            &["result"],
        );
        let peer_requests = counter_vec(
            "hoard_peer_requests_total",
            "Misses forwarded to the replica that owns them, by result (ok, error, unreachable).",
            &["result"],
        );
        let bucket_redirects = counter(
            "hoard_bucket_redirects_total",
            "Blob GETs answered with a redirect to a presigned bucket URL.",
        );
        let bucket_bytes = gauge(
            "hoard_bucket_bytes",
            "Bytes in the shared bucket at the last GC pass (on the replica holding the GC lease).",
        );
        let bucket_gc_leader = gauge(
            "hoard_bucket_gc_leader",
            "1 on the replica that holds the shared bucket's GC lease, 0 on the others.",
        );
        let bucket_duration = HistogramVec::new(
            HistogramOpts::new(
                "hoard_bucket_request_duration_seconds",
                "Object store requests by operation, time to the answer's head.",
            )
            .buckets(vec![
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["op"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(bucket_duration.clone()))
            .expect("unique metric");
        let bucket_errors = counter_vec(
            "hoard_bucket_errors_total",
            "Object store requests that failed (5xx, timeouts, refused), by operation.",
            &["op"],
        );
        let upstream_throttled = counter_vec(
            "hoard_upstream_throttled_total",
            "429 answers from upstreams by limit: pull_limit (the window's quota is spent) or abuse (a bare 429).",
            &["registry", "kind"],
        );
        let pulls_saved = counter_vec(
            "hoard_upstream_pulls_saved_total",
            "Client manifest GETs answered without an upstream GET: pulls that would have counted against the upstream's limit.",
            &["registry"],
        );
        let deadline_exceeded = counter(
            "hoard_http_deadline_exceeded_total",
            "Requests answered 503 because their response was not ready within limits.response_deadline.",
        );
        let blob_ranges = counter_vec(
            "hoard_blob_ranges_total",
            "Range requests on blobs by where the bytes came from (cache, download, upstream).",
            &["source"],
        );
        let upstream_resumes = counter_vec(
            "hoard_upstream_resumes_total",
            "Attempts to resume a cut upstream blob body, by result (resumed, reread, changed, failed).",
            &["result"],
        );
        for source in ["cache", "download", "upstream"] {
            blob_ranges.with_label_values(&[source]);
        }
        for result in ["resumed", "reread", "changed", "failed"] {
            upstream_resumes.with_label_values(&[result]);
        }
        // Series that exist from the start, so rates and ratios are defined
        // before the first request.
        for kind in ["manifest", "blob"] {
            for result in ["hit", "miss", "revalidated", "stale", "coalesced"] {
                cache_requests.with_label_values(&[kind, result]);
            }
        }
        for source in ["cache", "upstream"] {
            served_bytes.with_label_values(&[source]);
        }
        for result in [
            "hit",
            "miss",
            "revalidated",
            "stale",
            "coalesced",
            "not_found",
            "error",
        ] {
            referrers_requests.with_label_values(&[result]);
        }
        Metrics {
            registry,
            cache_requests,
            referrers_requests,
            served_bytes,
            upstream_requests,
            upstream_refused,
            ratelimit_remaining,
            ratelimit_limit,
            ratelimit_window,
            upstream_throttled,
            pulls_saved,
            deadline_exceeded,
            circuit_open,
            credential_helper_runs,
            store_bytes,
            store_max_bytes,
            evicted_blobs,
            evicted_bytes,
            store_bypassed,
            store_write_errors,
            sendfile_bytes,
            inflight_fetches,
            digest_mismatches,
            http_requests,
            http_duration,
            fetch_duration,
            bucket_uploads,
            peer_requests,
            bucket_redirects,
            bucket_bytes,
            bucket_gc_leader,
            bucket_duration,
            bucket_errors,
            blob_ranges,
            upstream_resumes,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding never fails");
        String::from_utf8(out).expect("prometheus text is utf-8")
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}
