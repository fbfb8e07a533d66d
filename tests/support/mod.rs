//! The one test support module, for the end-to-end tests and the in-process
//! suite alike: real images built here (gzip tar layers, configs with
//! correct diff_ids, Docker and OCI manifests, multi-arch indexes), pushed
//! to a real distribution registry over plain HTTP; guards that start real
//! daemons on 127.0.0.1 and stop them by PID on drop; and the shared
//! helpers (metrics, cut connections, waiting on conditions, counting files).
//!
//! Rules every test here keeps: it reads and counts only inside its own
//! temp dir; every daemon binds port 0 itself and reports the address it
//! got (hoard's `--ready-file`, distribution's "listening on" line); waits
//! are on conditions with deadlines, never on time alone.
#![allow(dead_code)]

pub mod fleet;
pub mod pki;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

pub fn digest_of(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Fails the test with a clear message when a real tool is missing: the
/// README's test command (scripts/test.sh) installs them.
pub fn require_tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("`{name}` is not installed: run scripts/test.sh (it installs the end-to-end tools from Debian), or apt-get install the package that has `{name}`")
    })
}

/// Deterministic pseudo-random bytes (xorshift), incompressible.
pub fn noise(len: usize, seed: u32) -> Vec<u8> {
    let mut x = 0x9e37_79b9u32 ^ seed.wrapping_mul(0x85eb_ca6b);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A content-addressed object.
#[derive(Clone, Debug)]
pub struct Blob {
    pub media_type: String,
    pub data: Vec<u8>,
}

impl Blob {
    pub fn digest(&self) -> String {
        digest_of(&self.data)
    }

    fn descriptor(&self) -> serde_json::Value {
        serde_json::json!({
            "mediaType": self.media_type,
            "digest": self.digest(),
            "size": self.data.len(),
        })
    }
}

/// A compressed layer and the digest of its uncompressed tar.
#[derive(Clone, Debug)]
pub struct Layer {
    pub gz: Vec<u8>,
    pub diff_id: String,
}

/// A tar of `files` (path, content, mode; symlinks as `->target`),
/// gzipped. mtimes are fixed so digests are reproducible.
pub fn layer(files: &[(&str, Vec<u8>, u32)]) -> Layer {
    let mut tar = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    for (path, _, _) in files {
        let mut p = Path::new(path).parent();
        while let Some(dir) = p.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(dir.to_owned());
            p = dir.parent();
        }
    }
    for dir in dirs {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_mtime(1_700_000_000);
        h.set_size(0);
        tar.append_data(&mut h, &dir, std::io::empty()).unwrap();
    }
    for (path, content, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        h.set_mode(*mode);
        if let Some(target) = std::str::from_utf8(content)
            .ok()
            .and_then(|c| c.strip_prefix("->"))
        {
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            tar.append_link(&mut h, path, target).unwrap();
        } else {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(content.len() as u64);
            tar.append_data(&mut h, path, content.as_slice()).unwrap();
        }
    }
    let raw = tar.into_inner().unwrap();
    let diff_id = digest_of(&raw);
    // Large layers are stored, not compressed: still valid gzip, and fast.
    let level = if raw.len() > 1 << 20 {
        flate2::Compression::none()
    } else {
        flate2::Compression::fast()
    };
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), level);
    gz.write_all(&raw).unwrap();
    Layer {
        gz: gz.finish().unwrap(),
        diff_id,
    }
}

/// A root filesystem with busybox-static as /bin/busybox and `sh`, `echo`
/// links: runnable by dockerd and containerd.
pub fn busybox_layer() -> Layer {
    let busybox = std::fs::read("/bin/busybox").unwrap_or_else(|_| {
        panic!("/bin/busybox is missing: apt-get install busybox-static (scripts/test.sh does)")
    });
    layer(&[
        ("bin/busybox", busybox, 0o755),
        ("bin/sh", b"->busybox".to_vec(), 0o777),
        ("bin/echo", b"->busybox".to_vec(), 0o777),
        (
            "etc/hoard-release",
            b"built by hoard's tests\n".to_vec(),
            0o644,
        ),
    ])
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Docker,
    Oci,
}

/// One single-platform image.
#[derive(Clone, Debug)]
pub struct Image {
    pub config: Blob,
    pub layers: Vec<Blob>,
    pub manifest: Blob,
    pub arch: String,
}

pub fn image(format: Format, arch: &str, layers: &[Layer]) -> Image {
    let config = serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": { "Cmd": ["/bin/sh"] },
        "rootfs": { "type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>() },
        "history": layers.iter().map(|_| serde_json::json!({"created": "2024-01-01T00:00:00Z", "created_by": "hoard tests"})).collect::<Vec<_>>(),
    });
    let (manifest_type, config_type, layer_type) = match format {
        Format::Docker => (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER),
        Format::Oci => (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER),
    };
    let config = Blob {
        media_type: config_type.into(),
        data: serde_json::to_vec(&config).unwrap(),
    };
    let layers: Vec<Blob> = layers
        .iter()
        .map(|l| Blob {
            media_type: layer_type.into(),
            data: l.gz.clone(),
        })
        .collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": config.descriptor(),
        "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
    });
    Image {
        manifest: Blob {
            media_type: manifest_type.into(),
            data: serde_json::to_vec_pretty(&manifest).unwrap(),
        },
        config,
        layers,
        arch: arch.into(),
    }
}

/// A multi-arch index over `images`.
pub fn index(format: Format, images: &[Image]) -> Blob {
    let media_type = match format {
        Format::Docker => DOCKER_LIST,
        Format::Oci => OCI_INDEX,
    };
    let manifests: Vec<serde_json::Value> = images
        .iter()
        .map(|i| {
            let mut d = i.manifest.descriptor();
            d["platform"] = serde_json::json!({ "architecture": i.arch, "os": "linux" });
            d
        })
        .collect();
    Blob {
        media_type: media_type.into(),
        data: serde_json::to_vec_pretty(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": manifests,
        }))
        .unwrap(),
    }
}

/// Pushes by plain HTTP, as the distribution API says.
pub struct Pusher {
    pub base: String,
    client: reqwest::blocking::Client,
}

impl Pusher {
    pub fn new(base: &str) -> Pusher {
        Pusher {
            base: base.trim_end_matches('/').to_owned(),
            client: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap(),
        }
    }

    pub fn blob(&self, name: &str, blob: &Blob) {
        let r = self
            .client
            .post(format!("{}/v2/{name}/blobs/uploads/", self.base))
            .send()
            .unwrap();
        assert_eq!(r.status(), 202, "start upload of {name}");
        let location = r.headers()["location"].to_str().unwrap().to_owned();
        let location = if location.starts_with('/') {
            format!("{}{location}", self.base)
        } else {
            location
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let r = self
            .client
            .put(format!("{location}{sep}digest={}", blob.digest()))
            .header("content-type", "application/octet-stream")
            .body(blob.data.clone())
            .send()
            .unwrap();
        assert_eq!(r.status(), 201, "finish upload of {name}");
    }

    pub fn manifest(&self, name: &str, reference: &str, manifest: &Blob) {
        let r = self
            .client
            .put(format!("{}/v2/{name}/manifests/{reference}", self.base))
            .header("content-type", &manifest.media_type)
            .body(manifest.data.clone())
            .send()
            .unwrap();
        assert_eq!(
            r.status(),
            201,
            "push manifest {name}:{reference}: {}",
            r.text().unwrap_or_default()
        );
    }

    /// Pushes an image's blobs and manifest; tags it if `tag` is given.
    pub fn image(&self, name: &str, tag: Option<&str>, image: &Image) {
        for blob in image.layers.iter().chain([&image.config]) {
            self.blob(name, blob);
        }
        let reference = tag
            .map(str::to_owned)
            .unwrap_or_else(|| image.manifest.digest());
        self.manifest(name, &reference, &image.manifest);
    }

    /// Pushes every child, then the index under `tag`.
    pub fn index(&self, name: &str, tag: &str, images: &[Image], index: &Blob) {
        for image in images {
            self.image(name, None, image);
        }
        self.manifest(name, tag, index);
    }
}

/// A child process stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Daemon {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Daemon {
    pub fn spawn(name: &str, command: &mut Command, log: PathBuf) -> Daemon {
        let out = std::fs::File::create(&log).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Daemon {
            name: name.into(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails the test (with the log) if the daemon has exited.
    fn check_alive(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!(
                "{} exited with {status} while starting:\n{}",
                self.name,
                self.log_text()
            );
        }
    }

    /// Waits (30 s at most) for a log line containing `marker` from which
    /// `parse` reads a value (given the text after the marker).
    pub fn wait_for_line<T>(&mut self, marker: &str, parse: impl Fn(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let found = self
                .log_text()
                .lines()
                .find_map(|line| line.split_once(marker).and_then(|(_, rest)| parse(rest)));
            if let Some(value) = found {
                return value;
            }
            self.check_alive();
            assert!(
                Instant::now() < deadline,
                "{} logged no {marker:?} line:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (30 s at most) until hoard's `--ready-file` exists, and reads it.
    pub fn wait_ready(&mut self, path: &Path) -> Ready {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(path) {
                return serde_json::from_str(&text).expect("a ready file hoard wrote whole");
            }
            self.check_alive();
            assert!(
                Instant::now() < deadline,
                "{} wrote no ready file:\n{}",
                self.name,
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits (at most `limit`) for the exit status.
    pub fn terminate(&mut self, limit: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {limit:?} of SIGTERM",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `url` answers (any HTTP status), or fails the test.
    pub fn wait_http(&mut self, url: &str) {
        let client = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            self.check_alive();
            if client.get(url).send().is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "{} did not answer on {url}:\n{}",
            self.name,
            self.log_text()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Debian's docker-registry (distribution 2.8) on a free loopback port.
pub struct Distribution {
    pub daemon: Daemon,
    pub port: u16,
    _dir: Option<tempfile::TempDir>,
}

impl Distribution {
    pub fn start() -> Distribution {
        let dir = tempfile::tempdir().unwrap();
        let mut distribution = Distribution::start_in(dir.path(), None);
        distribution._dir = Some(dir);
        distribution
    }

    /// Distribution over the storage in `dir` (kept by the caller, so a
    /// restart finds its images), on a port of its own choosing, with
    /// htpasswd (bcrypt) basic auth when `htpasswd` is given. Distribution
    /// 2.8 reads the htpasswd file once, at start: a new password needs a
    /// restart, on a new port (a `Relay` keeps one address for clients).
    pub fn start_in(dir: &Path, htpasswd: Option<&Path>) -> Distribution {
        let bin = require_tool("docker-registry");
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let config = dir.join(format!("config-{n}.yml"));
        let auth = match htpasswd {
            Some(path) => format!(
                "auth:\n  htpasswd:\n    realm: hoard-test\n    path: {}\n",
                path.display()
            ),
            None => String::new(),
        };
        // Port 0: distribution binds it and logs "listening on ADDR" (info).
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:0\nlog:\n  level: info\n  accesslog:\n    disabled: false\n{auth}",
                dir.join("data").display()
            ),
        )
        .unwrap();
        let mut daemon = Daemon::spawn(
            "docker-registry",
            Command::new(bin).arg("serve").arg(&config),
            dir.join(format!("registry-{n}.log")),
        );
        let addr: std::net::SocketAddr = daemon.wait_for_line("listening on ", |rest| {
            rest.split(|c: char| c == '"' || c.is_whitespace())
                .next()
                .and_then(|a| a.parse().ok())
        });
        let port = addr.port();
        daemon.wait_http(&format!("http://127.0.0.1:{port}/v2/"));
        Distribution {
            daemon,
            port,
            _dir: None,
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Sends a marker request and waits (10 s at most) for its log line, so
    /// the lines of every request answered before are there too.
    fn sync_log(&self) {
        static MARKERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = MARKERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let marker = format!("/v2/?hoard-log-sync={n}");
        let _ = reqwest::blocking::get(format!("{}{marker}", self.url()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.requests().iter().any(|r| r.contains(&marker)) {
            assert!(
                Instant::now() < deadline,
                "distribution never logged {marker}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Access-log request lines (`GET /v2/... HTTP/1.1`) so far.
    pub fn requests(&self) -> Vec<String> {
        self.daemon
            .log_text()
            .lines()
            .filter_map(|line| {
                line.split_once("] \"")
                    .map(|(_, rest)| rest.split('"').next().unwrap_or("").to_owned())
            })
            .collect()
    }

    /// Every request so far, once the access log has caught up (the marker
    /// request this sends is counted).
    pub fn total(&self) -> usize {
        self.sync_log();
        self.requests().len()
    }

    /// How many requests with `method` had a path containing `path`, once
    /// the access log has caught up: a request's line is written just after
    /// its response, so a marker request is sent and its line awaited first.
    pub fn count(&self, method: &str, path: &str) -> usize {
        self.sync_log();
        self.requests()
            .iter()
            .filter(|r| r.starts_with(&format!("{method} ")) && r.contains(path))
            .count()
    }
}

/// What hoard's `--ready-file` says: the addresses it bound.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Ready {
    pub api: std::net::SocketAddr,
    pub metrics: Option<std::net::SocketAddr>,
    pub admin: Option<std::net::SocketAddr>,
    pub plain: Option<std::net::SocketAddr>,
    pub pid: u32,
}

/// The real `hoard` binary with every registry host mapped to `upstream`.
pub struct HoardProcess {
    pub daemon: Daemon,
    pub port: u16,
    /// Every address it bound.
    pub ready: Ready,
    pub data: tempfile::TempDir,
}

impl HoardProcess {
    pub fn start(upstream: &str, extra_args: &[&str]) -> HoardProcess {
        HoardProcess::start_in(tempfile::tempdir().unwrap(), upstream, extra_args)
    }

    /// Starts hoard on the store in `data` (e.g. one a killed hoard left).
    /// It listens on port 0 unless `extra_args` say `--listen`; any other
    /// listener asked for as `127.0.0.1:0` is reported in `ready`.
    pub fn start_in(data: tempfile::TempDir, upstream: &str, extra_args: &[&str]) -> HoardProcess {
        let mut command = hoard_command();
        command.arg("serve");
        if !extra_args.contains(&"--listen") {
            command.args(["--listen", "127.0.0.1:0"]);
        }
        command
            .arg("--data-dir")
            .arg(data.path().join("store"))
            .arg("--upstream")
            .arg(format!(
                "docker.io={upstream},ghcr.io={upstream},quay.io={upstream}"
            ))
            .args(extra_args);
        HoardProcess::spawn(data, command)
    }

    /// Runs `command` (from `hoard_command`, with its arguments) with a
    /// ready file in `data`, and waits until it serves.
    pub fn spawn(data: tempfile::TempDir, mut command: Command) -> HoardProcess {
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ready_file = data.path().join(format!("ready-{n}.json"));
        command.arg("--ready-file").arg(&ready_file);
        let log = data.path().join(format!("hoard-{n}.log"));
        let mut daemon = Daemon::spawn("hoard", &mut command, log);
        let ready = daemon.wait_ready(&ready_file);
        HoardProcess {
            daemon,
            port: ready.api.port(),
            ready,
            data,
        }
    }

    /// SIGTERM, wait for the exit; hands back the data folder.
    pub fn stop(self) -> tempfile::TempDir {
        let HoardProcess { daemon, data, .. } = self;
        drop(daemon);
        data
    }

    /// `kill -9`: no shutdown code runs. Hands back the data folder.
    pub fn kill(self) -> tempfile::TempDir {
        let HoardProcess {
            mut daemon, data, ..
        } = self;
        let _ = daemon.child.kill();
        let _ = daemon.child.wait();
        data
    }

    /// The store folder.
    pub fn store(&self) -> PathBuf {
        self.data.path().join("store")
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn metrics(&self) -> String {
        reqwest::blocking::get(format!("http://{}/metrics", self.addr()))
            .unwrap()
            .text()
            .unwrap()
    }

    /// The value of one metric series (0 if absent).
    pub fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics(), series)
    }
}

/// The `hoard` binary, with no config from the environment.
pub fn hoard_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hoard"));
    command.env_remove("HOARD_CONFIG");
    command
}

/// The value of one series in Prometheus text (0 if absent).
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// Where a store rooted at `store` keeps the committed blob `digest`
/// (`sha256:<hex>`).
pub fn blob_file(store: &Path, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    store.join("blobs/sha256").join(&hex[..2]).join(hex)
}

/// Writes `dir/docker-credential-NAME`, an executable shell script running
/// `body`: a Docker credential helper as the tests need one (it speaks the
/// protocol by reading the server on stdin and printing JSON).
pub fn credential_helper(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join(format!("docker-credential-{name}"));
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Files below `dir`, recursively (0 if it does not exist).
pub fn count_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                count_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}

/// Polls `check` until it holds or `limit` passes; the last answer.
pub async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    eventually_async(limit, || std::future::ready(check())).await
}

/// Polls the asynchronous `check` (a request, say) until it holds or
/// `limit` passes; the last answer.
pub async fn eventually_async<F: std::future::Future<Output = bool>>(
    limit: Duration,
    mut check: impl FnMut() -> F,
) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check().await
}

/// Reads a response body that must end in a cut connection (an error),
/// never a clean end; fails the test otherwise. Returns the bytes received.
pub async fn expect_cut(mut response: reqwest::Response, why: &str) -> usize {
    let mut received = 0;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => received += chunk.len(),
            Ok(None) => panic!("{why}: the body ended cleanly after {received} bytes"),
            Err(_) => return received,
        }
    }
}

/// Polls `ready` until it holds, or fails the test after `limit` with
/// `daemon`'s log.
pub fn wait_until(daemon: &Daemon, limit: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "{} did not start:\n{}",
            daemon.name,
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// GET `url`; the status, body discarded.
pub async fn get_status(client: &reqwest::Client, url: &str) -> u16 {
    let response = client.get(url).send().await.unwrap();
    let status = response.status().as_u16();
    let _ = response.bytes().await;
    status
}

/// GET `url`; the whole body.
pub async fn get_bytes(client: &reqwest::Client, url: &str) -> bytes::Bytes {
    client.get(url).send().await.unwrap().bytes().await.unwrap()
}

/// Runs a client command, failing the test with its output if it fails.
pub fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        panic!(
            "{command:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    stdout
}

/// The images every end-to-end test pulls, as pushed upstream.
pub struct Seeded {
    /// `library/alpine-like:3`: Docker schema2, busybox root file system
    /// plus a data layer; runnable.
    pub docker: Image,
    /// `owner/app:1.0`: OCI, busybox root file system.
    pub oci: Image,
    /// `library/multi:1`: an OCI index over `amd` and `arm`.
    pub index: Blob,
    pub amd: Image,
    pub arm: Image,
}

/// Builds and pushes the images of `Seeded`.
pub fn seed(upstream: &Distribution) -> Seeded {
    let push = Pusher::new(&upstream.url());
    let base = busybox_layer();
    let extra = layer(&[("srv/data.bin", noise(300_000, 7), 0o644)]);
    let docker = image(Format::Docker, "amd64", &[base.clone(), extra]);
    push.image("library/alpine-like", Some("3"), &docker);
    let oci = image(Format::Oci, "amd64", std::slice::from_ref(&base));
    push.image("owner/app", Some("1.0"), &oci);
    let amd = image(Format::Oci, "amd64", std::slice::from_ref(&base));
    let arm = image(
        Format::Oci,
        "arm64",
        &[layer(&[("arch", b"arm64\n".to_vec(), 0o644)])],
    );
    let index = index(Format::Oci, &[amd.clone(), arm.clone()]);
    push.index("library/multi", "1", &[amd.clone(), arm.clone()], &index);
    Seeded {
        docker,
        oci,
        index,
        amd,
        arm,
    }
}

/// A client config from deploy/clients/, with only the mirror address
/// replaced: the tests use exactly what users copy.
pub fn client_config(relative: &str, mirror: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/clients")
        .join(relative);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .replace("mirror.example:5000", mirror)
}

/// Copies a folder of client configs from deploy/clients/ to `dest`,
/// replacing only the mirror address.
pub fn client_config_dir(relative: &str, mirror: &str, dest: &Path) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/clients")
        .join(relative);
    for entry in std::fs::read_dir(&src).unwrap().flatten() {
        let name = entry.file_name();
        let rel = format!("{relative}/{}", name.to_string_lossy());
        if entry.path().is_dir() {
            std::fs::create_dir_all(dest.join(&name)).unwrap();
            client_config_dir(&rel, mirror, &dest.join(&name));
        } else {
            std::fs::write(dest.join(&name), client_config(&rel, mirror)).unwrap();
        }
    }
}

/// A containerd daemon of its own (state in a temp dir), pulled with `ctr`
/// and a hosts directory.
pub struct Containerd {
    pub daemon: Daemon,
    socket: PathBuf,
    pub hosts: PathBuf,
    /// A namespace of this instance's own: runc keeps container state under
    /// `/run/containerd/runc/<namespace>` whatever containerd's state dir,
    /// so copies of a test running at once must not share one.
    namespace: String,
    _dir: tempfile::TempDir,
}

impl Containerd {
    /// containerd with the deploy/clients/`hosts_form` folder as its hosts
    /// directory, the mirror address filled in.
    pub fn start(mirror: &str, hosts_form: &str) -> Containerd {
        Containerd::start_with(|hosts| client_config_dir(hosts_form, mirror, hosts))
    }

    /// containerd with a hosts directory `fill` writes.
    pub fn start_with(fill: impl FnOnce(&Path)) -> Containerd {
        let bin = require_tool("containerd");
        require_tool("ctr");
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("containerd.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}-ttrpc\"\n",
                root = dir.path().join("root").display(),
                state = dir.path().join("state").display(),
                sock = socket.display(),
            ),
        )
        .unwrap();
        let hosts = dir.path().join("certs.d");
        std::fs::create_dir_all(&hosts).unwrap();
        fill(&hosts);
        let daemon = Daemon::spawn(
            "containerd",
            Command::new(bin).arg("--config").arg(&config),
            dir.path().join("containerd.log"),
        );
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let containerd = Containerd {
            daemon,
            socket,
            hosts,
            namespace: format!("hoardtest-{}-{n}", std::process::id()),
            _dir: dir,
        };
        wait_until(&containerd.daemon, Duration::from_secs(30), || {
            containerd
                .ctr()
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success())
        });
        containerd
    }

    /// Its socket and namespace, for a dockerd that is to run its
    /// containers on this containerd (`--containerd`).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address")
            .arg(&self.socket)
            .args(["-n", &self.namespace]);
        c
    }

    pub fn pull(&self, image: &str, extra: &[&str]) -> String {
        run(self
            .ctr()
            .args(["images", "pull", "--hosts-dir"])
            .arg(&self.hosts)
            .args(extra)
            .arg(image))
    }

    pub fn remove(&self, image: &str) {
        run(self.ctr().args(["images", "rm", "--sync", image]));
    }
}

/// A dockerd of a test's own: vfs storage, no bridge (containers use
/// `--network host`), its state in a temp dir, started with `daemon_json`
/// as its config file (so the host's /etc/docker/daemon.json is never
/// read) and `extra` flags, driven by the docker CLI `cli`. The containers
/// it runs are removed when it drops.
pub struct Dockerd {
    pub daemon: Daemon,
    cli: PathBuf,
    host: String,
    dir: tempfile::TempDir,
}

impl Dockerd {
    pub fn start(daemon_json: &str, extra: &[std::ffi::OsString], cli: PathBuf) -> Dockerd {
        let bin = require_tool("dockerd");
        assert!(
            cli.is_file(),
            "the docker CLI {} is not installed: run scripts/test.sh",
            cli.display()
        );
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("daemon.json");
        std::fs::write(&config, daemon_json).unwrap();
        let socket = dir.path().join("docker.sock");
        let host = format!("unix://{}", socket.display());
        let daemon = Daemon::spawn(
            "dockerd",
            Command::new(bin)
                .arg("--config-file")
                .arg(&config)
                .args(extra)
                .args([
                    "--storage-driver",
                    "vfs",
                    "--iptables=false",
                    "--ip-masq=false",
                    "--bridge=none",
                ])
                .arg("--data-root")
                .arg(dir.path().join("data"))
                .arg("--exec-root")
                .arg(dir.path().join("exec"))
                .arg("--pidfile")
                .arg(dir.path().join("docker.pid"))
                .arg("-H")
                .arg(&host),
            dir.path().join("dockerd.log"),
        );
        let dockerd = Dockerd {
            daemon,
            cli,
            host,
            dir,
        };
        wait_until(&dockerd.daemon, Duration::from_secs(60), || {
            dockerd
                .docker()
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success())
        });
        dockerd
    }

    /// The CLI, pointed at this dockerd (BuildKit on for `build`).
    pub fn docker(&self) -> Command {
        let mut c = Command::new(&self.cli);
        c.env("DOCKER_CONFIG", self.dir.path().join("cli"))
            .env("DOCKER_BUILDKIT", "1")
            .arg("-H")
            .arg(&self.host);
        c
    }

    pub fn pull(&self, image: &str, extra: &[&str]) -> String {
        run(self.docker().arg("pull").args(extra).arg(image))
    }

    pub fn remove(&self, image: &str) {
        run(self.docker().args(["rmi", "-f", image]));
    }

    /// `docker inspect -f FORMAT WHAT`, trimmed.
    pub fn inspect(&self, what: &str, format: &str) -> String {
        run(self.docker().args(["inspect", "-f", format, what]))
            .trim()
            .to_owned()
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if let Ok(out) = self.docker().args(["ps", "-aq"]).output() {
            let ids = String::from_utf8_lossy(&out.stdout).into_owned();
            let ids: Vec<&str> = ids.split_whitespace().collect();
            if !ids.is_empty() {
                let _ = self.docker().args(["rm", "-f"]).args(&ids).output();
            }
        }
    }
}

/// `skopeo copy` of `image` from the registry at `mirror` (HOST:PORT, plain
/// HTTP) into a `dir:` at `dest`.
pub fn skopeo_copy(mirror: &str, image: &str, dest: &Path) {
    run(Command::new(require_tool("skopeo"))
        .arg("--insecure-policy")
        .arg("copy")
        .arg("--src-tls-verify=false")
        .arg(format!("docker://{mirror}/{image}"))
        .arg(format!("dir:{}", dest.display())));
}

/// A TCP relay on a port held for its whole life, to a backend that can
/// move: a daemon restarted on a new port stays at one address for its
/// clients, and no port number is ever freed and bound again.
pub struct Relay {
    pub addr: std::net::SocketAddr,
    backend: std::sync::Arc<std::sync::Mutex<std::net::SocketAddr>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    pub fn start(backend: std::net::SocketAddr) -> Relay {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let backend = std::sync::Arc::new(std::sync::Mutex::new(backend));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (to, stopping) = (backend.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let target = *to.lock().unwrap();
                std::thread::spawn(move || {
                    let Ok(server) = std::net::TcpStream::connect(target) else {
                        return;
                    };
                    let pipe = |mut from: std::net::TcpStream, mut into: std::net::TcpStream| {
                        let _ = std::io::copy(&mut from, &mut into);
                        let _ = into.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    };
                    let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                    let back = std::thread::spawn(move || pipe(s2, c2));
                    pipe(client, server);
                    let _ = back.join();
                });
            }
        });
        Relay {
            addr,
            backend,
            stop,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// New connections go to `backend` from now on.
    pub fn point_to(&self, backend: std::net::SocketAddr) {
        *self.backend.lock().unwrap() = backend;
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wakes the accept loop so it sees the stop.
        let _ = std::net::TcpStream::connect(self.addr);
    }
}
