//! Plain HTTP/1 connections send cached blob chunks straight from the page
//! cache with `sendfile(2)`, as nginx does, instead of copying them into
//! hoard and out again: `perf` of 256 clients on a cached 64 KiB blob put
//! 69% of hoard's CPU in those two copies (issue 16).
//!
//! hyper writes every response and cannot be handed a file, so hyper still
//! does all of it (status, headers, lengths, keep-alive; the access log and
//! the metrics count the same body) and only the bytes are swapped at the
//! socket. For a chunk whose pages are all cached, the response body
//! (`Body::send_in_place`) yields a placeholder: a `Bytes` as long as the
//! chunk pointing into `PLACEHOLDER`, and pushes the file range it stands
//! for onto the connection's `Segments`. `Io`, the connection's transport,
//! writes everything else as it comes; where a write reaches a placeholder
//! slice it sends the range at the front of the queue from the file.
//!
//! This rests on hyper queueing body chunks as they are, never copying
//! them, when the transport writes vectored (hyper 1's `WriteStrategy::
//! Queue`, which `writev(true)` on the connection's builder pins): each
//! placeholder reaches `Io` as its own slice, advanced only by what `Io`
//! reported written. `Io` checks that: each placeholder starts at an offset
//! of its own in `PLACEHOLDER` (its tag, one of `MAX_QUEUED`), so a slice is
//! matched to its range by address, not length, and a placeholder dropped,
//! repeated or out of order cuts the connection, as does a non-vectored
//! write while ranges are queued (hyper copying them). A mistake here ends
//! in a cut connection, never in wrong bytes. The tests serve blobs through
//! this path and compare every byte.
//!
//! `sendfile` waits for the disk when a page is not in the page cache, on
//! the runtime's thread. The body hands out only ranges the page cache held
//! (and had read in) when it was polled; `Io` asks again before a send
//! when that answer is more than `RECHECK_AFTER` old (a slow client can
//! hold a range, or the one before it, for minutes while pages are
//! evicted). A range no longer all there is read on the blocking pool and
//! written as bytes.
//!
//! Only plain HTTP/1 takes this path: TLS must encrypt in user space and
//! HTTP/2 frames the body, so both read the chunk into memory as before.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::os::unix::io::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use hyper::rt::Write as _;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use prometheus::IntCounter;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::mirror::{BlobReader, Damage, CHUNK, CLIENT_STALL};

/// Ranges queued by a connection's bodies: hyper holds at most this many
/// buffers, and stops asking the body for more past 64 KiB buffered (one
/// chunk). More means the queue and hyper are out of step.
const MAX_QUEUED: usize = 16;

/// What placeholders point into: `CHUNK` bytes past each of `MAX_QUEUED`
/// tags. Never read or written: zeroed heap memory the kernel maps on first
/// touch, and nothing touches it. Its addresses mark a slice as a
/// placeholder and say which one.
static PLACEHOLDER: LazyLock<&'static [u8]> =
    LazyLock::new(|| vec![0u8; CHUNK as usize + MAX_QUEUED].leak());

/// Off once a `sendfile` said the file system cannot (no splice read):
/// bodies then read chunks as on TLS.
static UNAVAILABLE: AtomicBool = AtomicBool::new(false);

/// Whether bodies should hand out placeholders.
pub fn available() -> bool {
    !UNAVAILABLE.load(Ordering::Relaxed)
}

/// One file range a placeholder stands for.
struct Segment {
    reader: BlobReader,
    pos: u64,
    len: usize,
    /// Where its placeholder starts in `PLACEHOLDER`.
    tag: usize,
    /// Bytes of it already written (its placeholder's slice starts there).
    sent: usize,
    damage: Damage,
    /// When the body checked that the page cache held it.
    checked: std::time::Instant,
}

impl Segment {
    /// Whether the page cache still holds `pos..pos + left` of this range,
    /// asked again when the last answer is older than `RECHECK_AFTER`.
    fn fresh(&mut self, pos: u64, left: usize) -> bool {
        if self.checked.elapsed() <= RECHECK_AFTER {
            return true;
        }
        let cached = self.reader.is_cached(pos, left);
        if cached {
            self.checked = std::time::Instant::now();
        }
        cached
    }
}

/// A range checked longer ago than this is checked again before it is
/// sent: hyper asks the body for the next chunk while the last one's tail
/// may still wait for a slow client.
const RECHECK_AFTER: std::time::Duration = std::time::Duration::from_millis(5);

/// The file ranges a connection's placeholders stand for, in the order
/// hyper will write them. Shared by the connection's bodies (which push)
/// and its `Io` (which sends and pops); both run on the connection's task.
#[derive(Default)]
pub struct Segments(Mutex<Queue>);

#[derive(Default)]
struct Queue {
    ranges: VecDeque<Segment>,
    /// The next tag.
    next: usize,
}

impl Segments {
    /// A placeholder for `len` bytes at `pos` of `reader`'s file, whose
    /// pages are in the page cache; `damage` hears of a short file.
    pub fn push(
        &self,
        reader: BlobReader,
        pos: u64,
        len: usize,
        damage: Damage,
    ) -> io::Result<Bytes> {
        let mut queue = self.0.lock();
        if len == 0 || len as u64 > CHUNK || queue.ranges.len() >= MAX_QUEUED {
            return Err(out_of_step());
        }
        let tag = queue.next;
        queue.next = (tag + 1) % MAX_QUEUED;
        queue.ranges.push_back(Segment {
            reader,
            pos,
            len,
            tag,
            sent: 0,
            damage,
            checked: std::time::Instant::now(),
        });
        Ok(Bytes::from_static(&PLACEHOLDER[tag..tag + len]))
    }

    fn is_empty(&self) -> bool {
        self.0.lock().ranges.is_empty()
    }
}

fn out_of_step() -> io::Error {
    io::Error::other("sendfile ranges out of step with the response")
}

/// Whether hyper handed us (part of) a placeholder.
fn is_placeholder(slice: &[u8]) -> bool {
    !slice.is_empty() && PLACEHOLDER.as_ptr_range().contains(&slice.as_ptr())
}

/// A range being read because the page cache no longer held it.
enum Fallback {
    Reading(Pin<Box<dyn Future<Output = io::Result<Bytes>> + Send>>),
    Read(Bytes),
}

/// A plain TCP connection's transport for hyper: reads as usual, writes
/// placeholders with `sendfile`. Also cuts a client that takes nothing for
/// `CLIENT_STALL`: a body sent from the file holds no task that could time
/// it out (the read path's task does that for the others).
pub struct Io {
    tcp: TokioIo<TcpStream>,
    segments: Arc<Segments>,
    /// `hoard_sendfile_bytes_total`.
    sent: IntCounter,
    /// The front range's bytes, read on the blocking pool.
    fallback: Option<Fallback>,
    /// The deadline of a write waiting for the socket (made at the first
    /// wait, then reset: no allocation per wait).
    stall: Option<Pin<Box<Sleep>>>,
    /// Whether a write is waiting now (`stall` runs).
    waiting: bool,
}

impl Io {
    pub fn new(tcp: TcpStream, segments: Arc<Segments>, sent: IntCounter) -> Io {
        Io {
            tcp: TokioIo::new(tcp),
            segments,
            sent,
            fallback: None,
            stall: None,
            waiting: false,
        }
    }

    /// Writes `bufs` up to the first placeholder, or the range the first
    /// placeholder stands for.
    fn write(&mut self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let written = match bufs.iter().position(|b| is_placeholder(b)) {
            Some(0) => self.send_front(cx, &bufs[0]),
            // The head before a body's first chunk: held back (MSG_MORE)
            // to leave in the same packet as the chunk, as nginx's
            // TCP_NOPUSH does. The sendfile that follows pushes it; if that
            // fails the connection closes, which pushes it too.
            Some(n) => self.send_more(cx, &bufs[..n]),
            None => Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs),
        };
        match written {
            Poll::Ready(result) => {
                self.waiting = false;
                Poll::Ready(result)
            }
            Poll::Pending => {
                let deadline = tokio::time::Instant::now() + CLIENT_STALL;
                let stall = self
                    .stall
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !std::mem::replace(&mut self.waiting, true) {
                    stall.as_mut().reset(deadline);
                }
                ready!(stall.as_mut().poll(cx));
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "client took no data for too long",
                )))
            }
        }
    }

    /// Sends (part of) the range at the front of the queue, which
    /// `placeholder` must stand for: from the page cache with `sendfile`,
    /// or as bytes read on the blocking pool when the page cache no longer
    /// holds it all.
    fn send_front(&mut self, cx: &mut Context<'_>, placeholder: &[u8]) -> Poll<io::Result<usize>> {
        let segments = self.segments.clone();
        let mut queue = segments.0.lock();
        let Some(front) = queue.ranges.front_mut() else {
            return Poll::Ready(Err(out_of_step()));
        };
        let expected = PLACEHOLDER[front.tag + front.sent..].as_ptr();
        if placeholder.as_ptr() != expected || placeholder.len() != front.len - front.sent {
            return Poll::Ready(Err(out_of_step()));
        }
        let pos = front.pos + front.sent as u64;
        let left = front.len - front.sent;
        let sent = loop {
            match self.fallback.as_mut() {
                Some(Fallback::Read(bytes)) => {
                    let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &bytes[..]))?;
                    bytes.advance(n);
                    if bytes.is_empty() {
                        self.fallback = None;
                    }
                    break n;
                }
                Some(Fallback::Reading(read)) => match ready!(read.as_mut().poll(cx)) {
                    Ok(bytes) if !bytes.is_empty() => {
                        self.fallback = Some(Fallback::Read(bytes));
                    }
                    Ok(_) => return Poll::Ready(Err(short_file(&front.damage))),
                    Err(e) => {
                        self.fallback = None;
                        if e.kind() == io::ErrorKind::UnexpectedEof {
                            front.damage.report();
                        }
                        return Poll::Ready(Err(e));
                    }
                },
                // Asked again when the body's answer is not fresh: a slow
                // client may have held the range (or the one before it)
                // for minutes.
                None if !available() || !front.fresh(pos, left) => {
                    let reader = front.reader.clone();
                    self.fallback = Some(Fallback::Reading(Box::pin(async move {
                        reader.read(pos, left).await
                    })));
                }
                None => match ready!(self.sendfile(cx, &front.reader, pos, left)) {
                    Ok(0) => return Poll::Ready(Err(short_file(&front.damage))),
                    Ok(n) => {
                        self.sent.inc_by(n as u64);
                        break n;
                    }
                    Err(e) if unsupported(&e) => {
                        // Not this file system: read instead, from now on.
                        UNAVAILABLE.store(true, Ordering::Relaxed);
                    }
                    Err(e) => return Poll::Ready(Err(e)),
                },
            }
        };
        front.sent += sent;
        if front.sent == front.len {
            queue.ranges.pop_front();
        }
        Poll::Ready(Ok(sent))
    }

    /// `sendfile` of `len` bytes at `pos` of `reader`'s file.
    fn sendfile(
        &self,
        cx: &mut Context<'_>,
        reader: &BlobReader,
        pos: u64,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        let file = reader.file().as_raw_fd();
        let mut offset =
            libc::off_t::try_from(pos).map_err(|_| io::Error::other("offset out of range"))?;
        let socket = self.tcp.inner().as_raw_fd();
        self.poll_socket(cx, || {
            // SAFETY: both descriptors are open (the socket is ours, the
            // file is held by the segment); the kernel writes `offset`.
            counted(unsafe { libc::sendfile(socket, file, &mut offset, len) })
        })
    }

    /// `sendmsg(MSG_MORE)` of `bufs`.
    fn send_more(&mut self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let socket = self.tcp.inner().as_raw_fd();
        self.poll_socket(cx, || {
            // SAFETY: an all-zero msghdr is a valid empty one.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            // IoSlice is ABI-compatible with iovec (std guarantees it on
            // Unix); the kernel only reads them. hyper passes at most 64.
            msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
            msg.msg_iovlen = bufs.len().min(libc::UIO_MAXIOV as usize) as _;
            // SAFETY: `msg` points at `bufs`, live for the call.
            counted(unsafe { libc::sendmsg(socket, &msg, libc::MSG_MORE | libc::MSG_NOSIGNAL) })
        })
    }

    /// Runs `send` when the socket is writable, again until it does not
    /// say `WouldBlock`.
    fn poll_socket(
        &self,
        cx: &mut Context<'_>,
        mut send: impl FnMut() -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        let tcp = self.tcp.inner();
        loop {
            ready!(tcp.poll_write_ready(cx))?;
            match tcp.try_io(Interest::WRITABLE, &mut send) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                result => return Poll::Ready(result),
            }
        }
    }
}

/// A send call's result: bytes sent, or the error it set.
fn counted(r: isize) -> io::Result<usize> {
    usize::try_from(r).map_err(|_| io::Error::last_os_error())
}

/// The file ended before the range: changed behind hoard's back.
fn short_file(damage: &Damage) -> io::Error {
    damage.report();
    io::Error::new(io::ErrorKind::UnexpectedEof, "blob shorter than announced")
}

/// `sendfile` errors that mean "not from this file", not "this socket".
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS)
    )
}

impl hyper::rt::Read for Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // Only a flattening hyper writes this way, and it would have copied
        // the placeholders: their ranges would never be sent.
        if !self.segments.is_empty() {
            return Poll::Ready(Err(out_of_step()));
        }
        self.write(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.write(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn file_with(data: &[u8]) -> BlobReader {
        BlobReader::temp(data).0
    }

    fn no_damage() -> Damage {
        Damage::new(|| panic!("nothing is damaged here"))
    }

    #[test]
    fn a_placeholder_is_known_by_its_address_not_its_bytes() {
        let segments = Segments::default();
        let reader = file_with(b"0123456789");
        let placeholder = segments.push(reader.clone(), 0, 10, no_damage()).unwrap();
        assert!(is_placeholder(&placeholder));
        assert!(is_placeholder(&placeholder[3..]));
        assert!(!is_placeholder(&[0u8; 10]));
        assert!(!is_placeholder(&placeholder[..0]));
        // Never more than hyper could hold, never an empty or oversized one.
        assert!(segments.push(reader.clone(), 0, 0, no_damage()).is_err());
        let over = CHUNK as usize + 1;
        assert!(segments.push(reader.clone(), 0, over, no_damage()).is_err());
        for _ in 1..MAX_QUEUED {
            segments.push(reader.clone(), 0, 1, no_damage()).unwrap();
        }
        assert!(segments.push(reader, 0, 1, no_damage()).is_err());
    }

    /// `Io` on the server side of a loopback connection, and the client.
    async fn pair(segments: Arc<Segments>) -> (Io, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let sent = IntCounter::new("sent", "test").unwrap();
        (Io::new(server, segments, sent), client)
    }

    async fn write(io: &mut Io, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        std::future::poll_fn(|cx| Pin::new(&mut *io).poll_write_vectored(cx, bufs)).await
    }

    /// Writes `bufs` whole, as hyper does: what is left, until none is.
    async fn write_all(io: &mut Io, mut bufs: Vec<Bytes>) -> io::Result<()> {
        while !bufs.is_empty() {
            let slices: Vec<_> = bufs.iter().map(|b| IoSlice::new(b)).collect();
            let mut n = write(io, &slices).await?;
            assert!(n > 0);
            while n > 0 {
                let take = n.min(bufs[0].len());
                bufs[0].advance(take);
                n -= take;
                if bufs[0].is_empty() {
                    bufs.remove(0);
                }
            }
        }
        Ok(())
    }

    #[tokio::test]
    async fn placeholders_are_sent_from_their_file_in_order() {
        use tokio::io::AsyncReadExt;
        let segments = Arc::new(Segments::default());
        let (mut io, mut client) = pair(segments.clone()).await;
        let first = segments
            .push(file_with(b"0123456789"), 2, 5, no_damage())
            .unwrap();
        let second = segments
            .push(file_with(b"abcdef"), 0, 6, no_damage())
            .unwrap();
        let bufs = vec![
            Bytes::from_static(b"head|"),
            first,
            Bytes::from_static(b"|"),
            second,
        ];
        write_all(&mut io, bufs).await.unwrap();
        drop(io);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"head|23456|abcdef");
        assert!(segments.is_empty());
    }

    #[tokio::test]
    async fn a_placeholder_out_of_step_with_the_queue_cuts_instead_of_sending() {
        let segments = Arc::new(Segments::default());
        let (mut io, _client) = pair(segments.clone()).await;
        // A placeholder with nothing queued.
        let stray = Bytes::from_static(&PLACEHOLDER[..4]);
        assert!(write(&mut io, &[IoSlice::new(&stray)]).await.is_err());
        // One cut short, and one written before the range ahead of it:
        // both the same length as the front range.
        let first = segments
            .push(file_with(b"0123456789"), 0, 10, no_damage())
            .unwrap();
        let second = segments
            .push(file_with(b"abcdefghij"), 0, 10, no_damage())
            .unwrap();
        for wrong in [&first[..5], &second[..]] {
            let e = write(&mut io, &[IoSlice::new(wrong)]).await.unwrap_err();
            assert!(e.to_string().contains("out of step"), "{e}");
        }
        // A flattening writer (hyper copying the placeholders) is refused.
        let e = std::future::poll_fn(|cx| Pin::new(&mut io).poll_write(cx, b"copied"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("out of step"), "{e}");
    }

    #[tokio::test]
    async fn a_file_shorter_than_its_range_is_reported_damaged_and_cuts() {
        use tokio::io::AsyncReadExt;
        let segments = Arc::new(Segments::default());
        let (mut io, mut client) = pair(segments.clone()).await;
        let reports = Arc::new(AtomicUsize::new(0));
        let counted = reports.clone();
        let damage = Damage::new(move || {
            counted.fetch_add(1, Ordering::SeqCst);
        });
        // The index says 10 bytes; the file holds 4.
        let placeholder = segments.push(file_with(b"0123"), 0, 10, damage).unwrap();
        let e = write_all(&mut io, vec![placeholder]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(reports.load(Ordering::SeqCst), 1);
        drop(io);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"0123", "only what the file had");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_takes_nothing_is_cut_after_the_stall_time() {
        let segments = Arc::new(Segments::default());
        let (mut io, client) = pair(segments).await;
        let chunk = vec![7u8; 1 << 20];
        let started = tokio::time::Instant::now();
        // The client reads once, 100 s in, then never again: the socket
        // fills, the write waits; the read lets it go on; it fills again,
        // and that wait runs its full stall time from then (the clock is
        // paused, so the waits take no real time).
        let reader = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_secs(100)).await;
            let mut buf = vec![0u8; 1 << 20];
            let mut drained = 0;
            loop {
                match client.try_read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => drained += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{e}"),
                }
            }
            assert!(drained > 0);
            client
        });
        let e = loop {
            match write(&mut io, &[IoSlice::new(&chunk)]).await {
                Ok(n) => assert!(n > 0),
                Err(e) => break e,
            }
            assert!(started.elapsed() <= 2 * CLIENT_STALL, "never cut");
        };
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let _client = reader.await.unwrap();
        let cut_at = started.elapsed();
        assert!(
            cut_at >= std::time::Duration::from_secs(100) + CLIENT_STALL,
            "{cut_at:?}"
        );
    }
}
