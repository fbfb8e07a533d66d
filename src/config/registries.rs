//! Per-registry settings: `[registries."HOST"]` tables, `--upstream
//! HOST=URL` and `HOARD_REGISTRY_<HOST>_*` variables, merged per host and
//! validated into where each host is reached, its tag TTL and the
//! credentials hoard presents to it. Secrets are read from their files here,
//! and hosts without credentials take them from a Docker config.json
//! (docker.rs). A registry may name a Docker credential helper instead
//! (its own `credential_helper`, or the config.json's `credHelpers` and
//! `credsStore`); the helper binary is looked up on `PATH` here, so a
//! missing one stops start-up, and `upstream::helper` runs it. The
//! credentials never show in `Debug`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::units::parse_duration;
use super::{docker, invalid, Result, TagTtl};
use crate::reference::{validate_registry, DOCKER_HUB};

/// Docker Hub's registry API endpoint (what `docker.io` means).
pub const DOCKER_HUB_URL: &str = "https://registry-1.docker.io";

/// Credentials hoard presents to an upstream registry. `Debug` never shows
/// the secret.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// Username and password (or access token used as password).
    Basic { username: String, password: String },
    /// A bearer token sent as is.
    Bearer(String),
    /// An OAuth2 refresh token (Docker's `identitytoken`), exchanged at the
    /// registry's token endpoint.
    Identity { username: String, token: String },
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Credentials::Bearer(_) => f.write_str("Bearer(<redacted>)"),
            Credentials::Identity { .. } => f.write_str("Identity(<redacted>)"),
        }
    }
}

/// How long a helper's answer is used before the helper runs again when
/// nothing was refused: helpers give no expiry, GCP access tokens last an
/// hour and ECR's 12 hours, so a bit under the shortest.
pub const DEFAULT_CREDENTIAL_TTL: Duration = Duration::from_secs(45 * 60);
/// How long a helper may run before it is killed.
pub const DEFAULT_CREDENTIAL_HELPER_TIMEOUT: Duration = Duration::from_secs(10);

/// A Docker credential helper (`docker-credential-NAME get`) that hands
/// out this registry's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialHelper {
    /// `NAME` of `docker-credential-NAME` (`ecr-login`, `gcr`, ...).
    pub name: String,
    /// The binary found on `PATH` at start-up.
    pub program: PathBuf,
    /// What goes on the helper's standard input: the registry host, or
    /// `https://index.docker.io/v1/` for Docker Hub, as the docker CLI sends.
    pub server: String,
    /// The answer is used this long unless the registry refuses it first.
    pub ttl: Duration,
    /// A helper still running after this is killed.
    pub timeout: Duration,
}

/// How to reach one upstream registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryConfig {
    /// Base URL actually contacted (scheme, host, optional port).
    pub url: reqwest::Url,
    /// Credentials for this registry, if any.
    pub credentials: Option<Credentials>,
    /// The helper that supplies credentials instead, if any.
    pub helper: Option<CredentialHelper>,
}

/// One `[registries."HOST"]` table, or what a flag or the environment says
/// of that host; every key optional.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRegistry {
    pub url: Option<String>,
    pub tag_ttl: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Where the password is (a mounted Kubernetes secret, say).
    pub password_file: Option<PathBuf>,
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    /// `NAME` of a `docker-credential-NAME` helper on `PATH`.
    pub credential_helper: Option<String>,
    pub credential_ttl: Option<String>,
    pub credential_helper_timeout: Option<String>,
}

impl RawRegistry {
    /// `self` with the keys `later` sets replaced. A secret and its file are
    /// one setting, and a later username or password ends an earlier token,
    /// so the environment can supply just the password for a username from
    /// the file, or replace the file's token by a login.
    pub fn merge(self, later: RawRegistry) -> RawRegistry {
        let later_password = later.password.is_some() || later.password_file.is_some();
        let later_token = later.token.is_some() || later.token_file.is_some();
        let (password, password_file) = if later_password {
            (later.password, later.password_file)
        } else {
            (self.password, self.password_file)
        };
        let (token, token_file) = if later_token {
            (later.token, later.token_file)
        } else if later_password || later.username.is_some() {
            (None, None)
        } else {
            (self.token, self.token_file)
        };
        RawRegistry {
            url: later.url.or(self.url),
            tag_ttl: later.tag_ttl.or(self.tag_ttl),
            username: later.username.or(self.username),
            password,
            password_file,
            token,
            token_file,
            credential_helper: later.credential_helper.or(self.credential_helper),
            credential_ttl: later.credential_ttl.or(self.credential_ttl),
            credential_helper_timeout: later
                .credential_helper_timeout
                .or(self.credential_helper_timeout),
        }
    }
}

/// Merges `later` into `registries`, host by host.
pub(super) fn merge(
    mut registries: BTreeMap<String, RawRegistry>,
    later: BTreeMap<String, RawRegistry>,
) -> BTreeMap<String, RawRegistry> {
    for (host, raw) in later {
        let merged = registries.remove(&host).unwrap_or_default().merge(raw);
        registries.insert(host, merged);
    }
    registries
}

/// `--upstream HOST=URL` values (or `HOARD_UPSTREAM`'s, comma-separated);
/// a later one for the same host wins.
pub(super) fn from_upstream_flags(mappings: &[String]) -> Result<BTreeMap<String, RawRegistry>> {
    let mut registries = BTreeMap::new();
    for mapping in mappings {
        let (host, url) = mapping.split_once('=').ok_or_else(|| {
            invalid(
                "registries",
                format!("{mapping:?} (--upstream or HOARD_UPSTREAM) is not HOST=URL"),
            )
        })?;
        let raw = RawRegistry {
            url: Some(url.trim().to_owned()),
            ..RawRegistry::default()
        };
        registries.insert(host.trim().to_owned(), raw);
    }
    Ok(registries)
}

/// `HOARD_REGISTRY_<HOST>_{URL,TAG_TTL,USERNAME,PASSWORD,PASSWORD_FILE,
/// TOKEN,TOKEN_FILE,CREDENTIAL_HELPER,CREDENTIAL_TTL,
/// CREDENTIAL_HELPER_TIMEOUT}` for each of `hosts`, the host upper-cased with `.`,
/// `-`, `:` as `_` (e.g. `HOARD_REGISTRY_DOCKER_IO_PASSWORD`). The names
/// only make sense for hosts configured somewhere.
pub(super) fn from_env<'a>(
    env: &BTreeMap<String, String>,
    hosts: impl IntoIterator<Item = &'a str>,
) -> BTreeMap<String, RawRegistry> {
    let mut registries = BTreeMap::new();
    for host in hosts {
        let prefix = format!(
            "HOARD_REGISTRY_{}_",
            host.to_ascii_uppercase().replace(['.', '-', ':'], "_")
        );
        let get = |field: &str| env.get(&format!("{prefix}{field}")).cloned();
        let raw = RawRegistry {
            url: get("URL"),
            tag_ttl: get("TAG_TTL"),
            username: get("USERNAME"),
            password: get("PASSWORD"),
            password_file: get("PASSWORD_FILE").map(PathBuf::from),
            token: get("TOKEN"),
            token_file: get("TOKEN_FILE").map(PathBuf::from),
            credential_helper: get("CREDENTIAL_HELPER"),
            credential_ttl: get("CREDENTIAL_TTL"),
            credential_helper_timeout: get("CREDENTIAL_HELPER_TIMEOUT"),
        };
        if raw != RawRegistry::default() {
            registries.insert(host.to_owned(), raw);
        }
    }
    registries
}

/// The validated registries (`docker.io` always among them) and the tag
/// TTLs, `tag_ttl` where a registry sets none. Registries without
/// credentials or helper of their own take those of `docker_config` (a
/// Docker config.json), if given: its `credHelpers` entry for the host,
/// else its `credsStore`, else its `auths` entry, as the docker CLI does.
pub(super) fn validate(
    mut raw: BTreeMap<String, RawRegistry>,
    tag_ttl: Duration,
    docker_config: Option<&Path>,
) -> Result<(BTreeMap<String, RegistryConfig>, TagTtl)> {
    raw.entry(DOCKER_HUB.to_owned()).or_default();
    let docker = match docker_config {
        Some(path) => docker::read(path).map_err(|e| invalid("upstream.docker_config", e))?,
        None => docker::DockerCredentials::default(),
    };
    let mut registries = BTreeMap::new();
    let mut tag_ttls = TagTtl {
        default: tag_ttl,
        registries: BTreeMap::new(),
    };
    for (host, raw) in raw {
        let key = format!("registries.\"{host}\"");
        validate_registry(&host).map_err(|e| invalid(&key, e))?;
        let url = match &raw.url {
            Some(url) => url.clone(),
            None if host == DOCKER_HUB => DOCKER_HUB_URL.to_owned(),
            None => format!("https://{host}"),
        };
        let url = parse_url(&format!("{key}.url"), &url)?;
        if let Some(ttl) = &raw.tag_ttl {
            let ttl = parse_duration(ttl).map_err(|m| invalid(format!("{key}.tag_ttl"), m))?;
            tag_ttls.registries.insert(host.clone(), ttl);
        }
        let ttl = match &raw.credential_ttl {
            Some(t) => {
                parse_duration(t).map_err(|m| invalid(format!("{key}.credential_ttl"), m))?
            }
            None => DEFAULT_CREDENTIAL_TTL,
        };
        let timeout = match &raw.credential_helper_timeout {
            Some(t) => parse_duration(t)
                .map_err(|m| invalid(format!("{key}.credential_helper_timeout"), m))?,
            None => DEFAULT_CREDENTIAL_HELPER_TIMEOUT,
        };
        let own_helper = raw.credential_helper.clone();
        let own = credentials(&key, raw)?;
        if own.is_some() && own_helper.is_some() {
            return Err(invalid(
                &key,
                "credential_helper and username/password/token are exclusive",
            ));
        }
        let (credentials, helper_name, helper_key) = match (own, own_helper) {
            (Some(own), _) => (Some(own), None, String::new()),
            (None, Some(name)) => (None, Some(name), format!("{key}.credential_helper")),
            (None, None) => match docker.helper_for(&host) {
                Some(name) => (None, Some(name.to_owned()), "upstream.docker_config".into()),
                None => (docker.auths.get(&host).cloned(), None, String::new()),
            },
        };
        let helper = match helper_name {
            Some(name) => Some(CredentialHelper {
                program: find_helper(&helper_key, &name, std::env::var_os("PATH"))?,
                name,
                server: helper_server(&host),
                ttl,
                timeout,
            }),
            None => None,
        };
        registries.insert(
            host,
            RegistryConfig {
                url,
                credentials,
                helper,
            },
        );
    }
    Ok((registries, tag_ttls))
}

/// A registry's own credentials: a token (or its file) wins; otherwise a
/// username with a password (or its file).
fn credentials(key: &str, raw: RawRegistry) -> Result<Option<Credentials>> {
    let token = match &raw.token_file {
        Some(path) => Some(read_secret(&format!("{key}.token_file"), path)?),
        None => raw.token,
    };
    let password = match &raw.password_file {
        Some(path) => Some(read_secret(&format!("{key}.password_file"), path)?),
        None => raw.password,
    };
    match (token, raw.username, password) {
        (Some(token), _, _) => Ok(Some(Credentials::Bearer(token))),
        (None, Some(username), Some(password)) => {
            Ok(Some(Credentials::Basic { username, password }))
        }
        (None, None, None) => Ok(None),
        _ => Err(invalid(key, "username and password go together")),
    }
}

/// `docker-credential-NAME` in the first `PATH` folder that has it as an
/// executable file. Looked up once at start-up: a missing helper is a
/// configuration error, not a failure at the first pull.
fn find_helper(key: &str, name: &str, path: Option<std::ffi::OsString>) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    if name.is_empty() || name.contains(['/', '\\']) || name.chars().any(char::is_whitespace) {
        return Err(invalid(
            key,
            format!("{name:?} is not a credential helper name"),
        ));
    }
    let binary = format!("docker-credential-{name}");
    let found = path.iter().flat_map(std::env::split_paths).find_map(|dir| {
        let candidate = dir.join(&binary);
        let meta = std::fs::metadata(&candidate).ok()?;
        (meta.is_file() && meta.permissions().mode() & 0o111 != 0).then_some(candidate)
    });
    found.ok_or_else(|| invalid(key, format!("credential helper {binary} is not on PATH")))
}

/// The server name a helper is asked about: what `docker login` stores
/// credentials under (the docker CLI's `registry.IndexServer` for Hub).
fn helper_server(host: &str) -> String {
    if host == DOCKER_HUB {
        "https://index.docker.io/v1/".to_owned()
    } else {
        host.to_owned()
    }
}

/// A secret from a file, without the trailing newline editors and
/// `kubectl create secret --from-file` leave.
fn read_secret(key: &str, path: &Path) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid(key, format!("cannot read {}: {e}", path.display())))?;
    let secret = text.trim_end_matches(['\n', '\r']).to_owned();
    if secret.is_empty() {
        return Err(invalid(key, format!("{} is empty", path.display())));
    }
    Ok(secret)
}

pub(super) fn parse_url(key: &str, text: &str) -> Result<reqwest::Url> {
    let url: reqwest::Url = text
        .parse()
        .map_err(|e| invalid(key, format!("{text:?}: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(invalid(key, format!("{text:?} is not an http(s) URL")));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(pairs: &[(&str, &str)]) -> RawRegistry {
        let mut raw = RawRegistry::default();
        for (key, value) in pairs {
            let value = Some(value.to_string());
            match *key {
                "url" => raw.url = value,
                "username" => raw.username = value,
                "password" => raw.password = value,
                "password_file" => raw.password_file = value.map(PathBuf::from),
                "token" => raw.token = value,
                "token_file" => raw.token_file = value.map(PathBuf::from),
                other => panic!("{other}"),
            }
        }
        raw
    }

    #[test]
    fn a_secret_and_its_file_are_one_setting_and_a_login_ends_a_token() {
        let file = raw(&[("username", "bot"), ("password_file", "/run/pw")]);
        assert_eq!(
            file.clone().merge(raw(&[("password", "env")])),
            raw(&[("username", "bot"), ("password", "env")])
        );
        assert_eq!(
            raw(&[("password", "file")]).merge(raw(&[("password_file", "/run/pw")])),
            raw(&[("password_file", "/run/pw")])
        );
        assert_eq!(
            raw(&[("token_file", "/run/t")]).merge(raw(&[("username", "u"), ("password", "p")])),
            raw(&[("username", "u"), ("password", "p")])
        );
        // A URL alone keeps the credentials.
        assert_eq!(
            file.clone().merge(raw(&[("url", "http://x")])),
            raw(&[
                ("url", "http://x"),
                ("username", "bot"),
                ("password_file", "/run/pw")
            ])
        );
        // A token wins over a login of an earlier layer.
        let merged = raw(&[("username", "u"), ("password", "p")]).merge(raw(&[("token", "t")]));
        assert_eq!(
            credentials("k", merged).unwrap(),
            Some(Credentials::Bearer("t".into()))
        );
    }

    #[test]
    fn a_helper_is_the_first_executable_of_its_name_on_path() {
        use std::os::unix::fs::PermissionsExt as _;
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let write = |dir: &Path, mode: u32| {
            let path = dir.join("docker-credential-x");
            std::fs::write(&path, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path
        };
        write(a.path(), 0o644);
        let found = write(b.path(), 0o755);
        let path = std::env::join_paths([a.path(), b.path()]).unwrap();
        assert_eq!(find_helper("k", "x", Some(path.clone())).unwrap(), found);
        let e = find_helper("k", "y", Some(path.clone())).unwrap_err();
        assert!(
            e.to_string().contains("docker-credential-y is not on PATH"),
            "{e}"
        );
        for bad in ["", "../x", "a b"] {
            assert!(
                find_helper("k", bad, Some(path.clone())).is_err(),
                "{bad:?}"
            );
        }
        assert!(find_helper("k", "x", None).is_err());
        assert_eq!(helper_server("docker.io"), "https://index.docker.io/v1/");
        assert_eq!(helper_server("ghcr.io"), "ghcr.io");
    }

    #[test]
    fn an_upstream_flag_is_host_equals_url() {
        let flags = [
            "ghcr.io=http://a".to_owned(),
            " ghcr.io = http://b ".to_owned(),
        ];
        let registries = from_upstream_flags(&flags).unwrap();
        assert_eq!(registries["ghcr.io"].url.as_deref(), Some("http://b"));
        let e = from_upstream_flags(&["ghcr.io".to_owned()]).unwrap_err();
        assert!(e.to_string().contains("HOST=URL"), "{e}");
    }
}
