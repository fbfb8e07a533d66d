//! Blob bodies: a task reads the file in large positioned reads on the
//! blocking pool and hands chunks to the response through a small bounded
//! channel, so memory per transfer stays at a few chunks whatever the blob
//! size. A client that goes away closes the channel and stops the task.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use prometheus::IntCounter;
use tokio::sync::mpsc;

use super::fill::Fill;

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

/// Streams `file[start..end]`; with `fill`, follows a download in progress
/// (and `end` may be unknown until it completes).
pub(super) fn spawn(
    file: Arc<File>,
    start: u64,
    end: Option<u64>,
    fill: Option<Arc<Fill>>,
    served: IntCounter,
) -> ByteStream {
    let (tx, rx) = mpsc::channel(DEPTH);
    tokio::spawn(async move {
        let mut progress = fill.as_ref().map(|f| f.subscribe());
        let mut pos = start;
        while end.is_none_or(|end| pos < end) {
            let limit = match progress.as_mut() {
                None => end.expect("stored blobs have a length"),
                Some(rx) => match Fill::readable(rx, pos).await {
                    Ok(limit) => limit,
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
            let n = (limit - pos).min(CHUNK) as usize;
            let file = file.clone();
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = BytesMut::zeroed(n);
                file.read_exact_at(&mut buf, pos).map(|()| buf.freeze())
            })
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)));
            match read {
                Ok(chunk) => {
                    served.inc_by(n as u64);
                    if tx.send(Ok(chunk)).await.is_err() {
                        return;
                    }
                    pos += n as u64;
                }
                Err(e) => {
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
    mut response: crate::upstream::BlobResponse,
    digest: crate::reference::Digest,
    start: u64,
    end: Option<u64>,
    served: IntCounter,
) -> ByteStream {
    use sha2::Digest as _;
    let (tx, rx) = mpsc::channel(DEPTH);
    tokio::spawn(async move {
        let mut hasher = sha2::Sha256::new();
        let mut pos: u64 = 0;
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
            hasher.update(&chunk);
            let (from, to) = (pos, pos + chunk.len() as u64);
            pos = to;
            let lo = start.clamp(from, to) - from;
            let hi = end.unwrap_or(u64::MAX).clamp(from, to) - from;
            if lo < hi {
                let part = chunk.slice(lo as usize..hi as usize);
                if let Some(previous) = held.replace(part) {
                    served.inc_by(previous.len() as u64);
                    if tx.send(Ok(previous)).await.is_err() {
                        return;
                    }
                }
            }
        }
        let whole = start == 0 && end.is_none_or(|end| end == pos);
        if whole && crate::reference::Digest::from_hasher(hasher) != digest {
            let _ = tx
                .send(Err(io::Error::other(
                    "upstream content does not match its digest",
                )))
                .await;
            return;
        }
        if let Some(last) = held {
            served.inc_by(last.len() as u64);
            let _ = tx.send(Ok(last)).await;
        }
    });
    ByteStream { rx }
}
