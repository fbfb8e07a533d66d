//! `hoard serve`: binds the listeners, opens the daemon, tells whoever
//! waits for it that it is ready (systemd's `NOTIFY_SOCKET`, a `--ready-file`
//! naming the addresses actually bound), and runs until SIGTERM or Ctrl-C.
//! Also `hoard config check`, which loads a config exactly as `serve` would.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use hoard::config::{Config, ServeArgs};
use tracing::info;

/// Binds, opens and serves `config`; with `ready_file`, writes the bound
/// addresses there once the daemon answers (removed again on exit).
pub async fn serve(config: Config, ready_file: Option<PathBuf>) -> anyhow::Result<()> {
    if let Some(path) = &ready_file {
        // A file from an earlier run must not announce this one.
        let _ = std::fs::remove_file(path);
    }
    let listener = match activated_listener()? {
        Some(listener) => listener,
        None => tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?,
    };
    let metrics_listener = bind_optional(config.metrics_listen).await?;
    let admin_listener = bind_optional(config.admin.listen).await?;
    let plain_listener = bind_optional(config.tls.as_ref().and_then(|t| t.plain_listen)).await?;
    let registries: Vec<String> = config
        .upstream
        .registries
        .iter()
        .map(|(host, r)| format!("{host}={}", r.url))
        .collect();
    info!(
        listen = %listener.local_addr()?,
        tls = config.tls.is_some(),
        data_dir = %config.store.data_dir.display(),
        tag_ttl = ?config.upstream.tag_ttl.default,
        registries = %registries.join(","),
        "hoard starting"
    );
    let daemon = hoard::Daemon::open(config).await?;
    let listeners = hoard::Listeners {
        api: listener,
        metrics: metrics_listener,
        admin: admin_listener,
        plain: plain_listener,
    };
    let ready = Ready {
        api: listeners.api.local_addr()?,
        metrics: local_addr(listeners.metrics.as_ref()),
        admin: local_addr(listeners.admin.as_ref()),
        plain: local_addr(listeners.plain.as_ref()),
        pid: std::process::id(),
    };
    if let Some(path) = &ready_file {
        ready.write(path)?;
    }
    notify_systemd_ready();
    daemon.run(listeners, shutdown_signal()).await;
    if let Some(path) = &ready_file {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// The API listener handed over by whoever started hoard (systemd socket
/// activation: `LISTEN_PID` is this process, `LISTEN_FDS` >= 1, the first
/// socket is fd 3), used instead of binding `listen`. A replica started this
/// way has its address fixed before it runs, which a fleet's peer list needs.
fn activated_listener() -> anyhow::Result<Option<tokio::net::TcpListener>> {
    const FIRST_FD: i32 = 3;
    let for_us = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|pid| pid.parse::<u32>().ok())
        .is_some_and(|pid| pid == std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<i32>().ok())
        .unwrap_or(0);
    if !for_us || count < 1 {
        return Ok(None);
    }
    // The variables stay: a child process would see a LISTEN_PID that is
    // not its own, which the protocol says to ignore.
    use std::os::fd::FromRawFd as _;
    // SAFETY: the protocol hands this process fd 3 as an open socket it now
    // owns; nothing else in hoard opened or uses fd 3 before this point
    // (it is called first thing in `serve`).
    let std_listener = unsafe { std::net::TcpListener::from_raw_fd(FIRST_FD) };
    // Not inherited by anything hoard starts (credential helpers).
    // SAFETY: fcntl on fd 3, which this process owns from here on.
    unsafe {
        libc::fcntl(FIRST_FD, libc::F_SETFD, libc::FD_CLOEXEC);
    }
    // A handed-over fd that is not a bound socket fails here, by name.
    std_listener
        .local_addr()
        .and_then(|_| std_listener.set_nonblocking(true))
        .context("fd 3, handed over in LISTEN_FDS, is not a listening socket")?;
    let listener = tokio::net::TcpListener::from_std(std_listener)
        .context("the socket handed over in LISTEN_FDS is not a TCP listener")?;
    info!(listen = %listener.local_addr()?, "listening on the socket handed over (LISTEN_FDS)");
    Ok(Some(listener))
}

/// What `--ready-file` holds: where each listener really is (port 0 in the
/// config becomes the port the kernel gave), and the daemon's pid.
#[derive(serde::Serialize)]
struct Ready {
    api: SocketAddr,
    metrics: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    plain: Option<SocketAddr>,
    pid: u32,
}

impl Ready {
    /// Written whole or not at all: a temp file renamed into place, so a
    /// reader never sees half of it.
    fn write(&self, path: &Path) -> anyhow::Result<()> {
        let temp = path.with_extension("tmp");
        let json = serde_json::to_vec_pretty(self)?;
        std::fs::write(&temp, json)
            .and_then(|()| std::fs::rename(&temp, path))
            .with_context(|| format!("cannot write the ready file {}", path.display()))
    }
}

fn local_addr(listener: Option<&tokio::net::TcpListener>) -> Option<SocketAddr> {
    listener.and_then(|l| l.local_addr().ok())
}

async fn bind_optional(
    addr: Option<std::net::SocketAddr>,
) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    match addr {
        Some(addr) => Ok(Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?,
        )),
        None => Ok(None),
    }
}

/// Tells systemd (`Type=notify`) the listeners are bound and the store is
/// open: the sd_notify protocol is one datagram to `$NOTIFY_SOCKET`.
fn notify_systemd_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = (|| -> std::io::Result<()> {
        let socket = std::os::unix::net::UnixDatagram::unbound()?;
        let path = path.to_string_lossy();
        if let Some(name) = path.strip_prefix('@') {
            #[cfg(target_os = "linux")]
            {
                use std::os::linux::net::SocketAddrExt as _;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(b"READY=1", &addr)?;
            }
            #[cfg(not(target_os = "linux"))]
            let _ = name;
        } else {
            socket.send_to(b"READY=1", &*path)?;
        }
        Ok(())
    })();
    if let Err(e) = sent {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("can install a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received, shutting down"),
        _ = tokio::signal::ctrl_c() => info!("interrupt received, shutting down"),
    }
}

/// `hoard config check FILE`.
pub fn config_check(file: std::path::PathBuf) -> anyhow::Result<()> {
    let args = ServeArgs {
        config: Some(file.clone()),
        ..ServeArgs::default()
    };
    let config = Config::load(&args, std::env::vars())
        .with_context(|| format!("{} is not a valid hoard config", file.display()))?;
    if let Some(tls) = &config.tls {
        hoard::registry::Tls::load(tls.clone()).context("TLS files")?;
    }
    if let Some(auth) = &config.auth {
        hoard::registry::Access::new(auth)
            .map_err(|e| anyhow::anyhow!(e))
            .context("auth")?;
    }
    if let Some(s3) = &config.store.s3 {
        // The same check a start makes: the bucket is there, the keys sign
        // and may write.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime
            .block_on(hoard::store::Bucket::open(s3, "config-check"))
            .context("the bucket")?;
    }
    print!("{config}");
    eprintln!("{}: ok", file.display());
    Ok(())
}
