//! Configuration: the embedded defaults, `hoard.toml`, `HOARD_*` environment
//! variables and command-line flags, merged in that order (later wins) and
//! validated into one `Config`. Nothing else reads the environment.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod args;
mod docker;
mod registries;
mod units;

pub use args::{LogFormat, ServeArgs};
pub use registries::{Credentials, RegistryConfig};
pub use units::{parse_duration, parse_size};

use registries::{parse_url, read_secret};

use crate::reference::{validate_registry, DOCKER_HUB};

/// Docker Hub's registry API endpoint (what `docker.io` means).
pub const DOCKER_HUB_URL: &str = "https://registry-1.docker.io";

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

/// `hoard.toml` as written; every key optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    metrics_listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    log_format: Option<LogFormat>,
    tag_ttl: Option<String>,
    allow_any_upstream: Option<bool>,
    max_manifest_size: Option<Size>,
    #[serde(default)]
    upstream: FileUpstream,
    #[serde(default)]
    registries: BTreeMap<String, FileRegistry>,
    shutdown_timeout: Option<String>,
    #[serde(default)]
    store: FileStore,
    #[serde(default)]
    admin: FileAdmin,
    #[serde(default)]
    warm: FileWarm,
    #[serde(default)]
    tls: FileTls,
    #[serde(default)]
    auth: FileAuth,
    #[serde(default)]
    limits: FileLimits,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    max_connections_per_client: Option<usize>,
    header_read_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAuth {
    htpasswd: Option<PathBuf>,
    realm: Option<String>,
    protect_metrics: Option<bool>,
    #[serde(default)]
    access: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    groups: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    plain_listen: Option<SocketAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileWarm {
    #[serde(default)]
    images: Vec<String>,
    #[serde(default)]
    platforms: Vec<String>,
    interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAdmin {
    listen: Option<SocketAddr>,
    token: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStore {
    max_size: Option<Size>,
    max_tag_age: Option<String>,
    min_free_space: Option<Size>,
    #[serde(default)]
    pins: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUpstream {
    /// A Docker config.json whose `auths` give credentials to registries
    /// that have none of their own here.
    docker_config: Option<PathBuf>,
    max_concurrent_fetches: Option<usize>,
    rate_limit_floor: Option<i64>,
    connect_timeout: Option<String>,
    response_timeout: Option<String>,
    stall_timeout: Option<String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRegistry {
    url: Option<String>,
    tag_ttl: Option<String>,
    username: Option<String>,
    password: Option<String>,
    token: Option<String>,
    /// Where the password is (a mounted Kubernetes secret, say).
    password_file: Option<PathBuf>,
    token_file: Option<PathBuf>,
}

/// A size as a byte count or a string such as "4MiB".
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

impl Size {
    fn bytes(self, key: &str) -> Result<u64> {
        match self {
            Size::Bytes(n) => Ok(n),
            Size::Text(text) => parse_size(&text).map_err(|m| invalid(key, m)),
        }
    }
}

/// PEM files of the listener's TLS configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA whose certificates clients must present; `None`: no client
    /// certificates asked for.
    pub client_ca: Option<PathBuf>,
}

/// Client authentication: who may log in, and what each may pull.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
}

/// The validated configuration the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// TLS on `listen`; `None`: plain HTTP.
    pub tls: Option<TlsFiles>,
    /// With TLS, a plain-HTTP listener as well.
    pub plain_listen: Option<SocketAddr>,
    /// Client authentication; `None`: every client may pull everything.
    pub auth: Option<AuthConfig>,
    /// Connections one client address may hold open.
    pub max_connections_per_client: usize,
    /// Time a client has to send its request head.
    pub header_read_timeout: Duration,
    pub metrics_listen: Option<SocketAddr>,
    /// Admin API listener (off unless set).
    pub admin_listen: Option<SocketAddr>,
    /// Token the admin API requires.
    pub admin_token: Option<String>,
    pub data_dir: PathBuf,
    pub log_format: LogFormat,
    pub tag_ttl: Duration,
    pub allow_any_upstream: bool,
    pub max_manifest_bytes: u64,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub stall_timeout: Duration,
    pub shutdown_timeout: Duration,
    /// Images not pulled for this long are removed; `None`: kept until
    /// evicted for space.
    pub max_tag_age: Option<Duration>,
    /// Free space under which blobs are relayed without caching.
    pub min_free_bytes: u64,
    /// Upstream blob downloads at once, per registry.
    pub max_concurrent_fetches: usize,
    /// `ratelimit-remaining` under which tags are not revalidated.
    pub rate_limit_floor: i64,
    /// Most bytes the store keeps; `None` means 80% of the free space of
    /// the data file system, measured at start.
    pub max_store_bytes: Option<u64>,
    /// Images never evicted: `registry/name:tag` or `registry/name@digest`.
    pub pins: Vec<crate::reference::ImageRef>,
    /// Images pulled through the mirror at start and every `warm_interval`.
    pub warm_images: Vec<crate::reference::ImageRef>,
    /// Platforms (`linux/amd64`) warmed of multi-arch images; empty: all.
    pub warm_platforms: Vec<(String, String)>,
    /// How often the warm list runs again; `None`: only at start.
    pub warm_interval: Option<Duration>,
    /// Registry host (`docker.io`) -> how to reach it.
    pub registries: BTreeMap<String, RegistryConfig>,
}

/// The effective settings, TOML-like, secrets shown only as `<redacted>`
/// (`hoard config check`).
impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "(off)".into());
        let dur = |d: Duration| humantime::format_duration(d).to_string();
        writeln!(f, "listen = {}", self.listen)?;
        writeln!(f, "data_dir = {}", self.data_dir.display())?;
        writeln!(
            f,
            "metrics_listen = {}",
            opt(self.metrics_listen.map(|a| a.to_string()))
        )?;
        writeln!(f, "log_format = {:?}", self.log_format)?;
        writeln!(f, "tag_ttl = {}", dur(self.tag_ttl))?;
        writeln!(f, "allow_any_upstream = {}", self.allow_any_upstream)?;
        writeln!(f, "max_manifest_size = {} bytes", self.max_manifest_bytes)?;
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
                    opt(self.plain_listen.map(|a| a.to_string()))
                )?;
            }
        }
        writeln!(f, "[auth]")?;
        match &self.auth {
            None => writeln!(f, "  (off: every client may pull everything)")?,
            Some(auth) => {
                writeln!(f, "  htpasswd = {}", auth.htpasswd.display())?;
                writeln!(f, "  realm = {:?}", auth.realm)?;
                writeln!(f, "  protect_metrics = {}", auth.protect_metrics)?;
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
            self.max_connections_per_client
        )?;
        writeln!(
            f,
            "  header_read_timeout = {}",
            dur(self.header_read_timeout)
        )?;
        writeln!(f, "[store]")?;
        writeln!(
            f,
            "  max_size = {}",
            opt(self.max_store_bytes.map(|b| format!("{b} bytes")))
                .replace("(off)", "80% of free space at start")
        )?;
        writeln!(f, "  min_free_space = {} bytes", self.min_free_bytes)?;
        writeln!(f, "  max_tag_age = {}", opt(self.max_tag_age.map(dur)))?;
        writeln!(
            f,
            "  pins = {:?}",
            self.pins.iter().map(|p| p.to_string()).collect::<Vec<_>>()
        )?;
        writeln!(f, "[upstream]")?;
        writeln!(
            f,
            "  max_concurrent_fetches = {}",
            self.max_concurrent_fetches
        )?;
        writeln!(f, "  rate_limit_floor = {}", self.rate_limit_floor)?;
        writeln!(f, "  connect_timeout = {}", dur(self.connect_timeout))?;
        writeln!(f, "  response_timeout = {}", dur(self.response_timeout))?;
        writeln!(f, "  stall_timeout = {}", dur(self.stall_timeout))?;
        writeln!(f, "[admin]")?;
        writeln!(
            f,
            "  listen = {}",
            opt(self.admin_listen.map(|a| a.to_string()))
        )?;
        writeln!(
            f,
            "  token = {}",
            if self.admin_token.is_some() {
                "<redacted>"
            } else {
                "(none)"
            }
        )?;
        writeln!(f, "[warm]")?;
        writeln!(
            f,
            "  images = {:?}",
            self.warm_images
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
        )?;
        writeln!(f, "  interval = {}", opt(self.warm_interval.map(dur)))?;
        for (host, registry) in &self.registries {
            writeln!(f, "[registries.{host:?}]")?;
            writeln!(f, "  url = {}", registry.url)?;
            writeln!(
                f,
                "  tag_ttl = {}",
                dur(registry.tag_ttl.unwrap_or(self.tag_ttl))
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
        }
        Ok(())
    }
}

impl Config {
    /// The embedded default: listen on :5000, data in ./hoard-data (or
    /// `HOARD_DATA_DIR`, applied by clap), Docker Hub upstream.
    pub fn embedded() -> Config {
        let mut registries = BTreeMap::new();
        registries.insert(
            DOCKER_HUB.to_owned(),
            RegistryConfig {
                url: DOCKER_HUB_URL.parse().expect("valid url"),
                tag_ttl: None,
                credentials: None,
            },
        );
        Config {
            listen: "0.0.0.0:5000".parse().expect("valid addr"),
            tls: None,
            plain_listen: None,
            auth: None,
            max_connections_per_client: 1024,
            header_read_timeout: Duration::from_secs(30),
            metrics_listen: None,
            admin_listen: None,
            admin_token: None,
            data_dir: PathBuf::from("hoard-data"),
            log_format: LogFormat::Text,
            tag_ttl: Duration::from_secs(300),
            allow_any_upstream: false,
            max_manifest_bytes: 4 * 1024 * 1024,
            connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(30),
            max_store_bytes: None,
            pins: Vec::new(),
            warm_images: Vec::new(),
            warm_platforms: Vec::new(),
            warm_interval: None,
            max_tag_age: None,
            min_free_bytes: 512 << 20,
            max_concurrent_fetches: 32,
            rate_limit_floor: 10,
            registries,
        }
    }

    /// Merges defaults, the config file, per-registry `HOARD_REGISTRY_*`
    /// variables from `env`, and `args` (flags and their variables).
    pub fn load(
        args: &ServeArgs,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let mut config = Config::embedded();
        let file_docker_config = file.upstream.docker_config.clone();
        config.apply_file(file)?;
        config.apply_registry_env(env)?;
        let docker_config = args.docker_config.clone().or(file_docker_config);
        config.apply_args(args)?;
        if let Some(path) = docker_config {
            config.apply_docker_config(&path)?;
        }
        config.check_pairs()?;
        if config.admin_listen.is_some() && config.admin_token.as_deref().is_none_or(str::is_empty)
        {
            return Err(invalid(
                "admin.listen",
                "the admin API needs admin.token (or HOARD_ADMIN_TOKEN)",
            ));
        }
        Ok(config)
    }

    /// Credentials from a Docker config.json for registries without any.
    fn apply_docker_config(&mut self, path: &Path) -> Result<()> {
        let found = docker::read(path).map_err(|e| invalid("upstream.docker_config", e))?;
        for (host, registry) in self.registries.iter_mut() {
            if registry.credentials.is_none() {
                registry.credentials = found.get(host).cloned();
            }
        }
        Ok(())
    }

    /// Checks settings that only work together: the TLS files as a set,
    /// auth rules with their htpasswd file.
    fn check_pairs(&self) -> Result<()> {
        if self
            .auth
            .as_ref()
            .is_some_and(|a| a.htpasswd.as_os_str().is_empty())
        {
            return Err(invalid(
                "auth.htpasswd",
                "access rules need an htpasswd file (auth.htpasswd or --htpasswd)",
            ));
        }
        if let Some(tls) = &self.tls {
            if tls.cert.as_os_str().is_empty() || tls.key.as_os_str().is_empty() {
                return Err(invalid("tls", "tls.cert and tls.key go together"));
            }
        } else if self.plain_listen.is_some() {
            return Err(invalid(
                "tls.plain_listen",
                "a second plain listener only makes sense with tls.cert and tls.key",
            ));
        }
        Ok(())
    }

    /// The tag TTL for one registry host.
    pub fn tag_ttl_for(&self, registry: &str) -> Duration {
        self.registries
            .get(registry)
            .and_then(|r| r.tag_ttl)
            .unwrap_or(self.tag_ttl)
    }

    fn apply_file(&mut self, file: FileConfig) -> Result<()> {
        set(&mut self.listen, file.listen);
        self.apply_tls(file.tls.cert, file.tls.key, file.tls.client_ca);
        set(
            &mut self.max_connections_per_client,
            file.limits.max_connections_per_client,
        );
        set_duration(
            &mut self.header_read_timeout,
            "limits.header_read_timeout",
            file.limits.header_read_timeout.as_deref(),
        )?;
        let auth = file.auth;
        let has_auth = auth.htpasswd.is_some()
            || auth.realm.is_some()
            || auth.protect_metrics.is_some()
            || !auth.access.is_empty()
            || !auth.groups.is_empty();
        if has_auth {
            self.auth = Some(AuthConfig {
                htpasswd: auth.htpasswd.unwrap_or_default(),
                realm: auth.realm.unwrap_or_else(|| "hoard".into()),
                protect_metrics: auth.protect_metrics.unwrap_or(false),
                access: auth.access,
                groups: auth.groups,
            });
        }
        if file.tls.plain_listen.is_some() {
            self.plain_listen = file.tls.plain_listen;
        }
        if file.metrics_listen.is_some() {
            self.metrics_listen = file.metrics_listen;
        }
        set(&mut self.data_dir, file.data_dir);
        if file.admin.listen.is_some() {
            self.admin_listen = file.admin.listen;
        }
        if file.admin.token.is_some() {
            self.admin_token = file.admin.token;
        }
        set(&mut self.log_format, file.log_format);
        set(&mut self.allow_any_upstream, file.allow_any_upstream);
        set_duration(&mut self.tag_ttl, "tag_ttl", file.tag_ttl.as_deref())?;
        set_duration(
            &mut self.shutdown_timeout,
            "shutdown_timeout",
            file.shutdown_timeout.as_deref(),
        )?;
        let up = file.upstream;
        set(&mut self.max_concurrent_fetches, up.max_concurrent_fetches);
        set(&mut self.rate_limit_floor, up.rate_limit_floor);
        set_duration(
            &mut self.connect_timeout,
            "upstream.connect_timeout",
            up.connect_timeout.as_deref(),
        )?;
        set_duration(
            &mut self.response_timeout,
            "upstream.response_timeout",
            up.response_timeout.as_deref(),
        )?;
        set_duration(
            &mut self.stall_timeout,
            "upstream.stall_timeout",
            up.stall_timeout.as_deref(),
        )?;
        for image in &file.warm.images {
            let image =
                crate::reference::ImageRef::parse(image).map_err(|e| invalid("warm.images", e))?;
            self.warm_images.push(image);
        }
        for platform in &file.warm.platforms {
            let (os, arch) = platform
                .split_once('/')
                .ok_or_else(|| invalid("warm.platforms", format!("{platform:?} is not os/arch")))?;
            self.warm_platforms.push((os.to_owned(), arch.to_owned()));
        }
        if let Some(interval) = &file.warm.interval {
            self.warm_interval = Some(parse_duration("warm.interval", interval)?);
        }
        if let Some(age) = &file.store.max_tag_age {
            self.max_tag_age = Some(parse_duration("store.max_tag_age", age)?);
        }
        if let Some(size) = file.store.min_free_space {
            self.min_free_bytes = size.bytes("store.min_free_space")?;
        }
        if let Some(size) = file.store.max_size {
            self.max_store_bytes = Some(size.bytes("store.max_size")?);
        }
        for pin in &file.store.pins {
            let image =
                crate::reference::ImageRef::parse(pin).map_err(|e| invalid("store.pins", e))?;
            self.pins.push(image);
        }
        if let Some(size) = file.max_manifest_size {
            self.max_manifest_bytes = match size {
                Size::Bytes(n) => n,
                Size::Text(text) => {
                    parse_size(&text).map_err(|m| invalid("max_manifest_size", m))?
                }
            };
        }
        for (host, raw) in file.registries {
            self.apply_registry(&host, raw)?;
        }
        Ok(())
    }

    fn apply_registry(&mut self, host: &str, mut raw: FileRegistry) -> Result<()> {
        let key = format!("registries.\"{host}\"");
        if let Some(path) = raw.password_file.take() {
            raw.password = Some(read_secret(&format!("{key}.password_file"), &path)?);
        }
        if let Some(path) = raw.token_file.take() {
            raw.token = Some(read_secret(&format!("{key}.token_file"), &path)?);
        }
        validate_registry(host).map_err(|e| invalid(&key, e))?;
        let existing = self.registries.get(host).cloned();
        let url = match (raw.url, existing.as_ref()) {
            (Some(url), _) => parse_url(&format!("{key}.url"), &url)?,
            (None, Some(existing)) => existing.url.clone(),
            (None, None) => parse_url(&format!("{key}.url"), &format!("https://{host}"))?,
        };
        let mut tag_ttl = existing.as_ref().and_then(|e| e.tag_ttl);
        if let Some(ttl) = raw.tag_ttl {
            tag_ttl = Some(parse_duration(&format!("{key}.tag_ttl"), &ttl)?);
        }
        // Fields merge with what an earlier layer set, so the environment can
        // supply just the password for a username from the file.
        let existing = existing.and_then(|e| e.credentials);
        let untouched = raw.token.is_none() && raw.username.is_none() && raw.password.is_none();
        if untouched {
            return self.finish_registry(host, url, tag_ttl, existing);
        }
        let (mut username, mut password) = match existing {
            Some(Credentials::Basic { username, password }) => (Some(username), Some(password)),
            _ => (None, None),
        };
        if raw.username.is_some() {
            username = raw.username;
        }
        if raw.password.is_some() {
            password = raw.password;
        }
        let credentials = match (raw.token, username, password) {
            (Some(token), _, _) => Some(Credentials::Bearer(token)),
            (None, Some(username), Some(password)) => {
                Some(Credentials::Basic { username, password })
            }
            (None, None, None) => None,
            _ => return Err(invalid(&key, "username and password go together")),
        };
        self.finish_registry(host, url, tag_ttl, credentials)
    }

    fn finish_registry(
        &mut self,
        host: &str,
        url: reqwest::Url,
        tag_ttl: Option<Duration>,
        credentials: Option<Credentials>,
    ) -> Result<()> {
        self.registries.insert(
            host.to_owned(),
            RegistryConfig {
                url,
                tag_ttl,
                credentials,
            },
        );
        Ok(())
    }

    /// `HOARD_REGISTRY_<HOST>_{URL,USERNAME,PASSWORD,TOKEN,TAG_TTL}` for
    /// configured hosts, the host upper-cased with `.`, `-`, `:` as `_`
    /// (e.g. `HOARD_REGISTRY_DOCKER_IO_PASSWORD`).
    fn apply_registry_env(
        &mut self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<()> {
        let env: BTreeMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("HOARD_REGISTRY_"))
            .collect();
        if env.is_empty() {
            return Ok(());
        }
        let hosts: Vec<String> = self.registries.keys().cloned().collect();
        for host in hosts {
            let prefix = format!(
                "HOARD_REGISTRY_{}_",
                host.to_ascii_uppercase().replace(['.', '-', ':'], "_")
            );
            let get = |field: &str| env.get(&format!("{prefix}{field}")).cloned();
            let raw = FileRegistry {
                url: get("URL"),
                tag_ttl: get("TAG_TTL"),
                username: get("USERNAME"),
                password: get("PASSWORD"),
                token: get("TOKEN"),
                password_file: get("PASSWORD_FILE").map(PathBuf::from),
                token_file: get("TOKEN_FILE").map(PathBuf::from),
            };
            if raw.url.is_some()
                || raw.tag_ttl.is_some()
                || raw.username.is_some()
                || raw.password.is_some()
                || raw.token.is_some()
                || raw.password_file.is_some()
                || raw.token_file.is_some()
            {
                self.apply_registry(&host, raw)?;
            }
        }
        Ok(())
    }

    /// Each given path replaces the one set so far.
    fn apply_tls(&mut self, cert: Option<PathBuf>, key: Option<PathBuf>, ca: Option<PathBuf>) {
        if cert.is_none() && key.is_none() && ca.is_none() {
            return;
        }
        let tls = self.tls.get_or_insert_with(TlsFiles::default);
        set(&mut tls.cert, cert);
        set(&mut tls.key, key);
        if ca.is_some() {
            tls.client_ca = ca;
        }
    }

    fn apply_args(&mut self, args: &ServeArgs) -> Result<()> {
        set(&mut self.listen, args.listen);
        self.apply_tls(
            args.tls_cert.clone(),
            args.tls_key.clone(),
            args.tls_client_ca.clone(),
        );
        if args.plain_listen.is_some() {
            self.plain_listen = args.plain_listen;
        }
        set(
            &mut self.max_connections_per_client,
            args.max_connections_per_client,
        );
        set_duration(
            &mut self.header_read_timeout,
            "--header-read-timeout",
            args.header_read_timeout.as_deref(),
        )?;
        if self.max_connections_per_client == 0 {
            return Err(invalid(
                "limits.max_connections_per_client",
                "must be at least 1",
            ));
        }
        if let Some(path) = &args.htpasswd {
            let auth = self.auth.get_or_insert_with(|| AuthConfig {
                realm: "hoard".into(),
                ..AuthConfig::default()
            });
            auth.htpasswd = path.clone();
        }
        if args.metrics_listen.is_some() {
            self.metrics_listen = args.metrics_listen;
        }
        set(&mut self.data_dir, args.data_dir.clone());
        if args.admin_listen.is_some() {
            self.admin_listen = args.admin_listen;
        }
        if args.admin_token.is_some() {
            self.admin_token = args.admin_token.clone();
        }
        set(&mut self.log_format, args.log_format);
        set(&mut self.allow_any_upstream, args.allow_any_upstream);
        set_duration(&mut self.tag_ttl, "--tag-ttl", args.tag_ttl.as_deref())?;
        set_duration(
            &mut self.connect_timeout,
            "--connect-timeout",
            args.connect_timeout.as_deref(),
        )?;
        set_duration(
            &mut self.response_timeout,
            "--response-timeout",
            args.response_timeout.as_deref(),
        )?;
        set_duration(
            &mut self.stall_timeout,
            "--stall-timeout",
            args.stall_timeout.as_deref(),
        )?;
        set_duration(
            &mut self.shutdown_timeout,
            "--shutdown-timeout",
            args.shutdown_timeout.as_deref(),
        )?;
        set(
            &mut self.max_concurrent_fetches,
            args.max_concurrent_fetches,
        );
        set(&mut self.rate_limit_floor, args.rate_limit_floor);
        if self.max_concurrent_fetches == 0 {
            return Err(invalid("max_concurrent_fetches", "must be at least 1"));
        }
        if let Some(size) = &args.min_free_space {
            self.min_free_bytes = parse_size(size).map_err(|m| invalid("--min-free-space", m))?;
        }
        if let Some(size) = &args.max_size {
            self.max_store_bytes = Some(parse_size(size).map_err(|m| invalid("--max-size", m))?);
        }
        if let Some(size) = &args.max_manifest_size {
            self.max_manifest_bytes =
                parse_size(size).map_err(|m| invalid("--max-manifest-size", m))?;
        }
        for mapping in &args.upstream {
            let (host, url) = mapping
                .split_once('=')
                .ok_or_else(|| invalid("--upstream", format!("{mapping:?} is not HOST=URL")))?;
            self.apply_registry(
                host.trim(),
                FileRegistry {
                    url: Some(url.trim().to_owned()),
                    ..FileRegistry::default()
                },
            )?;
        }
        Ok(())
    }
}

/// A secret from a file, without the trailing newline editors and
fn read_file(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *slot = value;
    }
}

fn set_duration(slot: &mut Duration, key: &str, text: Option<&str>) -> Result<()> {
    if let Some(text) = text {
        *slot = parse_duration(key, text)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_serves_docker_hub_on_5000() {
        let c = Config::load(&ServeArgs::default(), []).unwrap();
        assert_eq!(c.listen.port(), 5000);
        assert_eq!(c.data_dir, PathBuf::from("hoard-data"));
        assert_eq!(
            c.registries["docker.io"].url.as_str(),
            "https://registry-1.docker.io/"
        );
        assert_eq!(c.tag_ttl, Duration::from_secs(300));
        assert!(!c.allow_any_upstream);
    }

    #[test]
    fn credentials_from_files_and_docker_config_with_explicit_ones_first() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "from-file\n").unwrap();
        let docker = dir.path().join("config.json");
        std::fs::write(
            &docker,
            r#"{"auths": {"ghcr.io": {"username": "d", "password": "docker-pw"},
                          "https://index.docker.io/v1/": {"username": "d", "password": "docker-pw"}}}"#,
        )
        .unwrap();
        let env = [
            (
                "HOARD_REGISTRY_DOCKER_IO_USERNAME".to_owned(),
                "u".to_owned(),
            ),
            (
                "HOARD_REGISTRY_DOCKER_IO_PASSWORD_FILE".to_owned(),
                dir.path().join("pw").display().to_string(),
            ),
        ];
        let args = ServeArgs {
            upstream: vec!["ghcr.io=https://ghcr.io".into()],
            docker_config: Some(docker),
            ..ServeArgs::default()
        };
        let c = Config::load(&args, env).unwrap();
        assert_eq!(
            c.registries["docker.io"].credentials,
            Some(Credentials::Basic {
                username: "u".into(),
                password: "from-file".into()
            })
        );
        assert_eq!(
            c.registries["ghcr.io"].credentials,
            Some(Credentials::Basic {
                username: "d".into(),
                password: "docker-pw".into()
            })
        );
        let shown = format!("{:?}", c.registries);
        assert!(!shown.contains("from-file") && !shown.contains("docker-pw"));
    }

    #[test]
    fn a_token_file_gives_a_bearer_token_and_an_empty_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "tok-from-file\n").unwrap();
        let env = |path: &Path| {
            [(
                "HOARD_REGISTRY_DOCKER_IO_TOKEN_FILE".to_owned(),
                path.display().to_string(),
            )]
        };
        let c = Config::load(&ServeArgs::default(), env(&token)).unwrap();
        assert_eq!(
            c.registries["docker.io"].credentials,
            Some(Credentials::Bearer("tok-from-file".into()))
        );
        std::fs::write(&token, "\n").unwrap();
        assert!(Config::load(&ServeArgs::default(), env(&token)).is_err());
    }

    #[test]
    fn tls_files_come_from_file_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hoard.toml");
        std::fs::write(
            &path,
            "[tls]\ncert = \"/a/cert.pem\"\nkey = \"/a/key.pem\"\nplain_listen = \"127.0.0.1:5001\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            tls_client_ca: Some("/b/ca.pem".into()),
            ..ServeArgs::default()
        };
        let c = Config::load(&args, []).unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(tls.cert, PathBuf::from("/a/cert.pem"));
        assert_eq!(tls.client_ca, Some(PathBuf::from("/b/ca.pem")));
        assert_eq!(c.plain_listen, Some("127.0.0.1:5001".parse().unwrap()));

        // A plain listener or a client CA without a certificate is a mistake.
        let args = ServeArgs {
            plain_listen: Some("127.0.0.1:5001".parse().unwrap()),
            ..ServeArgs::default()
        };
        assert!(Config::load(&args, []).is_err());
        let args = ServeArgs {
            tls_client_ca: Some("/b/ca.pem".into()),
            ..ServeArgs::default()
        };
        assert!(Config::load(&args, []).is_err());
    }

    #[test]
    fn example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/hoard.toml");
        let args = ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        };
        let c = Config::load(&args, []).unwrap();
        assert!(c.registries.contains_key("ghcr.io"));
        assert!(c.registries.contains_key("quay.io"));
    }

    #[test]
    fn file_then_env_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hoard.toml");
        std::fs::write(
            &path,
            r#"
tag_ttl = "1m"
max_manifest_size = "1MiB"
[registries."ghcr.io"]
tag_ttl = "10s"
username = "bot"
password = "from-file"
"#,
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            tag_ttl: Some("30s".into()),
            upstream: vec!["docker.io=http://127.0.0.1:5001".into()],
            ..ServeArgs::default()
        };
        let env = [(
            "HOARD_REGISTRY_GHCR_IO_PASSWORD".to_string(),
            "from-env".to_string(),
        )];
        let c = Config::load(&args, env).unwrap();
        assert_eq!(c.tag_ttl, Duration::from_secs(30));
        assert_eq!(c.max_manifest_bytes, 1 << 20);
        assert_eq!(c.tag_ttl_for("ghcr.io"), Duration::from_secs(10));
        assert_eq!(c.tag_ttl_for("docker.io"), Duration::from_secs(30));
        assert_eq!(
            c.registries["docker.io"].url.as_str(),
            "http://127.0.0.1:5001/"
        );
        assert_eq!(c.registries["ghcr.io"].url.as_str(), "https://ghcr.io/");
        let creds = c.registries["ghcr.io"].credentials.clone().unwrap();
        assert_eq!(
            creds,
            Credentials::Basic {
                username: "bot".into(),
                password: "from-env".into()
            }
        );
        assert!(!format!("{creds:?}").contains("from-env"));
    }

    #[test]
    fn bad_values_are_refused() {
        for args in [
            ServeArgs {
                tag_ttl: Some("soon".into()),
                ..Default::default()
            },
            ServeArgs {
                upstream: vec!["docker.io".into()],
                ..Default::default()
            },
            ServeArgs {
                upstream: vec!["docker.io=ftp://x".into()],
                ..Default::default()
            },
            ServeArgs {
                upstream: vec!["Bad_Host=http://x".into()],
                ..Default::default()
            },
            ServeArgs {
                max_manifest_size: Some("4 parsecs".into()),
                ..Default::default()
            },
        ] {
            assert!(Config::load(&args, []).is_err(), "{args:?}");
        }
    }
}
