//! Plain HTTP/1 connections send cached blob chunks straight from the page
//! cache with `sendfile(2)`, as nginx does, instead of copying them into
//! hoard and out again: `perf` of 256 clients on a cached 64 KiB blob put
//! 69% of hoard's CPU in those two copies (issue 16).
//!
//! hyper writes every response and cannot be handed a file, so hyper still
//! does all of it (status, headers, lengths, keep-alive; the access log and
//! the metrics count the same body) and only the bytes are swapped at the
//! socket. For a chunk whose pages are all cached, the response body
//! (`Body::send_in_place`) yields a placeholder: a `Bytes` pointing into
//! `PLACEHOLDER`, as long as the chunk, and pushes the file range it stands
//! for onto the connection's `Segments`. `Io`, the connection's transport,
//! writes everything else as it comes; where a write reaches a placeholder
//! slice it sends the range at the front of the queue from the file.
//!
//! This rests on hyper queueing body chunks as they are, never copying
//! them, when the transport writes vectored (`writev(true)` on the
//! connection's builder, which `server` sets): each placeholder reaches
//! `Io` as its own slice, advanced only by what `Io` reported written. `Io`
//! checks that each placeholder slice is exactly the range at the front of
//! the queue and cuts the connection otherwise: a mistake here ends in a
//! cut connection, never in wrong bytes for the client. The tests serve
//! blobs through this path and compare every byte.
//!
//! Only plain HTTP/1 takes this path: TLS must encrypt in user space and
//! HTTP/2 frames the body, so both read the chunk into memory as before.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::os::unix::io::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use hyper::rt::Write as _;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use prometheus::IntCounter;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Sleep;

use crate::mirror::CLIENT_STALL;
use crate::store::BlobReader;

/// What a placeholder points into: never read, never written (a static in
/// `.bss`, so its pages are never even touched). Its address is what marks
/// a slice as a placeholder.
static PLACEHOLDER: [u8; crate::store::buffers::SIZE] = [0; crate::store::buffers::SIZE];

/// Ranges queued by a connection's bodies: hyper holds at most this many
/// buffers, and stops asking the body for more past 64 KiB buffered (one
/// chunk). More means the queue and hyper are out of step.
const MAX_QUEUED: usize = 16;

/// One file range a placeholder stands for.
struct Segment {
    reader: BlobReader,
    pos: u64,
    len: usize,
}

/// The file ranges a connection's placeholders stand for, in the order
/// hyper will write them. Shared by the connection's bodies (which push)
/// and its `Io` (which sends and pops); both run on the connection's task.
#[derive(Default)]
pub struct Segments(Mutex<VecDeque<Segment>>);

impl Segments {
    /// A placeholder for `len` bytes at `pos` of `reader`'s file, whose
    /// pages are in the page cache.
    pub fn push(&self, reader: BlobReader, pos: u64, len: usize) -> io::Result<Bytes> {
        let mut queue = self.0.lock();
        if len == 0 || len > PLACEHOLDER.len() || queue.len() >= MAX_QUEUED {
            return Err(out_of_step());
        }
        queue.push_back(Segment { reader, pos, len });
        Ok(Bytes::from_static(&PLACEHOLDER[..len]))
    }
}

fn out_of_step() -> io::Error {
    io::Error::other("sendfile ranges out of step with the response")
}

/// Whether hyper handed us (part of) a placeholder.
fn is_placeholder(slice: &[u8]) -> bool {
    !slice.is_empty() && PLACEHOLDER.as_ptr_range().contains(&slice.as_ptr())
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
            stall: None,
            waiting: false,
        }
    }

    /// Writes `bufs` up to the first placeholder, or the range the first
    /// placeholder stands for.
    fn write(&mut self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let written = match bufs.iter().position(|b| is_placeholder(b)) {
            Some(0) => self.send_front(cx, bufs[0].len()),
            // The head before a body's first chunk: held back (MSG_MORE)
            // to leave in the same packet as the chunk, as nginx's
            // TCP_NOPUSH does. The sendfile that follows pushes it.
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

    /// Sends (part of) the range at the front of the queue, which the
    /// placeholder slice of `len` bytes must stand for.
    fn send_front(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<usize>> {
        let segments = self.segments.clone();
        let mut queue = segments.0.lock();
        let Some(front) = queue.front_mut() else {
            return Poll::Ready(Err(out_of_step()));
        };
        if front.len != len {
            return Poll::Ready(Err(out_of_step()));
        }
        let file = front.reader.file().as_raw_fd();
        let mut offset = libc::off_t::try_from(front.pos)
            .map_err(|_| io::Error::other("offset out of range"))?;
        let socket = self.tcp.inner().as_raw_fd();
        let sent = ready!(self.poll_socket(cx, || {
            // SAFETY: both descriptors are open (the socket is ours, the
            // file is held by the segment); the kernel writes `offset`.
            let r = unsafe { libc::sendfile(socket, file, &mut offset, len) };
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(r as usize)
            }
        }))?;
        if sent == 0 {
            // The file ended early: changed behind hoard's back.
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "blob shorter than announced",
            )));
        }
        front.pos += sent as u64;
        front.len -= sent;
        if front.len == 0 {
            queue.pop_front();
        }
        self.sent.inc_by(sent as u64);
        Poll::Ready(Ok(sent))
    }

    /// `sendmsg(MSG_MORE)` of `bufs`.
    fn send_more(&mut self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let socket = self.tcp.inner().as_raw_fd();
        self.poll_socket(cx, || {
            // SAFETY: an all-zero msghdr is a valid empty one.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            // IoSlice is ABI-compatible with iovec (std guarantees it on
            // Unix); the kernel only reads them.
            msg.msg_iov = bufs.as_ptr() as *mut libc::iovec;
            msg.msg_iovlen = bufs.len().min(libc::UIO_MAXIOV as usize) as _;
            // SAFETY: `msg` points at `bufs`, live for the call.
            let r = unsafe { libc::sendmsg(socket, &msg, libc::MSG_MORE | libc::MSG_NOSIGNAL) };
            if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(r as usize)
            }
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

    #[test]
    fn a_placeholder_is_known_by_its_address_not_its_bytes() {
        let segments = Segments::default();
        let file = tempfile::tempfile().unwrap();
        let reader = BlobReader::from_file(file);
        let placeholder = segments.push(reader.clone(), 0, 10).unwrap();
        assert!(is_placeholder(&placeholder));
        assert!(is_placeholder(&placeholder[3..]));
        assert!(!is_placeholder(&[0u8; 10]));
        assert!(!is_placeholder(&placeholder[..0]));
        // Never more than hyper could hold, never an empty or oversized one.
        assert!(segments.push(reader.clone(), 0, 0).is_err());
        assert!(segments
            .push(reader.clone(), 0, PLACEHOLDER.len() + 1)
            .is_err());
        for _ in 1..MAX_QUEUED {
            segments.push(reader.clone(), 0, 1).unwrap();
        }
        assert!(segments.push(reader, 0, 1).is_err());
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

    fn file_with(data: &[u8]) -> BlobReader {
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, data).unwrap();
        BlobReader::from_file(file)
    }

    #[tokio::test]
    async fn placeholders_are_sent_from_their_file_in_order() {
        use tokio::io::AsyncReadExt;
        let segments = Arc::new(Segments::default());
        let (mut io, mut client) = pair(segments.clone()).await;
        let first = segments.push(file_with(b"0123456789"), 2, 5).unwrap();
        let second = segments.push(file_with(b"abcdef"), 0, 6).unwrap();
        let mut bufs = vec![
            (Bytes::from_static(b"head|"), false),
            (first, true),
            (Bytes::from_static(b"|"), false),
            (second, true),
        ];
        // As hyper does: write what is left until all is written.
        while !bufs.is_empty() {
            let slices: Vec<_> = bufs.iter().map(|(b, _)| IoSlice::new(b)).collect();
            let mut n = write(&mut io, &slices).await.unwrap();
            assert!(n > 0);
            while n > 0 {
                let take = n.min(bufs[0].0.len());
                let _ = bufs[0].0.split_to(take);
                n -= take;
                if bufs[0].0.is_empty() {
                    bufs.remove(0);
                }
            }
        }
        drop(io);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"head|23456|abcdef");
        assert!(segments.0.lock().is_empty());
    }

    #[tokio::test]
    async fn a_placeholder_out_of_step_with_the_queue_cuts_instead_of_sending() {
        let segments = Arc::new(Segments::default());
        let (mut io, _client) = pair(segments.clone()).await;
        // A placeholder with nothing queued.
        let stray = Bytes::from_static(&PLACEHOLDER[..4]);
        assert!(write(&mut io, &[IoSlice::new(&stray)]).await.is_err());
        // One whose length is not the front range's.
        let placeholder = segments.push(file_with(b"0123456789"), 0, 10).unwrap();
        let e = write(&mut io, &[IoSlice::new(&placeholder[..5])])
            .await
            .unwrap_err();
        assert!(e.to_string().contains("out of step"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_takes_nothing_is_cut_after_the_stall_time() {
        let segments = Arc::new(Segments::default());
        let (mut io, _client) = pair(segments).await;
        let chunk = vec![7u8; 1 << 20];
        let started = tokio::time::Instant::now();
        // The client never reads: the socket fills, then the write waits
        // until the (paused, so instant) clock reaches the stall time.
        let e = loop {
            match write(&mut io, &[IoSlice::new(&chunk)]).await {
                Ok(n) => assert!(n > 0),
                Err(e) => break e,
            }
            assert!(started.elapsed() <= CLIENT_STALL, "never cut");
        };
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= CLIENT_STALL);
    }
}
