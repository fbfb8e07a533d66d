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

use sha2::{Digest as _, Sha256};

use super::error::Error;
use super::fill::{Fill, Source};
use super::Inner;
use crate::reference::{Digest, Repository};

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

/// Streams `file[start..end]`; with `fill`, follows a download in progress
/// (and `end` may be unknown until it completes).
pub(super) fn spawn(
    file: Arc<File>,
    start: u64,
    end: Option<u64>,
    fill: Option<(Arc<Fill>, Resume)>,
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
                        resume_from(file, pos, start, end, resume, tx, served).await;
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
            let read = match fill.as_ref().map(|fill| fill.source(pos, limit)) {
                Some(Source::Memory(chunk)) => Ok(chunk),
                // The fill failed under us: the state says how to go on.
                Some(Source::File(until)) if until <= pos => continue,
                Some(Source::File(until)) => read_file(&file, pos, until, false).await,
                None => read_file(&file, pos, limit, true).await,
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
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
    });
    ByteStream { rx }
}

/// Up to `CHUNK` bytes of `file` from `pos` (below `until`, which is past
/// `pos`). A stored blob is mapped: when its pages are in memory the chunk
/// goes out at once, else they are faulted in on a blocking thread. A
/// download's temp file is read.
async fn read_file(file: &Arc<File>, pos: u64, until: u64, stored: bool) -> io::Result<Bytes> {
    let n = (until - pos).min(CHUNK) as usize;
    if stored {
        if let Ok(map) = map_chunk(file, pos, n) {
            if is_resident(&map) {
                return Ok(Bytes::from_owner(map));
            }
            return blocking(move || {
                touch(&map);
                Ok(Bytes::from_owner(map))
            })
            .await;
        }
    }
    let file = file.clone();
    blocking(move || read_chunk(&file, pos, n)).await
}

/// Runs file work on the blocking pool.
async fn blocking(work: impl FnOnce() -> io::Result<Bytes> + Send + 'static) -> io::Result<Bytes> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)))
}

/// Maps `n` bytes at `pos` of a stored blob: the chunk goes from the page
/// cache to the socket with one copy (the kernel's), instead of a read into
/// a buffer and a write out of it. The mapping goes when the response drops
/// the chunk, so resident memory stays at the chunks in flight.
fn map_chunk(file: &File, pos: u64, n: usize) -> io::Result<memmap2::Mmap> {
    // SAFETY: a committed blob file is never written or truncated again
    // (content-addressed; eviction unlinks it, which leaves the mapping
    // valid), so the mapped bytes cannot change under the reader.
    unsafe { memmap2::MmapOptions::new().offset(pos).len(n).map(file) }
}

const PAGE: usize = 4096;

/// The page-aligned span covering a mapping.
fn pages(map: &memmap2::Mmap) -> (usize, usize) {
    let addr = map.as_ptr() as usize;
    let aligned = addr & !(PAGE - 1);
    (aligned, addr + map.len() - aligned)
}

/// Whether every page of the mapping is in memory, so reading it cannot
/// block the runtime on the disk.
fn is_resident(map: &memmap2::Mmap) -> bool {
    let (addr, len) = pages(map);
    let mut status = vec![0u8; len.div_ceil(PAGE)];
    // SAFETY: `addr..addr + len` lies within this live mapping (widened to
    // page boundaries, which the mapping itself is); `status` has one byte
    // per page.
    let r = unsafe { libc::mincore(addr as *mut libc::c_void, len, status.as_mut_ptr()) };
    r == 0 && status.iter().all(|s| s & 1 == 1)
}

/// Faults every page of the mapping in (on a blocking thread).
fn touch(map: &memmap2::Mmap) {
    let mut sum = 0u8;
    for i in (0..map.len()).step_by(PAGE) {
        sum = sum.wrapping_add(map[i]);
    }
    std::hint::black_box(sum);
}

/// Reads `n` bytes at `pos` into a new buffer without zeroing it first:
/// profiling 32 clients on a cached blob showed zeroing each 256 KiB chunk
/// (`BytesMut::zeroed`) cost more CPU than the read itself.
fn read_chunk(file: &File, pos: u64, n: usize) -> io::Result<Bytes> {
    use std::os::unix::io::AsRawFd;
    let mut buf = BytesMut::with_capacity(n);
    while buf.len() < n {
        let filled = buf.len();
        let spare = &mut buf.spare_capacity_mut()[..n - filled];
        let offset = libc::off_t::try_from(pos + filled as u64)
            .map_err(|_| io::Error::other("offset out of range"))?;
        // SAFETY: pread writes at most `spare.len()` bytes into memory this
        // buffer owns; `set_len` below covers only what it wrote.
        let read = unsafe {
            libc::pread(
                file.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                spare.len(),
                offset,
            )
        };
        match read {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            r if r < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            // SAFETY: the first `r` spare bytes were just initialized.
            r => unsafe { buf.set_len(filled + r as usize) },
        }
    }
    Ok(buf.freeze())
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
    pub inner: Arc<Inner>,
    pub repo: Repository,
    pub digest: Digest,
    pub len: Option<u64>,
}

/// The download a reader followed failed on the local side (disk full, I/O
/// error): the reader asks upstream for the rest (`Range` from `pos`) and
/// relays it, so its client still gets the blob. The bytes already sent are
/// re-read from the open temp file to verify the whole.
async fn resume_from(
    file: Arc<File>,
    pos: u64,
    start: u64,
    end: Option<u64>,
    resume: Resume,
    tx: mpsc::Sender<io::Result<Bytes>>,
    served: IntCounter,
) {
    // The reader may have sent bytes from memory that never reached the
    // file: ask from where the file ends (or `pos`), and hash the rest.
    let on_disk = file.metadata().map_or(0, |m| m.len());
    let from = pos.min(on_disk);
    let response = match resume
        .inner
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
            let prefix = tokio::task::spawn_blocking(move || hash_prefix(&file, offset)).await;
            match prefix {
                Ok(Ok(hasher)) => Some(hasher),
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

fn hash_prefix(file: &File, len: u64) -> io::Result<Sha256> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(CHUNK) as usize;
        file.read_exact_at(&mut buf[..n], pos)?;
        hasher.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(hasher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_and_read_chunks_match_the_file_at_any_offset() {
        let data: Vec<u8> = (0..3 * PAGE + 100).map(|i| (i % 253) as u8).collect();
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, &data).unwrap();
        for (pos, n) in [
            (0, data.len()),
            (1, 10),
            (PAGE - 1, PAGE + 2),
            (3 * PAGE, 100),
        ] {
            let map = map_chunk(&file, pos as u64, n).unwrap();
            touch(&map);
            assert!(is_resident(&map));
            assert_eq!(Bytes::from_owner(map), &data[pos..pos + n]);
            assert_eq!(
                read_chunk(&file, pos as u64, n).unwrap(),
                &data[pos..pos + n]
            );
        }
        assert!(read_chunk(&file, data.len() as u64 - 1, 2).is_err());
    }
}
