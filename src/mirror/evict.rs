//! Keeps the store under its size limit. A background task wakes when a
//! commit pushes the store past the high-water mark (and every 30 s) and
//! evicts least recently used content down to the low-water mark, sparing
//! pinned images: their manifests and everything they name, all platforms.
//! The task holds only a weak reference and stops with the mirror.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tracing::{info, warn};

use super::catalog;
use super::shared::Shared;

/// Eviction starts above this share of the limit...
const HIGH_WATER: f64 = 0.95;
/// ...and stops at this one.
const LOW_WATER: f64 = 0.85;
const TICK: Duration = Duration::from_secs(30);
/// How often images unread for `store.max_tag_age` are looked for.
const EXPIRY_EVERY: Duration = Duration::from_secs(600);

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

/// Starts the eviction task for `shared`.
pub(super) fn spawn(shared: &Arc<Shared>) {
    let weak: Weak<Shared> = Arc::downgrade(shared);
    let wake = shared.evict_wake.clone();
    tokio::spawn(async move {
        let mut last_expiry: Option<std::time::Instant> = None;
        loop {
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(TICK) => {}
            }
            let Some(shared) = weak.upgrade() else { return };
            if shared.store.size_bytes() > shared.limits.high() {
                run(&shared).await;
            }
            let due = last_expiry.is_none_or(|t| t.elapsed() >= EXPIRY_EVERY);
            if let (Some(max_age), true) = (shared.config.max_tag_age, due) {
                last_expiry = Some(std::time::Instant::now());
                expire(&shared, max_age).await;
            }
        }
    });
}

/// Wakes the task if the store is past the high-water mark.
pub(super) fn check(shared: &Shared) {
    if shared.store.size_bytes() > shared.limits.high() {
        shared.evict_wake.notify_one();
    }
}

/// Removes images nobody pulled for `max_age`.
async fn expire(shared: &Arc<Shared>, max_age: Duration) {
    let store = shared.store.clone();
    let config_pins = shared.config.pins.clone();
    match tokio::task::spawn_blocking(move || catalog::expire(&store, &config_pins, max_age)).await
    {
        Ok(Ok(evicted)) if evicted.blobs > 0 => {
            forget(shared, &evicted);
            info!(
                blobs = evicted.blobs,
                bytes = evicted.bytes,
                "removed images not pulled within store.max_tag_age"
            );
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => warn!(error = %e, "expiry failed"),
        Err(e) => warn!(error = %e, "expiry task failed"),
    }
}

/// One eviction pass, down to the low-water mark.
pub(super) async fn run(shared: &Arc<Shared>) {
    let store = shared.store.clone();
    let config_pins = shared.config.pins.clone();
    let target = shared.limits.low();
    let result = tokio::task::spawn_blocking(move || {
        let protected = catalog::pinned(&store, &config_pins);
        store.evict(target, &protected)
    })
    .await;
    match result {
        Ok(Ok(evicted)) => {
            forget(shared, &evicted);
            info!(
                blobs = evicted.blobs,
                manifests = evicted.manifests.len(),
                bytes = evicted.bytes,
                store_bytes = shared.store.size_bytes(),
                "evicted least recently used content"
            );
        }
        Ok(Err(e)) => warn!(error = %e, "eviction failed"),
        Err(e) => warn!(error = %e, "eviction task failed"),
    }
}

/// After a removal: manifests leave the memory cache, metrics catch up.
pub(super) fn forget(shared: &Shared, evicted: &crate::store::Evicted) {
    for manifest in &evicted.manifests {
        shared.hot.invalidate(manifest);
    }
    shared.metrics.evicted_blobs.inc_by(evicted.blobs as u64);
    shared.metrics.evicted_bytes.inc_by(evicted.bytes);
}
