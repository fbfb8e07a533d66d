//! The raw layer: every setting as an `Option`, in the shape of `hoard.toml`.
//! The file, the environment and the flags each fill one `RawConfig`, and
//! `merge` lays one over another, key by key. Nothing is checked here beyond
//! what TOML and clap check themselves: durations, sizes and URLs stay text
//! until validate.rs, and a missing key means "the default", decided there.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::registries::{self, RawRegistry};
use super::units::Size;
use super::{ConfigError, LogFormat, Result, ServeArgs};

/// `hoard.toml` as written, or what the environment or the flags set.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
    pub tag_ttl: Option<String>,
    pub allow_any_upstream: Option<bool>,
    pub max_manifest_size: Option<Size>,
    pub shutdown_timeout: Option<String>,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub upstream: RawUpstream,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub warm: RawWarm,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub tls: RawTls,
    #[serde(default)]
    pub auth: RawAuth,
    #[serde(default)]
    pub cluster: RawCluster,
    #[serde(default)]
    pub ui: RawUi,
    #[serde(default)]
    pub registries: BTreeMap<String, RawRegistry>,
}

/// `[cluster]`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCluster {
    pub peers: Option<Vec<String>>,
    pub advertise: Option<String>,
    pub peers_dns: Option<String>,
}

/// `[store]`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    pub max_size: Option<Size>,
    pub min_free_space: Option<Size>,
    pub max_tag_age: Option<String>,
    pub pins: Option<Vec<String>>,
    /// `fs` or `s3`; unset: `s3` when a bucket is named, else `fs`.
    pub backend: Option<String>,
    #[serde(default)]
    pub s3: RawS3,
}

/// `[store.s3]`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawS3 {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub bucket: Option<String>,
    pub prefix: Option<String>,
    pub redirect: Option<bool>,
    pub redirect_ttl: Option<String>,
    pub max_size: Option<Size>,
    pub gc_grace: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key_file: Option<PathBuf>,
}

/// `[upstream]`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    /// A Docker config.json whose `auths` give credentials to registries
    /// that have none of their own.
    pub docker_config: Option<PathBuf>,
    pub max_concurrent_fetches: Option<usize>,
    pub rate_limit_floor: Option<i64>,
    pub connect_timeout: Option<String>,
    pub response_timeout: Option<String>,
    pub stall_timeout: Option<String>,
    pub resume_attempts: Option<u32>,
    pub range_fill: Option<bool>,
    /// Ports an unconfigured registry may be reached on.
    pub any_ports: Option<Vec<u16>>,
}

/// `[limits]`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub max_connections_per_client: Option<usize>,
    pub header_read_timeout: Option<String>,
    pub response_deadline: Option<String>,
}

/// `[warm]`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWarm {
    pub images: Option<Vec<String>>,
    pub platforms: Option<Vec<String>>,
    pub interval: Option<String>,
}

/// `[ui]`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUi {
    pub enabled: Option<bool>,
}

/// `[admin]`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub listen: Option<SocketAddr>,
    pub token: Option<String>,
}

/// `[tls]`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    pub plain_listen: Option<SocketAddr>,
    pub reload_interval: Option<String>,
}

/// `[auth]`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAuth {
    pub htpasswd: Option<PathBuf>,
    pub realm: Option<String>,
    pub protect_metrics: Option<bool>,
    pub access: Option<BTreeMap<String, Vec<String>>>,
    pub groups: Option<BTreeMap<String, Vec<String>>>,
    pub reload_interval: Option<String>,
}

impl RawS3 {
    /// `earlier` with every key `self` sets replaced by `self`'s value.
    fn merge(self, earlier: RawS3) -> RawS3 {
        let (l, s) = (self, earlier);
        RawS3 {
            endpoint: l.endpoint.or(s.endpoint),
            region: l.region.or(s.region),
            bucket: l.bucket.or(s.bucket),
            prefix: l.prefix.or(s.prefix),
            redirect: l.redirect.or(s.redirect),
            redirect_ttl: l.redirect_ttl.or(s.redirect_ttl),
            max_size: l.max_size.or(s.max_size),
            gc_grace: l.gc_grace.or(s.gc_grace),
            access_key_id: l.access_key_id.or(s.access_key_id),
            secret_access_key_file: l.secret_access_key_file.or(s.secret_access_key_file),
        }
    }
}

impl RawConfig {
    /// The config file.
    pub fn read(path: &Path) -> Result<RawConfig> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// What the flags set (or their variables, see `ServeArgs::from_env`).
    /// `--config` is not a setting: the caller reads that file.
    pub fn from_args(args: &ServeArgs) -> Result<RawConfig> {
        // Taken apart whole, so a new flag that is not mapped here does not
        // compile.
        let ServeArgs {
            config: _,
            listen,
            data_dir,
            upstream,
            tag_ttl,
            metrics_listen,
            admin_listen,
            admin_token,
            tls_cert,
            tls_key,
            tls_client_ca,
            tls_reload_interval,
            plain_listen,
            htpasswd,
            auth_reload_interval,
            docker_config,
            max_connections_per_client,
            header_read_timeout,
            response_deadline,
            log_format,
            allow_any_upstream,
            max_manifest_size,
            max_size,
            min_free_space,
            s3_endpoint,
            s3_bucket,
            s3_region,
            peers,
            advertise,
            peers_dns,
            max_concurrent_fetches,
            rate_limit_floor,
            connect_timeout,
            response_timeout,
            stall_timeout,
            resume_attempts,
            range_fill,
            any_ports,
            shutdown_timeout,
            ui,
        } = args.clone();
        Ok(RawConfig {
            listen,
            metrics_listen,
            data_dir,
            log_format,
            tag_ttl,
            allow_any_upstream,
            max_manifest_size: max_manifest_size.map(Size::Text),
            shutdown_timeout,
            store: RawStore {
                max_size: max_size.map(Size::Text),
                min_free_space: min_free_space.map(Size::Text),
                s3: RawS3 {
                    endpoint: s3_endpoint,
                    bucket: s3_bucket,
                    region: s3_region,
                    ..RawS3::default()
                },
                ..RawStore::default()
            },
            upstream: RawUpstream {
                docker_config,
                max_concurrent_fetches,
                rate_limit_floor,
                connect_timeout,
                response_timeout,
                stall_timeout,
                resume_attempts,
                range_fill,
                any_ports: (!any_ports.is_empty()).then_some(any_ports),
            },
            limits: RawLimits {
                max_connections_per_client,
                header_read_timeout,
                response_deadline,
            },
            warm: RawWarm::default(),
            admin: RawAdmin {
                listen: admin_listen,
                token: admin_token,
            },
            tls: RawTls {
                cert: tls_cert,
                key: tls_key,
                client_ca: tls_client_ca,
                plain_listen,
                reload_interval: tls_reload_interval,
            },
            auth: RawAuth {
                htpasswd,
                reload_interval: auth_reload_interval,
                ..RawAuth::default()
            },
            ui: RawUi { enabled: ui },
            cluster: RawCluster {
                peers: (!peers.is_empty()).then_some(peers),
                advertise,
                peers_dns,
            },
            registries: registries::from_upstream_flags(&upstream)?,
        })
    }

    /// The `HOARD_*` variables in `env`: those of the flags (`args`, read
    /// from `env` by `ServeArgs::from_env`), and the
    /// `HOARD_REGISTRY_<HOST>_*` ones of `hosts` and of the hosts
    /// `HOARD_UPSTREAM` names. `HOARD_UPSTREAM` wins over
    /// `HOARD_REGISTRY_<HOST>_URL`, as its flag would.
    pub fn from_env<'a>(
        args: &ServeArgs,
        env: &BTreeMap<String, String>,
        hosts: impl IntoIterator<Item = &'a str>,
    ) -> Result<RawConfig> {
        let flags = RawConfig::from_args(args)?;
        let hosts: BTreeSet<String> = hosts
            .into_iter()
            .map(str::to_owned)
            .chain(flags.registries.keys().cloned())
            .collect();
        let per_registry = RawConfig {
            registries: registries::from_env(env, hosts.iter().map(String::as_str)),
            ..RawConfig::default()
        };
        Ok(per_registry.merge(flags))
    }

    /// `self` with every key `later` sets replaced by `later`'s value.
    pub fn merge(self, later: RawConfig) -> RawConfig {
        let (s, l) = (self, later);
        RawConfig {
            listen: l.listen.or(s.listen),
            metrics_listen: l.metrics_listen.or(s.metrics_listen),
            data_dir: l.data_dir.or(s.data_dir),
            log_format: l.log_format.or(s.log_format),
            tag_ttl: l.tag_ttl.or(s.tag_ttl),
            allow_any_upstream: l.allow_any_upstream.or(s.allow_any_upstream),
            max_manifest_size: l.max_manifest_size.or(s.max_manifest_size),
            shutdown_timeout: l.shutdown_timeout.or(s.shutdown_timeout),
            store: RawStore {
                max_size: l.store.max_size.or(s.store.max_size),
                min_free_space: l.store.min_free_space.or(s.store.min_free_space),
                max_tag_age: l.store.max_tag_age.or(s.store.max_tag_age),
                pins: l.store.pins.or(s.store.pins),
                backend: l.store.backend.or(s.store.backend),
                s3: l.store.s3.merge(s.store.s3),
            },
            upstream: RawUpstream {
                docker_config: l.upstream.docker_config.or(s.upstream.docker_config),
                max_concurrent_fetches: (l.upstream.max_concurrent_fetches)
                    .or(s.upstream.max_concurrent_fetches),
                rate_limit_floor: l.upstream.rate_limit_floor.or(s.upstream.rate_limit_floor),
                connect_timeout: l.upstream.connect_timeout.or(s.upstream.connect_timeout),
                response_timeout: l.upstream.response_timeout.or(s.upstream.response_timeout),
                stall_timeout: l.upstream.stall_timeout.or(s.upstream.stall_timeout),
                resume_attempts: l.upstream.resume_attempts.or(s.upstream.resume_attempts),
                range_fill: l.upstream.range_fill.or(s.upstream.range_fill),
                any_ports: l.upstream.any_ports.or(s.upstream.any_ports),
            },
            limits: RawLimits {
                max_connections_per_client: (l.limits.max_connections_per_client)
                    .or(s.limits.max_connections_per_client),
                header_read_timeout: (l.limits.header_read_timeout)
                    .or(s.limits.header_read_timeout),
                response_deadline: l.limits.response_deadline.or(s.limits.response_deadline),
            },
            warm: RawWarm {
                images: l.warm.images.or(s.warm.images),
                platforms: l.warm.platforms.or(s.warm.platforms),
                interval: l.warm.interval.or(s.warm.interval),
            },
            admin: RawAdmin {
                listen: l.admin.listen.or(s.admin.listen),
                token: l.admin.token.or(s.admin.token),
            },
            tls: RawTls {
                cert: l.tls.cert.or(s.tls.cert),
                key: l.tls.key.or(s.tls.key),
                client_ca: l.tls.client_ca.or(s.tls.client_ca),
                plain_listen: l.tls.plain_listen.or(s.tls.plain_listen),
                reload_interval: l.tls.reload_interval.or(s.tls.reload_interval),
            },
            auth: RawAuth {
                htpasswd: l.auth.htpasswd.or(s.auth.htpasswd),
                realm: l.auth.realm.or(s.auth.realm),
                protect_metrics: l.auth.protect_metrics.or(s.auth.protect_metrics),
                access: l.auth.access.or(s.auth.access),
                groups: l.auth.groups.or(s.auth.groups),
                reload_interval: l.auth.reload_interval.or(s.auth.reload_interval),
            },
            ui: RawUi {
                enabled: l.ui.enabled.or(s.ui.enabled),
            },
            cluster: RawCluster {
                peers: l.cluster.peers.or(s.cluster.peers),
                advertise: l.cluster.advertise.or(s.cluster.advertise),
                peers_dns: l.cluster.peers_dns.or(s.cluster.peers_dns),
            },
            registries: registries::merge(s.registries, l.registries),
        }
    }
}
