//! Blob bodies: a task reads the file in large positioned reads on the
//! blocking pool and hands chunks to the response through a small bounded
//! channel, so memory per transfer stays at a few chunks whatever the blob
//! size. A client that goes away closes the channel and stops the task.

use std::io;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use prometheus::IntCounter;
use tokio::sync::mpsc;

use sha2::{Digest as _, Sha256};

use super::error::Error;
use super::fill::{Fill, Source};
use super::Shared;
use crate::reference::{Digest, Repository};
use crate::store::BlobReader;

/// Bytes read from a file per chunk.
const CHUNK: u64 = 256 * 1024;
/// Chunks buffered per transfer.
const DEPTH: usize = 2;

/// A blob body being read; yields an error (a cut connection for the
/// client) if the read or the download it follows fails.
pub struct ByteStream {
    rx: mpsc::Receiver<io::Result<Bytes>>,
}

impl ByteStream {
    /// The next chunk, `None` at the end.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        self.rx.poll_recv(cx)
    }

    /// Awaits the next chunk.
    pub async fn next(&mut self) -> Option<io::Result<Bytes>> {
        self.rx.recv().await
    }
}

/// A client that takes no data for this long is dropped (its connection
/// is cut), freeing the file and the transfer slot.
const CLIENT_STALL: std::time::Duration = std::time::Duration::from_secs(300);

/// Hands a chunk to the response; false if the client is gone or stalled.
async fn deliver(tx: &mpsc::Sender<io::Result<Bytes>>, chunk: Bytes) -> bool {
    matches!(
        tokio::time::timeout(CLIENT_STALL, tx.send(Ok(chunk))).await,
        Ok(Ok(()))
    )
}

/// Called when a stored blob turns out shorter than its index says.
pub(super) type OnDamaged = Box<dyn FnOnce() + Send>;

/// Streams `reader[start..end]`; with `fill`, follows a download in
/// progress (and `end` may be unknown until it completes). A stored blob
/// that ends early (changed behind hoard's back) cuts this transfer and
/// calls `on_damaged`.
pub(super) fn spawn(
    reader: BlobReader,
    start: u64,
    end: Option<u64>,
    fill: Option<(Arc<Fill>, Resume)>,
    on_damaged: Option<OnDamaged>,
    served: IntCounter,
) -> ByteStream {
    let (tx, rx) = mpsc::channel(DEPTH);
    tokio::spawn(async move {
        let (fill, mut progress, mut resume) = match fill {
            Some((fill, resume)) => {
                let progress = fill.subscribe();
                (Some(fill), Some(progress), Some(resume))
            }
            None => (None, None, None),
        };
        let mut pos = start;
        while end.is_none_or(|end| pos < end) {
            let limit = match progress.as_mut() {
                None => end.expect("stored blobs have a length"),
                Some(rx) => match Fill::readable(rx, pos).await {
                    Ok(limit) => limit,
                    Err(Error::Store(_)) if resume.is_some() => {
                        let resume = resume.take().expect("checked");
                        resume_from(reader, pos, start, end, resume, tx, served).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(io::Error::other(e.to_string()))).await;
                        return;
                    }
                },
            };
            let limit = end.map_or(limit, |end| limit.min(end));
            if limit <= pos {
                if end.is_some_and(|end| pos < end) {
                    let _ = tx
                        .send(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "blob shorter than announced",
                        )))
                        .await;
                }
                return;
            }
            // A reader keeping up with a download takes the chunks that just
            // arrived; everything else is read from the file.
            let until = match fill.as_ref().map(|fill| fill.source(pos, limit)) {
                Some(Source::Memory(chunk)) => Err(chunk),
                // The fill failed under us: the state says how to go on.
                Some(Source::File(until)) if until <= pos => continue,
                Some(Source::File(until)) => Ok(until),
                None => Ok(limit),
            };
            let read = match until {
                Err(chunk) => Ok(chunk),
                Ok(until) => reader.read(pos, (until - pos).min(CHUNK) as usize).await,
            };
            match read {
                Ok(chunk) => {
                    let n = chunk.len() as u64;
                    served.inc_by(n);
                    if !deliver(&tx, chunk).await {
                        return;
                    }
                    pos += n;
                }
                Err(e) => {
                    if e.kind() == io::ErrorKind::UnexpectedEof && fill.is_none() {
                        if let Some(on_damaged) = on_damaged {
                            on_damaged();
                        }
                    }
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
    });
    ByteStream { rx }
}

/// Relays an upstream body straight to one client, `start..end` of it,
/// hashing everything; the last chunk is held back until the digest is
/// checked (when the whole blob is relayed), so a corrupt body ends in a
/// cut connection.
pub(super) fn relay(
    response: crate::upstream::BlobResponse,
    digest: Digest,
    start: u64,
    end: Option<u64>,
    served: IntCounter,
) -> ByteStream {
    let (tx, rx) = mpsc::channel(DEPTH);
    let hasher = (start == 0).then(Sha256::new);
    tokio::spawn(pump(response, digest, start, end, hasher, tx, served));
    ByteStream { rx }
}

/// Sends `[send_from, end)` of an upstream body (whose first byte is at
/// `response.offset`). With a `hasher` (holding every byte before the body),
/// the whole blob is verified before the last chunk goes out.
async fn pump(
    mut response: crate::upstream::BlobResponse,
    digest: Digest,
    send_from: u64,
    end: Option<u64>,
    mut hasher: Option<Sha256>,
    tx: mpsc::Sender<io::Result<Bytes>>,
    served: IntCounter,
) {
    let mut pos = response.offset;
    let mut held: Option<Bytes> = None;
    loop {
        let chunk = match response.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(e) => {
                let _ = tx.send(Err(io::Error::other(e.to_string()))).await;
                return;
            }
        };
        if let Some(hasher) = hasher.as_mut() {
            hasher.update(&chunk);
        }
        let (from, to) = (pos, pos + chunk.len() as u64);
        pos = to;
        let lo = send_from.clamp(from, to) - from;
        let hi = end.unwrap_or(u64::MAX).clamp(from, to) - from;
        if lo < hi {
            let part = chunk.slice(lo as usize..hi as usize);
            if let Some(previous) = held.replace(part) {
                served.inc_by(previous.len() as u64);
                if !deliver(&tx, previous).await {
                    return;
                }
            }
        }
    }
    let complete = end.is_none_or(|end| end == pos);
    if let (Some(hasher), true) = (hasher, complete) {
        if Digest::from_hasher(hasher) != digest {
            let _ = tx
                .send(Err(io::Error::other(
                    "upstream content does not match its digest",
                )))
                .await;
            return;
        }
    }
    if let Some(last) = held {
        served.inc_by(last.len() as u64);
        deliver(&tx, last).await;
    }
}

/// Where a reader of a failed download can get the rest of the blob.
pub(super) struct Resume {
    pub shared: Arc<Shared>,
    pub repo: Repository,
    pub digest: Digest,
    pub len: Option<u64>,
}

/// The download a reader followed failed on the local side (disk full, I/O
/// error): the reader asks upstream for the rest (`Range` from `pos`) and
/// relays it, so its client still gets the blob. The bytes already sent are
/// re-read from the open temp file to verify the whole.
async fn resume_from(
    reader: BlobReader,
    pos: u64,
    start: u64,
    end: Option<u64>,
    resume: Resume,
    tx: mpsc::Sender<io::Result<Bytes>>,
    served: IntCounter,
) {
    // The reader may have sent bytes from memory that never reached the
    // file: ask from where the file ends (or `pos`), and hash the rest.
    let on_disk = reader.file_len().unwrap_or(0);
    let from = pos.min(on_disk);
    let response = match resume
        .shared
        .upstream
        .get_blob_from(&resume.repo, &resume.digest, from)
        .await
    {
        Ok(response) => response,
        Err(e) => {
            let _ = tx.send(Err(io::Error::other(e.to_string()))).await;
            return;
        }
    };
    let whole = start == 0 && end.is_none_or(|end| Some(end) == resume.len);
    let hasher = match (whole, response.offset) {
        (false, _) => None,
        (true, 0) => Some(Sha256::new()),
        (true, offset) => {
            let prefix = hash_prefix(&reader, offset).await;
            match prefix {
                Ok(hasher) => Some(hasher),
                _ => {
                    let _ = tx
                        .send(Err(io::Error::other("cannot re-read the partial download")))
                        .await;
                    return;
                }
            }
        }
    };
    pump(response, resume.digest, pos, end, hasher, tx, served).await;
}

/// Hashes the first `len` bytes the reader holds.
async fn hash_prefix(reader: &BlobReader, len: u64) -> io::Result<Sha256> {
    let mut hasher = Sha256::new();
    let mut pos = 0;
    while pos < len {
        let chunk = reader.read(pos, (len - pos).min(CHUNK) as usize).await?;
        hasher.update(&chunk);
        pos += chunk.len() as u64;
    }
    Ok(hasher)
}
