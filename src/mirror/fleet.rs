//! The shared bucket as a whole: its garbage collection (the bucket-wide
//! size limit `store.s3.max_size` and `store.max_tag_age`), the images it
//! holds, and its verification. One replica at a time collects (the `gc`
//! lease); a pass is mark and sweep:
//!
//! - roots: tag records (and records of images pulled by digest) not past
//!   `max_tag_age` (by when upstream last
//!   confirmed them: every pull after the tag's TTL revalidates, so an old
//!   `checked_at` means nobody pulled it since) and pins (the config's and
//!   those added on any replica), which never expire;
//! - over the size limit, the least recently confirmed unpinned tags are
//!   dropped until what the rest need fits;
//! - marked: every manifest, config and layer a root needs;
//! - swept: unmarked content older than `store.s3.gc_grace` (1 h), and
//!   the dropped tags.
//!
//! Content a fill is writing is invisible until verified, content just
//! written is younger than the grace (its manifest may not be recorded
//! yet), and tags written or moved during a pass are listed again before
//! anything is removed and their trees marked (a dropped tag whose record
//! changed meanwhile is kept): a pass does not take a blob from under a
//! pull (the bug of distribution's shared-storage GC, distribution#2367,
//! and Harbor's, Harbor#22747).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tracing::{info, warn};

use super::catalog::CachedImage;
use super::error::Result;
use super::manifest::{Children, Manifest};
use super::shared::Shared;
use crate::clock;
use crate::reference::{Digest, ImageRef, Reference, Repository};
use crate::store::{bucket::ListedBlob, Bucket, GcReport, TagRecord, VerifyReport};

/// Images pulled by digest (`image@sha256:...`, as Kubernetes pins them)
/// have no tag to keep them: each gets a record of its own in `tags/`,
/// named `@<hex>` (no tag can start with `@`), refreshed when a replica
/// serves it (at most once per `DIGEST_REFRESH` each), so the GC keeps them
/// as roots and ages them like tags.
const DIGEST_ROOT_PREFIX: &str = "@";
const DIGEST_REFRESH: Duration = Duration::from_secs(300);

/// The in-memory note of digest roots refreshed lately, per replica.
pub(super) fn digest_pulls() -> moka::sync::Cache<(Repository, Digest), ()> {
    moka::sync::Cache::builder()
        .max_capacity(100_000)
        .time_to_live(DIGEST_REFRESH)
        .build()
}

/// Records for the GC that `repo@digest` (a manifest) was pulled by
/// digest now; in the background, and not again soon.
pub(super) fn note_digest_pull(shared: &Shared, repo: &Repository, manifest: &Manifest) {
    let Some(bucket) = shared.bucket.clone() else {
        return;
    };
    let key = (repo.clone(), manifest.digest.clone());
    if shared.digest_pulls.contains_key(&key) {
        return;
    }
    shared.digest_pulls.insert(key, ());
    let record = TagRecord {
        digest: manifest.digest.clone(),
        media_type: manifest.media_type.clone(),
        checked_at_ms: clock::unix_ms(),
    };
    let repo = repo.clone();
    tokio::spawn(async move {
        let name = format!("{DIGEST_ROOT_PREFIX}{}", record.digest.hex());
        if let Err(e) = bucket.put_tag(&repo, &name, &record).await {
            warn!(repository = %repo, digest = %record.digest, error = %e, "cannot record a pull by digest");
        }
    });
}

/// How often the lease holder collects.
const GC_EVERY: Duration = Duration::from_secs(600);
/// The lease's name in the bucket.
const GC_LEASE: &str = "gc";

/// Runs the fleet's GC every `GC_EVERY` on whichever replica holds the
/// lease, while the mirror lives; only when a limit is set.
pub(super) fn spawn_gc(shared: &Arc<Shared>) {
    let limited = shared.config.max_tag_age.is_some()
        || shared
            .config
            .s3
            .as_ref()
            .is_some_and(|s3| s3.max_bytes.is_some());
    if shared.bucket.is_none() || !limited {
        return;
    }
    let weak: Weak<Shared> = Arc::downgrade(shared);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(GC_EVERY).await;
            let Some(shared) = weak.upgrade() else {
                return;
            };
            if let Err(e) = leased_pass(&shared).await {
                warn!(error = %e, "the bucket's GC pass failed");
            }
        }
    });
}

/// One pass if this replica holds (or takes) the lease.
pub(super) async fn leased_pass(shared: &Shared) -> Result<Option<GcReport>> {
    let bucket = shared.bucket.as_ref().expect("only with a bucket");
    let leader = bucket.take_lease(GC_LEASE, GC_EVERY * 3).await?;
    shared.metrics.bucket_gc_leader.set(i64::from(leader));
    if !leader {
        return Ok(None);
    }
    let report = pass(shared).await?;
    if report.blobs > 0 {
        info!(
            blobs = report.blobs,
            bytes = report.bytes,
            "removed content no kept image needs from the bucket"
        );
    }
    Ok(Some(report))
}

/// Reads manifests from the bucket once per pass.
struct Trees<'a> {
    bucket: &'a Bucket,
    listed: &'a HashMap<Digest, ListedBlob>,
    children: HashMap<Digest, Children>,
    max_manifest: u64,
}

impl<'a> Trees<'a> {
    fn new(shared: &Shared, bucket: &'a Bucket, listed: &'a HashMap<Digest, ListedBlob>) -> Self {
        Trees {
            bucket,
            listed,
            children: HashMap::new(),
            max_manifest: shared.upstream.max_manifest_bytes(),
        }
    }

    /// `root` and everything it needs that the bucket holds.
    async fn of(&mut self, root: &Digest) -> Result<HashSet<Digest>> {
        let mut seen = HashSet::new();
        let mut stack = vec![root.clone()];
        while let Some(digest) = stack.pop() {
            // Manifests written since the listing are read too: a tag that
            // moved during the pass may name old, listed layers.
            if !seen.insert(digest.clone()) {
                continue;
            }
            let children = self.children(&digest).await?;
            stack.extend(children.manifests.iter().cloned());
            seen.extend(
                children
                    .blobs
                    .iter()
                    .filter(|d| self.listed.contains_key(d))
                    .cloned(),
            );
        }
        Ok(seen)
    }

    async fn children(&mut self, manifest: &Digest) -> Result<Children> {
        if let Some(children) = self.children.get(manifest) {
            return Ok(children.clone());
        }
        let small = self
            .listed
            .get(manifest)
            .is_none_or(|b| b.size <= self.max_manifest);
        let children = match small {
            true => match self
                .bucket
                .get_manifest(manifest, self.max_manifest)
                .await?
            {
                Some((_, bytes)) => Children::of(&bytes),
                None => Children::default(),
            },
            false => Children::default(),
        };
        self.children.insert(manifest.clone(), children.clone());
        Ok(children)
    }
}

/// A tag in the bucket, its root and whether a pin keeps it.
struct Root {
    repo: Repository,
    tag: String,
    record: TagRecord,
    pinned: bool,
}

/// One mark-and-sweep pass over the bucket (see the module comment).
pub(super) async fn pass(shared: &Shared) -> Result<GcReport> {
    let bucket = shared.bucket.as_ref().expect("only with a bucket");
    let now = clock::unix_ms();
    let listed = listing(bucket).await?;
    let total: u64 = listed.values().map(|b| b.size).sum();
    shared.metrics.bucket_bytes.set(total as i64);
    let pins = pins(shared).await?;
    let mut roots: Vec<Root> = bucket
        .list_tags()
        .await?
        .into_iter()
        .map(|(repo, tag, record)| {
            let pinned = pinned(&pins, &repo, &tag, &record.digest);
            Root {
                repo,
                tag,
                record,
                pinned,
            }
        })
        .collect();
    let pinned_digests: Vec<Digest> = pins
        .iter()
        .filter_map(|pin| match &pin.reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(_) => None,
        })
        .collect();
    let mut dropped: Vec<Root> = Vec::new();
    if let Some(max_age) = shared.config.max_tag_age {
        let (old, kept): (Vec<Root>, Vec<Root>) = roots.into_iter().partition(|root| {
            !root.pinned
                && u128::from(now.saturating_sub(root.record.checked_at_ms)) > max_age.as_millis()
        });
        dropped.extend(old);
        roots = kept;
    }
    let mut trees = Trees::new(shared, bucket, &listed);
    let mut live_by_root = Vec::new();
    for root in &roots {
        live_by_root.push(trees.of(&root.record.digest).await?);
    }
    let mut pinned_live = HashSet::new();
    for digest in &pinned_digests {
        pinned_live.extend(trees.of(digest).await?);
    }
    let bytes_of = |live: &HashSet<Digest>| -> u64 {
        live.iter()
            .filter_map(|d| listed.get(d))
            .map(|b| b.size)
            .sum()
    };
    let union = |live_by_root: &[HashSet<Digest>]| -> HashSet<Digest> {
        live_by_root
            .iter()
            .flatten()
            .chain(&pinned_live)
            .cloned()
            .collect()
    };
    let mut live = union(&live_by_root);
    if let Some(max) = shared.config.s3.as_ref().and_then(|s3| s3.max_bytes) {
        // Least recently confirmed first.
        let mut order: Vec<usize> = (0..roots.len()).filter(|&i| !roots[i].pinned).collect();
        order.sort_by_key(|&i| roots[i].record.checked_at_ms);
        let mut gone = HashSet::new();
        for i in order {
            if bytes_of(&live) <= max {
                break;
            }
            gone.insert(i);
            let rest: Vec<HashSet<Digest>> = live_by_root
                .iter()
                .enumerate()
                .filter(|(j, _)| !gone.contains(j))
                .map(|(_, l)| l.clone())
                .collect();
            live = union(&rest);
        }
        for (i, root) in roots.into_iter().enumerate() {
            if gone.contains(&i) {
                dropped.push(root);
            }
        }
    }
    let grace = shared
        .config
        .s3
        .as_ref()
        .map_or(Duration::ZERO, |s3| s3.gc_grace);
    let mut report = GcReport::default();
    // Tags written or moved while this pass marked (a pull in progress, a
    // revalidation) are roots too: listed again, their trees marked, and
    // a dropped tag whose record changed since is kept.
    let listed_first: HashMap<(Repository, String), TagRecord> = dropped
        .iter()
        .map(|root| ((root.repo.clone(), root.tag.clone()), root.record.clone()))
        .collect();
    let mut changed = HashSet::new();
    for (repo, tag, record) in bucket.list_tags().await? {
        let key = (repo, tag);
        let dropped_unchanged = listed_first.get(&key) == Some(&record);
        if !dropped_unchanged {
            live.extend(trees.of(&record.digest).await?);
            changed.insert(key);
        }
    }
    for root in &dropped {
        let key = (root.repo.clone(), root.tag.clone());
        if !changed.contains(&key) {
            bucket.remove_tag(&root.repo, &root.tag).await?;
        }
    }
    for blob in listed.values() {
        let young = u128::from(now.saturating_sub(blob.written_ms)) < grace.as_millis();
        if live.contains(&blob.digest) || young {
            continue;
        }
        bucket.delete_blob(&blob.digest).await?;
        report.blobs += 1;
        report.bytes += blob.size;
    }
    shared
        .metrics
        .bucket_bytes
        .set(total.saturating_sub(report.bytes) as i64);
    Ok(report)
}

/// Every blob and manifest in the bucket, by digest.
async fn listing(bucket: &Bucket) -> Result<HashMap<Digest, ListedBlob>> {
    Ok(bucket
        .list_blobs()
        .await?
        .into_iter()
        .map(|b| (b.digest.clone(), b))
        .collect())
}

/// Whether one of `pins` names `repo:tag` or the manifest it points to.
fn pinned(pins: &[ImageRef], repo: &Repository, tag: &str, digest: &Digest) -> bool {
    pins.iter().any(|pin| {
        pin.repository == *repo
            && match &pin.reference {
                Reference::Tag(t) => t == tag,
                Reference::Digest(d) => d == digest,
            }
    })
}

/// Every pin: the config's and those added on any replica.
async fn pins(shared: &Shared) -> Result<Vec<ImageRef>> {
    let bucket = shared.bucket.as_ref().expect("only with a bucket");
    let mut pins = shared.config.pins.clone();
    pins.extend(
        bucket
            .pins()
            .await?
            .iter()
            .filter_map(|p| ImageRef::parse(p).ok()),
    );
    Ok(pins)
}

/// The images the bucket holds, optionally of one registry.
pub(super) async fn images(shared: &Shared, registry: Option<&str>) -> Result<Vec<CachedImage>> {
    let bucket = shared.bucket.as_ref().expect("only with a bucket");
    let listed = listing(bucket).await?;
    let pins = pins(shared).await?;
    let mut trees = Trees::new(shared, bucket, &listed);
    let mut out = Vec::new();
    for (repo, tag, record) in bucket.list_tags().await? {
        if registry.is_some_and(|r| r != repo.registry()) {
            continue;
        }
        let size = trees
            .of(&record.digest)
            .await?
            .iter()
            .filter_map(|d| listed.get(d))
            .map(|b| b.size)
            .sum();
        let pinned = pinned(&pins, &repo, &tag, &record.digest);
        let image = match tag.strip_prefix(DIGEST_ROOT_PREFIX) {
            Some(_) => format!("{repo}@{}", record.digest),
            None => format!("{repo}:{tag}"),
        };
        out.push(CachedImage {
            image,
            digest: record.digest.to_string(),
            media_type: record.media_type,
            size,
            checked_at_ms: record.checked_at_ms,
            // Pulls are not recorded fleet-wide; the last confirmation is
            // the last pull after the tag's TTL.
            last_pulled_secs: record.checked_at_ms / 1000,
            pinned,
            // Would cost a bucket read per image per listing.
            platforms: Vec::new(),
        });
    }
    out.sort_by(|a, b| a.image.cmp(&b.image));
    Ok(out)
}

/// Hashes every object in the bucket again; one that does not match its
/// key is removed (the next pull fetches it again).
pub(super) async fn verify(shared: &Shared) -> Result<VerifyReport> {
    let bucket = shared.bucket.as_ref().expect("only with a bucket");
    let mut report = VerifyReport::default();
    for blob in bucket.list_blobs().await? {
        let Some(mut body) = bucket.get_blob(&blob.digest, None).await? else {
            continue;
        };
        let mut hasher = Sha256::new();
        let mut bytes = 0;
        while let Some(chunk) = body.chunk().await? {
            bytes += chunk.len() as u64;
            hasher.update(&chunk);
        }
        report.checked += 1;
        report.bytes += bytes;
        if Digest::from_hasher(hasher) != blob.digest {
            warn!(digest = %blob.digest, "bucket object does not match its digest: removed");
            bucket.delete_blob(&blob.digest).await?;
            shared.hot.invalidate(&blob.digest);
            report.quarantined.push(blob.digest);
        }
    }
    Ok(report)
}
