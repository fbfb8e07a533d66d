//! Single-flight for small lookups (manifests, tag revalidations): the first
//! request for a key runs the work in a detached task, so it finishes even if
//! that client goes away; every request for the same key meanwhile waits for
//! the same result. Blobs use `fills`, whose followers also stream while
//! the download runs.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::watch;

use super::error::{Error, Result};

type Slot<T> = watch::Receiver<Option<Result<T>>>;

/// In-progress work by key.
pub struct Flights<K, T> {
    map: Mutex<HashMap<K, Slot<T>>>,
}

impl<K, T> Default for Flights<K, T> {
    fn default() -> Self {
        Flights {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<K, T> Flights<K, T>
where
    K: Hash + Eq + Clone + Send + 'static,
    T: Clone + Send + Sync + 'static,
{
    /// Runs `work` unless work for `key` is already running, and returns its
    /// result; the flag is true when this call joined another's work.
    pub async fn run<F>(self: &Arc<Self>, key: K, work: F) -> (Result<T>, bool)
    where
        F: Future<Output = Result<T>> + Send + 'static,
    {
        let (mut slot, joined) = {
            let mut map = self.map.lock();
            match map.get(&key) {
                Some(slot) => (slot.clone(), true),
                None => {
                    let (tx, rx) = watch::channel(None);
                    map.insert(key.clone(), rx.clone());
                    let flights = Arc::clone(self);
                    tokio::spawn(async move {
                        let result = work.await;
                        flights.map.lock().remove(&key);
                        let _ = tx.send(Some(result));
                    });
                    (rx, false)
                }
            }
        };
        loop {
            if let Some(result) = slot.borrow_and_update().clone() {
                return (result, joined);
            }
            if slot.changed().await.is_err() {
                // The task ended without a result: it panicked.
                return (Err(Error::Internal("lookup task failed".into())), joined);
            }
        }
    }

    /// Keys with work running.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    // A paused clock advances only when every task waits: the callers all
    // get to join before the work's "50 ms" pass, however loaded the machine.
    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_share_one_run() {
        let flights: Arc<Flights<&'static str, usize>> = Arc::default();
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let flights = flights.clone();
            let runs = runs.clone();
            tasks.push(tokio::spawn(async move {
                flights
                    .run("k", async move {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(runs.fetch_add(1, Ordering::SeqCst) + 41)
                    })
                    .await
            }));
        }
        let mut joined = 0;
        for t in tasks {
            let (value, j) = t.await.unwrap();
            assert_eq!(value.unwrap(), 41);
            joined += j as usize;
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(joined, 19);
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn work_survives_a_dropped_leader_and_errors_are_not_kept() {
        let flights: Arc<Flights<u8, u8>> = Arc::default();
        let leader = {
            let flights = flights.clone();
            tokio::spawn(async move {
                flights
                    .run(1, async {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Err(Error::Internal("boom".into()))
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        leader.abort();
        let (result, joined) = flights.run(1, async { Ok(7) }).await;
        assert!(joined && result.is_err());
        let (result, joined) = flights.run(1, async { Ok(7) }).await;
        assert!(!joined);
        assert_eq!(result.unwrap(), 7);
    }
}
