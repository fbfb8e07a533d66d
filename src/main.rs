//! The `hoard` binary: parses the command line, sets up logging, and runs the
//! daemon until SIGTERM or Ctrl-C.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use hoard::config::{Config, LogFormat, ServeArgs};
use tracing::info;

/// A pull-through caching mirror for container registries.
#[derive(Parser)]
#[command(version = hoard::VERSION, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the mirror (the default).
    Serve(Box<ServeArgs>),
    /// Hash every stored blob and manifest again; quarantine mismatches.
    /// Exits 1 if any were found. Run on a stopped store.
    Verify(StoreArgs),
    /// Remove blobs no stored manifest names, and temp files left behind.
    /// Run on a stopped store.
    Gc(StoreArgs),
    /// List cached images: tag, digest, size, last confirmed upstream, pinned.
    Ls {
        #[command(flatten)]
        target: Target,
        /// Only this registry host (e.g. docker.io).
        #[arg(long)]
        registry: Option<String>,
    },
    /// Never evict IMAGE (e.g. alpine:3.19, ghcr.io/owner/app@sha256:...).
    Pin {
        #[command(flatten)]
        target: Target,
        image: String,
    },
    /// Pull images through a running mirror so their first real pull is a hit.
    Warm {
        /// The running mirror.
        #[arg(
            long,
            env = "HOARD_MIRROR_URL",
            default_value = "http://127.0.0.1:5000"
        )]
        mirror: String,
        /// Only these platforms of multi-arch images, e.g. linux/amd64,linux/arm64 [default: all].
        #[arg(long, default_value = "")]
        platform: String,
        /// Images, e.g. alpine:3.19 ghcr.io/owner/app:1.0.
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Exit 0 if the mirror's /healthz answers 200 (for container
    /// HEALTHCHECKs in images without curl). Plain HTTP only.
    Health {
        /// Address of a plain-HTTP listener (the API, --metrics-listen or
        /// --plain-listen).
        #[arg(long, default_value = "127.0.0.1:5000")]
        addr: String,
    },
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Undo `hoard pin IMAGE`.
    Unpin {
        #[command(flatten)]
        target: Target,
        image: String,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate FILE (with the HOARD_* environment, as `serve` would read
    /// it), load its TLS and htpasswd files, and print the effective
    /// settings with secrets redacted. Exits 1 if anything is wrong.
    Check {
        /// The config file.
        file: std::path::PathBuf,
    },
}

/// A running daemon's admin API, or a stopped store.
#[derive(clap::Args)]
struct Target {
    /// Admin API of a running hoard, e.g. http://127.0.0.1:5001.
    #[arg(long, env = "HOARD_ADMIN_URL", value_name = "URL")]
    admin: Option<String>,
    /// Its token.
    #[arg(
        long,
        env = "HOARD_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    admin_token: Option<String>,
    /// Without --admin: a stopped store.
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(clap::Args)]
struct StoreArgs {
    /// The data directory of the store.
    #[arg(
        long,
        env = "HOARD_DATA_DIR",
        value_name = "DIR",
        default_value = "hoard-data"
    )]
    data_dir: std::path::PathBuf,
}

fn main() -> anyhow::Result<()> {
    limit_malloc_arenas();
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Serve(args)) => *args,
        Some(Command::Verify(store)) => return verify(&store),
        Some(Command::Gc(store)) => return gc(&store),
        Some(Command::Config(ConfigCommand::Check { file })) => return config_check(file),
        Some(Command::Health { addr }) => return health(&addr),
        Some(Command::Ls { target, registry }) => return ls(&target, registry),
        Some(Command::Warm {
            mirror,
            platform,
            images,
        }) => return warm(&mirror, &platform, &images),
        Some(Command::Pin { target, image }) => return pin(&target, &image, true),
        Some(Command::Unpin { target, image }) => return pin(&target, &image, false),
        None => cli.serve,
    };
    let config = Config::load(&args, std::env::vars())?;
    init_logging(config.log_format);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?
        .block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
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
    let daemon = tokio::task::spawn_blocking(move || hoard::Daemon::open(config)).await??;
    let listeners = hoard::Listeners {
        api: listener,
        metrics: metrics_listener,
        admin: admin_listener,
        plain: plain_listener,
    };
    notify_systemd_ready();
    daemon.run(listeners, shutdown_signal()).await;
    Ok(())
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

/// `hoard health`: one GET /healthz with a 5 s budget.
fn health(addr: &str) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let timeout = std::time::Duration::from_secs(5);
    let target = addr
        .to_socket_addrs()
        .with_context(|| format!("bad address {addr}"))?
        .next()
        .with_context(|| format!("{addr} resolves to nothing"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&target, timeout)
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head)?;
    let line = String::from_utf8_lossy(&head[..n]);
    if line.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        anyhow::bail!(
            "{addr}/healthz: {}",
            line.lines().next().unwrap_or("no answer")
        )
    }
}

/// `hoard config check FILE`.
fn config_check(file: std::path::PathBuf) -> anyhow::Result<()> {
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
    print!("{config}");
    eprintln!("{}: ok", file.display());
    Ok(())
}

/// Opens a store for maintenance, reconciling it first.
fn open_store(args: &StoreArgs) -> anyhow::Result<(hoard::store::Store, hoard::store::Reconciled)> {
    if !args.data_dir.join("index").exists() {
        anyhow::bail!("{} holds no hoard store", args.data_dir.display());
    }
    let (store, reconciled) =
        hoard::store::Store::open_reconciled(&args.data_dir).with_context(|| {
            format!(
                "cannot open the store in {} (is a hoard daemon using it? stop it first)",
                args.data_dir.display()
            )
        })?;
    eprintln!(
        "reconciled {} index entries in {} ms: {} without a file dropped, {} of the wrong size quarantined, {} files adopted, {} stray files removed",
        reconciled.entries,
        reconciled.millis,
        reconciled.dropped,
        reconciled.quarantined.len(),
        reconciled.adopted,
        reconciled.removed
    );
    Ok((store, reconciled))
}

fn verify(args: &StoreArgs) -> anyhow::Result<()> {
    let (store, reconciled) = open_store(args)?;
    let started = std::time::Instant::now();
    let mut seen = 0u64;
    let report = store.verify(|_, _| {
        seen += 1;
        if seen.is_multiple_of(1000) {
            eprintln!("verified {seen} blobs");
        }
    })?;
    let corrupt: Vec<_> = reconciled
        .quarantined
        .iter()
        .chain(&report.quarantined)
        .collect();
    println!(
        "verified {} blobs ({} bytes) in {:.1}s: {} corrupt",
        report.checked,
        report.bytes,
        started.elapsed().as_secs_f64(),
        corrupt.len()
    );
    for digest in &corrupt {
        println!(
            "quarantined {digest} -> {}",
            args.data_dir
                .join("quarantine")
                .join(digest.hex())
                .display()
        );
    }
    if !corrupt.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

fn gc(args: &StoreArgs) -> anyhow::Result<()> {
    let (store, _) = open_store(args)?;
    let report = store.gc()?;
    println!(
        "removed {} unreferenced blobs ({} bytes)",
        report.blobs, report.bytes
    );
    Ok(())
}

fn warm(mirror: &str, platform: &str, images: &[String]) -> anyhow::Result<()> {
    let platforms = hoard::warm::parse_platforms(platform);
    let images = images
        .iter()
        .map(|i| {
            hoard::reference::ImageRef::parse(i).with_context(|| format!("invalid image {i:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let progress = indicatif::MultiProgress::new();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = reqwest::Client::new();
    let mut failed = 0;
    for image in &images {
        match runtime.block_on(hoard::warm::warm(
            &client,
            mirror,
            image,
            &platforms,
            Some(&progress),
        )) {
            Ok(r) => println!(
                "{image}: {} manifests, {} blobs ({} already cached), {} bytes fetched",
                r.manifests, r.blobs, r.cached, r.fetched_bytes
            ),
            Err(e) => {
                failed += 1;
                eprintln!("{image}: {e}");
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} of {} images could not be warmed", images.len());
    }
    Ok(())
}

/// Calls the admin API of a running daemon.
fn admin_call(
    target: &Target,
    method: reqwest::Method,
    path: &str,
) -> anyhow::Result<serde_json::Value> {
    let base = target.admin.as_deref().expect("admin url given");
    let token = target
        .admin_token
        .as_deref()
        .context("--admin needs --admin-token (or HOARD_ADMIN_TOKEN)")?;
    let url = format!("{}{path}", base.trim_end_matches('/'));
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let response = reqwest::Client::new()
                .request(method, &url)
                .bearer_auth(token)
                .send()
                .await
                .with_context(|| format!("cannot reach the admin API at {base}"))?;
            let status = response.status();
            let body: serde_json::Value = serde_json::from_slice(&response.bytes().await?)
                .context("the admin API answered something other than JSON")?;
            if !status.is_success() {
                anyhow::bail!("admin API: {status}: {}", body["errors"][0]["message"]);
            }
            Ok(body)
        })
}

fn query_value(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn ls(target: &Target, registry: Option<String>) -> anyhow::Result<()> {
    let images: Vec<hoard::mirror::catalog::CachedImage> = if target.admin.is_some() {
        let path = match &registry {
            Some(r) => format!("/admin/images?registry={}", query_value(r)),
            None => "/admin/images".to_owned(),
        };
        serde_json::from_value(admin_call(target, reqwest::Method::GET, &path)?["images"].clone())?
    } else {
        let (store, _) = open_store(&target.store)?;
        hoard::mirror::catalog::images(&store, &[], registry.as_deref())?
    };
    println!(
        "{:<60} {:<20} {:>12} {:<20} PINNED",
        "IMAGE", "DIGEST", "SIZE", "CHECKED"
    );
    for image in images {
        let checked = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(image.checked_at),
        );
        println!(
            "{:<60} {:<20} {:>12} {:<20} {}",
            image.image,
            &image.digest[..image.digest.len().min(19)],
            image.size,
            checked,
            if image.pinned { "yes" } else { "" }
        );
    }
    Ok(())
}

fn pin(target: &Target, image: &str, on: bool) -> anyhow::Result<()> {
    let parsed = hoard::reference::ImageRef::parse(image)
        .with_context(|| format!("invalid image {image:?}"))?;
    let changed = if target.admin.is_some() {
        let method = if on {
            reqwest::Method::POST
        } else {
            reqwest::Method::DELETE
        };
        let path = format!("/admin/pins?image={}", query_value(&parsed.to_string()));
        let body = admin_call(target, method, &path)?;
        body[if on { "added" } else { "removed" }]
            .as_bool()
            .unwrap_or(false)
    } else {
        let (store, _) = open_store(&target.store)?;
        if on {
            store.add_pin(&parsed.to_string())?
        } else {
            store.remove_pin(&parsed.to_string())?
        }
    };
    let verb = if on { "pinned" } else { "unpinned" };
    match changed {
        true => println!("{verb} {parsed}"),
        false => println!("{parsed} was already {verb}"),
    }
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("can install a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received, shutting down"),
        _ = tokio::signal::ctrl_c() => info!("interrupt received, shutting down"),
    }
}

/// glibc gives each thread that allocates its own arena; with a blocking
/// pool of one thread per concurrent file read that grew peak RSS by ~20 MiB
/// in the 100-client herd of scripts/bench.sh. Two arenas keep it flat.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator parameters; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HOARD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
