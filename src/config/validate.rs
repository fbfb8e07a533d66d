//! The one check of a merged `RawConfig`: each setting's default, its
//! parsing (durations, sizes, URLs, image references) and the settings that
//! only work together, giving a `Config`. An error names the key as written
//! in the file (`upstream.stall_timeout`), whichever source set the value.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::raw::{
    RawAdmin, RawAuth, RawCluster, RawConfig, RawLimits, RawS3, RawStore, RawTls, RawUpstream,
    RawWarm,
};
use super::registries::RawRegistry;
use super::units::{parse_duration, Size};
use super::{
    invalid, registries, AdminConfig, AuthConfig, ClusterConfig, Config, LimitsConfig, LogFormat,
    Peers, Result, S3Config, S3Credentials, StoreConfig, TlsConfig, UpstreamConfig, WarmConfig,
};
use crate::reference::ImageRef;

/// `raw` with the defaults filled in, checked.
pub(super) fn validate(raw: RawConfig) -> Result<Config> {
    // Taken apart whole, so a setting that is not validated does not compile.
    let RawConfig {
        listen,
        metrics_listen,
        data_dir,
        log_format,
        tag_ttl,
        allow_any_upstream,
        max_manifest_size,
        shutdown_timeout,
        store,
        upstream,
        limits,
        warm,
        admin,
        tls,
        auth,
        cluster,
        ui,
        registries,
    } = raw;
    let store = store_config(data_dir, store)?;
    let cluster = cluster_config(cluster)?;
    if cluster.is_some() && store.s3.is_none() {
        return Err(invalid(
            "cluster.peers",
            "replicas share content through a bucket: set store.s3.bucket (or --s3-bucket)",
        ));
    }
    Ok(Config {
        listen: listen.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 5000))),
        metrics_listen,
        log_format: log_format.unwrap_or(LogFormat::Text),
        shutdown_timeout: duration("shutdown_timeout", shutdown_timeout)?
            .unwrap_or(Duration::from_secs(30)),
        store,
        upstream: upstream_config(
            upstream,
            registries,
            tag_ttl,
            allow_any_upstream,
            max_manifest_size,
        )?,
        limits: limits_config(limits)?,
        warm: warm_config(warm)?,
        admin: admin_config(admin)?,
        tls: tls_config(tls)?,
        auth: auth_config(auth)?,
        cluster,
        ui_enabled: ui.enabled.unwrap_or(true),
    })
}

fn store_config(data_dir: Option<PathBuf>, raw: RawStore) -> Result<StoreConfig> {
    let s3 = match raw.backend.as_deref() {
        Some("fs") if raw.s3.bucket.is_some() => {
            return Err(invalid(
                "store.backend",
                "is \"fs\" but store.s3.bucket (or --s3-bucket) names a bucket: \
                 set backend = \"s3\" or remove the bucket",
            ))
        }
        Some("fs") | None if raw.s3.bucket.is_none() => {
            if raw.s3 != RawS3::default() {
                return Err(invalid(
                    "store.s3.bucket",
                    "is missing: the [store.s3] settings need a bucket",
                ));
            }
            None
        }
        Some("s3") | None => Some(s3_config(raw.s3)?),
        Some(other) => {
            return Err(invalid(
                "store.backend",
                format!("{other:?} is not a backend: use \"fs\" or \"s3\""),
            ))
        }
    };
    Ok(StoreConfig {
        s3,
        data_dir: data_dir.unwrap_or_else(|| PathBuf::from("hoard-data")),
        max_bytes: size("store.max_size", raw.max_size)?,
        min_free_bytes: size("store.min_free_space", raw.min_free_space)?.unwrap_or(512 << 20),
        max_tag_age: duration("store.max_tag_age", raw.max_tag_age)?,
        pins: images("store.pins", raw.pins)?,
    })
}

/// `[cluster]`. Replicas without a shared bucket would each fetch and keep
/// their own copy: peers are refused then (checked in `validate`'s caller
/// through `store.s3`).
fn cluster_config(raw: RawCluster) -> Result<Option<ClusterConfig>> {
    let RawCluster {
        peers,
        advertise,
        peers_dns,
    } = raw;
    let peers = peers.filter(|p| !p.is_empty());
    if peers.is_none() && peers_dns.is_none() {
        if advertise.is_some() {
            return Err(invalid(
                "cluster.advertise",
                "names this replica, but there is no cluster.peers or cluster.peers_dns",
            ));
        }
        return Ok(None);
    }
    let advertise = advertise.ok_or_else(|| {
        invalid(
            "cluster.advertise",
            "is missing: the replicas need this one's URL (e.g. http://10.0.0.1:5000)",
        )
    })?;
    let advertise = peer_url("cluster.advertise", &advertise)?;
    let peers = match (peers, peers_dns) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "cluster.peers_dns",
                "and cluster.peers both list the replicas: keep one",
            ))
        }
        (Some(list), None) => {
            let mut urls = list
                .iter()
                .map(|p| peer_url("cluster.peers", p))
                .collect::<Result<Vec<_>>>()?;
            if !urls.contains(&advertise) {
                urls.push(advertise.clone());
            }
            urls.sort();
            urls.dedup();
            Peers::Static(urls)
        }
        (None, Some(dns)) => {
            let (name, port) = dns
                .rsplit_once(':')
                .and_then(|(name, port)| Some((name, port.parse::<u16>().ok()?)))
                .filter(|(name, port)| !name.is_empty() && *port != 0)
                .ok_or_else(|| invalid("cluster.peers_dns", format!("{dns:?} is not NAME:PORT")))?;
            Peers::Dns {
                name: name.to_owned(),
                port,
            }
        }
        (None, None) => unreachable!("checked above"),
    };
    Ok(Some(ClusterConfig { advertise, peers }))
}

/// A replica's URL: scheme, host and port, nothing else (the same replica
/// must be written the same way everywhere: it is hashed).
fn peer_url(key: &str, text: &str) -> Result<reqwest::Url> {
    let url = registries::parse_url(key, text)?;
    if url.path() != "/" || url.query().is_some() || !url.username().is_empty() {
        return Err(invalid(
            key,
            format!("{text:?}: a replica is http(s)://HOST:PORT, without a path"),
        ));
    }
    Ok(url)
}

/// `[store.s3]`.
fn s3_config(raw: RawS3) -> Result<S3Config> {
    let bucket = raw.bucket.filter(|b| !b.is_empty()).ok_or_else(|| {
        invalid(
            "store.s3.bucket",
            "is missing: store.backend = \"s3\" needs one",
        )
    })?;
    // S3 bucket naming rules, loosely: what every S3-compatible server takes.
    let valid_name = bucket.len() >= 3
        && bucket.len() <= 63
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !valid_name {
        return Err(invalid(
            "store.s3.bucket",
            format!("{bucket:?} is not a bucket name (3 to 63 of a-z, 0-9, '-' and '.')"),
        ));
    }
    let endpoint = raw
        .endpoint
        .map(|text| registries::parse_url("store.s3.endpoint", &text))
        .transpose()?;
    let prefix = raw.prefix.unwrap_or_default();
    let prefix = prefix.trim_matches('/');
    if prefix.split('/').any(|part| part == "." || part == "..")
        || prefix.contains("//")
        || prefix.chars().any(char::is_control)
    {
        return Err(invalid(
            "store.s3.prefix",
            format!("{prefix:?} is not a key prefix"),
        ));
    }
    let prefix = if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}/")
    };
    let credentials = match (raw.access_key_id, raw.secret_access_key_file) {
        (None, None) => S3Credentials::Chain,
        (Some(access_key_id), Some(secret_access_key_file)) => S3Credentials::Static {
            access_key_id,
            secret_access_key_file,
        },
        (Some(_), None) => {
            return Err(invalid(
                "store.s3.secret_access_key_file",
                "is missing: store.s3.access_key_id needs its secret",
            ))
        }
        (None, Some(_)) => {
            return Err(invalid(
                "store.s3.access_key_id",
                "is missing: store.s3.secret_access_key_file needs its key id",
            ))
        }
    };
    let redirect_ttl =
        duration("store.s3.redirect_ttl", raw.redirect_ttl)?.unwrap_or(Duration::from_secs(600));
    // SigV4 presigned URLs live at most 7 days.
    if redirect_ttl.is_zero() || redirect_ttl > Duration::from_secs(7 * 24 * 3600) {
        return Err(invalid(
            "store.s3.redirect_ttl",
            "must be more than 0 and at most 7 days (the longest a presigned URL lives)",
        ));
    }
    Ok(S3Config {
        endpoint,
        region: raw.region.filter(|r| !r.is_empty()),
        bucket,
        prefix,
        redirect: raw.redirect.unwrap_or(false),
        redirect_ttl,
        max_bytes: size("store.s3.max_size", raw.max_size)?,
        gc_grace: duration("store.s3.gc_grace", raw.gc_grace)?.unwrap_or(Duration::from_secs(3600)),
        credentials,
    })
}

/// `[upstream]`, the registries, and the top-level keys that belong to
/// the section.
fn upstream_config(
    raw: RawUpstream,
    registries: BTreeMap<String, RawRegistry>,
    tag_ttl: Option<String>,
    allow_any_upstream: Option<bool>,
    max_manifest_size: Option<Size>,
) -> Result<UpstreamConfig> {
    let tag_ttl = duration("tag_ttl", tag_ttl)?.unwrap_or(Duration::from_secs(300));
    let (registries, tag_ttl) =
        registries::validate(registries, tag_ttl, raw.docker_config.as_deref())?;
    Ok(UpstreamConfig {
        registries,
        allow_any: allow_any_upstream.unwrap_or(false),
        tag_ttl,
        max_manifest_bytes: size("max_manifest_size", max_manifest_size)?.unwrap_or(4 << 20),
        max_concurrent_fetches: at_least_one(
            "upstream.max_concurrent_fetches",
            raw.max_concurrent_fetches,
        )?
        .unwrap_or(32),
        rate_limit_floor: raw.rate_limit_floor.unwrap_or(10),
        connect_timeout: duration("upstream.connect_timeout", raw.connect_timeout)?
            .unwrap_or(Duration::from_secs(10)),
        response_timeout: duration("upstream.response_timeout", raw.response_timeout)?
            .unwrap_or(Duration::from_secs(30)),
        stall_timeout: duration("upstream.stall_timeout", raw.stall_timeout)?
            .unwrap_or(Duration::from_secs(30)),
        resume_attempts: raw.resume_attempts.unwrap_or(3),
        range_fill: raw.range_fill.unwrap_or(true),
        any_ports: match raw.any_ports {
            Some(ports) if ports.is_empty() || ports.contains(&0) => {
                return Err(invalid(
                    "upstream.any_ports",
                    "must list ports from 1 to 65535",
                ))
            }
            Some(ports) => ports,
            None => vec![443, 80],
        },
    })
}

fn limits_config(raw: RawLimits) -> Result<LimitsConfig> {
    Ok(LimitsConfig {
        max_connections_per_client: at_least_one(
            "limits.max_connections_per_client",
            raw.max_connections_per_client,
        )?
        .unwrap_or(1024),
        header_read_timeout: duration("limits.header_read_timeout", raw.header_read_timeout)?
            .unwrap_or(Duration::from_secs(30)),
        response_deadline: duration("limits.response_deadline", raw.response_deadline)?
            .unwrap_or(Duration::from_secs(20)),
    })
}

fn warm_config(raw: RawWarm) -> Result<WarmConfig> {
    let platforms = raw
        .platforms
        .unwrap_or_default()
        .into_iter()
        .map(|platform| match platform.split_once('/') {
            Some((os, arch)) => Ok((os.to_owned(), arch.to_owned())),
            None => Err(invalid(
                "warm.platforms",
                format!("{platform:?} is not os/arch"),
            )),
        })
        .collect::<Result<_>>()?;
    Ok(WarmConfig {
        images: images("warm.images", raw.images)?,
        platforms,
        interval: duration("warm.interval", raw.interval)?,
    })
}

fn admin_config(raw: RawAdmin) -> Result<AdminConfig> {
    if raw.listen.is_some() && raw.token.as_deref().is_none_or(str::is_empty) {
        return Err(invalid(
            "admin.listen",
            "the admin API needs admin.token (or HOARD_ADMIN_TOKEN)",
        ));
    }
    Ok(AdminConfig {
        listen: raw.listen,
        token: raw.token,
    })
}

/// TLS is on with a certificate, a key or a client CA, and then needs the
/// certificate and the key.
fn tls_config(raw: RawTls) -> Result<Option<TlsConfig>> {
    let RawTls {
        cert,
        key,
        client_ca,
        plain_listen,
        reload_interval,
    } = raw;
    // Checked even with TLS off: a variable set for every deployment
    // should not hide a typo until TLS is turned on.
    let reload_interval = reload("tls.reload_interval", reload_interval)?;
    if cert.is_none() && key.is_none() && client_ca.is_none() {
        if plain_listen.is_some() {
            return Err(invalid(
                "tls.plain_listen",
                "a second plain listener only makes sense with tls.cert and tls.key",
            ));
        }
        return Ok(None);
    }
    let together = "tls.cert and tls.key go together";
    Ok(Some(TlsConfig {
        cert: cert.ok_or_else(|| invalid("tls.cert", together))?,
        key: key.ok_or_else(|| invalid("tls.key", together))?,
        client_ca,
        plain_listen,
        reload_interval,
    }))
}

/// Logins are on with any `[auth]` key, and then need the htpasswd file.
fn auth_config(raw: RawAuth) -> Result<Option<AuthConfig>> {
    let RawAuth {
        htpasswd,
        realm,
        protect_metrics,
        access,
        groups,
        reload_interval,
    } = raw;
    let reload_interval = reload("auth.reload_interval", reload_interval)?;
    let (access, groups) = (access.unwrap_or_default(), groups.unwrap_or_default());
    let on = htpasswd.is_some()
        || realm.is_some()
        || protect_metrics.is_some()
        || !access.is_empty()
        || !groups.is_empty();
    if !on {
        return Ok(None);
    }
    let htpasswd = htpasswd.ok_or_else(|| {
        invalid(
            "auth.htpasswd",
            "access rules need an htpasswd file (auth.htpasswd or --htpasswd)",
        )
    })?;
    Ok(Some(AuthConfig {
        htpasswd,
        realm: realm.unwrap_or_else(|| "hoard".into()),
        protect_metrics: protect_metrics.unwrap_or(false),
        access,
        groups,
        reload_interval,
    }))
}

fn duration(key: &str, text: Option<String>) -> Result<Option<Duration>> {
    text.map(|text| parse_duration(&text).map_err(|m| invalid(key, m)))
        .transpose()
}

/// How often a file is checked for changes: 5 s unless set, never 0.
fn reload(key: &str, text: Option<String>) -> Result<Duration> {
    match duration(key, text)? {
        Some(Duration::ZERO) => Err(invalid(key, "must be more than 0")),
        interval => Ok(interval.unwrap_or(Duration::from_secs(5))),
    }
}

fn size(key: &str, size: Option<Size>) -> Result<Option<u64>> {
    size.map(|size| size.bytes().map_err(|m| invalid(key, m)))
        .transpose()
}

fn at_least_one(key: &str, n: Option<usize>) -> Result<Option<usize>> {
    match n {
        Some(0) => Err(invalid(key, "must be at least 1")),
        n => Ok(n),
    }
}

fn images(key: &str, texts: Option<Vec<String>>) -> Result<Vec<ImageRef>> {
    texts
        .unwrap_or_default()
        .iter()
        .map(|text| ImageRef::parse(text).map_err(|e| invalid(key, e)))
        .collect()
}
