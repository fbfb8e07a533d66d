//! What the mirror is doing now, for people (the status page): downloads in
//! progress, how each registry is doing, how full the store is. Read-only
//! snapshots; nothing here changes what the mirror does.

use serde::Serialize;

use super::Mirror;
use crate::upstream::RegistryHealth;

/// A blob download in progress.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Download {
    /// The registry and repository the download was asked for.
    pub registry: String,
    pub repository: String,
    pub digest: String,
    pub received: u64,
    /// The blob's length, once upstream said it.
    pub size: Option<u64>,
    /// Average since the download started.
    pub bytes_per_second: u64,
    /// Readers following it (clients, and the bucket's uploader).
    pub readers: usize,
}

/// The store's size against its limit, and the disk's free space.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct StoreUsage {
    pub used_bytes: u64,
    pub limit_bytes: u64,
    /// `None` when the file system would not say.
    pub disk_free_bytes: Option<u64>,
}

impl Mirror {
    /// The blob downloads running now, largest first.
    pub fn downloads(&self) -> Vec<Download> {
        let mut downloads: Vec<Download> = self
            .shared
            .fills
            .all()
            .into_iter()
            .map(|(digest, fill)| {
                let (size, received) = fill.progress().unwrap_or((None, 0));
                let seconds = fill.age().as_secs_f64().max(0.001);
                Download {
                    registry: fill.repo().registry().to_owned(),
                    repository: fill.repo().name().to_owned(),
                    digest: digest.to_string(),
                    received,
                    size,
                    bytes_per_second: (received as f64 / seconds) as u64,
                    readers: fill.readers(),
                }
            })
            .collect();
        downloads.sort_by(|a, b| b.size.cmp(&a.size).then(a.digest.cmp(&b.digest)));
        downloads
    }

    /// Every configured registry and how it is doing.
    pub fn registries(&self) -> Vec<(String, RegistryHealth)> {
        self.shared.upstream.registries()
    }

    /// How full the store is. The free space is asked of the file system
    /// on the blocking pool (a network file system may take its time).
    pub async fn store_usage(&self) -> StoreUsage {
        let store = self.shared.store.clone();
        let free = tokio::task::spawn_blocking(move || store.available_space().ok())
            .await
            .ok()
            .flatten();
        StoreUsage {
            used_bytes: self.shared.store.size_bytes(),
            limit_bytes: self.shared.limits.max,
            disk_free_bytes: free,
        }
    }
}
