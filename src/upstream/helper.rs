//! Docker credential helpers: runs `docker-credential-NAME get` for the
//! registries configured with one, with the server on standard input, and
//! reads `{"ServerURL","Username","Secret"}` from standard output (the
//! protocol of docker/docker-credential-helpers, spoken by ecr-login, gcr,
//! acr-env, pass, secretservice). Owns the cache of the answers: one run per
//! registry at a time (later callers wait for it), kept until the registry
//! refuses it or its TTL ends. Never logs, counts or returns what the helper
//! printed: only its exit status. Knows nothing of HTTP; `auth` uses the
//! credentials and the client says when the registry refused them.

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
// tokio's clock, so the unit tests can step over the holds below.
use tokio::time::Instant;

use super::error::{Error, Result};
use crate::config::{CredentialHelper, Credentials, RegistryConfig};
use crate::metrics::Metrics;

/// A failed run is reported to every request for this long before the
/// helper runs again, so a broken helper does not run once per request;
/// the hold doubles with each failure in a row, up to `MAX_FAILURE_HOLD`.
const FAILURE_HOLD: Duration = Duration::from_secs(5);
const MAX_FAILURE_HOLD: Duration = Duration::from_secs(60);
/// After a run caused by a refusal, further refusals wait this long before
/// the helper runs again, doubling with each such run up to
/// `MAX_REFUSAL_HOLD`. A refusal is not always about the login (a 403 on a
/// repository the credentials may not read looks the same), and a helper
/// whose source has not rotated yet hands out the refused answer again:
/// neither may run the helper once per request.
const REFUSAL_HOLD: Duration = Duration::from_secs(10);
const MAX_REFUSAL_HOLD: Duration = Duration::from_secs(300);
/// Refusal runs further apart than this start the doubling over.
const REFUSALS_FORGOTTEN: Duration = Duration::from_secs(1800);
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

/// One upstream request's credentials: the helper's answer if the registry
/// has a helper, else the configured ones; renewed at most once per request.
pub struct Login<'a> {
    registry: &'a str,
    configured: Option<&'a Credentials>,
    lease: Option<Lease>,
    renewed: bool,
}

impl Login<'_> {
    /// The credentials to send.
    pub fn credentials(&self) -> Option<&Credentials> {
        match &self.lease {
            Some(lease) => lease.credentials.as_deref(),
            None => self.configured,
        }
    }

    /// The registry refused `credentials`: whether there are new ones to try.
    /// Only a helper's answer is renewed, once per request, and not while a
    /// refusal hold lasts (then the refusal stands). A run that fails is
    /// logged and the refusal stands too: the client hears the registry's
    /// answer, not the helper's trouble.
    pub async fn renew(&mut self, helpers: &Helpers) -> bool {
        let Some(lease) = &self.lease else {
            return false;
        };
        if self.renewed || !helpers.refuse(self.registry, lease).await {
            return false;
        }
        self.renewed = true;
        match helpers.lease(self.registry).await {
            Ok(lease) => {
                self.lease = lease;
                true
            }
            // Already logged where it failed.
            Err(_) => false,
        }
    }
}

#[derive(Default)]
struct State {
    /// The answer in use and when it was fetched. Kept when a routine
    /// (TTL) run fails: the credentials may well still be good.
    current: Option<(Lease, Instant)>,
    generation: u64,
    failed: Option<(Error, Instant)>,
    /// Failed runs in a row.
    failures: u32,
    /// A run in the background replaces `current` (past its TTL) while
    /// requests go on using it.
    refreshing: bool,
    /// The next run replaces an answer the registry refused.
    refused: bool,
    /// Runs caused by refusals in a row, and when the last one was.
    refusal_runs: u32,
    last_refusal_run: Option<Instant>,
}

impl State {
    /// Whether the last run failed within its hold: not run again yet.
    fn failure_held(&self) -> bool {
        let hold = FAILURE_HOLD
            .saturating_mul(1 << self.failures.saturating_sub(1).min(16))
            .min(MAX_FAILURE_HOLD);
        self.failed
            .as_ref()
            .is_some_and(|(_, at)| at.elapsed() < hold)
    }

    /// The answer still in use after a failed run, else that failure.
    fn kept_or(&self, error: Error) -> Result<Option<Lease>> {
        match &self.current {
            Some((kept, _)) => Ok(Some(kept.clone())),
            None => Err(error),
        }
    }

    /// How long refusals are held after the last run one caused.
    fn refusal_hold(&self) -> Duration {
        match self.refusal_runs {
            0 => Duration::ZERO,
            n => REFUSAL_HOLD
                .saturating_mul(1 << (n - 1).min(16))
                .min(MAX_REFUSAL_HOLD),
        }
    }
}

struct Slot {
    config: CredentialHelper,
    /// Held across a run: the single flight. Callers that arrive during a
    /// run wait here and then find its answer.
    state: Arc<tokio::sync::Mutex<State>>,
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
                        config: helper,
                        state: Default::default(),
                    },
                ))
            })
            .collect();
        Helpers { slots, metrics }
    }

    /// The credentials for one request to `registry`, running its helper if
    /// it has one and nothing fresh is cached.
    pub async fn login<'a>(
        &self,
        registry: &'a str,
        configured: Option<&'a Credentials>,
    ) -> Result<Login<'a>> {
        Ok(Login {
            registry,
            configured,
            lease: self.lease(registry).await?,
            renewed: false,
        })
    }

    /// `registry`'s current credentials from its helper, running it if
    /// nothing fresh is cached; `None` if the registry has no helper.
    async fn lease(&self, registry: &str) -> Result<Option<Lease>> {
        let Some(slot) = self.slots.get(registry) else {
            return Ok(None);
        };
        let mut state = slot.state.clone().lock_owned().await;
        if let Some((lease, at)) = &state.current {
            let lease = lease.clone();
            match lease.credentials {
                Some(_) if at.elapsed() < slot.config.ttl => return Ok(Some(lease)),
                // Past its TTL: still good as far as anyone knows (the TTL
                // comes before the real expiry), so requests go on with it
                // while one run in the background replaces it.
                Some(_) => {
                    if !state.refreshing && !state.failure_held() {
                        state.refreshing = true;
                        drop(state);
                        let run = self.spawn_run(registry, slot, None);
                        tokio::spawn(async move {
                            let _ = run.await;
                        });
                    }
                    return Ok(Some(lease));
                }
                // "Not found" is kept only briefly: ecr-login says it for
                // every failure (STS throttling, a pod identity not mounted
                // yet), and a Basic registry refused no credentials never
                // asks again.
                None if at.elapsed() < FAILURE_HOLD => return Ok(Some(lease)),
                None => {}
            }
        }
        if state.failure_held() {
            let (error, _) = state.failed.clone().expect("held after a failure");
            return state.kept_or(error);
        }
        self.spawn_run(registry, slot, Some(state)).await
    }

    /// Runs `slot`'s helper in a task of its own that holds the state
    /// (`held`, or taken when the task starts): a request given up meanwhile
    /// (its client gone, its deadline passed) neither kills the helper nor
    /// loses its answer, which the next caller finds.
    fn spawn_run(
        &self,
        registry: &str,
        slot: &Slot,
        held: Option<tokio::sync::OwnedMutexGuard<State>>,
    ) -> impl std::future::Future<Output = Result<Option<Lease>>> + Send + 'static {
        let (registry, config) = (registry.to_owned(), slot.config.clone());
        let (state, metrics) = (slot.state.clone(), self.metrics.clone());
        let task = tokio::spawn({
            let (registry, config) = (registry.clone(), config.clone());
            async move {
                let guard = match held {
                    Some(guard) => guard,
                    None => state.lock_owned().await,
                };
                refresh(guard, registry, config, metrics).await
            }
        });
        async move {
            task.await.unwrap_or_else(|e| {
                Err(Error::CredentialHelper {
                    registry,
                    helper: config.name,
                    message: if e.is_panic() {
                        "run panicked".into()
                    } else {
                        "run was cancelled (shutting down)".into()
                    },
                })
            })
        }
    }

    /// The registry refused `lease`'s credentials: whether the helper will
    /// run again for the next `lease`. It does unless another caller
    /// already replaced them (many requests refused at once cause one new
    /// run) or a refusal hold lasts (see `REFUSAL_HOLD`).
    async fn refuse(&self, registry: &str, lease: &Lease) -> bool {
        let Some(slot) = self.slots.get(registry) else {
            return false;
        };
        let mut state = slot.state.lock().await;
        match &state.current {
            Some((current, _)) if current.generation == lease.generation => {}
            // Replaced (or failed) since: the next lease is another answer.
            _ => return true,
        }
        if let Some(at) = state.last_refusal_run {
            if at.elapsed() < state.refusal_hold() {
                tracing::debug!(registry, "credentials refused again; helper held");
                return false;
            }
        }
        state.current = None;
        state.refused = true;
        true
    }
}

/// Runs the helper and records its answer in `state` (held throughout).
async fn refresh(
    mut state: tokio::sync::OwnedMutexGuard<State>,
    registry: String,
    config: CredentialHelper,
    metrics: Arc<Metrics>,
) -> Result<Option<Lease>> {
    let result = run(&config).await;
    state.refreshing = false;
    metrics
        .credential_helper_runs
        .with_label_values(&[
            registry.as_str(),
            match &result {
                Ok(Some(_)) => "ok",
                Ok(None) => "not_found",
                Err(Failure::Timeout(_)) => "timeout",
                Err(Failure::Other(_)) => "failed",
            },
        ])
        .inc();
    match result.map_err(Failure::into_message) {
        Ok(credentials) => {
            state.generation += 1;
            let lease = Lease {
                credentials: credentials.map(Arc::new),
                generation: state.generation,
            };
            let now = Instant::now();
            state.current = Some((lease.clone(), now));
            state.failed = None;
            state.failures = 0;
            if std::mem::take(&mut state.refused) {
                let forgotten = state
                    .last_refusal_run
                    .is_none_or(|at| now - at > REFUSALS_FORGOTTEN);
                state.refusal_runs = if forgotten { 1 } else { state.refusal_runs + 1 };
                state.last_refusal_run = Some(now);
            } else {
                state.refusal_runs = 0;
            }
            tracing::debug!(
                registry,
                helper = %config.name,
                found = lease.credentials.is_some(),
                "credential helper ran"
            );
            Ok(Some(lease))
        }
        Err(message) => {
            let error = Error::CredentialHelper {
                registry: registry.clone(),
                helper: config.name.clone(),
                message,
            };
            state.failed = Some((error.clone(), Instant::now()));
            state.failures += 1;
            if state.current.is_some() {
                tracing::warn!(registry, "{error}; the answer before it is kept");
            } else {
                tracing::warn!(registry, "{error}");
            }
            state.kept_or(error)
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
        // Its own process group, so a timeout kills what a wrapper script
        // started too (an `aws ecr get-login-password` under a shell).
        .process_group(0)
        // Should this future be dropped (the runtime shutting down), the
        // helper must not outlive it.
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", helper.program.display()))?;
    // Taken now: once the helper is reaped `id()` says nothing, yet what it
    // started may live on in its group (the group id is not reused while
    // a member lives).
    let group = child.id().and_then(|pid| i32::try_from(pid).ok());
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
            if let Some(group) = group {
                // SAFETY: kill(2) with a negative pid signals the process
                // group the helper leads (made above); no memory is touched.
                unsafe { libc::kill(-group, libc::SIGKILL) };
            }
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

    /// Steps tokio's clock by `by` (paused only meanwhile: a helper run
    /// under a paused clock would see its timeout fire at once).
    async fn step(by: Duration) {
        tokio::time::pause();
        tokio::time::advance(by).await;
        tokio::time::resume();
    }

    /// How many times the helper in `dir` ran (its script appends to `count`).
    fn runs(dir: &std::path::Path) -> usize {
        std::fs::read_to_string(dir.join("count"))
            .unwrap_or_default()
            .lines()
            .count()
    }

    #[tokio::test]
    async fn a_hanging_helper_is_killed_after_its_timeout_with_what_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let (pid_file, child_file) = (dir.path().join("pid"), dir.path().join("child"));
        // A wrapper script that started a process of its own and waits for
        // it, or exits leaving it (holding the output open).
        for end in ["wait", "exit 0"] {
            let config = helper(
                dir.path(),
                &format!(
                    "sleep 60 & echo $! > {}; echo $$ > {}; {end}",
                    child_file.display(),
                    pid_file.display()
                ),
                Duration::from_millis(500),
            );
            let started = std::time::Instant::now();
            let e = helpers(config).lease("r").await.unwrap_err();
            assert!(started.elapsed() < Duration::from_secs(5));
            assert!(
                e.to_string()
                    .contains("docker-credential-test timed out after 500ms, killed"),
                "{e}"
            );
            for file in [&pid_file, &child_file] {
                let pid = std::fs::read_to_string(file).unwrap();
                let proc = std::path::PathBuf::from(format!("/proc/{}", pid.trim()));
                // Killed; the helper reaped here, its child by init.
                let gone = || {
                    std::fs::read_to_string(proc.join("stat"))
                        .map(|stat| stat.contains(") Z "))
                        .unwrap_or(true)
                };
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while !gone() && std::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                assert!(gone(), "{} still running ({end})", file.display());
            }
        }
    }

    #[tokio::test]
    async fn one_run_serves_concurrent_callers_and_refusals_back_off() {
        let dir = tempfile::tempdir().unwrap();
        let config = helper(
            dir.path(),
            &format!(
                "echo run >> {}; sleep 0.2; echo '{{\"Username\":\"u\",\"Secret\":\"p\"}}'",
                dir.path().join("count").display()
            ),
            Duration::from_secs(10),
        );
        let helpers = Arc::new(helpers(config));
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
        assert_eq!(runs(dir.path()), 1);
        // Every refusal of the same answer causes one new run.
        for lease in &leases {
            assert!(helpers.refuse("r", lease).await);
        }
        let replaced = helpers.lease("r").await.unwrap().unwrap();
        for lease in &leases {
            assert!(helpers.refuse("r", lease).await, "already replaced");
        }
        assert_eq!(
            helpers.lease("r").await.unwrap().unwrap().generation,
            replaced.generation
        );
        assert_eq!(runs(dir.path()), 2);
        // The replacement refused at once is held; after the hold it runs
        // again, and the next hold is twice as long.
        assert!(!helpers.refuse("r", &replaced).await);
        step(REFUSAL_HOLD).await;
        assert!(helpers.refuse("r", &replaced).await);
        let third = helpers.lease("r").await.unwrap().unwrap();
        assert_eq!(runs(dir.path()), 3);
        step(REFUSAL_HOLD).await;
        assert!(
            !helpers.refuse("r", &third).await,
            "held for 2 x REFUSAL_HOLD"
        );
        step(REFUSAL_HOLD).await;
        assert!(helpers.refuse("r", &third).await);
        helpers.lease("r").await.unwrap();
        assert_eq!(runs(dir.path()), 4);
        assert!(helpers.lease("other").await.unwrap().is_none());
    }

    /// Waits (at most 10 s) until the helper in `dir` ran `n` times.
    async fn ran(dir: &std::path::Path, n: usize) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while runs(dir) < n && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        runs(dir) == n
    }

    #[tokio::test]
    async fn an_answer_past_its_ttl_is_replaced_in_the_background_and_kept_if_that_fails() {
        let dir = tempfile::tempdir().unwrap();
        // Answers on its first run only.
        let mut config = helper(
            dir.path(),
            &format!(
                "echo run >> {count}; [ $(wc -l < {count}) -eq 1 ] || exit 3
echo '{{\"Username\":\"u\",\"Secret\":\"p\"}}'",
                count = dir.path().join("count").display()
            ),
            Duration::from_secs(10),
        );
        config.ttl = Duration::from_secs(60);
        let helpers = helpers(config);
        let first = helpers.lease("r").await.unwrap().unwrap();
        helpers.lease("r").await.unwrap();
        assert_eq!(runs(dir.path()), 1);
        step(Duration::from_secs(61)).await;
        // Due again: the request goes on at once with the answer it has,
        // while one run in the background fetches the next.
        let kept = helpers.lease("r").await.unwrap().unwrap();
        assert_eq!(kept.generation, first.generation);
        assert!(ran(dir.path(), 2).await);
        // That run failed; the answer before it is still good as far as
        // anyone knows: kept, not dropped, and not run for again at once.
        for _ in 0..3 {
            let again = helpers.lease("r").await.unwrap().unwrap();
            assert_eq!(again.generation, first.generation);
            assert!(again.credentials.is_some());
        }
        assert_eq!(runs(dir.path()), 2, "held after the failure");
        step(FAILURE_HOLD).await;
        helpers.lease("r").await.unwrap().unwrap();
        assert!(ran(dir.path(), 3).await);
        // Failed twice in a row: the hold doubled.
        step(FAILURE_HOLD).await;
        helpers.lease("r").await.unwrap().unwrap();
        assert_eq!(runs(dir.path()), 3);
        // Once the registry refuses it, the failure is the answer.
        assert!(helpers.refuse("r", &kept).await);
        let e = helpers.lease("r").await.unwrap_err();
        assert!(e.to_string().contains("exit status: 3"), "{e}");
    }
}
