//! The HTTP listener loop (mini-redis style): takes a bound listener and a
//! shutdown future, caps concurrent connections, and on shutdown stops
//! accepting and lets requests in flight finish within a grace period.
//! Over TLS, ALPN decides between HTTP/2 and HTTP/1.1. Each listener offers
//! one surface (the registry API, metrics only, or the admin API), and a
//! handler that panics costs its request a 500, nothing more.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;

use parking_lot::Mutex;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, error, info, warn};

use super::app::{App, Surface};
use super::sendfile::{self, Segments};
use super::tls::Tls;
use super::{admin, handlers};

/// Connections served at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 4096;
/// Largest request head accepted; larger ones get 431 from hyper. Registry
/// requests carry a path and a bearer token at most.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// A TLS client must finish its handshake within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Per-client limits of a listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections one address may hold open at once; past it, new ones
    /// get one 429 and are closed. Offices and CI fleets behind one NAT
    /// share an address, hence a high default.
    pub connections_per_client: usize,
    /// A client must send its request head within this time (slowloris).
    pub header_read_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            connections_per_client: 1024,
            header_read_timeout: Duration::from_secs(30),
        }
    }
}

/// Open connections per client address.
#[derive(Default)]
struct PerClient(Mutex<HashMap<IpAddr, usize>>);

/// One client's connection slot; released on drop.
struct ClientSlot {
    counts: Arc<PerClient>,
    ip: IpAddr,
}

impl PerClient {
    fn take(self: &Arc<Self>, ip: IpAddr, limit: usize) -> Option<ClientSlot> {
        let mut counts = self.0.lock();
        let count = counts.entry(ip).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(ClientSlot {
            counts: self.clone(),
            ip,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock();
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// Serves `listener` (over TLS when `tls` is set) until `shutdown` resolves,
/// then drains for at most `grace`.
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    surface: Surface,
    tls: Option<Arc<Tls>>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_client = Arc::new(PerClient::default());
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            permit = limit.clone().acquire_owned() => permit.expect("semaphore never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let slot = per_client.take(peer.ip(), limits.connections_per_client);
        let over_limit = slot.is_none();
        if over_limit {
            debug!(%peer, "too many connections from this client");
        }
        // Plain HTTP/1 sends cached chunks with sendfile (see `sendfile`).
        let segments = Arc::new(Segments::default());
        let in_place = tls.is_none().then(|| segments.clone());
        let sendfile_bytes = app.metrics.sendfile_bytes.clone();
        let app = app.clone();
        let requested = Arc::new(AtomicBool::new(false));
        let asked = requested.clone();
        let service = service_fn(move |request| {
            let app = app.clone();
            let in_place = in_place.clone();
            asked.store(true, Ordering::Relaxed);
            async move {
                let mut response = if over_limit {
                    too_many_connections()
                } else {
                    // Boxed: the handler's future is large (every await of
                    // every route), and unboxed it was moved by value into
                    // `guarded` and then into hyper's slot for it: memcpys
                    // of its whole size per request, 6% of the CPU on a
                    // cached 64 KiB blob (perf, issue 16).
                    guarded(Box::pin(respond(&app, surface, Some(peer.ip()), request))).await
                };
                if let Some(segments) = in_place.as_ref() {
                    response.body_mut().send_in_place(segments);
                }
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        let http1 = move || {
            let mut builder = http1_builder(limits.header_read_timeout);
            builder.keep_alive(!over_limit);
            builder
        };
        let watcher = graceful.watcher();
        let acceptor = tls.as_ref().map(|tls| tls.acceptor());
        tokio::spawn(async move {
            let result = match acceptor {
                None => {
                    let io = sendfile::Io::new(stream, segments, sendfile_bytes);
                    // Vectored writes: hyper then queues body chunks as
                    // they are, which the placeholders rely on.
                    let mut builder = http1();
                    builder.writev(true);
                    watcher.watch(builder.serve_connection(io, service)).await
                }
                Some(acceptor) => {
                    let handshake =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
                    let stream = match handshake {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                    let io = TokioIo::new(stream);
                    if h2 {
                        let connection =
                            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .timer(TokioTimer::new())
                                .max_header_list_size(MAX_HEAD_BYTES as u32)
                                // Pings find peers gone silent: HTTP/2 has
                                // no per-request head timeout to do it.
                                .keep_alive_interval(Some(limits.header_read_timeout))
                                .keep_alive_timeout(limits.header_read_timeout)
                                .serve_connection(io, service);
                        let connection = watcher.watch(connection);
                        tokio::pin!(connection);
                        // Nor a preface timeout: a client that connects and
                        // asks nothing in time is dropped (slowloris).
                        let silent = async {
                            tokio::time::sleep(limits.header_read_timeout).await;
                            if requested.load(Ordering::Relaxed) {
                                std::future::pending::<()>().await;
                            }
                        };
                        tokio::select! {
                            result = &mut connection => result,
                            () = silent => {
                                debug!(%peer, "no HTTP/2 request in time");
                                Ok(())
                            }
                        }
                    } else {
                        watcher.watch(http1().serve_connection(io, service)).await
                    }
                }
            };
            if let Err(e) = result {
                debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(slot);
            drop(permit);
        });
    }
    drop(listener);
    info!("listener closed, draining connections");
    tokio::select! {
        _ = graceful.shutdown() => info!("all connections drained"),
        _ = tokio::time::sleep(grace) => warn!("shutdown grace period over, cutting remaining connections"),
    }
}

/// HTTP/1.1 with the request-head limits.
fn http1_builder(header_read_timeout: Duration) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_header_size(MAX_HEAD_BYTES)
        // Also what hyper queues of a body before it waits for the socket:
        // by default ~400 KiB per connection, which a thousand clients on a
        // cached blob, or a hundred slow readers of downloads, turned into
        // hundreds of MiB of chunks held for sockets that were full (issue
        // 16). With this, a connection holds at most one chunk past it.
        .max_buf_size(MAX_HEAD_BYTES);
    builder
}

/// The surface this listener offers decides who answers.
async fn respond<B>(
    app: &App,
    surface: Surface,
    peer: Option<IpAddr>,
    request: http::Request<B>,
) -> http::Response<super::Body> {
    match surface {
        Surface::Admin => admin::handle(app, request).await,
        Surface::Full | Surface::MetricsOnly => handlers::handle(app, surface, peer, request).await,
    }
}

/// Runs one request's handler. A panic in it (a bug) ends that request with
/// a 500 and a log line; the connection, the locks (which do not poison) and
/// every other request go on.
async fn guarded(
    handler: impl Future<Output = http::Response<super::Body>>,
) -> http::Response<super::Body> {
    let mut handler = std::pin::pin!(handler);
    let outcome = std::future::poll_fn(|cx| {
        match std::panic::catch_unwind(AssertUnwindSafe(|| handler.as_mut().poll(cx))) {
            Ok(Poll::Ready(response)) => Poll::Ready(Ok(response)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panic)),
        }
    })
    .await;
    outcome.unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        error!(panic = %message, "request handler panicked");
        super::error::response(&super::ApiError::new(
            super::Code::Unknown,
            "internal error",
        ))
    })
}

/// The one answer on a connection past the client's limit.
fn too_many_connections() -> http::Response<super::Body> {
    super::error::response(&super::ApiError::new(
        super::Code::TooManyRequests,
        "too many connections from this address",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn issue_12_a_panicking_handler_gets_a_500_and_the_next_one_runs() {
        let panicking = guarded(async {
            tokio::task::yield_now().await;
            panic!("a bug in a handler");
        })
        .await;
        assert_eq!(panicking.status(), http::StatusCode::INTERNAL_SERVER_ERROR);
        let body = http_body_util::BodyExt::collect(panicking.into_body())
            .await
            .unwrap()
            .to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["errors"][0]["code"], "UNKNOWN");
        let fine = guarded(async { http::Response::new(super::super::Body::empty()) }).await;
        assert_eq!(fine.status(), http::StatusCode::OK);
    }
}
