//! The `hoard` binary: parses the command line, sets up logging and hands
//! each command to its module under `cli/` (`serve`, the store commands, the
//! image commands, the client commands). Nothing else happens here.

mod cli;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use cli::images::Target;
use cli::store::StoreArgs;
use hoard::config::{Config, LogFormat, ServeArgs};

/// A pull-through caching mirror for container registries.
#[derive(Parser)]
#[command(version = hoard::VERSION, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeCommand,
}

/// `hoard serve`'s command line: the settings, and where to announce the
/// addresses it bound.
#[derive(clap::Args)]
struct ServeCommand {
    #[command(flatten)]
    settings: ServeArgs,
    /// Once serving, write the addresses actually bound (JSON: api, metrics,
    /// admin, plain, pid) to FILE; for supervisors and tests that listen on
    /// port 0. Removed on exit.
    #[arg(long, env = "HOARD_READY_FILE", value_name = "FILE")]
    ready_file: Option<std::path::PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the mirror (the default).
    Serve(Box<ServeCommand>),
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
        /// The images as JSON (raw bytes and unix times), for scripts.
        #[arg(long)]
        json: bool,
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
    /// HEALTHCHECKs in images without curl). Without --addr, checks the
    /// address `serve` would listen on, from the same defaults, config file
    /// and HOARD_* variables, over TLS when that listener has it.
    Health {
        /// A plain-HTTP listener to check instead (the API, --metrics-listen
        /// or --plain-listen).
        #[arg(long)]
        addr: Option<String>,
        /// The config file `serve` reads.
        #[arg(short, long, env = "HOARD_CONFIG", value_name = "FILE")]
        config: Option<std::path::PathBuf>,
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

fn main() -> anyhow::Result<()> {
    limit_malloc_arenas();
    let cli = Cli::parse();
    let serve = match cli.command {
        Some(Command::Serve(serve)) => *serve,
        Some(Command::Verify(store)) => return cli::store::verify(&store),
        Some(Command::Gc(store)) => return cli::store::gc(&store),
        Some(Command::Config(ConfigCommand::Check { file })) => {
            return cli::serve::config_check(file)
        }
        Some(Command::Health { addr, config }) => return cli::client::health(addr, config),
        Some(Command::Ls {
            target,
            registry,
            json,
        }) => return cli::images::ls(&target, registry, json),
        Some(Command::Warm {
            mirror,
            platform,
            images,
        }) => return cli::client::warm(&mirror, &platform, &images),
        Some(Command::Pin { target, image }) => return cli::images::pin(&target, &image, true),
        Some(Command::Unpin { target, image }) => return cli::images::pin(&target, &image, false),
        None => cli.serve,
    };
    let config = Config::load(&serve.settings, std::env::vars())?;
    init_logging(config.log_format);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?
        .block_on(cli::serve::serve(config, serve.ready_file))
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
