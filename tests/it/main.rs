//! In-process integration tests: hoard on 127.0.0.1:0 in front of the fake
//! upstream in `fake`. One binary, one module per topic.

mod fake;
#[path = "../support/mod.rs"]
mod support;

mod admin;
mod auth;
mod bucket;
mod evict;
mod faults;
mod hostile;
mod leaks;
mod login;
mod pull;
mod quota;
mod ranges;
mod referrers;
mod regression;
mod resume;
mod sendfile;
mod single_flight;
mod ssrf;
mod tls;
mod ui;
mod warm;

use std::net::SocketAddr;
use std::time::Duration;

use hoard::config::{Config, ServeArgs};
use tokio::sync::oneshot;

pub use support::{
    count_files, eventually, eventually_async, expect_cut, metric_value, noise, pki,
};

/// A hoard daemon running in this process. Stops when dropped.
pub struct Hoard {
    pub addr: SocketAddr,
    /// The admin listener, when the test asked for one (`admin_listen`).
    pub admin: Option<SocketAddr>,
    /// The plain listener beside TLS, when the test asked for one.
    pub plain: Option<SocketAddr>,
    pub metrics: std::sync::Arc<hoard::metrics::Metrics>,
    pub data: tempfile::TempDir,
    pub client: reqwest::Client,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Hoard {
    /// hoard with `docker.io` (and any `extra` HOST=URL) mapped to `upstream`.
    pub async fn start(
        upstream: &str,
        extra: &[&str],
        tweak: impl FnOnce(&mut ServeArgs),
    ) -> Hoard {
        let data = tempfile::tempdir().unwrap();
        Hoard::start_in(data, upstream, extra, tweak).await
    }

    pub async fn start_in(
        data: tempfile::TempDir,
        upstream: &str,
        extra: &[&str],
        tweak: impl FnOnce(&mut ServeArgs),
    ) -> Hoard {
        Hoard::start_full(data, upstream, extra, tweak, None, None).await
    }

    /// hoard with its own data dir sharing `bucket` with other replicas.
    pub async fn start_with_bucket(
        upstream: &str,
        bucket: std::sync::Arc<hoard::store::Bucket>,
    ) -> Hoard {
        let data = tempfile::tempdir().unwrap();
        Hoard::start_full(data, upstream, &[], |_| {}, Some(bucket), None).await
    }

    /// `start_with_bucket`, with `tweak` applied to the arguments.
    pub async fn start_with_bucket_and(
        upstream: &str,
        bucket: std::sync::Arc<hoard::store::Bucket>,
        tweak: impl FnOnce(&mut ServeArgs),
    ) -> Hoard {
        let data = tempfile::tempdir().unwrap();
        Hoard::start_full(data, upstream, &[], tweak, Some(bucket), None).await
    }

    /// `n` replicas sharing `bucket`, each listing all as peers.
    pub async fn start_cluster(
        upstream: &str,
        n: usize,
        bucket: impl Fn(usize) -> std::sync::Arc<hoard::store::Bucket>,
    ) -> Vec<Hoard> {
        Hoard::start_cluster_with(upstream, n, bucket, |_| {}).await
    }

    /// `start_cluster`, with `tweak` applied to each replica's arguments.
    pub async fn start_cluster_with(
        upstream: &str,
        n: usize,
        bucket: impl Fn(usize) -> std::sync::Arc<hoard::store::Bucket>,
        tweak: impl Fn(&mut ServeArgs),
    ) -> Vec<Hoard> {
        let mut listeners = Vec::new();
        for _ in 0..n {
            listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
        }
        let urls: Vec<String> = listeners
            .iter()
            .map(|l| format!("http://{}", l.local_addr().unwrap()))
            .collect();
        let mut replicas = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            let data = tempfile::tempdir().unwrap();
            let (peers, me) = (urls.clone(), urls[i].clone());
            let tweak = |args: &mut ServeArgs| {
                tweak(args);
                args.peers = peers;
                args.advertise = Some(me);
                // The bucket is injected; the config must still say s3.
                args.s3_bucket = Some("fleet".into());
            };
            replicas.push(
                Hoard::start_full(data, upstream, &[], tweak, Some(bucket(i)), Some(listener))
                    .await,
            );
        }
        replicas
    }

    async fn start_full(
        data: tempfile::TempDir,
        upstream: &str,
        extra: &[&str],
        tweak: impl FnOnce(&mut ServeArgs),
        bucket: Option<std::sync::Arc<hoard::store::Bucket>>,
        listener: Option<tokio::net::TcpListener>,
    ) -> Hoard {
        Hoard::start_configured(data, upstream, extra, tweak, |_| {}, bucket, listener).await
    }

    /// Like `start`, with the loaded `Config` changed by `configure` (what
    /// no flag can say, such as a credential helper outside `PATH`).
    pub async fn start_with_config(upstream: &str, configure: impl FnOnce(&mut Config)) -> Hoard {
        let data = tempfile::tempdir().unwrap();
        Hoard::start_configured(data, upstream, &[], |_| {}, configure, None, None).await
    }

    async fn start_configured(
        data: tempfile::TempDir,
        upstream: &str,
        extra: &[&str],
        tweak: impl FnOnce(&mut ServeArgs),
        configure: impl FnOnce(&mut Config),
        bucket: Option<std::sync::Arc<hoard::store::Bucket>>,
        listener: Option<tokio::net::TcpListener>,
    ) -> Hoard {
        let mut upstreams = vec![format!("docker.io={upstream}")];
        upstreams.extend(extra.iter().map(|s| s.to_string()));
        let mut args = ServeArgs {
            data_dir: Some(data.path().to_owned()),
            upstream: upstreams,
            stall_timeout: Some("2s".into()),
            response_timeout: Some("5s".into()),
            shutdown_timeout: Some("1s".into()),
            ..ServeArgs::default()
        };
        tweak(&mut args);
        let admin_listener = bind_if_asked(&mut args.admin_listen).await;
        let plain_listener = bind_if_asked(&mut args.plain_listen).await;
        let args_admin = args.admin_listen;
        let args_plain = args.plain_listen;
        let mut config = Config::load(&args, []).unwrap();
        configure(&mut config);
        let daemon = hoard::Daemon::open_with(config, bucket).await.unwrap();
        let metrics = daemon.metrics();
        let listener = match listener {
            Some(listener) => listener,
            None => tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let listeners = hoard::Listeners {
            api: listener,
            metrics: None,
            admin: admin_listener,
            plain: plain_listener,
        };
        let task = tokio::spawn(daemon.run(listeners, async move {
            let _ = stopped.await;
        }));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        Hoard {
            addr,
            admin: args_admin,
            plain: args_plain,
            metrics,
            data,
            client,
            stop,
            task,
        }
    }

    /// Shuts the daemon down, waits for it, and hands back its data dir.
    pub async fn stop(self) -> tempfile::TempDir {
        let Hoard {
            data, stop, task, ..
        } = self;
        let _ = stop.send(());
        task.await.unwrap();
        data
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    /// The status of a GET, body discarded.
    pub async fn status(&self, path: &str) -> u16 {
        let r = self.get(path).await;
        let status = r.status().as_u16();
        let _ = r.bytes().await;
        status
    }

    pub async fn head(&self, path: &str) -> reqwest::Response {
        self.client.head(self.url(path)).send().await.unwrap()
    }

    /// The value of one metric series from /metrics (0 if absent).
    pub fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics.render(), series)
    }

    /// Files under blobs/ (committed content).
    pub fn blob_files(&self) -> usize {
        count_files(&self.data.path().join("blobs"))
    }

    /// Files under tmp/ (downloads in progress or leftovers).
    pub fn temp_files(&self) -> usize {
        count_files(&self.data.path().join("tmp"))
    }
}

/// A listener on an ephemeral port if the test asked for one (any address
/// in `addr`), which then holds the real address.
async fn bind_if_asked(addr: &mut Option<SocketAddr>) -> Option<tokio::net::TcpListener> {
    addr.as_ref()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    *addr = Some(listener.local_addr().unwrap());
    Some(listener)
}

/// Sends `method target` verbatim (no client-side path normalization) and
/// returns the status and body.
pub async fn raw_request(addr: SocketAddr, method: &str, target: &str) -> (u16, String) {
    let request = format!(
        "{method} {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    );
    send_raw(addr, request.as_bytes()).await
}

/// Sends raw bytes, returns (status, body); status 0 if the server closed
/// without an answer.
pub async fn send_raw(addr: SocketAddr, raw: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(raw).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The registry error code of a JSON error body.
pub async fn error_code(response: reqwest::Response) -> String {
    let body: serde_json::Value =
        serde_json::from_slice(&response.bytes().await.unwrap()).expect("a JSON error body");
    body["errors"][0]["code"]
        .as_str()
        .expect("an error code")
        .to_owned()
}
