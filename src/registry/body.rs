//! Response bodies, and the access log line written when a body is done
//! (complete, failed or abandoned by the client), so the line carries the
//! bytes really sent and the full duration.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::Response;
use http_body::{Frame, SizeHint};
use tracing::info;

use super::sendfile::Segments;
use crate::mirror::{ByteStream, Chunk, Outcome};

/// A JSON answer with its `Content-Type` and `Content-Length`; for a `HEAD`,
/// the same headers without the body. Every JSON response (the API's, its
/// errors, the admin API's) is made here.
pub fn json_response(body: impl Into<Bytes>, head: bool) -> Response<Body> {
    let body = body.into();
    let len = body.len();
    let mut response = Response::new(Body::unless_head(body, head));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    response
}

/// A response body: nothing, a buffer, or a blob stream.
pub struct Body {
    kind: Kind,
    log: Option<AccessLog>,
    /// Set on plain HTTP/1 connections: cached chunks of a stream leave
    /// with `sendfile` (see `sendfile`).
    in_place: Option<Arc<Segments>>,
}

enum Kind {
    Empty,
    Full(Option<Bytes>),
    Stream(ByteStream),
}

impl Body {
    /// No body (HEAD, 304).
    pub fn empty() -> Body {
        Body {
            kind: Kind::Empty,
            log: None,
            in_place: None,
        }
    }

    /// A body already in memory.
    pub fn full(bytes: impl Into<Bytes>) -> Body {
        Body {
            kind: Kind::Full(Some(bytes.into())),
            log: None,
            in_place: None,
        }
    }

    /// `bytes`, or nothing for a `HEAD` (whose headers still say how long
    /// the `GET` body is).
    pub fn unless_head(bytes: impl Into<Bytes>, head: bool) -> Body {
        if head {
            Body::empty()
        } else {
            Body::full(bytes)
        }
    }

    /// A streamed blob.
    pub fn stream(stream: ByteStream) -> Body {
        Body {
            kind: Kind::Stream(stream),
            log: None,
            in_place: None,
        }
    }

    /// Lets a stream's cached chunks be sent from their file by the
    /// connection whose ranges `segments` holds.
    pub(super) fn send_in_place(&mut self, segments: &Arc<Segments>) {
        if matches!(self.kind, Kind::Stream(_)) && super::sendfile::available() {
            self.in_place = Some(segments.clone());
        }
    }

    /// Attaches the access log entry written when the body is dropped.
    pub fn logged(mut self, mut log: AccessLog) -> Body {
        log.complete = matches!(self.kind, Kind::Empty);
        self.log = Some(log);
        self
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        let polled = match &mut this.kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(Ok)),
            Kind::Stream(stream) => match this.in_place.as_ref() {
                None => stream.poll_next(cx),
                Some(segments) => stream.poll_next_in_place(cx).map(|next| {
                    next.map(|chunk| match chunk? {
                        Chunk::Bytes(bytes) => Ok(bytes),
                        Chunk::File {
                            reader,
                            pos,
                            len,
                            damage,
                        } => segments.push(reader, pos, len, damage),
                    })
                }),
            },
        };
        if let (Poll::Ready(item), Some(log)) = (&polled, this.log.as_mut()) {
            match item {
                Some(Ok(chunk)) => log.bytes += chunk.len() as u64,
                Some(Err(_)) => log.failed = true,
                None => log.complete = true,
            }
        }
        polled.map(|item| item.map(|r| r.map(Frame::data)))
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Stream(stream) => stream.is_end(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Stream(_) => SizeHint::default(),
        }
    }
}

/// One access log line, written on drop.
pub struct AccessLog {
    pub method: http::Method,
    pub path: String,
    pub query: String,
    pub status: u16,
    /// How the cache answered; `None` for requests it had no part in.
    pub cache: Option<Outcome>,
    pub started: Instant,
    /// `Content-Length`: hyper stops polling once that much is sent.
    pub expected: Option<u64>,
    bytes: u64,
    complete: bool,
    failed: bool,
}

impl AccessLog {
    /// An entry for a request that started at `started`.
    pub fn new(
        method: http::Method,
        path: String,
        query: String,
        status: u16,
        cache: Option<Outcome>,
        started: Instant,
    ) -> AccessLog {
        AccessLog {
            method,
            path,
            query,
            status,
            cache,
            started,
            expected: None,
            bytes: 0,
            complete: false,
            failed: false,
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        let end = if self.failed {
            "failed"
        } else if self.complete || self.expected == Some(self.bytes) {
            "complete"
        } else {
            "aborted"
        };
        info!(
            method = %self.method,
            path = %self.path,
            query = %self.query,
            status = self.status,
            bytes = self.bytes,
            cache = self.cache.map_or("-", Outcome::as_str),
            body = end,
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            "request"
        );
    }
}
