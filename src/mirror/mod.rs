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

mod accept;
mod blob;
pub mod catalog;
mod error;
mod evict;
mod fill;
mod flight;
mod manifest;
mod outcome;
mod stream;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tracing::warn;

pub use accept::Accept;
pub use blob::Blob;
pub use error::{Error, Result, UpstreamFailure};
pub use manifest::Manifest;
pub use outcome::Outcome;
pub use stream::ByteStream;

use crate::clock;
use crate::config::{StoreConfig, TagTtl};
use crate::metrics::Metrics;
use crate::reference::{Digest, Reference, Repository};
use crate::store::{self, Store, TagRecord};
use crate::upstream;

/// How long a proxied tag list is reused.
const TAG_LIST_TTL: Duration = Duration::from_secs(30);
/// Memory for the hot-manifest cache.
const HOT_MANIFEST_BYTES: u64 = 64 * 1024 * 1024;

/// A tag list page.
#[derive(Debug, Clone)]
pub struct TagList {
    pub bytes: Bytes,
    pub content_type: String,
    /// Upstream's `Link` to the next page, if any.
    pub link: Option<String>,
}

/// Manifest lookups in progress, by repository and reference.
type ManifestFlights = flight::Flights<(Repository, Reference), (Arc<Manifest>, Outcome)>;

/// The mirror, shared by every request (cheap to clone).
#[derive(Clone)]
pub struct Mirror {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<Store>,
    upstream: upstream::Client,
    config: StoreConfig,
    tag_ttl: TagTtl,
    metrics: Arc<Metrics>,
    hot: moka::sync::Cache<Digest, Arc<Manifest>>,
    tag_lists: moka::sync::Cache<String, TagList>,
    manifest_flights: Arc<ManifestFlights>,
    fills: blob::Fills,
    limits: evict::Limits,
    evict_wake: Arc<tokio::sync::Notify>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Lets the eviction task see the mirror is gone and stop.
        self.evict_wake.notify_one();
    }
}

impl Mirror {
    /// A mirror over `store` and `upstream`, with the store's settings and
    /// the tag TTLs.
    pub fn new(
        config: StoreConfig,
        tag_ttl: TagTtl,
        store: Arc<Store>,
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
        let inner = Arc::new(Inner {
            store,
            upstream,
            config,
            tag_ttl,
            metrics,
            hot: moka::sync::Cache::builder()
                .max_capacity(HOT_MANIFEST_BYTES)
                .weigher(|_, m: &Arc<Manifest>| m.bytes.len().try_into().unwrap_or(u32::MAX))
                .build(),
            tag_lists: moka::sync::Cache::builder()
                .max_capacity(1024)
                .time_to_live(TAG_LIST_TTL)
                .build(),
            manifest_flights: Arc::default(),
            fills: blob::Fills::default(),
            limits: evict::Limits { max },
            evict_wake: Arc::default(),
        });
        evict::spawn(&inner);
        evict::check(&inner);
        Mirror { inner }
    }

    /// Cached tags (the admin API's list), optionally of one registry.
    pub async fn images(&self, registry: Option<String>) -> Result<Vec<catalog::CachedImage>> {
        let inner = self.inner.clone();
        let images = tokio::task::spawn_blocking(move || {
            catalog::images(&inner.store, &inner.config.pins, registry.as_deref())
        })
        .await??;
        Ok(images)
    }

    /// Every pin, from the config file and added at run time.
    pub fn pins(&self) -> Vec<String> {
        catalog::all_pins(&self.inner.store, &self.inner.config.pins)
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    /// Pins an image (durable); true if it was not pinned yet.
    pub async fn pin(&self, image: &crate::reference::ImageRef) -> Result<bool> {
        Ok(self.inner.store.add_pin(&image.to_string())?)
    }

    /// Removes a run-time pin; true if there was one. Pins from the config
    /// file stay until the file changes.
    pub async fn unpin(&self, image: &crate::reference::ImageRef) -> Result<bool> {
        Ok(self.inner.store.remove_pin(&image.to_string())?)
    }

    /// Removes one image from the store (pinned content stays).
    pub async fn evict_image(&self, image: &crate::reference::ImageRef) -> Result<store::Evicted> {
        let inner = self.inner.clone();
        let image = image.clone();
        let evicted = tokio::task::spawn_blocking(move || {
            catalog::evict_image(&inner.store, &inner.config.pins, &image)
        })
        .await??;
        evict::forget(&self.inner, &evicted);
        Ok(evicted)
    }

    /// Re-hashes every stored blob; mismatches are quarantined and dropped
    /// from the index (a reader that has one open finishes its transfer).
    pub async fn verify(&self) -> Result<store::VerifyReport> {
        let store = self.inner.store.clone();
        let report = tokio::task::spawn_blocking(move || store.verify(|_, _| {})).await??;
        for digest in &report.quarantined {
            self.inner.hot.invalidate(digest);
        }
        Ok(report)
    }

    /// Removes blobs no manifest names.
    pub async fn gc(&self) -> Result<store::GcReport> {
        let store = self.inner.store.clone();
        let report = tokio::task::spawn_blocking(move || store.gc()).await??;
        Ok(report)
    }

    /// The manifest `reference` of `repo`, as the client's `accept` allows.
    pub async fn manifest(
        &self,
        repo: &Repository,
        reference: &Reference,
        accept: &Accept,
    ) -> Result<(Arc<Manifest>, Outcome)> {
        let inner = &self.inner;
        inner.check_registry(repo)?;
        let result = match reference {
            Reference::Digest(digest) => inner.manifest_by_digest(repo, digest, accept).await,
            Reference::Tag(tag) => self.manifest_by_tag(repo, tag, accept).await,
        };
        if let Ok((_, outcome)) = &result {
            inner.count("manifest", *outcome);
        }
        result
    }

    /// A blob of `repo`, from the store or streaming in from upstream.
    pub async fn blob(&self, repo: &Repository, digest: &Digest) -> Result<Blob> {
        self.inner.check_registry(repo)?;
        let blob = blob::lookup(&self.inner, repo, digest).await?;
        self.inner.count("blob", blob.outcome);
        Ok(blob)
    }

    /// A blob's length for a `HEAD`, without downloading it.
    pub async fn blob_head(
        &self,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<(Option<u64>, Outcome)> {
        self.inner.check_registry(repo)?;
        let (len, outcome) = blob::head(&self.inner, repo, digest).await?;
        self.inner.count("blob", outcome);
        Ok((len, outcome))
    }

    /// A tag list page of `repo` (`query` is the client's `n`/`last`),
    /// proxied with a short cache; from the index when upstream is down.
    pub async fn tags(&self, repo: &Repository, query: &str) -> Result<(TagList, Outcome)> {
        let inner = &self.inner;
        inner.check_registry(repo)?;
        let key = format!("{repo}?{query}");
        if let Some(list) = inner.tag_lists.get(&key) {
            return Ok((list, Outcome::Hit));
        }
        match inner.upstream.get_tags(repo, query).await {
            Ok(response) => {
                let list = TagList {
                    bytes: response.bytes,
                    content_type: response
                        .content_type
                        .unwrap_or_else(|| "application/json".into()),
                    link: response.link,
                };
                inner.tag_lists.insert(key, list.clone());
                Ok((list, Outcome::Miss))
            }
            Err(upstream::Error::NotFound { .. }) => Err(Error::NameUnknown(repo.clone())),
            Err(e) if e.is_unavailable() => {
                let tags = inner.store.tags_of(repo)?;
                if tags.is_empty() {
                    return Err(e.into());
                }
                warn!(repository = %repo, error = %e, "upstream unavailable, listing cached tags");
                let body = serde_json::json!({ "name": repo.name(), "tags": tags });
                let list = TagList {
                    bytes: serde_json::to_vec(&body).expect("json").into(),
                    content_type: "application/json".into(),
                    link: None,
                };
                Ok((list, Outcome::Stale))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Waits (at most `limit`) for blob downloads in progress to end, so a
    /// shutdown does not throw away work a moment from done; cancels the
    /// rest (their temp files are deleted, never promoted).
    pub async fn drain(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.inner.fills.is_empty() {
            if tokio::time::Instant::now() >= deadline {
                self.inner.fills.abort_all();
                // The writers notice on their blocking threads and delete
                // their temp files: give them a moment, so a clean stop
                // leaves no temp file behind.
                let settle = tokio::time::Instant::now() + Duration::from_secs(2);
                while self.inner.store.open_temps() > 0 && tokio::time::Instant::now() < settle {
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
        Ok(self.inner.store.flush()?)
    }

    async fn manifest_by_tag(
        &self,
        repo: &Repository,
        tag: &str,
        accept: &Accept,
    ) -> Result<(Arc<Manifest>, Outcome)> {
        let inner = &self.inner;
        let cached = match inner.store.tag(repo, tag)? {
            Some(record) if accept.allows(&record.media_type) => {
                match Digest::parse(&record.digest).ok() {
                    Some(digest) => inner.load_manifest(&digest).await?.map(|m| (record, m)),
                    None => None,
                }
            }
            _ => None,
        };
        let ttl = inner.tag_ttl.for_registry(repo.registry());
        if let Some((record, manifest)) = &cached {
            let age = clock::unix_ms().saturating_sub(record.checked_at);
            if u128::from(age) < ttl.as_millis() {
                return Ok((manifest.clone(), Outcome::Hit));
            }
            // Upstream's budget is nearly spent: keep it for real misses and
            // stretch the TTL (the upstream logs when this starts).
            if inner.upstream.budget_low(repo.registry()) {
                return Ok((manifest.clone(), Outcome::Stale));
            }
        }
        let key = (repo.clone(), Reference::Tag(tag.to_owned()));
        let work = {
            let inner = self.inner.clone();
            let (repo, tag, accept) = (repo.clone(), tag.to_owned(), accept.clone());
            async move { inner.resolve_tag(&repo, &tag, &accept, cached).await }
        };
        let (result, joined) = inner.manifest_flights.run(key, work).await;
        result.map(|(m, outcome)| (m, if joined { Outcome::Coalesced } else { outcome }))
    }
}

impl Inner {
    /// Whether the data file system has less free space than
    /// `store.min_free_space`: then new blobs are relayed, not cached.
    fn low_on_space(&self) -> bool {
        self.store
            .available_space()
            .is_ok_and(|free| free < self.config.min_free_bytes)
    }

    fn check_registry(&self, repo: &Repository) -> Result<()> {
        if self.upstream.serves(repo.registry()) {
            Ok(())
        } else {
            Err(Error::RegistryDenied(repo.registry().to_owned()))
        }
    }

    fn count(&self, kind: &str, outcome: Outcome) {
        self.metrics
            .cache_requests
            .with_label_values(&[kind, outcome.as_str()])
            .inc();
    }

    async fn manifest_by_digest(
        self: &Arc<Self>,
        repo: &Repository,
        digest: &Digest,
        accept: &Accept,
    ) -> Result<(Arc<Manifest>, Outcome)> {
        if let Some(manifest) = self.load_manifest(digest).await? {
            if !self.store.is_linked(repo, digest)? {
                // Cached for another repository: only upstream may say this
                // one has it too.
                let reference = Reference::Digest(digest.clone());
                self.upstream
                    .head_manifest(repo, &reference, &accept.upstream_header())
                    .await
                    .map_err(|e| manifest_error(e, repo, &reference))?;
                self.store.link(repo, digest)?;
            }
            return Ok((manifest, Outcome::Hit));
        }
        let reference = Reference::Digest(digest.clone());
        let work = {
            let inner = self.clone();
            let (repo, reference, accept) = (repo.clone(), reference.clone(), accept.clone());
            async move {
                let manifest = inner.fetch_manifest(&repo, &reference, &accept).await?;
                Ok((manifest, Outcome::Miss))
            }
        };
        let (result, joined) = self
            .manifest_flights
            .run((repo.clone(), reference), work)
            .await;
        result.map(|(m, outcome)| (m, if joined { Outcome::Coalesced } else { outcome }))
    }

    /// A tag past its TTL (or not cached): `HEAD` upstream, re-fetch only if
    /// the digest moved, serve the cached copy if upstream is unavailable.
    async fn resolve_tag(
        &self,
        repo: &Repository,
        tag: &str,
        accept: &Accept,
        cached: Option<(TagRecord, Arc<Manifest>)>,
    ) -> Result<(Arc<Manifest>, Outcome)> {
        let reference = Reference::Tag(tag.to_owned());
        let Some((mut record, manifest)) = cached else {
            return Ok((
                self.fetch_manifest(repo, &reference, accept).await?,
                Outcome::Miss,
            ));
        };
        let head = self
            .upstream
            .head_manifest(repo, &reference, &accept.upstream_header())
            .await;
        let result = match head {
            Ok(head) if head.digest.as_ref() == Some(&manifest.digest) => {
                record.checked_at = clock::unix_ms();
                self.store.put_tag(repo, tag, &record)?;
                return Ok((manifest, Outcome::Revalidated));
            }
            Ok(_) => self.fetch_manifest(repo, &reference, accept).await,
            Err(e) => Err(manifest_error(e, repo, &reference)),
        };
        match result {
            Ok(fresh) => Ok((fresh, Outcome::Miss)),
            Err(Error::Upstream(e)) if e.is_unavailable() => {
                warn!(repository = %repo, tag, error = %e, "upstream unavailable, serving stale tag");
                Ok((manifest, Outcome::Stale))
            }
            Err(e @ Error::ManifestUnknown { .. }) => {
                self.store.remove_tag(repo, tag)?;
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// `GET` a manifest upstream, verify it, store it, link what it names.
    async fn fetch_manifest(
        &self,
        repo: &Repository,
        reference: &Reference,
        accept: &Accept,
    ) -> Result<Arc<Manifest>> {
        let response = self
            .upstream
            .get_manifest(repo, reference, &accept.upstream_header())
            .await
            .map_err(|e| manifest_error(e, repo, reference))?;
        let actual = Digest::of(&response.bytes);
        let expected = match reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(_) => response.digest.clone(),
        };
        if let Some(expected) = expected.filter(|e| *e != actual) {
            self.metrics.digest_mismatches.inc();
            return Err(Error::DigestMismatch {
                repo: repo.clone(),
                expected,
                actual,
            });
        }
        let manifest = Arc::new(Manifest {
            digest: actual,
            media_type: response.media_type,
            bytes: response.bytes,
        });
        let store = self.store.clone();
        let stored = manifest.clone();
        tokio::task::spawn_blocking(move || {
            store.put_bytes(
                &stored.digest,
                Some(stored.media_type.clone()),
                &stored.bytes,
            )
        })
        .await??;
        // Upstream serving this manifest for `repo` vouches that `repo` has
        // everything it names (registries refuse manifests otherwise).
        self.store.link(repo, &manifest.digest)?;
        let children = manifest.references();
        for child in &children {
            self.store.link(repo, child)?;
        }
        self.store.add_refs(&manifest.digest, &children)?;
        evict::check(self);
        if let Reference::Tag(tag) = reference {
            // A client that accepts only some types may get a converted
            // manifest: it must not become what the tag means for others.
            if accept.is_complete() {
                let record = TagRecord {
                    digest: manifest.digest.to_string(),
                    media_type: manifest.media_type.clone(),
                    checked_at: clock::unix_ms(),
                };
                self.store.put_tag(repo, tag, &record)?;
            }
        }
        self.hot.insert(manifest.digest.clone(), manifest.clone());
        Ok(manifest)
    }

    /// A stored manifest, from memory if hot.
    async fn load_manifest(&self, digest: &Digest) -> Result<Option<Arc<Manifest>>> {
        if let Some(manifest) = self.hot.get(digest) {
            return Ok(Some(manifest));
        }
        let store = self.store.clone();
        let key = digest.clone();
        let loaded =
            tokio::task::spawn_blocking(move || -> store::Result<Option<(String, Bytes)>> {
                let Some(blob) = store.open_blob(&key)? else {
                    return Ok(None);
                };
                let Some(media_type) = blob.meta.media_type.clone() else {
                    return Ok(None);
                };
                let bytes = blob
                    .reader
                    .read_all(blob.meta.size)
                    .map_err(|e| store::Error::io(key.hex(), e))?;
                Ok(Some((media_type, bytes)))
            })
            .await??;
        Ok(loaded.map(|(media_type, bytes)| {
            let manifest = Arc::new(Manifest {
                digest: digest.clone(),
                media_type,
                bytes,
            });
            self.hot.insert(digest.clone(), manifest.clone());
            manifest
        }))
    }
}

fn manifest_error(e: upstream::Error, repo: &Repository, reference: &Reference) -> Error {
    match e {
        upstream::Error::NotFound { .. } => Error::ManifestUnknown {
            repo: repo.clone(),
            reference: reference.to_string(),
        },
        e => Error::Upstream(e),
    }
}
