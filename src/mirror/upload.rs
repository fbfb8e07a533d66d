//! Copying a download from upstream into the shared bucket while it runs,
//! so the fleet has the blob as soon as it is verified. The uploader
//! follows the download's temp file, not the network: it sends each part
//! once it is on disk (never holding back the clients of the download, and
//! holding at most one part in memory), and completes the multipart upload
//! only after the download is verified. A download that fails aborts the
//! upload: nothing partial or unverified becomes visible in the bucket.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use sha2::{Digest as _, Sha256};
use tokio::task::JoinHandle;

use super::fill::{Fill, FillState};
use crate::reference::Digest;
use crate::store::bucket::PART_SIZE;
use crate::store::{self, BlobReader, Bucket};

/// How an upload ended.
#[derive(Debug)]
pub(super) enum Uploaded {
    /// The blob is in the bucket under its digest.
    Done,
    /// The download failed or was cancelled: nothing was kept.
    Abandoned,
}

/// Starts copying `fill` (a download of `digest` of `len` bytes, if known)
/// to `bucket`.
/// `running` counts the copies in progress (a shutdown waits for them).
pub(super) fn spawn(
    bucket: Arc<Bucket>,
    digest: Digest,
    fill: Arc<Fill>,
    len: Option<u64>,
    running: Arc<AtomicUsize>,
) -> JoinHandle<store::Result<Uploaded>> {
    running.fetch_add(1, Ordering::SeqCst);
    tokio::spawn(async move {
        let result = follow(&bucket, &digest, &fill, len).await;
        running.fetch_sub(1, Ordering::SeqCst);
        result
    })
}

async fn follow(
    bucket: &Arc<Bucket>,
    digest: &Digest,
    fill: &Fill,
    len: Option<u64>,
) -> store::Result<Uploaded> {
    let mut state = fill.subscribe();
    // A blob smaller than a part goes in one PUT once verified.
    let single = len.is_some_and(|len| len < PART_SIZE);
    let mut copy = Copy {
        bucket,
        digest,
        reader: fill.reader(),
        upload: None,
        sent: 0,
        hasher: Sha256::new(),
    };
    loop {
        let current = state.borrow_and_update().clone();
        let step = match current {
            FillState::Failed(_) => {
                copy.abort().await;
                return Ok(Uploaded::Abandoned);
            }
            FillState::Complete { len } => return copy.finish(len).await.map(|()| Uploaded::Done),
            FillState::Connecting | FillState::Streaming { .. } if !single => {
                // Whole parts of what is on disk so far.
                copy.parts_until(fill.in_file(), PART_SIZE).await
            }
            FillState::Connecting | FillState::Streaming { .. } => Ok(()),
        };
        if let Err(e) = step {
            copy.abort().await;
            return Err(e);
        }
        if state.changed().await.is_err() {
            // The download task is gone without a result (cancelled).
            copy.abort().await;
            return Ok(Uploaded::Abandoned);
        }
    }
}

/// One copy in progress: what was sent, and the hash of exactly the bytes
/// sent, so the object is completed only if they are the verified blob
/// (the download's hash covered the network's bytes, not the file's).
struct Copy<'a> {
    bucket: &'a Arc<Bucket>,
    digest: &'a Digest,
    reader: BlobReader,
    upload: Option<store::Upload>,
    sent: u64,
    hasher: Sha256,
}

impl Copy<'_> {
    /// Sends `sent..until` as parts of `PART_SIZE`, the last one shorter
    /// only if it is at least `min_last` (1 at the end: everything).
    async fn parts_until(&mut self, until: u64, min_last: u64) -> store::Result<()> {
        while self.sent < until {
            let n = (until - self.sent).min(PART_SIZE);
            if n < min_last {
                break;
            }
            // The permit first: it bounds the parts held in memory.
            let _permit = self.bucket.part_permit().await;
            let bytes = read(&self.reader, self.sent, n).await?;
            self.hasher.update(&bytes);
            if self.upload.is_none() {
                self.upload = Some(self.bucket.start_upload(self.digest).await?);
            }
            let upload = self.upload.as_mut().expect("just started");
            upload.put_part(bytes).await?;
            self.sent += n;
        }
        Ok(())
    }

    /// The download is verified and `len` long: sends the rest and makes
    /// the object visible, if what was sent hashes to the digest.
    async fn finish(mut self, len: u64) -> store::Result<()> {
        if self.upload.is_none() && len < PART_SIZE {
            let _permit = self.bucket.part_permit().await;
            let bytes = read(&self.reader, 0, len).await?;
            self.hasher.update(&bytes);
            self.check()?;
            return self.bucket.put_verified(self.digest, None, bytes).await;
        }
        if let Err(e) = self.parts_until(len, 1).await {
            self.abort().await;
            return Err(e);
        }
        if let Err(e) = self.check() {
            self.abort().await;
            return Err(e);
        }
        match self.upload.take() {
            Some(upload) => upload.complete().await,
            None => Ok(()),
        }
    }

    /// Whether the bytes sent are the blob.
    fn check(&self) -> store::Result<()> {
        let actual = Digest::from_hasher(self.hasher.clone());
        if actual == *self.digest {
            return Ok(());
        }
        Err(store::Error::DigestMismatch {
            expected: self.digest.clone(),
            actual,
            size: self.sent,
        })
    }

    async fn abort(mut self) {
        if let Some(upload) = self.upload.take() {
            upload.abort().await;
        }
    }
}

/// `n` bytes of the temp file at `pos`.
async fn read(reader: &BlobReader, pos: u64, n: u64) -> store::Result<Bytes> {
    let mut out = BytesMut::with_capacity(n as usize);
    while (out.len() as u64) < n {
        let at = pos + out.len() as u64;
        let want = (n - out.len() as u64) as usize;
        let chunk = reader
            .read(at, want)
            .await
            .map_err(|e| store::Error::io("download temp file", e))?;
        out.extend_from_slice(&chunk);
    }
    Ok(out.freeze())
}

/// Uploads older than this are taken for abandoned by a replica that died
/// (the longest download hoard expects, with room to spare).
const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// How often the bucket is swept for abandoned uploads.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Aborts the uploads this replica left when it last stopped (now), and
/// anyone's abandoned ones (now and every hour), until the mirror is gone.
pub(super) fn spawn_sweeper(bucket: std::sync::Weak<Bucket>) {
    let started = crate::clock::unix_ms();
    tokio::spawn(async move {
        loop {
            let Some(bucket) = bucket.upgrade() else {
                return;
            };
            match bucket.sweep_uploads(ABANDONED_AFTER, started).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(aborted = n, "aborted abandoned uploads in the bucket"),
                Err(e) => tracing::warn!(error = %e, "cannot sweep abandoned uploads"),
            }
            drop(bucket);
            tokio::time::sleep(SWEEP_EVERY).await;
        }
    });
}
