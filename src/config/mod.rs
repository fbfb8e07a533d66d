//! Configuration: the settings hoard runs with, as a `Config` of sections
//! (store, upstream, limits, warm, admin, tls, auth) so each component takes
//! its own. The built-in defaults, `hoard.toml`, the `HOARD_*` environment
//! and the flags are layered in that order, later winning: the file, the
//! environment and the flags each fill a `RawConfig` (raw.rs), the layers
//! are merged once and validated once (validate.rs). Nothing else in hoard
//! reads the config file or the environment.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

mod args;
mod docker;
mod raw;
mod registries;
#[cfg(test)]
mod tests;
mod units;
mod validate;

pub use args::{LogFormat, ServeArgs};
pub use registries::{
    CredentialHelper, Credentials, RegistryConfig, DEFAULT_CREDENTIAL_HELPER_TIMEOUT,
    DEFAULT_CREDENTIAL_TTL, DOCKER_HUB_URL,
};
pub use units::{parse_duration, parse_size};

use crate::reference::{ImageRef, DOCKER_HUB};
use raw::RawConfig;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// `key` is the key as the file writes it (`upstream.stall_timeout`),
    /// or, for a value clap refused (an address, a number), the `HOARD_*`
    /// variable that held it.
    #[error("invalid value for {key}: {message}")]
    Invalid { key: String, message: String },
}

type Result<T> = std::result::Result<T, ConfigError>;

fn invalid(key: impl Into<String>, message: impl fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.to_string(),
    }
}

/// The validated configuration the daemon runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The registry API, /metrics and /healthz.
    pub listen: SocketAddr,
    /// A second listener with only /metrics and /healthz.
    pub metrics_listen: Option<SocketAddr>,
    /// Text or JSON log lines.
    pub log_format: LogFormat,
    /// How long shutdown waits for transfers in progress.
    pub shutdown_timeout: Duration,
    /// `data_dir` and `[store]`.
    pub store: StoreConfig,
    /// `[upstream]`, `[registries.*]` and the top-level keys about them.
    pub upstream: UpstreamConfig,
    /// `[limits]`.
    pub limits: LimitsConfig,
    /// `[warm]`.
    pub warm: WarmConfig,
    /// `[admin]`.
    pub admin: AdminConfig,
    /// TLS on `listen`; `None`: plain HTTP.
    pub tls: Option<TlsConfig>,
    /// Client authentication; `None`: every client may pull everything.
    pub auth: Option<AuthConfig>,
    /// The other replicas; `None`: this one alone.
    pub cluster: Option<ClusterConfig>,
    /// `[ui]`: whether the status page is served.
    pub ui_enabled: bool,
}

/// `[cluster]`: the replicas sharing a bucket, so that each object is
/// fetched upstream by one of them (its owner) and streamed by the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// This replica's URL as the others reach it.
    pub advertise: reqwest::Url,
    /// Who the replicas are.
    pub peers: Peers,
}

/// Where the replica list comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peers {
    /// Listed (`peers`); includes `advertise`.
    Static(Vec<reqwest::Url>),
    /// Every address a name resolves to (`peers_dns = "NAME:PORT"`),
    /// looked up again every few seconds; the scheme is `advertise`'s.
    Dns { name: String, port: u16 },
}

/// Where content is kept, and how much of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// Blobs, temp files and the index (the file's top-level `data_dir`).
    pub data_dir: PathBuf,
    /// Most bytes the store keeps; `None` means 80% of the free space of
    /// the data file system, measured at start.
    pub max_bytes: Option<u64>,
    /// Free space under which blobs are relayed without caching.
    pub min_free_bytes: u64,
    /// Images not pulled for this long are removed; `None`: kept until
    /// evicted for space.
    pub max_tag_age: Option<Duration>,
    /// Images never evicted: `registry/name:tag` or `registry/name@digest`.
    pub pins: Vec<ImageRef>,
    /// The bucket shared by every replica (`store.backend = "s3"`); `None`:
    /// the local disk alone (`fs`). With a bucket, `data_dir` and
    /// `max_bytes` are this replica's hot tier.
    pub s3: Option<S3Config>,
}

/// `[store.s3]`: an S3-compatible bucket holding content, manifests, tags
/// and pins for every replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    /// The endpoint (`http://garage:3900`); `None`: AWS S3 of `region`.
    pub endpoint: Option<reqwest::Url>,
    /// The region; `None`: `AWS_REGION`, else `us-east-1`.
    pub region: Option<String>,
    pub bucket: String,
    /// Every key hoard writes starts with this (`""` or `team-a/`).
    pub prefix: String,
    /// Blob GETs answered with a redirect to a presigned bucket URL.
    pub redirect: bool,
    /// How long a presigned URL stays valid.
    pub redirect_ttl: Duration,
    /// Most bytes the bucket keeps (fleet-wide); `None`: no limit.
    pub max_bytes: Option<u64>,
    /// Content younger than this is never collected from the bucket (a
    /// pull may be storing an image's parts before its manifest).
    pub gc_grace: Duration,
    /// Where the keys come from.
    pub credentials: S3Credentials,
}

/// How hoard signs its requests to the bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum S3Credentials {
    /// The standard AWS chain: `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`
    /// (and `AWS_SESSION_TOKEN`), web identity (`AWS_WEB_IDENTITY_TOKEN_FILE`
    /// with `AWS_ROLE_ARN`: Kubernetes service accounts), the `AWS_PROFILE`
    /// profile of the shared credentials file, then the container or
    /// instance metadata endpoint.
    Chain,
    /// `access_key_id` with the secret read from a file at start.
    Static {
        access_key_id: String,
        secret_access_key_file: PathBuf,
    },
}

/// The registries mirrored and how they are asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// Registry host (`docker.io`) -> how to reach it.
    pub registries: BTreeMap<String, RegistryConfig>,
    /// Mirror any registry host a client names, not only `registries`
    /// (the file's `allow_any_upstream`).
    pub allow_any: bool,
    /// How long a tag is served without asking upstream.
    pub tag_ttl: TagTtl,
    /// Largest manifest accepted from upstream (`max_manifest_size`).
    pub max_manifest_bytes: u64,
    /// Upstream blob downloads at once, per registry.
    pub max_concurrent_fetches: usize,
    /// `ratelimit-remaining` under which tags are not revalidated.
    pub rate_limit_floor: i64,
    /// TCP and TLS connect timeout.
    pub connect_timeout: Duration,
    /// Time to wait for a response head.
    pub response_timeout: Duration,
    /// A body that sends nothing for this long is abandoned.
    pub stall_timeout: Duration,
    /// Times a cut or stalled blob body is resumed (`Range` from the byte
    /// after the last one received) before the download fails.
    pub resume_attempts: u32,
    /// Whether a `Range` on a blob not cached also starts the download of
    /// the whole blob in the background, so later requests are hits.
    pub range_fill: bool,
    /// Ports a registry only `allow_any` lets in may be reached on
    /// (`upstream.any_ports`, default 443 and 80).
    pub any_ports: Vec<u16>,
}

/// Tag TTLs: one for every registry, and the registries' own.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TagTtl {
    /// The top-level `tag_ttl`.
    pub default: Duration,
    /// Registry host -> its `registries."HOST".tag_ttl`.
    pub registries: BTreeMap<String, Duration>,
}

impl TagTtl {
    /// The tag TTL of one registry host.
    pub fn for_registry(&self, registry: &str) -> Duration {
        self.registries
            .get(registry)
            .copied()
            .unwrap_or(self.default)
    }
}

/// What one client may take of the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Connections one client address may hold open.
    pub max_connections_per_client: usize,
    /// Time a client has to send its request head.
    pub header_read_timeout: Duration,
    /// Longest a request waits for its response head: containerd 2.3 and
    /// later give up on a registry silent for 30 s, so hoard answers 503
    /// with `Retry-After` before (the fetch it waited for goes on).
    pub response_deadline: Duration,
}

/// Images pulled through the mirror at start and every `interval`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WarmConfig {
    /// The images, each pulled whole.
    pub images: Vec<ImageRef>,
    /// Platforms (`linux`, `amd64`) warmed of multi-arch images; empty: all.
    pub platforms: Vec<(String, String)>,
    /// How often the list runs again; `None`: only at start.
    pub interval: Option<Duration>,
}

/// The admin API. `Debug` never shows the token.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AdminConfig {
    /// Its listener; off unless set.
    pub listen: Option<SocketAddr>,
    /// The bearer token it requires (always set when `listen` is).
    pub token: Option<String>,
}

impl fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// TLS on the API listener: PEM files, and a plain listener beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key of `cert`.
    pub key: PathBuf,
    /// CA whose certificates clients must present; `None`: no client
    /// certificates asked for.
    pub client_ca: Option<PathBuf>,
    /// A plain-HTTP listener as well.
    pub plain_listen: Option<SocketAddr>,
    /// How often the files are checked for changes (SIGHUP reloads at once).
    pub reload_interval: Duration,
}

/// Client authentication: who may log in, and what each may pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    /// htpasswd file with bcrypt entries.
    pub htpasswd: PathBuf,
    /// Realm of the Basic challenge.
    pub realm: String,
    /// Whether /metrics and /healthz need a login too.
    pub protect_metrics: bool,
    /// `user`, `group:NAME`, `*` (any user) or `anonymous` -> repository
    /// patterns (`*`, `host/prefix/*`, `host/name`). Empty: every user may
    /// pull everything, anonymous clients nothing.
    pub access: BTreeMap<String, Vec<String>>,
    /// Group -> members.
    pub groups: BTreeMap<String, Vec<String>>,
    /// How often the htpasswd file is checked for changes.
    pub reload_interval: Duration,
}

impl Config {
    /// The configuration from the defaults, the config file (`--config` or
    /// `HOARD_CONFIG`), the `HOARD_*` variables in `env` and the flags in
    /// `args`, later ones winning. The binary's clap has already applied the
    /// process environment to `args` too; as the same values, that changes
    /// nothing, and it lets callers without clap pass the environment alone.
    pub fn load(
        args: &ServeArgs,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config> {
        let env: BTreeMap<String, String> = env
            .into_iter()
            .filter(|(key, _)| key.starts_with("HOARD_"))
            .collect();
        let env_args = ServeArgs::from_env(&env)?;
        let file = match args.config.as_ref().or(env_args.config.as_ref()) {
            Some(path) => RawConfig::read(path)?,
            None => RawConfig::default(),
        };
        let flags = RawConfig::from_args(args)?;
        // `HOARD_REGISTRY_<HOST>_*` variables are looked for by host: those
        // the other layers configure.
        let hosts: BTreeSet<&str> = [DOCKER_HUB]
            .into_iter()
            .chain(file.registries.keys().map(String::as_str))
            .chain(flags.registries.keys().map(String::as_str))
            .collect();
        let env = RawConfig::from_env(&env_args, &env, hosts)?;
        let raw = [file, env, flags]
            .into_iter()
            .fold(RawConfig::default(), RawConfig::merge);
        validate::validate(raw)
    }
}

/// The effective settings, TOML-like, secrets shown only as `<redacted>`
/// (`hoard config check`).
impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "(off)".into());
        let dur = |d: Duration| humantime::format_duration(d).to_string();
        writeln!(f, "listen = {}", self.listen)?;
        writeln!(f, "data_dir = {}", self.store.data_dir.display())?;
        writeln!(
            f,
            "metrics_listen = {}",
            opt(self.metrics_listen.map(|a| a.to_string()))
        )?;
        writeln!(f, "log_format = {:?}", self.log_format)?;
        writeln!(f, "tag_ttl = {}", dur(self.upstream.tag_ttl.default))?;
        writeln!(f, "allow_any_upstream = {}", self.upstream.allow_any)?;
        writeln!(
            f,
            "max_manifest_size = {} bytes",
            self.upstream.max_manifest_bytes
        )?;
        writeln!(f, "shutdown_timeout = {}", dur(self.shutdown_timeout))?;
        writeln!(f, "[tls]")?;
        match &self.tls {
            None => writeln!(f, "  (off)")?,
            Some(tls) => {
                writeln!(f, "  cert = {}", tls.cert.display())?;
                writeln!(f, "  key = {}", tls.key.display())?;
                writeln!(
                    f,
                    "  client_ca = {}",
                    opt(tls.client_ca.as_ref().map(|p| p.display().to_string()))
                )?;
                writeln!(
                    f,
                    "  plain_listen = {}",
                    opt(tls.plain_listen.map(|a| a.to_string()))
                )?;
                writeln!(f, "  reload_interval = {}", dur(tls.reload_interval))?;
            }
        }
        writeln!(f, "[auth]")?;
        match &self.auth {
            None => writeln!(f, "  (off: every client may pull everything)")?,
            Some(auth) => {
                writeln!(f, "  htpasswd = {}", auth.htpasswd.display())?;
                writeln!(f, "  realm = {:?}", auth.realm)?;
                writeln!(f, "  protect_metrics = {}", auth.protect_metrics)?;
                writeln!(f, "  reload_interval = {}", dur(auth.reload_interval))?;
                for (group, members) in &auth.groups {
                    writeln!(f, "  group {group} = {members:?}")?;
                }
                for (who, patterns) in &auth.access {
                    writeln!(f, "  access {who} = {patterns:?}")?;
                }
            }
        }
        writeln!(f, "[limits]")?;
        writeln!(
            f,
            "  max_connections_per_client = {}",
            self.limits.max_connections_per_client
        )?;
        writeln!(
            f,
            "  header_read_timeout = {}",
            dur(self.limits.header_read_timeout)
        )?;
        writeln!(
            f,
            "  response_deadline = {}",
            dur(self.limits.response_deadline)
        )?;
        writeln!(f, "[ui]")?;
        writeln!(f, "  enabled = {}", self.ui_enabled)?;
        writeln!(f, "[store]")?;
        writeln!(
            f,
            "  max_size = {}",
            opt(self.store.max_bytes.map(|b| format!("{b} bytes")))
                .replace("(off)", "80% of free space at start")
        )?;
        writeln!(f, "  min_free_space = {} bytes", self.store.min_free_bytes)?;
        writeln!(
            f,
            "  max_tag_age = {}",
            opt(self.store.max_tag_age.map(dur))
        )?;
        writeln!(
            f,
            "  pins = {:?}",
            self.store
                .pins
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
        )?;
        writeln!(
            f,
            "  backend = {}",
            if self.store.s3.is_some() { "s3" } else { "fs" }
        )?;
        if let Some(s3) = &self.store.s3 {
            writeln!(f, "[store.s3]")?;
            writeln!(
                f,
                "  endpoint = {}",
                opt(s3.endpoint.as_ref().map(|u| u.to_string())).replace("(off)", "AWS S3")
            )?;
            writeln!(f, "  region = {}", opt(s3.region.clone()))?;
            writeln!(f, "  bucket = {:?}", s3.bucket)?;
            writeln!(f, "  prefix = {:?}", s3.prefix)?;
            writeln!(f, "  redirect = {}", s3.redirect)?;
            writeln!(f, "  redirect_ttl = {}", dur(s3.redirect_ttl))?;
            writeln!(f, "  gc_grace = {}", dur(s3.gc_grace))?;
            writeln!(
                f,
                "  max_size = {}",
                opt(s3.max_bytes.map(|b| format!("{b} bytes")))
            )?;
            let credentials = match &s3.credentials {
                S3Credentials::Chain => {
                    "the AWS chain (environment, web identity, metadata)".to_owned()
                }
                S3Credentials::Static {
                    access_key_id,
                    secret_access_key_file,
                } => format!(
                    "key {access_key_id:?}, secret in {}",
                    secret_access_key_file.display()
                ),
            };
            writeln!(f, "  credentials = {credentials}")?;
        }
        writeln!(f, "[cluster]")?;
        match &self.cluster {
            None => writeln!(f, "  (off: this replica alone)")?,
            Some(cluster) => {
                writeln!(f, "  advertise = {}", cluster.advertise)?;
                match &cluster.peers {
                    Peers::Static(urls) => writeln!(
                        f,
                        "  peers = {:?}",
                        urls.iter().map(|u| u.as_str()).collect::<Vec<_>>()
                    )?,
                    Peers::Dns { name, port } => writeln!(f, "  peers_dns = {name}:{port}")?,
                }
            }
        }
        writeln!(f, "[upstream]")?;
        writeln!(
            f,
            "  max_concurrent_fetches = {}",
            self.upstream.max_concurrent_fetches
        )?;
        writeln!(f, "  rate_limit_floor = {}", self.upstream.rate_limit_floor)?;
        writeln!(
            f,
            "  connect_timeout = {}",
            dur(self.upstream.connect_timeout)
        )?;
        writeln!(
            f,
            "  response_timeout = {}",
            dur(self.upstream.response_timeout)
        )?;
        writeln!(f, "  stall_timeout = {}", dur(self.upstream.stall_timeout))?;
        writeln!(f, "  resume_attempts = {}", self.upstream.resume_attempts)?;
        writeln!(f, "  range_fill = {}", self.upstream.range_fill)?;
        writeln!(f, "  any_ports = {:?}", self.upstream.any_ports)?;
        writeln!(f, "[admin]")?;
        writeln!(
            f,
            "  listen = {}",
            opt(self.admin.listen.map(|a| a.to_string()))
        )?;
        writeln!(
            f,
            "  token = {}",
            if self.admin.token.is_some() {
                "<redacted>"
            } else {
                "(none)"
            }
        )?;
        writeln!(f, "[warm]")?;
        writeln!(
            f,
            "  images = {:?}",
            self.warm
                .images
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
        )?;
        writeln!(
            f,
            "  platforms = {:?}",
            self.warm
                .platforms
                .iter()
                .map(|(os, arch)| format!("{os}/{arch}"))
                .collect::<Vec<_>>()
        )?;
        writeln!(f, "  interval = {}", opt(self.warm.interval.map(dur)))?;
        for (host, registry) in &self.upstream.registries {
            writeln!(f, "[registries.{host:?}]")?;
            writeln!(f, "  url = {}", registry.url)?;
            writeln!(
                f,
                "  tag_ttl = {}",
                dur(self.upstream.tag_ttl.for_registry(host))
            )?;
            let credentials = match &registry.credentials {
                None => "(none)".to_owned(),
                Some(Credentials::Basic { username, .. }) => {
                    format!("user {username:?}, password <redacted>")
                }
                Some(Credentials::Bearer(_)) => "bearer token <redacted>".to_owned(),
                Some(Credentials::Identity { .. }) => "identity token <redacted>".to_owned(),
            };
            writeln!(f, "  credentials = {credentials}")?;
            if let Some(helper) = &registry.helper {
                writeln!(
                    f,
                    "  credential_helper = {} ({}, ttl {}, timeout {})",
                    helper.name,
                    helper.program.display(),
                    dur(helper.ttl),
                    dur(helper.timeout)
                )?;
            }
        }
        Ok(())
    }
}
