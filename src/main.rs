//! The `hoard` binary: parses the command line, sets up logging, and runs the
//! daemon until SIGTERM or Ctrl-C.

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use hoard::config::{Config, LogFormat, ServeArgs};
use tracing::info;

/// A pull-through caching mirror for container registries.
#[derive(Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
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
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Serve(args)) => *args,
        Some(Command::Verify(store)) => return verify(&store),
        Some(Command::Gc(store)) => return gc(&store),
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
    let metrics_listener = match config.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?,
        ),
        None => None,
    };
    let registries: Vec<String> = config
        .registries
        .iter()
        .map(|(host, r)| format!("{host}={}", r.url))
        .collect();
    info!(
        listen = %listener.local_addr()?,
        data_dir = %config.data_dir.display(),
        tag_ttl = ?config.tag_ttl,
        registries = %registries.join(","),
        "hoard starting"
    );
    let daemon = tokio::task::spawn_blocking(move || hoard::Daemon::open(config)).await??;
    daemon
        .run(listener, metrics_listener, shutdown_signal())
        .await;
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
        if seen % 1000 == 0 {
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

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("can install a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM received, shutting down"),
        _ = tokio::signal::ctrl_c() => info!("interrupt received, shutting down"),
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
