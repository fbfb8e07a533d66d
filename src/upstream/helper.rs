//! Docker credential helpers: runs `docker-credential-NAME get` for the
//! registries configured with one, with the server on standard input, and
//! reads `{"ServerURL","Username","Secret"}` from standard output (the
//! protocol of docker/docker-credential-helpers, spoken by ecr-login, gcr,
//! acr-env, pass, secretservice). Owns the cache of the answers: one run per
//! registry at a time (later callers wait for it), kept until the registry
//! refuses it or its TTL ends. Never logs, counts or returns what the helper
//! printed: only its exit status. Knows nothing of HTTP; `auth` uses the
//! credentials.

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::error::{Error, Result};
use crate::config::{CredentialHelper, Credentials, RegistryConfig};
use crate::metrics::Metrics;

/// A failed run is reported to every request for this long before the
/// helper runs again, so a broken helper does not run once per request.
const FAILURE_HOLD: Duration = Duration::from_secs(5);
/// Largest helper output read; the protocol's JSON is a few KiB at most.
const MAX_OUTPUT: usize = 1024 * 1024;
/// What helpers print (on stdout or stderr, exit 1) when they hold nothing
/// for the server (docker-credential-helpers' `credentials.errCredentialsNotFound`).
const NOT_FOUND: &str = "credentials not found in native keychain";
/// The `Username` that marks `Secret` as an identity (OAuth2 refresh) token.
const IDENTITY_TOKEN_USER: &str = "<token>";

/// The credentials of one helper run, and which run gave them. `Debug`
/// shows no secret (`Credentials` redacts them).
#[derive(Debug, Clone)]
pub struct Lease {
    /// `None`: the helper holds nothing for this registry (pull anonymously).
    pub credentials: Option<Arc<Credentials>>,
    generation: u64,
}

/// The credentials to send: the helper's if the registry has one, else the
/// configured ones.
pub fn pick<'a>(
    lease: Option<&'a Lease>,
    configured: Option<&'a Credentials>,
) -> Option<&'a Credentials> {
    match lease {
        Some(lease) => lease.credentials.as_deref(),
        None => configured,
    }
}

#[derive(Default)]
struct State {
    current: Option<(Lease, Instant)>,
    generation: u64,
    failed: Option<(Error, Instant)>,
    /// The next run replaces an answer the registry refused.
    refused: bool,
    /// The current answer replaced a refused one.
    after_refusal: bool,
}

struct Slot {
    registry: String,
    config: CredentialHelper,
    /// Held across a run: the single flight. Callers that arrive during a
    /// run wait here and then find its answer.
    state: tokio::sync::Mutex<State>,
}

/// Every configured registry's helper and its cached answer.
pub struct Helpers {
    slots: HashMap<String, Slot>,
    metrics: Arc<Metrics>,
}

impl Helpers {
    /// The helpers of `registries` that name one.
    pub fn new(registries: &BTreeMap<String, RegistryConfig>, metrics: Arc<Metrics>) -> Helpers {
        let slots = registries
            .iter()
            .filter_map(|(host, config)| {
                let helper = config.helper.clone()?;
                Some((
                    host.clone(),
                    Slot {
                        registry: host.clone(),
                        config: helper,
                        state: Default::default(),
                    },
                ))
            })
            .collect();
        Helpers { slots, metrics }
    }

    fn count(&self, registry: &str, result: &str) {
        self.metrics
            .credential_helper_runs
            .with_label_values(&[registry, result])
            .inc();
    }

    /// `registry`'s current credentials from its helper, running it if
    /// nothing fresh is cached; `None` if the registry has no helper.
    pub async fn lease(&self, registry: &str) -> Result<Option<Lease>> {
        let Some(slot) = self.slots.get(registry) else {
            return Ok(None);
        };
        let mut state = slot.state.lock().await;
        if let Some((lease, at)) = &state.current {
            // "Not found" is kept only briefly: ecr-login says it for every
            // failure (STS throttling, a pod identity not mounted yet), and
            // a Basic registry refused no credentials never asks again.
            let keep = match lease.credentials {
                Some(_) => slot.config.ttl,
                None => FAILURE_HOLD,
            };
            if at.elapsed() < keep {
                return Ok(Some(lease.clone()));
            }
        }
        if let Some((error, at)) = &state.failed {
            if at.elapsed() < FAILURE_HOLD {
                return Err(error.clone());
            }
        }
        let result = run(&slot.config).await;
        self.count(
            registry,
            match &result {
                Ok(Some(_)) => "ok",
                Ok(None) => "not_found",
                Err(Failure::Timeout(_)) => "timeout",
                Err(Failure::Other(_)) => "failed",
            },
        );
        match result.map_err(Failure::into_message) {
            Ok(credentials) => {
                state.generation += 1;
                let lease = Lease {
                    credentials: credentials.map(Arc::new),
                    generation: state.generation,
                };
                state.current = Some((lease.clone(), Instant::now()));
                state.failed = None;
                state.after_refusal = std::mem::take(&mut state.refused);
                tracing::debug!(
                    registry,
                    helper = %slot.config.name,
                    found = lease.credentials.is_some(),
                    "credential helper ran"
                );
                Ok(Some(lease))
            }
            Err(message) => {
                let error = Error::CredentialHelper {
                    registry: slot.registry.clone(),
                    helper: slot.config.name.clone(),
                    message,
                };
                tracing::warn!(registry, "{error}");
                state.current = None;
                state.failed = Some((error.clone(), Instant::now()));
                Err(error)
            }
        }
    }

    /// The registry refused `lease`'s credentials: the next `lease` runs the
    /// helper again, unless another caller already replaced them (many
    /// requests refused at once cause one new run). An answer that itself
    /// replaced a refused one is kept for `FAILURE_HOLD` first: a helper
    /// that keeps handing out refused credentials (or a 403 that is about
    /// the repository, not the login) must not run once per request.
    pub async fn refuse(&self, registry: &str, lease: &Lease) {
        if let Some(slot) = self.slots.get(registry) {
            let mut state = slot.state.lock().await;
            let held = match &state.current {
                Some((current, at)) => {
                    current.generation != lease.generation
                        || (state.after_refusal && at.elapsed() < FAILURE_HOLD)
                }
                None => true,
            };
            if !held {
                state.current = None;
                state.refused = true;
            }
        }
    }
}

/// The protocol's answer to `get`.
#[derive(Deserialize)]
struct Answer {
    #[serde(rename = "Username", default)]
    username: String,
    #[serde(rename = "Secret", default)]
    secret: String,
}

/// Why a run gave no answer; the text names no output of the helper.
#[derive(Debug)]
enum Failure {
    Timeout(String),
    Other(String),
}

impl Failure {
    fn into_message(self) -> String {
        match self {
            Failure::Timeout(m) | Failure::Other(m) => m,
        }
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Failure {
        Failure::Other(message)
    }
}

/// Runs `helper get` once. `Ok(None)`: the helper holds nothing for the
/// server. The error text names no output of the helper: it may hold
/// secrets (some helpers echo what they failed to parse).
async fn run(helper: &CredentialHelper) -> std::result::Result<Option<Credentials>, Failure> {
    let mut child = tokio::process::Command::new(&helper.program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Should this future be dropped (the request cancelled), the helper
        // must not outlive it.
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", helper.program.display()))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let exchange = async {
        // A helper that exits without reading its input breaks the pipe:
        // not an error of ours, its exit status tells.
        let _ = stdin.write_all(helper.server.as_bytes()).await;
        drop(stdin);
        let limit = MAX_OUTPUT as u64 + 1;
        let (mut stdout, mut stderr) = ((&mut stdout).take(limit), (&mut stderr).take(limit));
        let (read_out, read_err, status) = tokio::join!(
            stdout.read_to_end(&mut out),
            stderr.read_to_end(&mut err),
            child.wait()
        );
        read_out.and(read_err).and(status)
    };
    let status = match tokio::time::timeout(helper.timeout, exchange).await {
        Ok(status) => status.map_err(|e| format!("failed: {e}"))?,
        Err(_) => {
            // Killed and reaped here, not left to the runtime's best effort.
            let _ = child.kill().await;
            return Err(Failure::Timeout(format!(
                "timed out after {}, killed",
                humantime::format_duration(helper.timeout)
            )));
        }
    };
    let output = std::process::Output {
        status,
        stdout: out,
        stderr: err,
    };
    if !output.status.success() {
        let said = |bytes: &[u8]| String::from_utf8_lossy(bytes).contains(NOT_FOUND);
        if said(&output.stdout) || said(&output.stderr) {
            return Ok(None);
        }
        return Err(format!("failed: {}", output.status).into());
    }
    if output.stdout.len() > MAX_OUTPUT {
        return Err(Failure::Other("printed more than 1 MiB".into()));
    }
    // Serde's message could quote the output: report only where it broke.
    let answer: Answer = serde_json::from_slice(&output.stdout).map_err(|e| {
        format!(
            "printed no credentials JSON (line {}, column {})",
            e.line(),
            e.column()
        )
    })?;
    Ok(credentials(answer))
}

/// The credentials an answer means.
fn credentials(answer: Answer) -> Option<Credentials> {
    if answer.secret.is_empty() {
        return None;
    }
    if answer.username == IDENTITY_TOKEN_USER {
        return Some(Credentials::Identity {
            username: String::new(),
            token: answer.secret,
        });
    }
    Some(Credentials::Basic {
        username: answer.username,
        password: answer.secret,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    /// A helper script in `dir` running `body` (sh).
    fn helper(dir: &std::path::Path, body: &str, timeout: Duration) -> CredentialHelper {
        let program = dir.join("docker-credential-test");
        std::fs::write(&program, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        CredentialHelper {
            name: "test".into(),
            program,
            server: "registry.example".into(),
            ttl: Duration::from_secs(3600),
            timeout,
        }
    }

    fn helpers(config: CredentialHelper) -> Helpers {
        let mut registries = BTreeMap::new();
        registries.insert(
            "r".to_owned(),
            RegistryConfig {
                url: "http://127.0.0.1:1".parse().unwrap(),
                credentials: None,
                helper: Some(config),
            },
        );
        Helpers::new(&registries, Arc::new(Metrics::new()))
    }

    #[tokio::test]
    async fn reads_the_protocol_answer_for_the_server_on_stdin() {
        let dir = tempfile::tempdir().unwrap();
        let config = helper(
            dir.path(),
            r#"read server; [ "$1" = get ] || exit 3
printf '{"ServerURL":"%s","Username":"bot","Secret":"s3cret-%s"}' "$server" "$server""#,
            Duration::from_secs(10),
        );
        assert_eq!(
            run(&config).await.unwrap(),
            Some(Credentials::Basic {
                username: "bot".into(),
                password: "s3cret-registry.example".into()
            })
        );
    }

    #[tokio::test]
    async fn a_token_username_means_an_identity_token() {
        let dir = tempfile::tempdir().unwrap();
        let config = helper(
            dir.path(),
            r#"echo '{"Username":"<token>","Secret":"refresh"}'"#,
            Duration::from_secs(10),
        );
        assert_eq!(
            run(&config).await.unwrap(),
            Some(Credentials::Identity {
                username: String::new(),
                token: "refresh".into()
            })
        );
    }

    #[tokio::test]
    async fn not_found_means_anonymous_and_other_failures_are_errors_without_output() {
        let dir = tempfile::tempdir().unwrap();
        let config = helper(
            dir.path(),
            "echo 'credentials not found in native keychain'; exit 1",
            Duration::from_secs(10),
        );
        assert_eq!(run(&config).await.unwrap(), None);
        let config = helper(
            dir.path(),
            "echo 'leaked-canary' >&2; exit 7",
            Duration::from_secs(10),
        );
        let e = run(&config)
            .await
            .map_err(Failure::into_message)
            .unwrap_err();
        assert!(e.contains("exit status: 7") && !e.contains("canary"), "{e}");
        let config = helper(
            dir.path(),
            r#"echo '{"Username":"u","Secret":"leaked-canary"'"#,
            Duration::from_secs(10),
        );
        let e = run(&config)
            .await
            .map_err(Failure::into_message)
            .unwrap_err();
        assert!(
            e.contains("no credentials JSON") && !e.contains("canary"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_hanging_helper_is_killed_after_its_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let config = helper(
            dir.path(),
            &format!("echo $$ > {}; exec sleep 60", pid_file.display()),
            Duration::from_millis(500),
        );
        let started = Instant::now();
        let e = helpers(config).lease("r").await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            e.to_string()
                .contains("docker-credential-test timed out after 500ms, killed"),
            "{e}"
        );
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let proc = std::path::PathBuf::from(format!("/proc/{}", pid.trim()));
        // Killed and reaped (tokio reaps dropped children in the background).
        let deadline = Instant::now() + Duration::from_secs(10);
        while proc.exists() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!proc.exists(), "helper still running");
    }

    #[tokio::test]
    async fn one_run_serves_concurrent_callers_until_refused() {
        let dir = tempfile::tempdir().unwrap();
        let count = dir.path().join("count");
        let config = helper(
            dir.path(),
            &format!(
                "echo run >> {}; sleep 0.2; echo '{{\"Username\":\"u\",\"Secret\":\"p\"}}'",
                count.display()
            ),
            Duration::from_secs(10),
        );
        let helpers = Arc::new(helpers(config));
        let runs = || std::fs::read_to_string(&count).unwrap().lines().count();
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let helpers = helpers.clone();
            tasks.push(tokio::spawn(async move {
                helpers.lease("r").await.unwrap().unwrap()
            }));
        }
        let mut leases = Vec::new();
        for task in tasks {
            leases.push(task.await.unwrap());
        }
        assert_eq!(runs(), 1);
        // Every refusal of the same answer causes one new run.
        for lease in &leases {
            helpers.refuse("r", lease).await;
        }
        helpers.lease("r").await.unwrap();
        for lease in &leases {
            helpers.refuse("r", lease).await;
        }
        let replaced = helpers.lease("r").await.unwrap().unwrap();
        assert_eq!(runs(), 2);
        // The replacement refused at once is kept a while.
        helpers.refuse("r", &replaced).await;
        helpers.lease("r").await.unwrap();
        assert_eq!(runs(), 2);
        assert!(helpers.lease("other").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn an_answer_past_its_ttl_is_fetched_again() {
        let dir = tempfile::tempdir().unwrap();
        let count = dir.path().join("count");
        let mut config = helper(
            dir.path(),
            &format!(
                "echo run >> {}; echo '{{\"Username\":\"u\",\"Secret\":\"p\"}}'",
                count.display()
            ),
            Duration::from_secs(10),
        );
        config.ttl = Duration::from_millis(300);
        let helpers = helpers(config);
        helpers.lease("r").await.unwrap();
        helpers.lease("r").await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        helpers.lease("r").await.unwrap();
        let runs = std::fs::read_to_string(&count).unwrap().lines().count();
        assert_eq!(runs, 2);
    }
}
