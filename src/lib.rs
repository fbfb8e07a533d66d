//! hoard: a pull-through caching mirror for container registries.
//!
//! Request path: `registry` (HTTP) -> `mirror` (policy) -> `store` (local
//! blobs and index) | `upstream` (registry client). Only `mirror` talks to
//! both `store` and `upstream`.

/// `hoard --version`: the crate version and the git commit built.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("HOARD_GIT_COMMIT"),
    ")"
);

pub mod clock;
pub mod cluster;
pub mod config;
pub mod metrics;
pub mod mirror;
pub mod ranges;
pub mod reference;
pub mod registry;
pub mod store;
pub mod upstream;
pub mod warm;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::info;

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the store in {path}: {source}")]
    Store {
        path: std::path::PathBuf,
        source: store::Error,
    },
    #[error("cannot use the bucket: {0}")]
    Bucket(store::Error),
    #[error("cannot build the upstream client: {0}")]
    Upstream(#[from] upstream::Error),
    #[error(transparent)]
    Tls(#[from] registry::TlsError),
    #[error("client authentication: {0}")]
    Auth(String),
}

/// The sockets a daemon serves.
pub struct Listeners {
    /// The registry API, /metrics and /healthz.
    pub api: TcpListener,
    /// /metrics and /healthz only.
    pub metrics: Option<TcpListener>,
    /// The admin API.
    pub admin: Option<TcpListener>,
    /// Plain HTTP beside a TLS `api` listener.
    pub plain: Option<TcpListener>,
}

/// A mirror ready to serve: store opened, upstream client built.
pub struct Daemon {
    app: Arc<registry::App>,
    config: config::Config,
    tls: Option<Arc<registry::Tls>>,
}

impl Daemon {
    /// Opens the store under `config.store.data_dir` (removing leftovers of
    /// interrupted downloads), connects to the bucket if there is one
    /// (checking it is there and writable) and builds the upstream client.
    pub async fn open(config: config::Config) -> Result<Daemon, StartError> {
        Daemon::open_with(config, None).await
    }

    /// `open`, with `bucket` as the shared tier instead of the one the
    /// config names (tests: `object_store`'s in-memory store).
    pub async fn open_with(
        config: config::Config,
        bucket: Option<Arc<store::Bucket>>,
    ) -> Result<Daemon, StartError> {
        let metrics = Arc::new(metrics::Metrics::new());
        let data_dir = config.store.data_dir.clone();
        let opened = tokio::task::spawn_blocking(move || {
            let store = store::Store::open(&data_dir)?;
            let replica = store.replica_id()?;
            Ok::<_, store::Error>((store, replica))
        })
        .await
        .expect("the store's open does not panic");
        let (store, replica) = opened.map_err(|source| StartError::Store {
            path: config.store.data_dir.clone(),
            source,
        })?;
        let bucket = match (bucket, &config.store.s3) {
            (Some(bucket), _) => Some(bucket),
            (None, Some(s3)) => Some(Arc::new(
                store::Bucket::open(s3, &replica)
                    .await
                    .map_err(StartError::Bucket)?,
            )),
            (None, None) => None,
        };
        let tls = match &config.tls {
            Some(files) => Some(Arc::new(registry::Tls::load(files.clone())?)),
            None => None,
        };
        let access = match &config.auth {
            Some(auth) => Some(registry::Access::new(auth).map_err(StartError::Auth)?),
            None => None,
        };
        let upstream = upstream::Client::new(&config.upstream, metrics.clone())?;
        let cluster = config.cluster.as_ref().map(|cluster_config| {
            let cluster = Arc::new(cluster::Cluster::new(
                cluster_config,
                metrics.peer_requests.clone(),
            ));
            cluster.spawn_dns_refresh(cluster_config);
            cluster
        });
        let mirror = mirror::Mirror::new(
            config.store.clone(),
            &config.upstream,
            Arc::new(store),
            bucket,
            cluster,
            upstream,
            metrics.clone(),
        );
        let ui = config
            .ui_enabled
            .then(|| Arc::new(registry::ui::Ui::new(&metrics)));
        Ok(Daemon {
            app: Arc::new(registry::App {
                mirror,
                metrics,
                admin_token: config.admin.token.clone(),
                access,
                response_deadline: config.limits.response_deadline,
                ui,
            }),
            config,
            tls,
        })
    }

    /// The metrics of this daemon.
    pub fn metrics(&self) -> Arc<metrics::Metrics> {
        self.app.metrics.clone()
    }

    /// Serves until `shutdown` resolves; then drains and flushes the index.
    pub async fn run(
        self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) {
        let grace = self.config.shutdown_timeout;
        let limits = registry::Limits {
            connections_per_client: self.config.limits.max_connections_per_client,
            header_read_timeout: self.config.limits.header_read_timeout,
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let side = [
            (listeners.metrics, registry::Surface::MetricsOnly),
            (listeners.admin, registry::Surface::Admin),
            (listeners.plain, registry::Surface::Full),
        ];
        let side_tasks: Vec<_> = side
            .into_iter()
            .filter_map(|(listener, surface)| {
                let listener = listener?;
                let app = self.app.clone();
                let stop = stopped(stop_rx.clone());
                Some(tokio::spawn(registry::serve(
                    listener, app, surface, None, limits, stop, grace,
                )))
            })
            .collect();
        if !self.config.warm.images.is_empty() {
            if let Ok(addr) = listeners.api.local_addr() {
                tokio::spawn(warm_loop(
                    self.config.warm.clone(),
                    addr,
                    stopped(stop_rx.clone()),
                ));
            }
        }
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        if let Some(tls) = &self.tls {
            tokio::spawn(tls.clone().watch(stopped(stop_rx.clone())));
        }
        if let Some(ui) = &self.app.ui {
            tokio::spawn(
                ui.clone()
                    .sample(self.app.metrics.clone(), stopped(stop_rx.clone())),
            );
        }
        registry::serve(
            listeners.api,
            self.app.clone(),
            registry::Surface::Full,
            self.tls.clone(),
            limits,
            stopped(stop_rx),
            grace,
        )
        .await;
        for task in side_tasks {
            let _ = task.await;
        }
        // Downloads are detached from clients: give them the grace period
        // too, then cancel them (their temp files are deleted; a crash
        // instead leaves them to the next start, which removes them).
        if !self.app.mirror.drain(grace).await {
            tracing::warn!("blob downloads still running after the grace period were cancelled");
        }
        if let Err(e) = self.app.mirror.flush() {
            tracing::error!(error = %e, "index flush failed");
        }
        info!("stopped");
    }
}

/// Pulls the configured warm list through this daemon's own listener, at
/// start and then every `warm.interval`, until `stop`.
async fn warm_loop(
    config: config::WarmConfig,
    addr: std::net::SocketAddr,
    stop: impl Future<Output = ()>,
) {
    let host = if addr.ip().is_unspecified() {
        std::net::SocketAddr::new([127, 0, 0, 1].into(), addr.port())
    } else {
        addr
    };
    let base = format!("http://{host}");
    let client = reqwest::Client::new();
    tokio::pin!(stop);
    loop {
        for image in &config.images {
            let run = warm::warm(&client, &base, image, &config.platforms, None);
            let result = tokio::select! {
                _ = &mut stop => return,
                result = run => result,
            };
            match result {
                Ok(r) => {
                    info!(%image, blobs = r.blobs, cached = r.cached, fetched_bytes = r.fetched_bytes, "warmed")
                }
                Err(e) => tracing::warn!(%image, error = %e, "warming failed"),
            }
        }
        let Some(interval) = config.interval else {
            return;
        };
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
