//! The pull-through policy: what is served from the store, what is fetched
//! from upstream, when a tag is revalidated, when stale content is served,
//! and that each missing object is fetched once however many ask at once.
//! The only module that calls both `store` and `upstream`.
//!
//! - Digest-addressed content (blobs, manifests by digest) is immutable:
//!   once verified locally it is served without asking upstream.
//! - Tags are served from the index inside their TTL, then revalidated with
//!   a `HEAD` (free on Docker Hub) and re-fetched only if the digest moved.
//!   On upstream 5xx, 429 or timeout a cached tag is served stale; on 404,
//!   never.
//! - Content cached for one repository is served to another only after
//!   upstream confirms that repository has it (no cross-repository leaks).
//!
//! This file is the facade the registry calls; `shared` is the state every
//! part shares. Each policy has its own file: `blob` (blobs, and their
//! downloads: `fills` is their single-flight, `fill` one download, `stream`
//! sends the bytes), `manifest`, `tag_list`, `referrers` (OCI 1.1 referrers
//! lists, cached like tags); `flight` is single-flight for
//! small lookups, `evict` keeps the size limit, `catalog` lists, pins and
//! removes whole images.

mod accept;
mod blob;
mod caller;
pub mod catalog;
mod error;
mod evict;
mod fill;
mod fills;
mod fleet;
mod flight;
mod lazy;
mod manifest;
mod outcome;
mod referrers;
mod resume;
mod shared;
mod status;
mod stream;
mod tag_list;
mod upload;

use std::sync::Arc;
use std::time::Duration;

pub use accept::Accept;
pub use blob::Blob;
pub use caller::{Caller, CHECKED_AT_HEADER};
pub use error::{Error, Result, UpstreamFailure};
pub use lazy::{Ranged, Relayed};
pub use manifest::Manifest;
pub use outcome::Outcome;
pub use referrers::Referrers;
pub use status::{Download, StoreUsage};
// The upstream's words the registry layer answers with, named here so that
// `registry` names no `upstream` item: why a destination was refused or
// unreachable, how a registry is doing, and an HTTP client error's causes.
/// Stored content, as `Chunk::File` hands it out.
pub use crate::store::BlobReader;
pub use crate::upstream::{describe_error, Cause, Condition, RegistryHealth, Rule};
pub use stream::{ByteStream, Chunk, Damage, Piece, CHUNK, CLIENT_STALL};
pub use tag_list::TagList;

use crate::cluster::Cluster;
use crate::config::{StoreConfig, UpstreamConfig};
use crate::metrics::Metrics;
use crate::ranges::Ranges;
use crate::reference::{Digest, Reference, Repository};
use crate::store::{self, Bucket, Store};
use crate::upstream;
use shared::Shared;

/// The mirror, shared by every request (cheap to clone).
#[derive(Clone)]
pub struct Mirror {
    shared: Arc<Shared>,
}

impl Mirror {
    /// A mirror over `store` (and the shared `bucket`, if any) and
    /// `upstream`, with the store's settings and the tag TTLs.
    pub fn new(
        config: StoreConfig,
        upstream_config: &UpstreamConfig,
        store: Arc<Store>,
        bucket: Option<Arc<Bucket>>,
        cluster: Option<Arc<Cluster>>,
        upstream: upstream::Client,
        metrics: Arc<Metrics>,
    ) -> Mirror {
        let max = config.max_bytes.unwrap_or_else(|| {
            // 80% of what is free at start, plus what the store already holds.
            let free = store.available_space().unwrap_or(0);
            (free as f64 * 0.8) as u64 + store.size_bytes()
        });
        store.report_size_to(metrics.store_bytes.clone());
        metrics.store_max_bytes.set(max as i64);
        if let Some(bucket) = &bucket {
            bucket.report_to(
                metrics.bucket_duration.clone(),
                metrics.bucket_errors.clone(),
            );
            upload::spawn_sweeper(Arc::downgrade(bucket));
        }
        let fills = fills::Fills::new(metrics.inflight_fetches.clone());
        let shared = Arc::new(Shared {
            store,
            bucket,
            cluster,
            upstream,
            config,
            tag_ttl: upstream_config.tag_ttl.clone(),
            resume_attempts: upstream_config.resume_attempts,
            range_fill: upstream_config.range_fill,
            metrics,
            hot: manifest::hot_cache(),
            tag_lists: tag_list::cache(),
            digest_pulls: fleet::digest_pulls(),
            manifest_flights: Arc::default(),
            referrer_flights: Arc::default(),
            fills,
            uploads: Arc::default(),
            limits: evict::Limits { max },
            evict_wake: Arc::default(),
        });
        evict::spawn(&shared);
        evict::check(&shared);
        fleet::spawn_gc(&shared);
        Mirror { shared }
    }

    /// Cached tags (the admin API's list), optionally of one registry.
    pub async fn images(&self, registry: Option<String>) -> Result<Vec<catalog::CachedImage>> {
        if self.shared.bucket.is_some() {
            // The fleet's images: what any replica cached.
            return fleet::images(&self.shared, registry.as_deref()).await;
        }
        let shared = self.shared.clone();
        let images = tokio::task::spawn_blocking(move || {
            catalog::images(&shared.store, &shared.config.pins, registry.as_deref())
        })
        .await??;
        Ok(images)
    }

    /// Every pin, from the config file and added at run time.
    pub fn pins(&self) -> Vec<String> {
        catalog::all_pins(&self.shared.store, &self.shared.config.pins)
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    /// Pins an image (durable); true if it was not pinned yet.
    pub async fn pin(&self, image: &crate::reference::ImageRef) -> Result<bool> {
        if let Some(bucket) = &self.shared.bucket {
            // For the fleet: the bucket's GC keeps what any replica pinned.
            bucket.add_pin(&image.to_string()).await?;
        }
        Ok(self.shared.store.add_pin(&image.to_string())?)
    }

    /// Removes a run-time pin; true if there was one. Pins from the config
    /// file stay until the file changes.
    pub async fn unpin(&self, image: &crate::reference::ImageRef) -> Result<bool> {
        if let Some(bucket) = &self.shared.bucket {
            bucket.remove_pin(&image.to_string()).await?;
        }
        Ok(self.shared.store.remove_pin(&image.to_string())?)
    }

    /// Removes one image from the store (pinned content stays).
    pub async fn evict_image(&self, image: &crate::reference::ImageRef) -> Result<store::Evicted> {
        let shared = self.shared.clone();
        let image = image.clone();
        let evicted = tokio::task::spawn_blocking(move || {
            catalog::evict_image(&shared.store, &shared.config.pins, &image)
        })
        .await??;
        evict::forget(&self.shared, &evicted);
        Ok(evicted)
    }

    /// Re-hashes every stored blob; mismatches are quarantined and dropped
    /// from the index (a reader that has one open finishes its transfer).
    pub async fn verify(&self) -> Result<store::VerifyReport> {
        let store = self.shared.store.clone();
        let mut report = tokio::task::spawn_blocking(move || store.verify(|_, _| {})).await??;
        for digest in &report.quarantined {
            self.shared.hot.invalidate(digest);
        }
        if self.shared.bucket.is_some() {
            let fleet = fleet::verify(&self.shared).await?;
            report.checked += fleet.checked;
            report.bytes += fleet.bytes;
            report.quarantined.extend(fleet.quarantined);
        }
        Ok(report)
    }

    /// Removes blobs no manifest names; with a bucket, also runs a pass of
    /// the bucket's GC (whoever holds its lease: a pass is safe to run
    /// twice, the lease only saves the work).
    pub async fn gc(&self) -> Result<store::GcReport> {
        let store = self.shared.store.clone();
        let mut report = tokio::task::spawn_blocking(move || store.gc()).await??;
        if self.shared.bucket.is_some() {
            let fleet = fleet::pass(&self.shared).await?;
            report.blobs += fleet.blobs;
            report.bytes += fleet.bytes;
        }
        Ok(report)
    }

    /// The manifest `reference` of `repo`, as the client's `accept` allows.
    pub async fn manifest(
        &self,
        repo: &Repository,
        reference: &Reference,
        accept: &Accept,
        caller: &Caller,
    ) -> Result<(Arc<Manifest>, Outcome)> {
        self.shared.check_registry(repo)?;
        self.shared.check_loop(caller)?;
        let result = manifest::lookup(&self.shared, repo, reference, accept, caller).await;
        if let Ok((_, outcome)) = &result {
            self.shared.count("manifest", *outcome);
        }
        result
    }

    /// A blob of `repo`, from the store or streaming in from upstream.
    pub async fn blob(&self, repo: &Repository, digest: &Digest, caller: &Caller) -> Result<Blob> {
        self.shared.check_registry(repo)?;
        self.shared.check_loop(caller)?;
        let blob = blob::lookup(&self.shared, repo, digest, caller).await?;
        self.shared.count("blob", blob.outcome);
        Ok(blob)
    }

    /// A blob asked for by `Range` (`header` as the client sent it): served
    /// from here when the bytes are here or due soon, else upstream's
    /// partial answer relayed while the whole blob downloads (see `lazy`).
    pub async fn blob_range(
        &self,
        repo: &Repository,
        digest: &Digest,
        caller: &Caller,
        ranges: &Ranges,
        header: &str,
    ) -> Result<Ranged> {
        self.shared.check_registry(repo)?;
        self.shared.check_loop(caller)?;
        let ranged = lazy::lookup(&self.shared, repo, digest, caller, ranges, header).await?;
        let outcome = match &ranged {
            Ranged::Here(blob) => blob.outcome,
            Ranged::Relayed(_) => Outcome::Miss,
        };
        self.shared.count("blob", outcome);
        Ok(ranged)
    }

    /// With `store.s3.redirect`, a presigned bucket URL to send the client
    /// to instead of the bytes (`None`: serve them, see `blob`).
    pub async fn blob_redirect(
        &self,
        repo: &Repository,
        digest: &Digest,
        caller: &Caller,
    ) -> Result<Option<reqwest::Url>> {
        self.shared.check_registry(repo)?;
        let url = blob::redirect(&self.shared, repo, digest, caller).await?;
        if url.is_some() {
            self.shared.count("blob", Outcome::Hit);
            self.shared.metrics.bucket_redirects.inc();
        }
        Ok(url)
    }

    /// A blob's length for a `HEAD`, without downloading it.
    pub async fn blob_head(
        &self,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<(Option<u64>, Outcome)> {
        self.shared.check_registry(repo)?;
        let (len, outcome) = blob::head(&self.shared, repo, digest).await?;
        self.shared.count("blob", outcome);
        Ok((len, outcome))
    }

    /// `registry` as a metric label (bounded: see `upstream::Client::label`).
    pub fn registry_label<'a>(&self, registry: &'a str) -> &'a str {
        self.shared.upstream.label(registry)
    }

    /// When upstream last confirmed `repo:tag` (unix ms), as recorded here:
    /// what a replica tells the replica it served the tag to.
    pub fn tag_checked_at(&self, repo: &Repository, tag: &str) -> Option<u64> {
        self.shared
            .store
            .tag(repo, tag)
            .ok()
            .flatten()
            .map(|record| record.checked_at_ms)
    }

    /// A tag list page of `repo` (`query` is the client's `n`/`last`),
    /// proxied with a short cache; from the index when upstream is down.
    pub async fn tags(&self, repo: &Repository, query: &str) -> Result<(TagList, Outcome)> {
        self.shared.check_registry(repo)?;
        tag_list::lookup(&self.shared, repo, query).await
    }

    /// The referrers list of `subject` in `repo` (OCI 1.1), filtered on
    /// `artifact_type` when given; cached like a tag.
    pub async fn referrers(
        &self,
        repo: &Repository,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<(Referrers, Outcome)> {
        self.shared.check_registry(repo)?;
        let result = referrers::lookup(&self.shared, repo, subject, artifact_type).await;
        let label = match &result {
            Ok((_, outcome)) => outcome.as_str(),
            Err(Error::ReferrersUnknown { .. }) => "not_found",
            Err(_) => "error",
        };
        self.shared
            .metrics
            .referrers_requests
            .with_label_values(&[label])
            .inc();
        result
    }

    /// Waits (at most `limit`) for blob downloads in progress, and their
    /// copies to the bucket, to end, so a shutdown does not throw away work
    /// a moment from done; cancels the rest (their temp files are deleted,
    /// never promoted; an unfinished upload is swept when this replica
    /// starts again, or after a day by another).
    pub async fn drain(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        let uploads = || {
            self.shared
                .uploads
                .load(std::sync::atomic::Ordering::SeqCst)
        };
        while !self.shared.fills.is_empty() || uploads() > 0 {
            if tokio::time::Instant::now() >= deadline {
                self.shared.fills.abort_all();
                // The writers notice on their blocking threads and delete
                // their temp files: give them a moment, so a clean stop
                // leaves no temp file behind.
                let settle = tokio::time::Instant::now() + Duration::from_secs(2);
                while self.shared.store.open_temps() > 0 && tokio::time::Instant::now() < settle {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Flushes the index; called on shutdown.
    pub fn flush(&self) -> Result<()> {
        Ok(self.shared.store.flush()?)
    }
}
