//! Copying a download from upstream into the shared bucket while it runs,
//! so the fleet has the blob as soon as it is verified. The uploader
//! follows the download's temp file, not the network: it sends each part
//! once it is on disk (never holding back the clients of the download, and
//! holding at most one part in memory), and completes the multipart upload
//! only after the download is verified. A download that fails aborts the
//! upload: nothing partial or unverified becomes visible in the bucket.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
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
pub(super) fn spawn(
    bucket: Arc<Bucket>,
    digest: Digest,
    fill: Arc<Fill>,
    len: Option<u64>,
) -> JoinHandle<store::Result<Uploaded>> {
    tokio::spawn(async move { follow(&bucket, &digest, &fill, len).await })
}

async fn follow(
    bucket: &Arc<Bucket>,
    digest: &Digest,
    fill: &Fill,
    len: Option<u64>,
) -> store::Result<Uploaded> {
    let reader = fill.reader();
    let mut state = fill.subscribe();
    // A blob smaller than a part goes in one PUT once verified.
    let single = len.is_some_and(|len| len < PART_SIZE);
    let mut upload: Option<store::Upload> = None;
    let mut sent = 0;
    loop {
        let current = state.borrow_and_update().clone();
        match current {
            FillState::Failed(_) => {
                if let Some(upload) = upload {
                    upload.abort().await;
                }
                return Ok(Uploaded::Abandoned);
            }
            FillState::Complete { len } => {
                if upload.is_none() && len < PART_SIZE {
                    let bytes = read(&reader, 0, len).await?;
                    bucket.put_verified(digest, None, bytes).await?;
                    return Ok(Uploaded::Done);
                }
                let mut upload = match upload {
                    Some(upload) => upload,
                    None => bucket.start_upload(digest).await?,
                };
                if let Err(e) = send_parts(&mut upload, &reader, &mut sent, len, 1).await {
                    upload.abort().await;
                    return Err(e);
                }
                upload.complete().await?;
                return Ok(Uploaded::Done);
            }
            FillState::Connecting | FillState::Streaming { .. } if !single => {
                let on_disk = fill.in_file();
                if on_disk >= sent + PART_SIZE {
                    if upload.is_none() {
                        upload = Some(bucket.start_upload(digest).await?);
                    }
                    let current = upload.as_mut().expect("just started");
                    let sending = send_parts(current, &reader, &mut sent, on_disk, PART_SIZE).await;
                    if let Err(e) = sending {
                        if let Some(upload) = upload.take() {
                            upload.abort().await;
                        }
                        return Err(e);
                    }
                }
            }
            FillState::Connecting | FillState::Streaming { .. } => {}
        }
        if state.changed().await.is_err() {
            // The download task is gone without a result (cancelled).
            if let Some(upload) = upload {
                upload.abort().await;
            }
            return Ok(Uploaded::Abandoned);
        }
    }
}

/// Sends `sent..until` as parts of `PART_SIZE` (the last one shorter),
/// stopping short of a final piece smaller than `min_last`.
async fn send_parts(
    upload: &mut store::Upload,
    reader: &BlobReader,
    sent: &mut u64,
    until: u64,
    min_last: u64,
) -> store::Result<()> {
    while *sent < until {
        let n = (until - *sent).min(PART_SIZE);
        if n < min_last {
            break;
        }
        let bytes = read(reader, *sent, n).await?;
        upload.put_part(bytes).await?;
        *sent += n;
    }
    Ok(())
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
