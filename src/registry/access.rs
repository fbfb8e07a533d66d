//! Who may pull what: clients authenticate with HTTP Basic against an
//! htpasswd file (bcrypt entries, the format distribution and nginx use),
//! and access rules give users, groups or anonymous clients repository
//! patterns. Off unless an htpasswd file is configured.
//!
//! bcrypt is slow on purpose, so a verified `Authorization` value is
//! remembered for a few minutes (under a salted hash, never the password);
//! failed logins are counted per client address and past a limit that
//! address gets 429 until it stops for a minute.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use tracing::{info, warn};

use super::error::{ApiError, Code};
use crate::config::AuthConfig;
use crate::reference::Repository;

/// Failed logins from one address before it is refused for a while.
const MAX_FAILURES: u32 = 10;
/// How long failures are remembered (and an address stays refused).
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// How long a verified `Authorization` value skips bcrypt.
const VERIFIED_FOR: Duration = Duration::from_secs(300);

/// The client behind a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Who {
    Anonymous,
    User(String),
}

/// Whom a rule is for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Principal {
    Anonymous,
    AnyUser,
    User(String),
    Group(String),
}

/// A repository pattern: `*`, `host/prefix/*`, or an exact `host/name`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    All,
    Prefix(String),
    Exact(String),
}

impl Pattern {
    fn parse(text: &str) -> Result<Pattern, String> {
        if text == "*" {
            return Ok(Pattern::All);
        }
        if let Some(prefix) = text.strip_suffix("/*") {
            if prefix.is_empty() || prefix.contains('*') {
                return Err(format!("bad repository pattern {text:?}"));
            }
            return Ok(Pattern::Prefix(format!("{prefix}/")));
        }
        if text.contains('*') || !text.contains('/') {
            return Err(format!(
                "bad repository pattern {text:?} (use *, host/prefix/* or host/name)"
            ));
        }
        Ok(Pattern::Exact(text.to_owned()))
    }

    fn matches(&self, repo: &str) -> bool {
        match self {
            Pattern::All => true,
            Pattern::Prefix(prefix) => repo.starts_with(prefix.as_str()),
            Pattern::Exact(name) => repo == name,
        }
    }
}

/// The htpasswd file, read again when it changes.
struct Htpasswd {
    path: PathBuf,
    /// How often the file is checked for changes (`auth.reload_interval`).
    reload_interval: Duration,
    state: Mutex<HtpasswdState>,
}

struct HtpasswdState {
    modified: Option<SystemTime>,
    checked: Instant,
    /// user -> bcrypt hash
    users: Arc<HashMap<String, String>>,
}

impl Htpasswd {
    fn load(path: &Path, reload_interval: Duration) -> Result<Htpasswd, String> {
        let (users, modified) = read_htpasswd(path)?;
        Ok(Htpasswd {
            path: path.to_owned(),
            reload_interval,
            state: Mutex::new(HtpasswdState {
                modified,
                checked: Instant::now(),
                users: Arc::new(users),
            }),
        })
    }

    /// The current users, re-reading the file if it changed.
    fn users(&self) -> Arc<HashMap<String, String>> {
        let mut state = self.state.lock();
        if state.checked.elapsed() >= self.reload_interval {
            state.checked = Instant::now();
            let modified = std::fs::metadata(&self.path)
                .and_then(|m| m.modified())
                .ok();
            if modified != state.modified {
                match read_htpasswd(&self.path) {
                    Ok((users, modified)) => {
                        info!(users = users.len(), "htpasswd file reloaded");
                        state.users = Arc::new(users);
                        state.modified = modified;
                    }
                    Err(e) => warn!(error = %e, "htpasswd reload failed; keeping the old users"),
                }
            }
        }
        state.users.clone()
    }
}

fn read_htpasswd(path: &Path) -> Result<(HashMap<String, String>, Option<SystemTime>), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read htpasswd file {}: {e}", path.display()))?;
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let mut users = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((user, hash)) = line.split_once(':') else {
            return Err(format!("{}:{}: not user:hash", path.display(), n + 1));
        };
        if !(hash.starts_with("$2y$") || hash.starts_with("$2a$") || hash.starts_with("$2b$")) {
            // As distribution: only bcrypt. MD5/SHA1/crypt entries are weak.
            warn!(
                user,
                line = n + 1,
                "htpasswd entry is not bcrypt (htpasswd -B); ignored"
            );
            continue;
        }
        users.insert(user.to_owned(), hash.to_owned());
    }
    Ok((users, modified))
}

/// Client authentication and access rules.
pub struct Access {
    realm: String,
    htpasswd: Htpasswd,
    rules: Vec<(Principal, Vec<Pattern>)>,
    /// user -> groups
    groups: HashMap<String, Vec<String>>,
    protect_metrics: bool,
    salt: [u8; 32],
    verified: moka::sync::Cache<[u8; 32], String>,
    failures: moka::sync::Cache<IpAddr, u32>,
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 401 with a Basic challenge.
    Unauthenticated,
    /// 403: authenticated, not allowed.
    Denied,
    /// 429: too many failed logins from this address.
    Throttled,
}

impl Refusal {
    pub fn error(&self) -> ApiError {
        match self {
            Refusal::Unauthenticated => {
                ApiError::new(Code::Unauthorized, "authentication required")
            }
            Refusal::Denied => ApiError::new(Code::Denied, "access to the resource is denied"),
            Refusal::Throttled => ApiError::new(
                Code::TooManyRequests,
                "too many failed logins from this address; wait a minute",
            ),
        }
    }
}

impl Access {
    /// Reads the htpasswd file and checks the rules.
    pub fn new(config: &AuthConfig) -> Result<Access, String> {
        let htpasswd = Htpasswd::load(&config.htpasswd, config.reload_interval)?;
        let mut rules = Vec::new();
        for (who, patterns) in &config.access {
            let principal = match who.as_str() {
                "anonymous" => Principal::Anonymous,
                "*" => Principal::AnyUser,
                group if group.starts_with("group:") => Principal::Group(group[6..].to_owned()),
                user => Principal::User(user.to_owned()),
            };
            let patterns = patterns
                .iter()
                .map(|p| Pattern::parse(p))
                .collect::<Result<Vec<_>, _>>()?;
            rules.push((principal, patterns));
        }
        if rules.is_empty() {
            // No rules: every user may pull everything, anonymous nothing.
            rules.push((Principal::AnyUser, vec![Pattern::All]));
        }
        let mut groups: HashMap<String, Vec<String>> = HashMap::new();
        for (group, members) in &config.groups {
            for member in members {
                groups
                    .entry(member.clone())
                    .or_default()
                    .push(group.clone());
            }
        }
        Ok(Access {
            realm: config.realm.clone(),
            htpasswd,
            rules,
            groups,
            protect_metrics: config.protect_metrics,
            salt: random_salt(),
            verified: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(VERIFIED_FOR)
                .build(),
            failures: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(FAILURE_WINDOW)
                .build(),
        })
    }

    /// The `WWW-Authenticate` value of a 401.
    pub fn challenge(&self) -> String {
        format!("Basic realm=\"{}\"", self.realm.replace('"', ""))
    }

    /// Whether /metrics and /healthz need a login.
    pub fn protects_metrics(&self) -> bool {
        self.protect_metrics
    }

    /// Who sent the request: anonymous without `Authorization`, a user with
    /// valid Basic credentials; anything else is refused.
    pub async fn authenticate(
        &self,
        peer: Option<IpAddr>,
        authorization: Option<&http::HeaderValue>,
    ) -> Result<Who, Refusal> {
        let Some(value) = authorization else {
            return Ok(Who::Anonymous);
        };
        if peer.is_some_and(|ip| self.failures.get(&ip).unwrap_or(0) >= MAX_FAILURES) {
            return Err(Refusal::Throttled);
        }
        let key = self.key(value.as_bytes());
        if let Some(user) = self.verified.get(&key) {
            return Ok(Who::User(user));
        }
        let checked = match basic(value) {
            Some((user, password)) => {
                let users = self.htpasswd.users();
                match users.get(&user).cloned() {
                    Some(hash) => {
                        let ok = tokio::task::spawn_blocking(move || {
                            bcrypt::verify(password, &hash).unwrap_or(false)
                        })
                        .await
                        .unwrap_or(false);
                        ok.then_some(user)
                    }
                    None => None,
                }
            }
            None => None,
        };
        match checked {
            Some(user) => {
                self.verified.insert(key, user.clone());
                Ok(Who::User(user))
            }
            None => {
                if let Some(ip) = peer {
                    let count = self.failures.get(&ip).unwrap_or(0) + 1;
                    self.failures.insert(ip, count);
                }
                Err(Refusal::Unauthenticated)
            }
        }
    }

    /// Whether `who` may pull from `repo`.
    pub fn may_pull(&self, who: &Who, repo: &Repository) -> bool {
        let name = format!("{}/{}", repo.registry(), repo.name());
        let no_groups = Vec::new();
        let groups = match who {
            Who::User(user) => self.groups.get(user).unwrap_or(&no_groups),
            Who::Anonymous => &no_groups,
        };
        self.rules.iter().any(|(principal, patterns)| {
            let applies = match (principal, who) {
                (Principal::Anonymous, Who::Anonymous) => true,
                (Principal::AnyUser, Who::User(_)) => true,
                (Principal::User(u), Who::User(user)) => u == user,
                (Principal::Group(g), Who::User(_)) => groups.contains(g),
                _ => false,
            };
            applies && patterns.iter().any(|p| p.matches(&name))
        })
    }

    fn key(&self, authorization: &[u8]) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(self.salt);
        hasher.update(authorization);
        hasher.finalize().into()
    }
}

/// `Basic base64(user:password)` -> (user, password).
fn basic(value: &http::HeaderValue) -> Option<(String, String)> {
    let text = value.to_str().ok()?;
    let (scheme, encoded) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

fn random_salt() -> [u8; 32] {
    let mut salt = [0u8; 32];
    if let Ok(mut urandom) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut urandom, &mut salt);
    }
    // Mixed with the std hasher's random keys in case /dev/urandom is absent.
    let extra =
        std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 0u8);
    for (i, b) in extra.to_le_bytes().iter().enumerate() {
        salt[i] ^= b;
    }
    salt
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(
        rules: &[(&str, &[&str])],
        groups: &[(&str, &[&str])],
    ) -> (tempfile::TempDir, Access) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        std::fs::write(
            &path,
            format!("alice:{hash}\nbob:{hash}\n# comment\nold:$apr1$xyz$abc\n"),
        )
        .unwrap();
        let config = AuthConfig {
            htpasswd: path,
            realm: "hoard".into(),
            protect_metrics: false,
            access: rules
                .iter()
                .map(|(w, p)| (w.to_string(), p.iter().map(|s| s.to_string()).collect()))
                .collect(),
            groups: groups
                .iter()
                .map(|(g, m)| (g.to_string(), m.iter().map(|s| s.to_string()).collect()))
                .collect(),
            reload_interval: Duration::from_secs(5),
        };
        (dir, Access::new(&config).unwrap())
    }

    fn header(user: &str, password: &str) -> http::HeaderValue {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        http::HeaderValue::from_str(&format!("Basic {token}")).unwrap()
    }

    fn repo(registry: &str, name: &str) -> Repository {
        Repository::new(registry, name).unwrap()
    }

    #[tokio::test]
    async fn basic_credentials_are_checked_against_bcrypt_entries() {
        let (_dir, access) = access(&[], &[]);
        let ip = Some("10.0.0.1".parse().unwrap());
        assert_eq!(access.authenticate(ip, None).await, Ok(Who::Anonymous));
        let alice = header("alice", "s3cret");
        assert_eq!(
            access.authenticate(ip, Some(&alice)).await,
            Ok(Who::User("alice".into()))
        );
        // Cached: same answer without bcrypt.
        assert_eq!(
            access.authenticate(ip, Some(&alice)).await,
            Ok(Who::User("alice".into()))
        );
        for bad in [
            header("alice", "wrong"),
            header("nobody", "s3cret"),
            header("old", "x"),
        ] {
            assert_eq!(
                access.authenticate(ip, Some(&bad)).await,
                Err(Refusal::Unauthenticated)
            );
        }
        let bearer = http::HeaderValue::from_static("Bearer abc");
        assert_eq!(
            access.authenticate(ip, Some(&bearer)).await,
            Err(Refusal::Unauthenticated)
        );
    }

    #[tokio::test]
    async fn repeated_failures_from_one_address_are_throttled() {
        let (_dir, access) = access(&[], &[]);
        let ip = Some("10.0.0.2".parse().unwrap());
        let bad = header("alice", "guess");
        for _ in 0..MAX_FAILURES {
            assert_eq!(
                access.authenticate(ip, Some(&bad)).await,
                Err(Refusal::Unauthenticated)
            );
        }
        let good = header("alice", "s3cret");
        assert_eq!(
            access.authenticate(ip, Some(&good)).await,
            Err(Refusal::Throttled)
        );
        // Another address is unaffected.
        let other = Some("10.0.0.3".parse().unwrap());
        assert!(access.authenticate(other, Some(&good)).await.is_ok());
    }

    #[test]
    fn rules_by_user_group_and_anonymous() {
        let (_dir, access) = access(
            &[
                ("group:ci", &["ghcr.io/acme/*", "docker.io/*"]),
                ("bob", &["quay.io/org/tool"]),
                ("anonymous", &["docker.io/library/*"]),
            ],
            &[("ci", &["alice"])],
        );
        let alice = Who::User("alice".into());
        let bob = Who::User("bob".into());
        assert!(access.may_pull(&alice, &repo("ghcr.io", "acme/app")));
        assert!(access.may_pull(&alice, &repo("ghcr.io", "acme/team/app")));
        assert!(!access.may_pull(&alice, &repo("ghcr.io", "acmex/app")));
        assert!(access.may_pull(&alice, &repo("docker.io", "library/alpine")));
        assert!(access.may_pull(&bob, &repo("quay.io", "org/tool")));
        assert!(!access.may_pull(&bob, &repo("ghcr.io", "acme/app")));
        assert!(access.may_pull(&Who::Anonymous, &repo("docker.io", "library/alpine")));
        assert!(!access.may_pull(&Who::Anonymous, &repo("docker.io", "someone/private")));
    }

    #[test]
    fn without_rules_users_pull_everything_and_anonymous_nothing() {
        let (_dir, access) = access(&[], &[]);
        assert!(access.may_pull(&Who::User("bob".into()), &repo("ghcr.io", "x/y")));
        assert!(!access.may_pull(&Who::Anonymous, &repo("docker.io", "library/alpine")));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["ghcr.io/*/x", "alpine", "a*"] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
    }
}
