//! Per-registry settings: where each registry host is reached, and the
//! credentials hoard presents to it, with secrets read from files.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use super::{invalid, Result};

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

/// One upstream registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryConfig {
    /// Base URL actually contacted (scheme, host, optional port).
    pub url: reqwest::Url,
    /// Overrides the global tag TTL.
    pub tag_ttl: Option<Duration>,
    /// Credentials for this registry, if any.
    pub credentials: Option<Credentials>,
}

/// `kubectl create secret --from-file` leave.
pub(super) fn read_secret(key: &str, path: &Path) -> Result<String> {
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
