//! Keeps the store under its size limit. A background task wakes when a
//! commit pushes the store past the high-water mark (and every 30 s) and
//! evicts least recently used content down to the low-water mark, sparing
//! pinned images: their manifests and everything they name, all platforms.
//! The task holds only a weak reference and stops with the mirror.

use std::collections::HashSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use tracing::{info, warn};

use super::manifest::Manifest;
use super::Inner;
use crate::reference::{Digest, ImageRef, Reference};
use crate::store::Store;

/// Eviction starts above this share of the limit...
const HIGH_WATER: f64 = 0.95;
/// ...and stops at this one.
const LOW_WATER: f64 = 0.85;
const TICK: Duration = Duration::from_secs(30);

/// The size limits, in bytes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub max: u64,
}

impl Limits {
    pub fn high(&self) -> u64 {
        (self.max as f64 * HIGH_WATER) as u64
    }

    pub fn low(&self) -> u64 {
        (self.max as f64 * LOW_WATER) as u64
    }
}

/// Starts the eviction task for `inner`.
pub(super) fn spawn(inner: &Arc<Inner>) {
    let weak: Weak<Inner> = Arc::downgrade(inner);
    let wake = inner.evict_wake.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(TICK) => {}
            }
            let Some(inner) = weak.upgrade() else { return };
            if inner.store.size_bytes() > inner.limits.high() {
                run(&inner).await;
            }
        }
    });
}

/// Wakes the task if the store is past the high-water mark.
pub(super) fn check(inner: &Inner) {
    if inner.store.size_bytes() > inner.limits.high() {
        inner.evict_wake.notify_one();
    }
}

/// One eviction pass, down to the low-water mark.
pub(super) async fn run(inner: &Arc<Inner>) {
    let store = inner.store.clone();
    let pins = inner.config.pins.clone();
    let target = inner.limits.low();
    let result = tokio::task::spawn_blocking(move || {
        let protected = pinned(&store, &pins);
        store.evict(target, &protected)
    })
    .await;
    match result {
        Ok(Ok(evicted)) => {
            for manifest in &evicted.manifests {
                inner.hot.invalidate(manifest);
            }
            inner.metrics.evicted_blobs.inc_by(evicted.blobs as u64);
            inner.metrics.evicted_bytes.inc_by(evicted.bytes);
            inner
                .metrics
                .store_bytes
                .set(inner.store.size_bytes() as i64);
            info!(
                blobs = evicted.blobs,
                manifests = evicted.manifests.len(),
                bytes = evicted.bytes,
                store_bytes = inner.store.size_bytes(),
                "evicted least recently used content"
            );
        }
        Ok(Err(e)) => warn!(error = %e, "eviction failed"),
        Err(e) => warn!(error = %e, "eviction task failed"),
    }
}

/// Every digest a pinned image needs: its manifest, child manifests of an
/// index, configs and layers. Pins not cached yet protect nothing.
fn pinned(store: &Store, pins: &[ImageRef]) -> HashSet<Digest> {
    let mut protected = HashSet::new();
    for pin in pins {
        let root = match &pin.reference {
            Reference::Digest(d) => Some(d.clone()),
            Reference::Tag(tag) => store
                .tag(&pin.repository, tag)
                .ok()
                .flatten()
                .and_then(|r| Digest::parse(&r.digest).ok()),
        };
        let mut stack: Vec<Digest> = root.into_iter().collect();
        while let Some(digest) = stack.pop() {
            if !protected.insert(digest.clone()) {
                continue;
            }
            if let Some(manifest) = read_manifest(store, &digest) {
                stack.extend(manifest.references());
            }
        }
    }
    protected
}

fn read_manifest(store: &Store, digest: &Digest) -> Option<Manifest> {
    let blob = store.open_blob(digest).ok()??;
    let media_type = blob.meta.media_type.clone()?;
    let bytes = std::io::read_to_string(blob.file).ok()?;
    Some(Manifest {
        digest: digest.clone(),
        media_type,
        bytes: bytes.into(),
    })
}
