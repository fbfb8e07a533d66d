//! End to end, issue 15: Docker credential helpers. Debian's docker-registry
//! (distribution 2.8) with htpasswd auth is the upstream; a
//! `docker-credential-<name>` shell script written here, first on the real
//! hoard binary's `PATH`, hands out the password (read from a file the test
//! rewrites) and counts its runs. skopeo and plain HTTP GETs pull through
//! hoard. Needs `docker-registry` and `skopeo` (scripts/test.sh installs
//! them); a missing tool fails the test.

mod support;

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use support::*;

const USER: &str = "hoard-bot";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// A test's folder: the registry's storage, its htpasswd, the helpers and
/// what they record.
struct Scene {
    dir: tempfile::TempDir,
}

impl Scene {
    fn new() -> Scene {
        let scene = Scene {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir(scene.bin()).unwrap();
        scene
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn bin(&self) -> PathBuf {
        self.path("bin")
    }

    /// Seeds the images with auth off (distribution refuses anonymous
    /// pushes once it is on), then serves them with `password` required.
    fn registry(&self, password: &str) -> (Distribution, Seeded) {
        let open = Distribution::start_in(self.dir.path(), None);
        let seeded = seed(&open);
        drop(open);
        (self.restart(password), seeded)
    }

    /// Distribution on the same storage again (on a new port), now
    /// accepting only `password`.
    fn restart(&self, password: &str) -> Distribution {
        let hash = bcrypt::hash(password, 4).unwrap();
        let htpasswd = self.path("htpasswd");
        std::fs::write(&htpasswd, format!("{USER}:{hash}\n")).unwrap();
        let registry = Distribution::start_in(self.dir.path(), Some(&htpasswd));
        let anonymous = reqwest::blocking::get(format!("{}/v2/", registry.url())).unwrap();
        assert_eq!(anonymous.status(), 401, "htpasswd auth is on");
        registry
    }

    /// `docker-credential-NAME`: records the server it was asked about and
    /// answers with the password in the file `password`.
    fn helper(&self, name: &str) {
        self.script(
            name,
            &format!(
                r#"[ "$1" = get ] || exit 2
read server
echo "$server" >> {runs}
printf '{{"ServerURL":"%s","Username":"{USER}","Secret":"%s"}}\n' "$server" "$(cat {password})""#,
                runs = self.path(&format!("runs-{name}")).display(),
                password = self.path("password").display(),
            ),
        );
    }

    fn script(&self, name: &str, body: &str) {
        credential_helper(&self.bin(), name, body);
    }

    fn set_password(&self, password: &str) {
        std::fs::write(self.path("password"), password).unwrap();
    }

    /// The servers `name` was asked about, one per run.
    fn runs(&self, name: &str) -> Vec<String> {
        std::fs::read_to_string(self.path(&format!("runs-{name}")))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// `hoard serve` with every seeded host mapped to `upstream`, the helpers
    /// first on its `PATH`, trace logging, and `env`.
    fn hoard(&self, upstream: &str, args: &[&str], env: &[(&str, &str)]) -> HoardProcess {
        let data = tempfile::tempdir().unwrap();
        let mut command = hoard_command();
        command
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data.path().join("store"))
            .arg("--upstream")
            .arg(format!("docker.io={upstream},ghcr.io={upstream}"))
            .args(args)
            .env("PATH", self.path_var())
            .env("HOARD_LOG", "trace");
        for (key, value) in env {
            command.env(key, value);
        }
        HoardProcess::spawn(data, command)
    }

    fn path_var(&self) -> std::ffi::OsString {
        let rest = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![self.bin()];
        dirs.extend(std::env::split_paths(&rest));
        std::env::join_paths(dirs).unwrap()
    }
}

/// `GET` through hoard; the status.
fn get(hoard: &HoardProcess, path: &str) -> u16 {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    client
        .get(format!("http://{}/v2/{path}", hoard.addr()))
        .header(
            "accept",
            format!("{DOCKER_MANIFEST}, {OCI_MANIFEST}, {OCI_INDEX}"),
        )
        .send()
        .unwrap()
        .status()
        .as_u16()
}

/// Everything a password could show as in a log: itself, and inside a
/// basic `Authorization` header.
fn leaks(log: &str, password: &str) -> bool {
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{password}"));
    log.contains(password) || log.contains(&basic)
}

#[test]
fn issue_15_a_credential_helper_logs_in_once_and_again_after_the_password_changes() {
    let scene = Scene::new();
    let (first, second) = ("first-secret-7f3a", "second-secret-91bc");
    scene.set_password(first);
    let (registry, seeded) = scene.registry(first);
    scene.helper("scripted");
    // hoard's upstream stays at the relay's address across the restart.
    let relay = Relay::start(([127, 0, 0, 1], registry.port).into());
    let hoard = scene.hoard(
        &relay.url(),
        &[],
        &[("HOARD_REGISTRY_DOCKER_IO_CREDENTIAL_HELPER", "scripted")],
    );

    // Many cold requests at once: the helper runs once for all of them.
    let mut paths = vec![
        "library/alpine-like/manifests/3".to_owned(),
        "owner/app/manifests/1.0".to_owned(),
    ];
    for blob in std::iter::once(&seeded.docker.config).chain(&seeded.docker.layers) {
        paths.push(format!("library/alpine-like/blobs/{}", blob.digest()));
    }
    paths.push(format!("owner/app/blobs/{}", seeded.oci.config.digest()));
    std::thread::scope(|s| {
        let handles: Vec<_> = paths
            .iter()
            .map(|path| {
                let hoard = &hoard;
                s.spawn(move || (path, get(hoard, path)))
            })
            .collect();
        for handle in handles {
            let (path, status) = handle.join().unwrap();
            assert_eq!(status, 200, "{path}");
        }
    });
    let pulled = scene.path("pulled-app");
    skopeo_copy(&hoard.addr(), "owner/app:1.0", &pulled);
    assert_eq!(
        scene.runs("scripted"),
        vec!["https://index.docker.io/v1/".to_owned()],
        "one run for every request, asked as the docker CLI asks for Docker Hub"
    );

    // The registry's password changes; the helper hands out the new one.
    drop(registry);
    let registry = scene.restart(second);
    relay.point_to(([127, 0, 0, 1], registry.port).into());
    scene.set_password(second);
    skopeo_copy(
        &hoard.addr(),
        "library/multi:1",
        &scene.path("pulled-multi"),
    );
    assert_eq!(
        scene.runs("scripted").len(),
        2,
        "the 401 made the helper run again"
    );
    assert_eq!(get(&hoard, "library/multi/manifests/1"), 200);
    assert_eq!(scene.runs("scripted").len(), 2, "and only once");
    assert!(registry.count("GET", "/v2/library/multi/manifests/") >= 1);

    assert_eq!(
        hoard.metric(r#"hoard_credential_helper_runs_total{registry="docker.io",result="ok"}"#),
        2.0
    );
    let metrics = hoard.metrics();
    assert!(!leaks(&metrics, first) && !leaks(&metrics, second));

    let log = hoard.daemon.log_text();
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "trace log on"
    );
    assert!(!leaks(&log, first) && !leaks(&log, second), "{log}");
}

#[test]
fn issue_15_cred_helpers_and_creds_store_of_a_docker_config_are_run() {
    let scene = Scene::new();
    let password = "store-secret-5d21";
    scene.set_password(password);
    let (registry, _seeded) = scene.registry(password);
    scene.helper("hub");
    scene.helper("store");
    let config = scene.path("config.json");
    std::fs::write(
        &config,
        r#"{"auths": {"https://index.docker.io/v1/": {}},
            "credHelpers": {"https://index.docker.io/v1/": "hub"},
            "credsStore": "store"}"#,
    )
    .unwrap();
    let config = config.display().to_string();
    let hoard = scene.hoard(&registry.url(), &["--docker-config", &config], &[]);

    assert_eq!(get(&hoard, "library/alpine-like/manifests/3"), 200);
    assert_eq!(get(&hoard, "ghcr.io/owner/app/manifests/1.0"), 200);
    assert_eq!(get(&hoard, "ghcr.io/library/multi/manifests/1"), 200);
    assert_eq!(scene.runs("hub"), vec!["https://index.docker.io/v1/"]);
    assert_eq!(
        scene.runs("store"),
        vec!["ghcr.io"],
        "credsStore for the rest"
    );
    assert!(!leaks(&hoard.daemon.log_text(), password));
}

#[test]
fn issue_15_a_hanging_helper_is_killed_with_an_error_naming_it() {
    let scene = Scene::new();
    let pid_file = scene.path("helper.pid");
    scene.script(
        "hang",
        &format!(
            "echo $$ > {}; echo hang-canary >&2; exec sleep 120",
            pid_file.display()
        ),
    );
    // No registry is needed: hoard fails before it sends anything.
    let hoard = scene.hoard(
        "http://127.0.0.1:9",
        &[],
        &[
            ("HOARD_REGISTRY_DOCKER_IO_CREDENTIAL_HELPER", "hang"),
            ("HOARD_REGISTRY_DOCKER_IO_CREDENTIAL_HELPER_TIMEOUT", "1s"),
        ],
    );
    let started = std::time::Instant::now();
    let client = reqwest::blocking::Client::new();
    let response = client
        .get(format!(
            "http://{}/v2/library/alpine-like/manifests/3",
            hoard.addr()
        ))
        .send()
        .unwrap();
    let status = response.status().as_u16();
    let body = response.text().unwrap();
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!((500..600).contains(&status), "{status} {body}");
    assert!(!body.contains("hang-canary"), "{body}");
    let message = "credential helper docker-credential-hang timed out after 1s, killed";
    wait_until(&hoard.daemon, Duration::from_secs(10), || {
        hoard.daemon.log_text().contains(message)
    });
    assert!(!hoard.daemon.log_text().contains("hang-canary"));
    assert_eq!(
        hoard
            .metric(r#"hoard_credential_helper_runs_total{registry="docker.io",result="timeout"}"#),
        1.0
    );
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let proc = PathBuf::from(format!("/proc/{}", pid.trim()));
    wait_until(&hoard.daemon, Duration::from_secs(10), || !proc.exists());
}

#[test]
fn issue_15_a_missing_helper_binary_stops_serve_and_config_check() {
    let scene = Scene::new();
    let file = scene.path("hoard.toml");
    std::fs::write(
        &file,
        "[registries.\"ghcr.io\"]\ncredential_helper = \"hoard-absent\"\n",
    )
    .unwrap();
    for args in [
        vec!["config", "check", file.to_str().unwrap()],
        vec![
            "serve",
            "--config",
            file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            scene.path("store").to_str().unwrap(),
        ],
    ] {
        let output = hoard_command()
            .args(&args)
            .env("PATH", scene.path_var())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?}");
        assert!(
            stderr.contains("docker-credential-hoard-absent is not on PATH"),
            "{args:?}: {stderr}"
        );
    }
}
