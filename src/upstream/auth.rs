//! Upstream authentication: `WWW-Authenticate` challenges, the Docker token
//! flow and the token cache. Tokens are cached per (registry, scope) until
//! shortly before they expire; a registry's last challenge is remembered so
//! the next new scope fetches its token before the first request instead of
//! after a 401. <https://distribution.github.io/distribution/spec/auth/token/>

use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::error::{Error, Result};
use super::{read_bounded, ReadError};
use crate::config::Credentials;

/// Token lifetime when the token server does not say (the spec's default).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Largest token response read.
const MAX_TOKEN_RESPONSE: u64 = 1024 * 1024;
/// A token response that sends nothing for this long has failed.
const TOKEN_STALL: Duration = Duration::from_secs(30);
/// Tokens are dropped this long before they expire.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

impl Challenge {
    /// Parses `Bearer realm="..",service="..",scope=".."` or `Basic realm=".."`.
    pub fn parse(header: &str) -> Option<Challenge> {
        let header = header.trim();
        let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
        let params = parse_params(rest);
        let get = |k: &str| {
            params
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.clone())
        };
        if scheme.eq_ignore_ascii_case("basic") {
            Some(Challenge::Basic)
        } else if scheme.eq_ignore_ascii_case("bearer") {
            Some(Challenge::Bearer {
                realm: get("realm")?,
                service: get("service"),
                scope: get("scope"),
            })
        } else {
            None
        }
    }
}

/// Whether a 401's challenge says the token lacks the scope
/// (`error="insufficient_scope"`, RFC 6750 §3.1): the repository does not
/// exist or the login may not read it, not a refused login.
pub fn insufficient_scope(header: &str) -> bool {
    let (_, rest) = header.trim().split_once(' ').unwrap_or(("", ""));
    parse_params(rest)
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("error") && v == "insufficient_scope")
}

/// `key=value` and `key="quoted, \"escaped\""` pairs separated by commas.
fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            return out;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek() {
                if *c == ',' {
                    break;
                }
                value.push(*c);
                chars.next();
            }
        }
        out.push((key.trim().to_owned(), value.trim().to_owned()));
    }
}

/// What goes in the `Authorization` header of a registry request.
#[derive(Clone, PartialEq, Eq)]
pub enum Authorization {
    Basic { username: String, password: String },
    Bearer(String),
}

impl std::fmt::Debug for Authorization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Authorization::Basic { .. } => "Basic(<redacted>)",
            Authorization::Bearer(_) => "Bearer(<redacted>)",
        })
    }
}

impl Authorization {
    /// Sets the header on a request (reqwest marks it sensitive).
    pub fn apply(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            Authorization::Basic { username, password } => {
                request.basic_auth(username, Some(password))
            }
            Authorization::Bearer(token) => request.bearer_auth(token),
        }
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// A cached authorization and how long it is good for.
#[derive(Clone)]
struct Token {
    authorization: Authorization,
    lifetime: Duration,
}

/// Each token expires on its own lifetime (moka's per-entry expiry).
struct TokenExpiry;

impl moka::Expiry<(String, String), Token> for TokenExpiry {
    fn expire_after_create(
        &self,
        _: &(String, String),
        token: &Token,
        _: Instant,
    ) -> Option<Duration> {
        Some(token.lifetime)
    }
}

/// Tokens kept at most; the least used go first.
const MAX_TOKENS: u64 = 10_000;

/// Cached tokens and challenges for every upstream.
pub struct Authenticator {
    tokens: moka::sync::Cache<(String, String), Token>,
    challenges: Mutex<HashMap<String, Challenge>>,
}

impl Default for Authenticator {
    fn default() -> Authenticator {
        Authenticator {
            tokens: moka::sync::Cache::builder()
                .max_capacity(MAX_TOKENS)
                .expire_after(TokenExpiry)
                .build(),
            challenges: Mutex::default(),
        }
    }
}

impl Authenticator {
    /// The authorization to send before any challenge: a cached token, or
    /// one fetched now because this registry challenged us before.
    pub async fn prepare(
        &self,
        http: &reqwest::Client,
        registry: &str,
        credentials: Option<&Credentials>,
        scope: &str,
    ) -> Result<Option<Authorization>> {
        if let Some(Credentials::Bearer(token)) = credentials {
            return Ok(Some(Authorization::Bearer(token.clone())));
        }
        if let Some(auth) = self.cached(registry, scope) {
            return Ok(Some(auth));
        }
        let known = self.challenges.lock().get(registry).cloned();
        match known {
            Some(challenge) => self
                .answer(http, registry, credentials, &challenge, scope)
                .await
                .map(Some),
            None => Ok(None),
        }
    }

    /// Answers a 401's challenge and caches the result for `scope`.
    pub async fn answer(
        &self,
        http: &reqwest::Client,
        registry: &str,
        credentials: Option<&Credentials>,
        challenge: &Challenge,
        scope: &str,
    ) -> Result<Authorization> {
        self.challenges
            .lock()
            .insert(registry.to_owned(), challenge.clone());
        let (auth, lifetime) = match challenge {
            // Made from the credentials each time, never cached: a helper's
            // new answer (its TTL ran out) is used at once.
            Challenge::Basic => {
                return match credentials {
                    Some(Credentials::Basic { username, password }) => Ok(Authorization::Basic {
                        username: username.clone(),
                        password: password.clone(),
                    }),
                    _ => Err(Error::Unauthorized {
                        registry: registry.to_owned(),
                        envelope: None,
                    }),
                }
            }
            Challenge::Bearer { realm, service, .. } => {
                fetch_token(
                    http,
                    registry,
                    credentials,
                    realm,
                    service.as_deref(),
                    scope,
                )
                .await?
            }
        };
        let lifetime = lifetime
            .saturating_sub(EXPIRY_MARGIN)
            .max(Duration::from_secs(1));
        self.tokens.insert(
            (registry.to_owned(), scope.to_owned()),
            Token {
                authorization: auth.clone(),
                lifetime,
            },
        );
        Ok(auth)
    }

    /// Drops a cached token the registry refused.
    pub fn forget(&self, registry: &str, scope: &str) {
        self.tokens
            .invalidate(&(registry.to_owned(), scope.to_owned()));
    }

    fn cached(&self, registry: &str, scope: &str) -> Option<Authorization> {
        self.tokens
            .get(&(registry.to_owned(), scope.to_owned()))
            .map(|token| token.authorization)
    }
}

async fn fetch_token(
    http: &reqwest::Client,
    registry: &str,
    credentials: Option<&Credentials>,
    realm: &str,
    service: Option<&str>,
    scope: &str,
) -> Result<(Authorization, Duration)> {
    let token_error = |message: String| Error::Token {
        registry: registry.to_owned(),
        message,
    };
    let mut url: reqwest::Url = realm
        .parse()
        .map_err(|_| token_error("challenge realm is not a url".into()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(token_error("challenge realm is not http(s)".into()));
    }
    let request = if let Some(Credentials::Identity { token, .. }) = credentials {
        // An identity token is an OAuth2 refresh token: POSTed to the same
        // endpoint (distribution's token spec, "OAuth2 token", grant_type
        // refresh_token).
        let mut form = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", token.as_str()),
            ("client_id", "hoard"),
            ("scope", scope),
        ];
        if let Some(service) = service {
            form.push(("service", service));
        }
        http.post(url).form(&form)
    } else {
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = service {
                query.append_pair("service", service);
            }
            query.append_pair("scope", scope);
            if let Some(Credentials::Basic { username, .. }) = credentials {
                query.append_pair("account", username);
            }
        }
        let request = http.get(url);
        match credentials {
            Some(Credentials::Basic { username, password }) => {
                request.basic_auth(username, Some(password))
            }
            _ => request,
        }
    };
    let response = tokio::time::timeout(TOKEN_STALL, request.send())
        .await
        .map_err(|_| token_error("timed out".into()))?
        .map_err(|e| match super::guard::refusal_in(&e) {
            Some(rule) => Error::Refused {
                registry: registry.to_owned(),
                rule,
            },
            // Named like the registry's own connection failures, so the
            // client's error says why (`detail.cause`).
            None => Error::Connect {
                registry: registry.to_owned(),
                cause: super::cause::classify(&e),
                message: format!("token endpoint: {}", super::cause::describe(e)),
            },
        })?;
    if response.status() == http::StatusCode::TOO_MANY_REQUESTS {
        // The login endpoint's own limit (Docker Hub has one): the client
        // sees a 429 with its Retry-After, and the registry backs off.
        return Err(Error::TooManyRequests {
            registry: registry.to_owned(),
            retry_after: super::ratelimit::retry_after(response.headers()),
        });
    }
    if matches!(response.status().as_u16(), 401 | 403) {
        return Err(Error::TokenRefused {
            registry: registry.to_owned(),
            status: response.status().as_u16(),
        });
    }
    if !response.status().is_success() {
        return Err(token_error(format!(
            "status {}",
            response.status().as_u16()
        )));
    }
    let body = read_bounded(response, MAX_TOKEN_RESPONSE, TOKEN_STALL)
        .await
        .map_err(|e| {
            token_error(match e {
                ReadError::TooLarge => "response too large".into(),
                ReadError::Stalled => "response stalled".into(),
                ReadError::Broken(message) => message,
            })
        })?;
    let body: TokenResponse =
        serde_json::from_slice(&body).map_err(|e| token_error(format!("invalid json: {e}")))?;
    let token = body
        .token
        .or(body.access_token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| token_error("response has no token".into()))?;
    let lifetime = body
        .expires_in
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TOKEN_LIFETIME);
    Ok((Authorization::Bearer(token), lifetime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_docker_hub_challenge() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            }
        );
    }

    #[test]
    fn parses_unquoted_escaped_and_basic() {
        let c = Challenge::parse(
            r#"bearer realm=http://a/token, scope="repository:x:pull,push", service="s\"q""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: "http://a/token".into(),
                service: Some("s\"q".into()),
                scope: Some("repository:x:pull,push".into()),
            }
        );
        assert_eq!(
            Challenge::parse(r#"Basic realm="registry""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            Challenge::parse("Bearer service=x"),
            None,
            "realm is required"
        );
        assert_eq!(Challenge::parse("Negotiate abc"), None);
        assert_eq!(Challenge::parse(""), None);
    }

    #[tokio::test]
    async fn basic_answers_follow_the_credentials_of_each_request() {
        let auth = Authenticator::default();
        let http = reqwest::Client::new();
        let login = |password: &str| Credentials::Basic {
            username: "u".into(),
            password: password.into(),
        };
        let old = auth
            .answer(&http, "r", Some(&login("old")), &Challenge::Basic, "s1")
            .await
            .unwrap();
        assert_eq!(
            old,
            Authorization::Basic {
                username: "u".into(),
                password: "old".into()
            }
        );
        // Nothing cached: a new password (a helper's next answer) is sent at
        // once, for a new scope too, from the remembered challenge.
        assert!(auth.cached("r", "s1").is_none());
        for scope in ["s1", "s2"] {
            let new = auth
                .prepare(&http, "r", Some(&login("new")), scope)
                .await
                .unwrap();
            assert!(
                matches!(new, Some(Authorization::Basic { password, .. }) if password == "new")
            );
        }
        // Basic without credentials cannot be answered.
        let err = auth
            .answer(&http, "r", None, &Challenge::Basic, "s3")
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Unauthorized { .. }));
    }

    #[test]
    fn insufficient_scope_is_told_from_a_refused_login() {
        assert!(insufficient_scope(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:x/y:pull",error="insufficient_scope""#
        ));
        assert!(!insufficient_scope(
            r#"Bearer realm="https://auth.docker.io/token",error="invalid_token""#
        ));
        assert!(!insufficient_scope(r#"Basic realm="r""#));
    }

    #[test]
    fn authorization_debug_hides_secrets() {
        let a = Authorization::Bearer("canary-secret".into());
        assert!(!format!("{a:?}").contains("canary"));
    }
}
