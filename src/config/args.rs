//! The flags of `hoard serve` and their `HOARD_*` environment variables
//! (clap), and the environment read as those flags. Their names are a
//! contract with users and scripts: a flag or variable is added, never
//! renamed. Durations, sizes and URLs stay text here; validate.rs parses
//! them, whatever source they came from.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args as _, FromArgMatches as _};
use serde::Deserialize;

use super::{ConfigError, Result};

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Flags of `hoard serve` (also accepted without the subcommand). Each has a
/// `HOARD_*` environment variable; unset flags fall back to the file, then to
/// the embedded defaults.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ServeArgs {
    /// Config file (TOML); see config/hoard.toml.
    #[arg(short, long, env = "HOARD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 0.0.0.0:5000].
    #[arg(long, env = "HOARD_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Directory for blobs and the index [default: ./hoard-data].
    #[arg(long, env = "HOARD_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Map a registry host to the URL contacted, e.g. docker.io=http://127.0.0.1:5001 (repeatable).
    #[arg(
        long,
        env = "HOARD_UPSTREAM",
        value_name = "HOST=URL",
        value_delimiter = ','
    )]
    pub upstream: Vec<String>,
    /// How long a tag is served without asking upstream, e.g. 30s, 5m [default: 5m].
    #[arg(long, env = "HOARD_TAG_TTL", value_name = "DURATION")]
    pub tag_ttl: Option<String>,
    /// Also serve /metrics and /healthz on this address.
    #[arg(long, env = "HOARD_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// Serve the admin API (/admin/*) on this address; needs --admin-token.
    #[arg(long, env = "HOARD_ADMIN_LISTEN", value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,
    /// Bearer token the admin API requires.
    #[arg(
        long,
        env = "HOARD_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    /// Serve the API over TLS with this certificate chain (PEM, leaf first).
    #[arg(
        long,
        env = "HOARD_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,
    /// Private key of --tls-cert (PEM).
    #[arg(
        long,
        env = "HOARD_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,
    /// Ask clients for a certificate signed by this CA (PEM) and refuse
    /// connections without one.
    #[arg(long, env = "HOARD_TLS_CLIENT_CA", value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
    /// How often the TLS files are checked for changes [default: 5s].
    #[arg(long, env = "HOARD_TLS_RELOAD_INTERVAL", value_name = "DURATION")]
    pub tls_reload_interval: Option<String>,
    /// With TLS on, also serve plain HTTP here (e.g. 127.0.0.1:5001 for
    /// local clients).
    #[arg(long, env = "HOARD_PLAIN_LISTEN", value_name = "ADDR")]
    pub plain_listen: Option<SocketAddr>,
    /// Require clients to log in with a user of this htpasswd file (bcrypt
    /// entries, `htpasswd -B`); access rules go in the config file.
    #[arg(long, env = "HOARD_HTPASSWD", value_name = "FILE")]
    pub htpasswd: Option<PathBuf>,
    /// How often the htpasswd file is checked for changes [default: 5s].
    #[arg(long, env = "HOARD_AUTH_RELOAD_INTERVAL", value_name = "DURATION")]
    pub auth_reload_interval: Option<String>,
    /// Docker config.json whose `auths` give upstream credentials to
    /// configured registries that have none of their own.
    #[arg(long, env = "HOARD_DOCKER_CONFIG", value_name = "FILE")]
    pub docker_config: Option<PathBuf>,
    /// Connections one client address may hold open [default: 1024].
    #[arg(long, env = "HOARD_MAX_CONNECTIONS_PER_CLIENT", value_name = "N")]
    pub max_connections_per_client: Option<usize>,
    /// A client must send its request head within this time [default: 30s].
    #[arg(long, env = "HOARD_HEADER_READ_TIMEOUT", value_name = "DURATION")]
    pub header_read_timeout: Option<String>,
    /// No request waits longer for its response head: past it, 503 with
    /// Retry-After while the fetch goes on [default: 20s].
    #[arg(long, env = "HOARD_RESPONSE_DEADLINE", value_name = "DURATION")]
    pub response_deadline: Option<String>,
    /// Log format [default: text].
    #[arg(long, env = "HOARD_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Mirror any registry host a client names, not only configured ones.
    #[arg(long, env = "HOARD_ALLOW_ANY_UPSTREAM", num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub allow_any_upstream: Option<bool>,
    /// Largest manifest accepted from upstream, e.g. 4MiB [default: 4MiB].
    #[arg(long, env = "HOARD_MAX_MANIFEST_SIZE", value_name = "SIZE")]
    pub max_manifest_size: Option<String>,
    /// Most bytes the store keeps, e.g. 200GiB; least recently used blobs go
    /// first [default: 80% of the data file system's free space at start].
    #[arg(long, env = "HOARD_MAX_SIZE", value_name = "SIZE")]
    pub max_size: Option<String>,
    /// Below this much free disk space new blobs are relayed uncached and
    /// eviction runs [default: 512MiB].
    #[arg(long, env = "HOARD_MIN_FREE_SPACE", value_name = "SIZE")]
    pub min_free_space: Option<String>,
    /// The S3-compatible endpoint of the shared store, e.g.
    /// http://garage:3900 [default: AWS S3 of the region].
    #[arg(long, env = "HOARD_S3_ENDPOINT", value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// Keep content in this bucket, shared by every replica (selects the
    /// s3 store backend; --data-dir stays the local hot tier).
    #[arg(long, env = "HOARD_S3_BUCKET", value_name = "NAME")]
    pub s3_bucket: Option<String>,
    /// The bucket's region [default: AWS_REGION, else us-east-1].
    #[arg(long, env = "HOARD_S3_REGION", value_name = "REGION")]
    pub s3_region: Option<String>,
    /// Another replica sharing the bucket, as http(s)://HOST:PORT
    /// (repeatable; this replica may be among them). Each object is fetched
    /// upstream by one replica, which the others stream from.
    #[arg(
        long = "peer",
        env = "HOARD_PEERS",
        value_name = "URL",
        value_delimiter = ','
    )]
    pub peers: Vec<String>,
    /// This replica's URL as the other replicas reach it (one of --peer).
    #[arg(long, env = "HOARD_ADVERTISE", value_name = "URL")]
    pub advertise: Option<String>,
    /// A DNS name:port resolving to every replica (a Kubernetes headless
    /// Service), instead of --peer.
    #[arg(long, env = "HOARD_PEERS_DNS", value_name = "NAME:PORT")]
    pub peers_dns: Option<String>,
    /// Upstream blob downloads running at once per registry [default: 32].
    #[arg(long, env = "HOARD_MAX_CONCURRENT_FETCHES", value_name = "N")]
    pub max_concurrent_fetches: Option<usize>,
    /// Under this many requests left (ratelimit-remaining), tags are served
    /// without revalidation [default: 10].
    #[arg(long, env = "HOARD_RATE_LIMIT_FLOOR", value_name = "N")]
    pub rate_limit_floor: Option<i64>,
    /// Upstream connect timeout [default: 10s].
    #[arg(long, env = "HOARD_CONNECT_TIMEOUT", value_name = "DURATION")]
    pub connect_timeout: Option<String>,
    /// Upstream response-head timeout [default: 30s].
    #[arg(long, env = "HOARD_RESPONSE_TIMEOUT", value_name = "DURATION")]
    pub response_timeout: Option<String>,
    /// Give up on an upstream body that sends nothing for this long [default: 30s].
    #[arg(long, env = "HOARD_STALL_TIMEOUT", value_name = "DURATION")]
    pub stall_timeout: Option<String>,
    /// Times a cut or stalled upstream blob body is resumed from where it
    /// broke before the download fails [default: 3].
    #[arg(long, env = "HOARD_RESUME_ATTEMPTS", value_name = "N")]
    pub resume_attempts: Option<u32>,
    /// Whether a Range on a blob not cached also downloads the whole blob
    /// in the background [default: true].
    #[arg(long, env = "HOARD_RANGE_FILL", value_name = "BOOL")]
    pub range_fill: Option<bool>,
    /// A port a registry not configured may be reached on, with
    /// --allow-any-upstream (repeatable) [default: 443, 80].
    #[arg(
        long = "any-port",
        env = "HOARD_ANY_PORTS",
        value_name = "PORT",
        value_delimiter = ','
    )]
    pub any_ports: Vec<u16>,
    /// How long shutdown waits for transfers in progress [default: 30s].
    #[arg(long, env = "HOARD_SHUTDOWN_TIMEOUT", value_name = "DURATION")]
    pub shutdown_timeout: Option<String>,
    /// Whether the status page (/ui/) is served [default: true].
    #[arg(long, env = "HOARD_UI", value_name = "BOOL")]
    pub ui: Option<bool>,
}

impl ServeArgs {
    /// The flags as the `HOARD_*` variables in `env` set them. Each variable
    /// goes to clap as its flag, so it means exactly what the flag means
    /// (lists, booleans, `requires`); the process environment is not read.
    pub(super) fn from_env(env: &BTreeMap<String, String>) -> Result<ServeArgs> {
        let mut argv = Vec::new();
        for arg in command().get_arguments() {
            let (Some(var), Some(long)) = (arg.get_env().and_then(OsStr::to_str), arg.get_long())
            else {
                continue;
            };
            // An empty variable counts as unset.
            if let Some(value) = env.get(var).filter(|v| !v.is_empty()) {
                argv.push(format!("--{long}={value}"));
            }
        }
        parse(argv).map_err(|e| env_error(&e))
    }
}

/// `ServeArgs` as a clap command of its own.
pub(super) fn command() -> clap::Command {
    ServeArgs::augment_args(clap::Command::new("hoard").no_binary_name(true))
}

/// Flags parsed as the binary parses them, but without reading the process
/// environment.
pub(super) fn parse(
    argv: impl IntoIterator<Item = String>,
) -> std::result::Result<ServeArgs, clap::Error> {
    let matches = command()
        .mut_args(|arg| arg.env(None::<&'static str>))
        .try_get_matches_from(argv)?;
    ServeArgs::from_arg_matches(&matches)
}

/// clap's complaint about a value from the environment, naming the
/// variable rather than the flag clap was handed.
fn env_error(e: &clap::Error) -> ConfigError {
    use clap::error::{ContextKind, ContextValue};
    let text = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    // "--listen <ADDR>" -> listen -> HOARD_LISTEN.
    let var = text(ContextKind::InvalidArg).and_then(|arg| {
        let long = arg
            .split([' ', '='])
            .next()?
            .trim_start_matches('-')
            .to_owned();
        let command = command();
        let env = command
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()))?
            .get_env()?;
        Some(env.to_string_lossy().into_owned())
    });
    let message = match (
        text(ContextKind::InvalidValue),
        std::error::Error::source(e),
    ) {
        (Some(value), Some(why)) => format!("{value:?}: {why}"),
        _ => {
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or_default();
            first.trim_start_matches("error: ").to_owned()
        }
    };
    ConfigError::Invalid {
        key: var.unwrap_or_else(|| "the HOARD_* environment".to_owned()),
        message,
    }
}
