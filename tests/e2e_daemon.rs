//! The real `hoard` binary as an operator runs it: no config file, JSON logs,
//! a separate metrics listener, SIGTERM.

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

#[test]
fn runs_without_a_config_file_and_stops_cleanly_on_sigterm() {
    let cwd = tempfile::tempdir().unwrap();
    let ready_file = cwd.path().join("ready.json");
    let mut command = hoard_command();
    command
        .current_dir(cwd.path())
        .env_remove("HOARD_DATA_DIR")
        .env("HOARD_LISTEN", "127.0.0.1:0")
        .env("HOARD_READY_FILE", &ready_file);
    let mut daemon = Daemon::spawn("hoard", &mut command, cwd.path().join("hoard.log"));
    let ready = daemon.wait_ready(&ready_file);
    let response = reqwest::blocking::get(format!("http://{}/v2/", ready.api)).unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );
    assert!(
        cwd.path().join("hoard-data/index").is_dir(),
        "embedded default data dir"
    );
    let text = daemon.log_text();
    assert!(
        text.contains("docker.io=https://registry-1.docker.io/"),
        "{text}"
    );

    let status = daemon.terminate(Duration::from_secs(10));
    assert!(status.success(), "{status}");
    assert!(daemon.log_text().contains("stopped"));
    assert!(!ready_file.exists(), "the ready file goes with the daemon");
}

#[test]
fn json_access_log_has_one_line_per_request_and_no_authorization() {
    let upstream = Distribution::start();
    let image = image(
        Format::Oci,
        "amd64",
        &[layer(&[("x", b"x".to_vec(), 0o644)])],
    );
    Pusher::new(&upstream.url()).image("library/logged", Some("1"), &image);
    let hoard = HoardProcess::start(
        &upstream.url(),
        &["--log-format", "json", "--metrics-listen", "127.0.0.1:0"],
    );
    let metrics_addr = hoard.ready.metrics.expect("a metrics listener");
    let client = reqwest::blocking::Client::new();
    let base = format!("http://{}", hoard.addr());
    let canary = "Bearer canary-secret-4f1c";
    for path in [
        "/v2/library/logged/manifests/1".to_owned(),
        format!("/v2/library/logged/blobs/{}", image.layers[0].digest()),
    ] {
        let r = client
            .get(format!("{base}{path}"))
            .header("authorization", canary)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().unwrap();
    }
    // The metrics listener serves metrics and nothing else.
    let metrics = client
        .get(format!("http://{metrics_addr}/metrics"))
        .send()
        .unwrap();
    assert!(metrics
        .text()
        .unwrap()
        .contains("hoard_cache_requests_total"));
    let other = client
        .get(format!(
            "http://{metrics_addr}/v2/library/logged/manifests/1"
        ))
        .send()
        .unwrap();
    assert_eq!(other.status(), 404);

    // A request's line is written when its body ends, just after the
    // client has it: wait for both lines.
    wait_until(&hoard.daemon, Duration::from_secs(10), || {
        hoard
            .daemon
            .log_text()
            .matches("\"message\":\"request\"")
            .count()
            >= 2
    });
    let log = hoard.daemon.log_text();
    assert!(
        !log.contains("canary-secret"),
        "authorization leaked into the log:\n{log}"
    );
    let requests: Vec<serde_json::Value> = log
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))
        })
        .filter(|v| v["fields"]["message"] == "request")
        .collect();
    let manifest = requests
        .iter()
        .find(|v| v["fields"]["path"] == "/v2/library/logged/manifests/1")
        .expect("a line for the manifest request");
    assert_eq!(manifest["fields"]["status"], 200);
    assert_eq!(manifest["fields"]["cache"], "miss");
    assert_eq!(manifest["fields"]["method"], "GET");
    assert!(manifest["fields"]["bytes"].as_u64().unwrap() > 0);
    assert!(manifest["fields"]["duration_ms"].as_f64().is_some());
    let blob = requests
        .iter()
        .find(|v| v["fields"]["path"].as_str().unwrap().contains("/blobs/"))
        .expect("a line for the blob request");
    assert_eq!(blob["fields"]["body"], "complete");
}

#[test]
fn ls_and_pin_work_through_the_admin_api_and_on_a_stopped_store() {
    let upstream = Distribution::start();
    let seeded = seed(&upstream);
    let hoard = HoardProcess::start(
        &upstream.url(),
        &["--admin-listen", "127.0.0.1:0", "--admin-token", "t0ken"],
    );
    let admin_addr = hoard.ready.admin.expect("an admin listener");
    let client = reqwest::blocking::Client::new();
    let r = client
        .get(format!(
            "http://{}/v2/library/alpine-like/manifests/3",
            hoard.addr()
        ))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_hoard"))
            .args(args)
            .env("HOARD_ADMIN_TOKEN", "t0ken")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let admin = format!("http://{admin_addr}");
    let listed = cli(&["ls", "--admin", &admin]);
    assert!(
        listed.contains("docker.io/library/alpine-like:3"),
        "{listed}"
    );
    assert!(
        listed.contains(&seeded.docker.manifest.digest()[..19]),
        "{listed}"
    );
    assert!(cli(&["pin", "--admin", &admin, "alpine-like:3"])
        .contains("pinned docker.io/library/alpine-like:3"));

    let store = hoard.store();
    let _data = hoard.stop();
    let listed = cli(&["ls", "--data-dir", store.to_str().unwrap()]);
    let line = listed
        .lines()
        .find(|l| l.contains("alpine-like:3"))
        .expect(&listed);
    assert!(
        line.trim_end().ends_with("yes"),
        "pinned, and the pin persisted: {line}"
    );
    // Sizes and times as people read them, like `docker images` (only
    // the manifest was pulled: its size in bytes).
    assert!(line.contains(" B just now"), "{line}");
    let json: serde_json::Value = serde_json::from_str(&cli(&[
        "ls",
        "--json",
        "--data-dir",
        store.to_str().unwrap(),
    ]))
    .unwrap();
    let image = json["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["image"] == "docker.io/library/alpine-like:3")
        .unwrap();
    assert!(
        image["size"].as_u64().unwrap() > 100,
        "raw bytes for scripts"
    );
    assert_eq!(image["pinned"], true);
    assert!(cli(&[
        "unpin",
        "--data-dir",
        store.to_str().unwrap(),
        "alpine-like:3"
    ])
    .contains("unpinned"));
}

#[test]
fn hoard_warm_prefetches_through_the_running_mirror() {
    let upstream = Distribution::start();
    let seeded = seed(&upstream);
    let hoard = HoardProcess::start(&upstream.url(), &[]);
    let warm = |images: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_hoard"))
            .args([
                "warm",
                "--mirror",
                &format!("http://{}", hoard.addr()),
                "--platform",
                "linux/arm64",
            ])
            .args(images)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let first = warm(&["library/multi:1", "alpine-like:3"]);
    assert!(
        first.contains("docker.io/library/multi:1: 2 manifests, 2 blobs (0 already cached)"),
        "{first}"
    );
    assert_eq!(upstream.count("GET", &seeded.arm.layers[0].digest()), 1);
    assert_eq!(
        upstream.count("GET", &seeded.amd.config.digest()),
        0,
        "only linux/arm64"
    );
    assert_eq!(upstream.count("GET", &seeded.docker.layers[1].digest()), 1);
    let second = warm(&["library/multi:1"]);
    assert!(
        second.contains("2 blobs (2 already cached), 0 B fetched"),
        "{second}"
    );
    assert!(
        first.contains("MiB fetched") || first.contains("KiB fetched"),
        "amounts in binary units: {first}"
    );

    // A mirror that is not there: the error names why.
    let (_socket, port) = support::fleet::refusing_port();
    let out = Command::new(env!("CARGO_BIN_EXE_hoard"))
        .args([
            "warm",
            "--mirror",
            &format!("http://127.0.0.1:{port}"),
            "alpine-like:3",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("Connection refused"), "{stderr}");
}

#[test]
fn version_names_the_commit_and_config_check_validates_and_redacts() {
    let hoard = env!("CARGO_BIN_EXE_hoard");
    let out = Command::new(hoard).arg("--version").output().unwrap();
    let version = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success());
    assert!(
        version.starts_with(&format!("hoard {}", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if let Some(head) = head {
        assert!(version.contains(&head), "{version} does not name {head}");
    }

    // The shipped example, with a password from the environment.
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/hoard.toml");
    let out = Command::new(hoard)
        .args(["config", "check"])
        .arg(&example)
        .env("HOARD_REGISTRY_DOCKER_IO_USERNAME", "bot")
        .env("HOARD_REGISTRY_DOCKER_IO_PASSWORD", "config-check-canary")
        .env_remove("HOARD_CONFIG")
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(printed.contains("listen = 0.0.0.0:5000"), "{printed}");
    assert!(printed.contains("[registries.\"docker.io\"]"));
    assert!(printed.contains("password <redacted>"));
    assert!(!printed.contains("config-check-canary"));

    // A wrong key, and TLS files that do not exist: exit 1, saying why.
    let dir = tempfile::tempdir().unwrap();
    for (text, expect) in [
        (
            "listen = \"0.0.0.0:5000\"\nlisten_typo = 1\n",
            "listen_typo",
        ),
        (
            "[tls]\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"\n",
            "/nonexistent/cert.pem",
        ),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(hoard)
            .args(["config", "check"])
            .arg(&path)
            .env_remove("HOARD_CONFIG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(expect), "{stderr}");
    }
}

#[test]
fn tells_systemd_it_is_ready_once_listening() {
    // What systemd does for Type=notify: a datagram socket in NOTIFY_SOCKET.
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let ready_file = dir.path().join("ready.json");
    let mut command = hoard_command();
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--ready-file")
        .arg(&ready_file)
        .env("NOTIFY_SOCKET", &socket_path);
    let daemon = Daemon::spawn("hoard", &mut command, dir.path().join("hoard.log"));
    let mut message = [0u8; 64];
    let n = socket.recv(&mut message).expect("READY=1 within 30 s");
    assert_eq!(&message[..n], b"READY=1");
    // Ready means ready: the ready file is written and the listener answers.
    let ready: Ready = serde_json::from_slice(&std::fs::read(&ready_file).unwrap()).unwrap();
    let health = reqwest::blocking::get(format!("http://{}/healthz", ready.api)).unwrap();
    assert_eq!(health.status(), 200);
    drop(daemon);
}

#[test]
fn hoard_health_checks_a_running_mirror() {
    let upstream = Distribution::start();
    let hoard = HoardProcess::start(&upstream.url(), &[]);
    let health = |addr: &str| {
        Command::new(env!("CARGO_BIN_EXE_hoard"))
            .args(["health", "--addr", addr])
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap()
    };
    assert!(health(&hoard.addr()).status.success());
    // Nothing ever listens on port 0: a refused connection, without
    // borrowing a port another test may bind meanwhile.
    let out = health("127.0.0.1:0");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
}

/// `hoard health` with no `--addr` checks where `serve` would listen, from
/// the same HOARD_* variables (as a container's HEALTHCHECK runs it), over
/// TLS when the listener has it.
#[test]
fn issue_18_hoard_health_follows_the_listener_serve_would_use() {
    let upstream = Distribution::start();
    let health = |env: &[(&str, String)]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_hoard"));
        command.arg("health").env("RUST_BACKTRACE", "0");
        for (key, value) in env {
            command.env(key, value);
        }
        command.output().unwrap()
    };
    let plain = HoardProcess::start(&upstream.url(), &[]);
    let listen = ("HOARD_LISTEN", plain.addr());
    let out = health(std::slice::from_ref(&listen));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let pki = tempfile::tempdir().unwrap();
    let (cert, key) = support::pki::Ca::new("health check CA").server_files(pki.path());
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let tls = HoardProcess::start(&upstream.url(), &["--tls-cert", cert, "--tls-key", key]);
    let tls_env = [
        ("HOARD_LISTEN", tls.addr()),
        ("HOARD_TLS_CERT", cert.to_owned()),
        ("HOARD_TLS_KEY", key.to_owned()),
    ];
    let out = health(&tls_env);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Asked in plain HTTP, the TLS listener does not answer 200.
    assert!(!health(&[("HOARD_LISTEN", tls.addr())]).status.success());
    // Nothing listens on port 0: the error names the address it tried.
    let out = health(&[("HOARD_LISTEN", "127.0.0.1:0".to_owned())]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect to 127.0.0.1:0"));
}
