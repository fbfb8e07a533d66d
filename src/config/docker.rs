//! Upstream credentials from a Docker `config.json` (`docker login` writes
//! it; Kubernetes image-pull secrets hold the same JSON): `auths` entries
//! with a base64 `auth` ("user:password"), separate `username`/`password`,
//! or an `identitytoken` (an OAuth2 refresh token), and which credential
//! helpers (`credHelpers` per registry, `credsStore` for all) hold the
//! rest. Helpers are only named here; `upstream::helper` runs them.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use serde::Deserialize;

use super::Credentials;

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

/// What a config.json says about credentials.
/// `Debug` shows no secret (`Credentials` redacts them).
#[derive(Debug, Default)]
pub struct DockerCredentials {
    /// Registry host (as hoard names it: `docker.io`, `ghcr.io`) ->
    /// credentials written in the file.
    pub auths: BTreeMap<String, Credentials>,
    /// Registry host -> helper `NAME` (`credHelpers`).
    pub helpers: BTreeMap<String, String>,
    /// The helper for every other registry (`credsStore`).
    pub store: Option<String>,
}

impl DockerCredentials {
    /// The helper that holds `host`'s credentials: its `credHelpers` entry,
    /// else the `credsStore` (the docker CLI's order; with a store, the
    /// file's `auths` hold no secrets).
    pub fn helper_for(&self, host: &str) -> Option<&str> {
        self.helpers
            .get(host)
            .or(self.store.as_ref())
            .map(String::as_str)
    }
}

#[derive(Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

/// The credentials and helpers of the config.json at `path`.
pub fn read(path: &Path) -> Result<DockerCredentials, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    // Serde's message can quote the input: keep it out, it holds secrets.
    let config: DockerConfig = serde_json::from_str(&text).map_err(|e| {
        format!(
            "{} is not a Docker config.json (line {}, column {})",
            path.display(),
            e.line(),
            e.column()
        )
    })?;
    let mut out = BTreeMap::new();
    for (key, entry) in config.auths {
        let host = host_of(&key);
        let credentials = if let Some(token) = entry.identitytoken.filter(|t| !t.is_empty()) {
            Credentials::Identity {
                username: entry.username.unwrap_or_default(),
                token,
            }
        } else if let (Some(username), Some(password)) = (entry.username.clone(), entry.password) {
            Credentials::Basic { username, password }
        } else if let Some(auth) = entry.auth.filter(|a| !a.is_empty()) {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .ok()
                .and_then(|d| String::from_utf8(d).ok())
                .ok_or_else(|| {
                    format!(
                        "{}: auths.{key}.auth is not base64 of user:password",
                        path.display()
                    )
                })?;
            let (username, password) = decoded.split_once(':').ok_or_else(|| {
                format!("{}: auths.{key}.auth is not user:password", path.display())
            })?;
            Credentials::Basic {
                username: username.to_owned(),
                password: password.to_owned(),
            }
        } else {
            continue;
        };
        out.insert(host, credentials);
    }
    Ok(DockerCredentials {
        auths: out,
        helpers: config
            .cred_helpers
            .into_iter()
            .map(|(key, name)| (host_of(&key), name))
            .collect(),
        store: config.creds_store.filter(|s| !s.is_empty()),
    })
}

/// `https://index.docker.io/v1/` -> `docker.io`; `ghcr.io` -> `ghcr.io`.
fn host_of(key: &str) -> String {
    let rest = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = rest.split('/').next().unwrap_or(rest).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_owned()
        }
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_auth_username_password_and_identity_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:hub-secret");
        std::fs::write(
            &path,
            format!(
                r#"{{"auths": {{
                    "https://index.docker.io/v1/": {{"auth": "{auth}"}},
                    "ghcr.io": {{"username": "bot", "password": "ghp_x"}},
                    "myregistry.azurecr.io": {{"auth": "", "identitytoken": "refresh-me"}},
                    "quay.io": {{}}
                }}, "credsStore": "desktop"}}"#
            ),
        )
        .unwrap();
        let read = read(&path).unwrap();
        assert_eq!(read.store.as_deref(), Some("desktop"));
        assert_eq!(read.helper_for("quay.io"), Some("desktop"));
        let creds = read.auths;
        assert_eq!(
            creds["docker.io"],
            Credentials::Basic {
                username: "alice".into(),
                password: "hub-secret".into()
            }
        );
        assert_eq!(
            creds["ghcr.io"],
            Credentials::Basic {
                username: "bot".into(),
                password: "ghp_x".into()
            }
        );
        assert_eq!(
            creds["myregistry.azurecr.io"],
            Credentials::Identity {
                username: String::new(),
                token: "refresh-me".into()
            }
        );
        assert!(!creds.contains_key("quay.io"));
    }

    #[test]
    fn cred_helpers_win_over_the_store_per_host() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"credHelpers": {"123.dkr.ecr.us-east-1.amazonaws.com": "ecr-login",
                "https://index.docker.io/v1/": "pass"}}"#,
        )
        .unwrap();
        let read = read(&path).unwrap();
        assert_eq!(
            read.helper_for("123.dkr.ecr.us-east-1.amazonaws.com"),
            Some("ecr-login")
        );
        assert_eq!(read.helper_for("docker.io"), Some("pass"));
        assert_eq!(read.helper_for("ghcr.io"), None, "no credsStore");
    }

    #[test]
    fn a_broken_file_is_reported_without_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"auths": {"x": {"auth": "c2VjcmV0LXZhbHVl"#).unwrap();
        let e = read(&path).unwrap_err();
        assert!(!e.contains("c2VjcmV0"), "{e}");
    }
}
