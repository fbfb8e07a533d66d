//! Single-flight for blob downloads: at most one download per digest, led
//! by one request and followed by every other. The leader's download task
//! holds a `Lead`, the one right to fill that digest; dropped before the
//! fill finished (an error, a panic, an abort at shutdown), it marks the
//! fill failed, so its readers stop waiting, and frees the digest for a new
//! leader, as pingora's cache lock does with its write permit.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use prometheus::IntGauge;
use tokio::task::AbortHandle;

use super::error::Error;
use super::fill::{Fill, FillState};
use crate::reference::Digest;

/// Downloads in progress, by digest.
pub(super) struct Fills {
    map: Mutex<HashMap<Digest, Running>>,
    /// `hoard_inflight_fetches`: one per `Lead` alive.
    inflight: IntGauge,
}

struct Running {
    fill: Arc<Fill>,
    /// Its task, for cancelling at shutdown.
    task: AbortHandle,
}

impl Fills {
    /// No downloads yet; `inflight` counts those that will run.
    pub(super) fn new(inflight: IntGauge) -> Arc<Fills> {
        Arc::new(Fills {
            map: Mutex::default(),
            inflight,
        })
    }

    /// Whether no download is running.
    pub(super) fn is_empty(&self) -> bool {
        self.map.lock().is_empty()
    }

    /// The download of `digest` running now.
    pub(super) fn running(&self, digest: &Digest) -> Option<Arc<Fill>> {
        self.map.lock().get(digest).map(|r| r.fill.clone())
    }

    /// Takes the lock, for a decision about one digest that must not race
    /// with a download starting or ending (see `Entries`).
    pub(super) fn lock(self: &Arc<Self>) -> Entries<'_> {
        Entries {
            fills: self,
            map: self.map.lock(),
        }
    }

    /// Every download running now (the status page).
    pub(super) fn all(&self) -> Vec<(Digest, Arc<Fill>)> {
        self.map
            .lock()
            .iter()
            .map(|(digest, running)| (digest.clone(), running.fill.clone()))
            .collect()
    }

    /// Cancels every download (shutdown past its grace period): their
    /// leads drop, so readers are told and temp files are deleted.
    pub(super) fn abort_all(&self) {
        for running in self.map.lock().values() {
            running.task.abort();
        }
    }
}

/// The downloads, locked: who runs what cannot change until this drops.
pub(super) struct Entries<'a> {
    fills: &'a Arc<Fills>,
    map: MutexGuard<'a, HashMap<Digest, Running>>,
}

impl Entries<'_> {
    /// The download of `digest` running now.
    pub(super) fn running(&self, digest: &Digest) -> Option<Arc<Fill>> {
        self.map.get(digest).map(|r| r.fill.clone())
    }

    /// Registers `fill` as the download of `digest` (none may be running)
    /// and hands its `Lead` to `start`, which spawns the task that runs it.
    /// Started under the lock, the task cannot end (and remove its entry)
    /// before the entry exists.
    pub(super) fn lead(
        &mut self,
        digest: &Digest,
        fill: Arc<Fill>,
        start: impl FnOnce(Lead) -> AbortHandle,
    ) {
        debug_assert!(!self.map.contains_key(digest));
        self.fills.inflight.inc();
        let lead = Lead {
            fills: self.fills.clone(),
            digest: digest.clone(),
            fill: fill.clone(),
        };
        let task = start(lead);
        self.map.insert(digest.clone(), Running { fill, task });
    }
}

/// The one right to fill a digest. Dropping it ends the download's entry:
/// a fill not finished by then is marked failed.
pub(super) struct Lead {
    fills: Arc<Fills>,
    digest: Digest,
    fill: Arc<Fill>,
}

impl Lead {
    /// The fill this lead must finish.
    pub(super) fn fill(&self) -> &Arc<Fill> {
        &self.fill
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        if !self.fill.is_finished() {
            self.fill.set(FillState::Failed(Error::Internal(
                "download cancelled".into(),
            )));
        }
        let mut map = self.fills.map.lock();
        if map
            .get(&self.digest)
            .is_some_and(|r| Arc::ptr_eq(&r.fill, &self.fill))
        {
            map.remove(&self.digest);
        }
        drop(map);
        self.fills.inflight.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::Repository;
    use crate::store::BlobReader;

    fn fill() -> Arc<Fill> {
        let repo = Repository::new("docker.io", "library/x").unwrap();
        Arc::new(Fill::new(
            repo,
            BlobReader::from_file(tempfile::tempfile().unwrap()),
        ))
    }

    #[tokio::test]
    async fn a_lead_dropped_unfinished_fails_its_fill_and_frees_the_digest() {
        let gauge = IntGauge::new("inflight", "inflight").unwrap();
        let fills = Fills::new(gauge.clone());
        let digest = Digest::of(b"x");
        let led = fill();
        let (tx, rx) = std::sync::mpsc::channel();
        fills.lock().lead(&digest, led.clone(), |lead| {
            tx.send(lead).unwrap();
            tokio::spawn(async {}).abort_handle()
        });
        assert_eq!(gauge.get(), 1);
        assert!(Arc::ptr_eq(&fills.running(&digest).unwrap(), &led));

        drop(rx.recv().unwrap());
        assert!(matches!(*led.subscribe().borrow(), FillState::Failed(_)));
        assert!(fills.running(&digest).is_none() && fills.is_empty());
        assert_eq!(gauge.get(), 0);
    }

    #[tokio::test]
    async fn a_finished_lead_keeps_its_state_and_an_old_lead_leaves_a_new_entry() {
        let fills = Fills::new(IntGauge::new("g", "g").unwrap());
        let digest = Digest::of(b"x");
        let (first, second) = (fill(), fill());
        let (tx, rx) = std::sync::mpsc::channel();
        fills.lock().lead(&digest, first.clone(), |lead| {
            tx.send(lead).unwrap();
            tokio::spawn(async {}).abort_handle()
        });
        let old = rx.recv().unwrap();
        first.set(FillState::Complete { len: 0 });
        // The entry was replaced meanwhile (as after a failed fill): the old
        // lead must not remove the new one.
        fills.map.lock().remove(&digest);
        fills.lock().lead(&digest, second.clone(), |lead| {
            tx.send(lead).unwrap();
            tokio::spawn(async {}).abort_handle()
        });
        drop(old);
        assert!(matches!(
            *first.subscribe().borrow(),
            FillState::Complete { .. }
        ));
        assert!(Arc::ptr_eq(&fills.running(&digest).unwrap(), &second));
    }
}
