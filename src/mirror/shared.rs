//! The state every part of the mirror shares: the store, the upstream
//! client, the caches and the single-flight maps, and the small checks all
//! policies make (is this registry mirrored, is the disk nearly full, count
//! an outcome). Policies (`blob`, `manifest`, `tag_list`, `evict`) depend
//! on this, never on each other's state.

use std::sync::Arc;

use super::error::{Error, Result};
use super::manifest::{self, Manifest};
use super::tag_list::TagList;
use super::{evict, fills, referrers, Caller, Outcome};
use crate::cluster::Cluster;
use crate::config::{StoreConfig, TagTtl};
use crate::metrics::Metrics;
use crate::reference::{Digest, Repository};
use crate::store::{Bucket, Store};
use crate::upstream;

/// What every lookup, download and the eviction task share.
pub(super) struct Shared {
    /// Blobs, manifests, tags, links and pins on this replica's disk (with
    /// a bucket: its hot tier and a cache of the bucket's records).
    pub(super) store: Arc<Store>,
    /// The bucket every replica shares (`store.backend = "s3"`).
    pub(super) bucket: Option<Arc<Bucket>>,
    /// The other replicas, which own some objects' upstream fetches.
    pub(super) cluster: Option<Arc<Cluster>>,
    /// The registries hoard mirrors.
    pub(super) upstream: upstream::Client,
    /// The store's settings: size limits, pins, tag expiry.
    pub(super) config: StoreConfig,
    /// How long a tag is served without asking upstream, per registry.
    pub(super) tag_ttl: TagTtl,
    /// `upstream.resume_attempts`: resumes of a cut upstream body.
    pub(super) resume_attempts: u32,
    /// `upstream.range_fill`: a range on a blob not cached also starts
    /// the download of the whole blob.
    pub(super) range_fill: bool,
    /// Cache outcomes, downloads, evictions, mismatches.
    pub(super) metrics: Arc<Metrics>,
    /// Manifests recently served, by digest (bounded by bytes).
    pub(super) hot: moka::sync::Cache<Digest, Arc<Manifest>>,
    /// Images pulled by digest whose record in the bucket was refreshed
    /// lately (see `fleet::note_digest_pull`).
    pub(super) digest_pulls: moka::sync::Cache<(Repository, Digest), ()>,
    /// Tag list pages recently proxied, by `repository?query`.
    pub(super) tag_lists: moka::sync::Cache<String, TagList>,
    /// Manifest lookups in progress (single-flight).
    pub(super) manifest_flights: Arc<manifest::Flights>,
    /// Referrers list lookups in progress (single-flight).
    pub(super) referrer_flights: Arc<referrers::Flights>,
    /// Blob downloads in progress (single-flight, streaming).
    pub(super) fills: Arc<fills::Fills>,
    /// Copies of downloads to the bucket in progress (a shutdown waits for
    /// them as for the downloads).
    pub(super) uploads: Arc<std::sync::atomic::AtomicUsize>,
    /// The store's size limit.
    pub(super) limits: evict::Limits,
    /// Wakes the eviction task (a commit past the high-water mark, a full
    /// disk, the mirror dropped).
    pub(super) evict_wake: Arc<tokio::sync::Notify>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Lets the eviction task see the mirror is gone and stop.
        self.evict_wake.notify_one();
    }
}

impl Shared {
    /// Whether the data file system has less free space than
    /// `store.min_free_space`: then new blobs are relayed, not cached.
    pub(super) fn low_on_space(&self) -> bool {
        self.store
            .available_space()
            .is_ok_and(|free| free < self.config.min_free_bytes)
    }

    /// Refuses a registry this mirror does not serve.
    pub(super) fn check_registry(&self, repo: &Repository) -> Result<()> {
        if self.upstream.serves(repo.registry()) {
            Ok(())
        } else {
            Err(Error::RegistryDenied(repo.registry().to_owned()))
        }
    }

    /// Refuses a replica's request that this replica sent itself: it would
    /// wait on its own download (see `cluster::LOOP_STATUS`).
    pub(super) fn check_loop(&self, caller: &Caller) -> Result<()> {
        match (&self.cluster, &caller.sender) {
            (Some(cluster), Some(sender)) if sender == cluster.me() => Err(Error::Loop),
            _ => Ok(()),
        }
    }

    /// Counts how a lookup of `kind` (manifest, blob) was answered.
    pub(super) fn count(&self, kind: &str, outcome: Outcome) {
        self.metrics
            .cache_requests
            .with_label_values(&[kind, outcome.as_str()])
            .inc();
    }
}
