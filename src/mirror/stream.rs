//! Blob bodies: a task reads chunks (a stored blob, a download's window or
//! temp file, an upstream body) and hands them to the response through a
//! small bounded channel, so memory per transfer stays at a few chunks
//! whatever the blob size. A client that goes away closes the channel and
//! stops the task. This module only sends bytes: what happens when the
//! local side fails a transfer (a damaged blob, a download that hit a full
//! disk) is the mirror's decision, handed in as `Follow`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use prometheus::IntCounter;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use super::error::Error;
use super::fill::{Fill, Source};
use crate::reference::Digest;
use crate::store::BlobReader;

/// Bytes read from a file per chunk: one pooled read buffer. Also the
/// longest `Chunk::File`.
pub const CHUNK: u64 = crate::store::buffers::SIZE as u64;
/// Chunks buffered per transfer.
const DEPTH: usize = 2;

/// A blob body being read; yields an error (a cut connection for the
/// client) if the read or the download it follows fails.
pub struct ByteStream {
    /// A stored blob's range not handed to a task yet (see `spawn`).
    stored: Option<Stored>,
    /// The rest, from the task; `None` when `stored` is all.
    rx: Option<mpsc::Receiver<io::Result<Bytes>>>,
}

/// A chunk for a consumer that can send from the file itself.
pub enum Chunk {
    Bytes(Bytes),
    /// `len` bytes at `pos` of a stored blob, every page of them in the
    /// page cache when this was yielded (`BlobReader::is_cached`). Whoever
    /// finds the file shorter than that reports it to `damage`.
    File {
        reader: BlobReader,
        pos: u64,
        len: usize,
        damage: Damage,
    },
}

/// Who is told, once, that a stored blob is shorter than its index says:
/// shared by a stream and the file chunks it handed out, since the
/// connection that sends those itself is the one to find the short file.
#[derive(Clone)]
pub struct Damage(Arc<parking_lot::Mutex<Option<OnDamaged>>>);

impl Damage {
    pub(crate) fn new(on_damaged: impl FnOnce() + Send + 'static) -> Damage {
        Damage(Arc::new(parking_lot::Mutex::new(Some(Box::new(
            on_damaged,
        )))))
    }

    /// Reports the blob damaged (the first call only).
    pub fn report(&self) {
        let on_damaged = self.0.lock().take();
        if let Some(on_damaged) = on_damaged {
            on_damaged();
        }
    }
}

/// A stored blob's range not handed to a task yet.
struct Stored {
    reader: BlobReader,
    pos: u64,
    end: u64,
    damage: Damage,
    served: IntCounter,
    /// Whether the first chunk was asked for in bytes (`poll_next`).
    started: bool,
    /// For a consumer that sends from files: the blocking pool putting the
    /// bytes up to `.1` into the page cache (`BlobReader::load`).
    loading: Option<(tokio::task::JoinHandle<io::Result<()>>, u64)>,
    /// Bytes before this were loaded once (or failed to): not again.
    loaded: u64,
    /// A chunk being read as bytes (`poll_next_in_place`).
    reading: Option<Pin<Box<dyn Future<Output = io::Result<Bytes>> + Send>>>,
}

/// Bytes put in the page cache at a time for `poll_next_in_place`.
const LOAD_AHEAD: u64 = 4 * CHUNK;
// A load must cover at least the chunk that waits for it.
const _: () = assert!(LOAD_AHEAD >= CHUNK);

impl Stored {
    /// Starts loading `LOAD_AHEAD` bytes from `from` into the page cache.
    fn load(&mut self, from: u64) {
        let until = (from + LOAD_AHEAD).min(self.end);
        let reader = self.reader.clone();
        let load = tokio::task::spawn_blocking(move || reader.load(from, until - from));
        self.loading = Some((load, until));
    }

    /// The next chunk's length.
    fn next_len(&self) -> usize {
        (self.end - self.pos).min(CHUNK) as usize
    }
}

impl ByteStream {
    fn channel(rx: mpsc::Receiver<io::Result<Bytes>>) -> ByteStream {
        ByteStream {
            stored: None,
            rx: Some(rx),
        }
    }

    /// Counts `n` bytes of `stored` as sent.
    fn advance(&mut self, n: u64) {
        if let Some(stored) = self.stored.as_mut() {
            stored.served.inc_by(n);
            stored.pos += n;
            if stored.pos >= stored.end {
                self.stored = None;
            }
        }
    }

    /// Hands what is left of `stored` to a task, which reads ahead.
    fn start_task(&mut self) {
        if let Some(Stored {
            reader,
            pos,
            end,
            damage,
            served,
            ..
        }) = self.stored.take()
        {
            let pieces = vec![Piece::Range(pos, Some(end))];
            let on_damaged: OnDamaged = Box::new(move || damage.report());
            self.rx = Some(start(reader, pieces, Follow::Stored(on_damaged), served));
        }
    }

    /// The next chunk, `None` at the end.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        if let Some(stored) = self.stored.as_mut() {
            let first = !std::mem::replace(&mut stored.started, true);
            // The first chunk here if cached, without waiting; anything else
            // (the disk, a short file) is the task's to read and to report.
            let cached = first
                .then(|| stored.reader.read_cached(stored.pos, stored.next_len()))
                .and_then(Result::ok)
                .flatten();
            if let Some(chunk) = cached {
                self.advance(chunk.len() as u64);
                // The rest starts reading now, while hyper sends this one.
                self.start_task();
                return Poll::Ready(Some(Ok(chunk)));
            }
            self.start_task();
        }
        match self.rx.as_mut() {
            Some(rx) => rx.poll_recv(cx),
            None => Poll::Ready(None),
        }
    }

    /// The next chunk for a consumer that sends from files itself (plain
    /// HTTP/1's `sendfile`): each chunk of a stored blob comes as a
    /// `Chunk::File` once the page cache holds all of it, read by nobody
    /// here. Chunks not in the page cache (the first hit after a download,
    /// which was written around it) are first loaded there on the blocking
    /// pool, `LOAD_AHEAD` at a time and the next window while the current
    /// one is sent; a chunk loaded and dropped again before it was sent
    /// (memory pressure) comes as bytes, read on the blocking pool.
    pub fn poll_next_in_place(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Chunk>>> {
        while let Some(stored) = self.stored.as_mut() {
            let len = stored.next_len();
            if let Some(read) = stored.reading.as_mut() {
                let read = ready!(read.as_mut().poll(cx));
                stored.reading = None;
                return Poll::Ready(Some(match read {
                    Ok(bytes) => {
                        self.advance(bytes.len() as u64);
                        Ok(Chunk::Bytes(bytes))
                    }
                    Err(e) => {
                        if e.kind() == io::ErrorKind::UnexpectedEof {
                            stored.damage.report();
                        }
                        self.stored = None;
                        Err(e)
                    }
                }));
            }
            let cached = stored.reader.is_cached(stored.pos, len);
            if let Some((loading, until)) = stored.loading.as_mut() {
                // Waited for when this chunk needs it; collected as soon as
                // it is done either way, so the next window can start.
                if !cached || loading.is_finished() {
                    let until = *until;
                    let loaded = ready!(Pin::new(loading).poll(cx));
                    stored.loading = None;
                    // A failed load (a short file, the disk): the reads
                    // below meet the failure again and report it as for
                    // any client.
                    stored.loaded = match loaded {
                        Ok(Ok(())) => until,
                        _ => stored.end,
                    };
                    if !cached {
                        let covered = stored.loaded >= stored.pos + len as u64;
                        if covered && !stored.reader.is_cached(stored.pos, len) {
                            // Loaded and still not seen as cached: this
                            // system cannot tell (no cachestat, no
                            // RWF_NOWAIT). The task reads the rest, ahead.
                            break;
                        }
                        continue;
                    }
                }
            }
            if cached {
                let chunk = Chunk::File {
                    reader: stored.reader.clone(),
                    pos: stored.pos,
                    len,
                    damage: stored.damage.clone(),
                };
                // Loading (a first hit): the next window starts loading
                // once the current one is half sent.
                let next = stored.pos + len as u64;
                let loading = stored.loaded > 0 && stored.loaded < stored.end;
                if loading
                    && stored.loading.is_none()
                    && next < stored.end
                    && next + LOAD_AHEAD / 2 >= stored.loaded
                    && BlobReader::can_load()
                {
                    stored.load(stored.loaded.max(next));
                }
                self.advance(len as u64);
                return Poll::Ready(Some(Ok(chunk)));
            }
            if !BlobReader::can_load() {
                break;
            }
            if stored.loaded >= stored.pos + len as u64 {
                // Loaded, then evicted before it was sent (memory
                // pressure): this chunk as bytes; the next ones are loaded.
                let (reader, pos) = (stored.reader.clone(), stored.pos);
                stored.reading = Some(Box::pin(async move { reader.read(pos, len).await }));
                continue;
            }
            stored.load(stored.pos);
        }
        self.poll_next(cx)
            .map(|next| next.map(|r| r.map(Chunk::Bytes)))
    }

    /// Awaits the next chunk.
    pub async fn next(&mut self) -> Option<io::Result<Bytes>> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// Whether nothing more will come (hyper then ends the body without
    /// polling again).
    pub fn is_end(&self) -> bool {
        self.stored.is_none() && self.rx.is_none()
    }
}

/// A client that takes no data for this long is dropped (its connection
/// is cut), freeing the file and the transfer slot.
pub const CLIENT_STALL: std::time::Duration = std::time::Duration::from_secs(300);

/// Hands a chunk to the response; false if the client is gone or stalled.
async fn deliver(tx: &mpsc::Sender<io::Result<Bytes>>, chunk: Bytes) -> bool {
    matches!(
        tokio::time::timeout(CLIENT_STALL, tx.send(Ok(chunk))).await,
        Ok(Ok(()))
    )
}

/// Called when a stored blob turns out shorter than its index says.
pub(super) type OnDamaged = Box<dyn FnOnce() + Send>;

/// Called when a download a transfer follows fails on the local side (disk
/// full, I/O error), with the transfer to finish: the mirror decides how.
pub(super) type Resume =
    Box<dyn FnOnce(Handoff) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// What a transfer reads, and who is told when the local side fails it.
pub(super) enum Follow {
    /// A stored blob; a short read (changed behind hoard's back) cuts the
    /// transfer and calls the callback.
    Stored(OnDamaged),
    /// A download in progress, and who finishes the transfer if the
    /// download fails locally.
    Fill(Arc<Fill>, Resume),
}

/// A transfer the local side could not finish, handed over at `pos`.
pub(super) struct Handoff {
    /// The failed download's temp file, as far as it got.
    pub reader: BlobReader,
    /// The next byte the client needs.
    pub pos: u64,
    /// The range the client asked for (`end` unknown for a download of
    /// unannounced length).
    pub start: u64,
    pub end: Option<u64>,
    tx: mpsc::Sender<io::Result<Bytes>>,
    served: IntCounter,
}

impl Handoff {
    /// Sends the client `[pos, end)` of `response`, an upstream body whose
    /// first byte is at `response.offset`; with `hasher` (holding every
    /// byte before that offset) the whole blob is verified against `digest`
    /// before the last chunk goes out.
    pub async fn relay(
        self,
        response: crate::upstream::BlobResponse,
        digest: Digest,
        hasher: Option<Sha256>,
    ) {
        let verify = hasher.map(|hasher| (hasher, digest));
        pump(response, self.pos, self.end, verify, self.tx, self.served).await;
    }

    /// Ends the transfer with an error: the client sees a cut connection.
    pub async fn fail(self, message: String) {
        let _ = self.tx.send(Err(io::Error::other(message))).await;
    }
}

/// What a transfer sends, in order: ranges of the blob (`end` unknown for
/// a download of unannounced length) and bytes of the caller's own between
/// them (the part headers of a `multipart/byteranges` answer).
pub enum Piece {
    Range(u64, Option<u64>),
    Literal(Bytes),
}

/// Streams `pieces` of what `follow` says.
///
/// A stored blob asked for in one range starts when the stream is first
/// polled, with its first chunk read there if the page cache holds it:
/// hyper then sends the headers and that chunk in one `writev`, and a blob
/// that fits one chunk (configs, thin layers: most blobs of a pull) needs
/// no task and no channel at all. Profiling 256 clients on a cached 64 KiB
/// blob showed two `writev`s per request (the headers went out alone while
/// the task started) besides the task's own wake-ups. A task reads the rest
/// ahead. A plain HTTP/1 connection instead takes every chunk as a file
/// range to `sendfile` from the page cache, loaded there first when it is
/// not (`poll_next_in_place`).
pub(super) fn spawn(
    reader: BlobReader,
    pieces: Vec<Piece>,
    follow: Follow,
    served: IntCounter,
) -> ByteStream {
    match (follow, pieces.as_slice()) {
        (Follow::Stored(on_damaged), &[Piece::Range(pos, Some(end))]) => ByteStream {
            stored: (pos < end).then(|| Stored {
                reader,
                pos,
                end,
                damage: Damage::new(on_damaged),
                served,
                started: false,
                loading: None,
                loaded: 0,
                reading: None,
            }),
            rx: None,
        },
        (follow, _) => ByteStream::channel(start(reader, pieces, follow, served)),
    }
}

/// Starts the task that streams `pieces` of what `follow` says.
fn start(
    reader: BlobReader,
    pieces: Vec<Piece>,
    follow: Follow,
    served: IntCounter,
) -> mpsc::Receiver<io::Result<Bytes>> {
    let (tx, rx) = mpsc::channel(DEPTH);
    tokio::spawn(async move {
        let (fill, on_damaged, resume) = match follow {
            Follow::Stored(on_damaged) => (None, Some(on_damaged), None),
            Follow::Fill(fill, resume) => (Some(fill), None, Some(resume)),
        };
        let mut transfer = Transfer {
            progress: fill.as_ref().map(|fill| fill.subscribe()),
            fill,
            reader,
            on_damaged,
            // Upstream can finish one range for the client, not a
            // multipart answer.
            resume: resume.filter(|_| pieces.len() == 1),
            tx,
            served,
        };
        for piece in pieces {
            let (start, end) = match piece {
                Piece::Literal(bytes) => {
                    if !deliver(&transfer.tx, bytes).await {
                        return;
                    }
                    continue;
                }
                Piece::Range(start, end) => (start, end),
            };
            match transfer.send(start, end).await {
                Sent::All => {}
                Sent::Stopped => return,
                Sent::HandOff(pos) => {
                    let resume = transfer.resume.take().expect("only with a resume");
                    let handoff = Handoff {
                        reader: transfer.reader,
                        pos,
                        start,
                        end,
                        tx: transfer.tx,
                        served: transfer.served,
                    };
                    resume(handoff).await;
                    return;
                }
            }
        }
    });
    rx
}

/// One transfer's reading side.
struct Transfer {
    reader: BlobReader,
    fill: Option<Arc<Fill>>,
    progress: Option<tokio::sync::watch::Receiver<super::fill::FillState>>,
    on_damaged: Option<OnDamaged>,
    resume: Option<Resume>,
    tx: mpsc::Sender<io::Result<Bytes>>,
    served: IntCounter,
}

/// How sending a range ended.
enum Sent {
    All,
    /// The client is gone or was sent an error.
    Stopped,
    /// The download failed locally at this position: `resume` finishes.
    HandOff(u64),
}

impl Transfer {
    /// Sends `reader[start..end]`.
    async fn send(&mut self, start: u64, end: Option<u64>) -> Sent {
        let mut pos = start;
        while end.is_none_or(|end| pos < end) {
            let limit = match self.progress.as_mut() {
                None => end.expect("stored blobs have a length"),
                Some(rx) => match Fill::readable(rx, pos).await {
                    Ok(limit) => limit,
                    // A local failure (disk full, I/O): upstream has the
                    // rest. A bucket that failed mid-read is not resumed
                    // upstream: the fleet's copy exists, the client retries.
                    Err(Error::Store(e)) if self.resume.is_some() && !e.is_bucket() => {
                        return Sent::HandOff(pos);
                    }
                    Err(e) => {
                        let _ = self.tx.send(Err(io::Error::other(e.to_string()))).await;
                        return Sent::Stopped;
                    }
                },
            };
            let limit = end.map_or(limit, |end| limit.min(end));
            if limit <= pos {
                if end.is_some_and(|end| pos < end) {
                    let _ = self
                        .tx
                        .send(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "blob shorter than announced",
                        )))
                        .await;
                    return Sent::Stopped;
                }
                return Sent::All;
            }
            // Room for the chunk first, then the read: a transfer whose
            // client is slow waits holding no chunk, so a connection holds
            // at most the channel's chunks and the one hyper is writing
            // (issue 16: a thousand connections on a cached blob).
            let permit = match tokio::time::timeout(CLIENT_STALL, self.tx.reserve()).await {
                Ok(Ok(permit)) => permit,
                _ => return Sent::Stopped,
            };
            // A reader keeping up with a download takes the chunks that just
            // arrived; everything else is read from the file.
            let until = match self.fill.as_ref().map(|fill| fill.source(pos, limit)) {
                Some(Source::Memory(chunk)) => Err(chunk),
                // The fill failed under us: the state says how to go on.
                Some(Source::File(until)) if until <= pos => continue,
                Some(Source::File(until)) => Ok(until),
                None => Ok(limit),
            };
            let read = match until {
                Err(chunk) => Ok(chunk),
                Ok(until) => {
                    self.reader
                        .read(pos, (until - pos).min(CHUNK) as usize)
                        .await
                }
            };
            match read {
                Ok(chunk) => {
                    let n = chunk.len() as u64;
                    self.served.inc_by(n);
                    permit.send(Ok(chunk));
                    pos += n;
                }
                Err(e) => {
                    if e.kind() == io::ErrorKind::UnexpectedEof {
                        if let Some(on_damaged) = self.on_damaged.take() {
                            on_damaged();
                        }
                    }
                    permit.send(Err(e));
                    return Sent::Stopped;
                }
            }
        }
        Sent::All
    }
}

/// A body read chunk by chunk: upstream's or the shared bucket's.
pub(super) trait Chunks: Send + 'static {
    fn next_chunk(&mut self) -> impl Future<Output = Result<Option<Bytes>, String>> + Send;
}

impl Chunks for crate::upstream::BlobResponse {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, String> {
        self.chunk().await.map_err(|e| e.to_string())
    }
}

impl Chunks for crate::store::BucketBody {
    async fn next_chunk(&mut self) -> Result<Option<Bytes>, String> {
        self.chunk().await.map_err(|e| e.to_string())
    }
}

/// Relays a body as it comes, unverified: a range of a blob not cached
/// (see `lazy`), which no digest covers.
pub(super) fn forward(mut body: impl Chunks, served: IntCounter) -> ByteStream {
    let (tx, rx) = mpsc::channel(DEPTH);
    tokio::spawn(async move {
        loop {
            match body.next_chunk().await {
                Ok(Some(chunk)) => {
                    served.inc_by(chunk.len() as u64);
                    if !deliver(&tx, chunk).await {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    let _ = tx.send(Err(io::Error::other(e))).await;
                    return;
                }
            }
        }
    });
    ByteStream::channel(rx)
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
    let verify = (start == 0).then(|| (Sha256::new(), digest));
    tokio::spawn(pump(response, start, end, verify, tx, served));
    ByteStream::channel(rx)
}

/// Sends `[send_from, end)` of an upstream body (whose first byte is at
/// `response.offset`). With `verify` (a hasher holding every byte before
/// the body, and the digest), the whole blob is verified before the last
/// chunk goes out.
async fn pump(
    mut response: crate::upstream::BlobResponse,
    send_from: u64,
    end: Option<u64>,
    mut verify: Option<(Sha256, Digest)>,
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
        if let Some((hasher, _)) = verify.as_mut() {
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
    if let (Some((hasher, digest)), true) = (verify, complete) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A stored stream of `len` bytes over a file holding `data`, dropped
    /// from the page cache first; and how often it reported damage.
    fn stored(data: &[u8], len: u64) -> (ByteStream, IntCounter, Arc<AtomicUsize>) {
        let (reader, _) = BlobReader::temp(data);
        reader.evict();
        let served = IntCounter::new("served", "test").unwrap();
        let damaged = Arc::new(AtomicUsize::new(0));
        let counted = damaged.clone();
        let on_damaged: OnDamaged = Box::new(move || {
            counted.fetch_add(1, Ordering::SeqCst);
        });
        let stream = spawn(
            reader,
            vec![Piece::Range(0, Some(len))],
            Follow::Stored(on_damaged),
            served.clone(),
        );
        (stream, served, damaged)
    }

    /// Every chunk `poll_next_in_place` yields, with file ranges read back.
    async fn drain(stream: &mut ByteStream) -> (Vec<u8>, usize, Option<io::Error>) {
        let (mut got, mut files) = (Vec::new(), 0);
        while let Some(chunk) = std::future::poll_fn(|cx| stream.poll_next_in_place(cx)).await {
            match chunk {
                Ok(Chunk::Bytes(bytes)) => got.extend_from_slice(&bytes),
                Ok(Chunk::File {
                    reader, pos, len, ..
                }) => {
                    assert!(
                        reader.is_cached(pos, len),
                        "a file range not in the page cache"
                    );
                    got.extend_from_slice(&reader.read(pos, len).await.unwrap());
                    files += 1;
                }
                Err(e) => return (got, files, Some(e)),
            }
        }
        (got, files, None)
    }

    #[tokio::test]
    async fn a_blob_not_in_the_page_cache_is_loaded_and_sent_as_file_ranges() {
        let data: Vec<u8> = (0..5 * CHUNK + 123).map(|i| (i % 251) as u8).collect();
        let (mut stream, served, damaged) = stored(&data, data.len() as u64);
        let (got, files, error) = drain(&mut stream).await;
        assert!(error.is_none());
        assert!(got == data);
        assert_eq!(files, 6, "every chunk from the page cache");
        assert_eq!(served.get(), data.len() as u64, "each byte counted once");
        assert_eq!(damaged.load(Ordering::SeqCst), 0);
        assert!(stream.is_end());
    }

    #[tokio::test]
    async fn a_file_shorter_than_its_index_says_is_reported_once_and_ends_in_an_error() {
        let data: Vec<u8> = (0..CHUNK + 100).map(|i| (i % 249) as u8).collect();
        let (mut stream, served, damaged) = stored(&data, 3 * CHUNK);
        let (got, _, error) = drain(&mut stream).await;
        assert_eq!(error.unwrap().kind(), io::ErrorKind::UnexpectedEof);
        let after = std::future::poll_fn(|cx| stream.poll_next_in_place(cx)).await;
        assert!(after.is_none(), "the stream ends after its error");
        assert!(got == data, "what the file had, then the error");
        assert_eq!(served.get(), data.len() as u64);
        assert_eq!(damaged.load(Ordering::SeqCst), 1);
    }
}
