//! Real container engines pulling through the real hoard binary, with the
//! client configs from deploy/clients/: dockerd (registry-mirrors),
//! containerd (hosts.toml), podman (registries.conf). Upstream is Debian's
//! docker-registry; hoard maps docker.io, ghcr.io and quay.io to it. Docker
//! Hub does not resolve here, so a client that bypasses hoard fails.
//! Needs root (the engines run containers and mount file systems).

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

fn require_root() {
    let uid = Command::new("id").arg("-u").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "the container-engine end-to-end tests need root (they start dockerd, containerd and podman)"
    );
}

/// Blob GETs and manifest GETs the upstream has seen.
fn upstream_gets(upstream: &Distribution) -> (usize, usize) {
    (
        upstream.count("GET", "/blobs/"),
        upstream.count("GET", "/manifests/"),
    )
}

/// Requests hoard answered, from its access log: "METHOD path?query status".
fn hoard_requests(hoard: &HoardProcess) -> Vec<String> {
    hoard
        .daemon
        .log_text()
        .lines()
        .filter(|l| l.contains(" request ") || l.contains("\"request\""))
        .map(|l| l.to_owned())
        .collect()
}

/// Removes the image locally and pulls it again, twice: inside the tag TTL
/// no GET reaches upstream; past the TTL (`ttl`, whose first run ends by
/// `ttl_over`) upstream sees one HEAD for the tag `/manifests/3` and still
/// no GET.
fn second_pulls_are_free(
    upstream: &Distribution,
    ttl_over: Instant,
    ttl: Duration,
    pull_again: impl Fn(),
) {
    let before = upstream_gets(upstream);
    let heads_before = upstream.count("HEAD", "/manifests/3");
    pull_again();
    let pulled = Instant::now();
    assert_eq!(
        upstream_gets(upstream),
        before,
        "{:#?}",
        upstream.requests()
    );
    let heads = upstream.count("HEAD", "/manifests/3");
    // On a loaded machine that pull may itself have come past the TTL and
    // revalidated the tag (a HEAD): the TTL then runs from that pull.
    let over = if heads > heads_before {
        pulled + ttl + Duration::from_secs(1)
    } else {
        ttl_over
    };
    std::thread::sleep(over.saturating_duration_since(Instant::now()));
    pull_again();
    assert_eq!(
        upstream_gets(upstream),
        before,
        "{:#?}",
        upstream.requests()
    );
    assert_eq!(upstream.count("HEAD", "/manifests/3"), heads + 1);
}

// ---------------------------------------------------------------- containerd

#[test]
fn containerd_pulls_through_hoard_with_hosts_toml() {
    require_root();
    let upstream = Distribution::start();
    let seeded = seed(&upstream);
    let other = format!("registry.example.org={}", upstream.url());
    let hoard = HoardProcess::start(&upstream.url(), &["--tag-ttl", "10s", "--upstream", &other]);
    let ctr = Containerd::start(&hoard.addr(), "containerd/certs.d");
    let first_pull = Instant::now();

    ctr.pull("docker.io/library/alpine-like:3", &[]);
    ctr.pull("ghcr.io/owner/app:1.0", &[]);
    ctr.pull("quay.io/owner/app:1.0", &[]);
    // No folder of its own: _default/hosts.toml sends it with ?ns=.
    ctr.pull("registry.example.org/owner/app:1.0", &[]);
    ctr.pull("docker.io/library/multi:1", &["--platform", "linux/arm64"]);
    let requests = hoard_requests(&hoard);
    for ns in [
        "ns=docker.io",
        "ns=ghcr.io",
        "ns=quay.io",
        "ns=registry.example.org",
    ] {
        assert!(
            requests.iter().any(|r| r.contains(ns)),
            "no request with {ns}:\n{}",
            requests.join("\n")
        );
    }
    let images = run(ctr.ctr().args(["images", "ls", "-q"]));
    assert!(
        images.contains("docker.io/library/alpine-like:3"),
        "{images}"
    );
    assert!(upstream.count("GET", &seeded.arm.layers[0].digest()) == 1);

    // Runs, from the bytes hoard served.
    let out = run(ctr.ctr().args([
        "run",
        "--rm",
        "docker.io/library/alpine-like:3",
        "hoard-e2e",
        "/bin/echo",
        "hello through hoard",
    ]));
    assert!(out.contains("hello through hoard"), "{out}");

    second_pulls_are_free(
        &upstream,
        first_pull + Duration::from_secs(11),
        Duration::from_secs(10),
        || {
            ctr.remove("docker.io/library/alpine-like:3");
            ctr.pull("docker.io/library/alpine-like:3", &[]);
        },
    );
}

#[test]
fn containerd_override_path_form_reaches_the_prefixed_registry() {
    require_root();
    let upstream = Distribution::start();
    let seeded = seed(&upstream);
    let hoard = HoardProcess::start(&upstream.url(), &[]);
    let ctr = Containerd::start(&hoard.addr(), "containerd/certs.d-override-path");
    ctr.pull("ghcr.io/owner/app:1.0", &[]);
    let requests = hoard_requests(&hoard);
    assert!(
        requests
            .iter()
            .any(|r| r.contains("/v2/ghcr.io/owner/app/manifests/")),
        "{}",
        requests.join("\n")
    );
    assert_eq!(upstream.count("GET", &seeded.oci.config.digest()), 1);
}

// ------------------------------------------------------------------- dockerd

/// dockerd with deploy/clients/docker/daemon.json (`registry-mirrors`
/// naming `mirror`), driven by the docker CLI on `PATH`.
fn dockerd(mirror: &str) -> Dockerd {
    Dockerd::start(
        &client_config("docker/daemon.json", mirror),
        &[],
        require_tool("docker"),
    )
}

#[test]
fn dockerd_pulls_and_runs_through_hoard_as_registry_mirror() {
    require_root();
    let upstream = Distribution::start();
    let seeded = seed(&upstream);
    let hoard = HoardProcess::start(&upstream.url(), &["--tag-ttl", "12s"]);
    let docker = dockerd(&hoard.addr());
    let first_pull = Instant::now();

    docker.pull("alpine-like:3", &[]);
    docker.pull("owner/app:1.0", &[]);
    docker.pull(&format!("owner/app@{}", seeded.oci.manifest.digest()), &[]);
    docker.pull("multi:1", &["--platform", "linux/arm64"]);
    let inspect = run(docker.docker().args([
        "image",
        "inspect",
        "--format",
        "{{.Architecture}}",
        "multi:1",
    ]));
    assert_eq!(inspect.trim(), "arm64");
    assert_eq!(upstream.count("GET", &seeded.arm.layers[0].digest()), 1);
    // The bytes came through hoard: it fetched every layer once.
    for layer in &seeded.docker.layers {
        assert_eq!(
            upstream.count("GET", &layer.digest()),
            1,
            "{:#?}",
            upstream.requests()
        );
    }
    let requests = hoard_requests(&hoard);
    assert!(
        requests
            .iter()
            .any(|r| r.contains("/v2/library/alpine-like/manifests/3")),
        "{}",
        requests.join("\n")
    );

    let out = run(docker.docker().args([
        "run",
        "--rm",
        "--network",
        "none",
        "alpine-like:3",
        "/bin/echo",
        "hello from dockerd",
    ]));
    assert!(out.contains("hello from dockerd"), "{out}");

    second_pulls_are_free(
        &upstream,
        first_pull + Duration::from_secs(13),
        Duration::from_secs(12),
        || {
            docker.remove("alpine-like:3");
            docker.pull("alpine-like:3", &[]);
        },
    );
}

// -------------------------------------------------------------------- podman

struct Podman {
    dir: tempfile::TempDir,
}

impl Podman {
    fn new(mirror: &str) -> Podman {
        require_tool("podman");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("registries.conf"),
            client_config("podman/registries.conf", mirror),
        )
        .unwrap();
        Podman { dir }
    }

    fn podman(&self) -> Command {
        let d = self.dir.path();
        let mut c = Command::new("podman");
        c.env("CONTAINERS_REGISTRIES_CONF", d.join("registries.conf"))
            .env("TMPDIR", d)
            .arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("runroot"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
            ]);
        c
    }

    fn pull(&self, image: &str) -> String {
        run(self.podman().args(["pull", "--quiet", image]))
    }

    fn remove(&self, image: &str) {
        run(self.podman().args(["rmi", "-f", image]));
    }
}

#[test]
fn podman_pulls_through_hoard_with_registries_conf() {
    require_root();
    let upstream = Distribution::start();
    let seeded = seed(&upstream);
    let hoard = HoardProcess::start(&upstream.url(), &["--tag-ttl", "4s"]);
    let podman = Podman::new(&hoard.addr());
    let first_pull = Instant::now();

    podman.pull("docker.io/library/alpine-like:3");
    podman.pull("alpine-like:3");
    podman.pull("ghcr.io/owner/app:1.0");
    let requests = hoard_requests(&hoard);
    assert!(
        requests
            .iter()
            .any(|r| r.contains("/v2/ghcr.io/owner/app/manifests/1.0")),
        "{}",
        requests.join("\n")
    );
    for layer in &seeded.docker.layers {
        assert_eq!(
            upstream.count("GET", &layer.digest()),
            1,
            "{:#?}",
            upstream.requests()
        );
    }
    let images = run(podman
        .podman()
        .args(["images", "--format", "{{.Repository}}:{{.Tag}}"]));
    assert!(
        images.contains("docker.io/library/alpine-like:3"),
        "{images}"
    );

    // podman GETs the tag from hoard; past the TTL hoard only HEADs upstream.
    second_pulls_are_free(
        &upstream,
        first_pull + Duration::from_secs(5),
        Duration::from_secs(4),
        || {
            podman.remove("docker.io/library/alpine-like:3");
            podman.pull("docker.io/library/alpine-like:3");
        },
    );
}

// ------------------------------------------------------------- mixed clients

#[test]
fn dockerd_containerd_and_podman_at_once_cause_one_upstream_get_per_blob() {
    require_root();
    let upstream = Distribution::start();
    let seeded = seed(&upstream);
    let hoard = HoardProcess::start(&upstream.url(), &[]);
    let docker = dockerd(&hoard.addr());
    let ctr = Containerd::start(&hoard.addr(), "containerd/certs.d");
    let podman = Podman::new(&hoard.addr());

    std::thread::scope(|s| {
        s.spawn(|| docker.pull("alpine-like:3", &[]));
        s.spawn(|| ctr.pull("docker.io/library/alpine-like:3", &[]));
        s.spawn(|| podman.pull("docker.io/library/alpine-like:3"));
    });
    for blob in seeded.docker.layers.iter().chain([&seeded.docker.config]) {
        assert_eq!(
            upstream.count("GET", &blob.digest()),
            1,
            "{:#?}",
            upstream.requests()
        );
    }
    assert!(
        upstream.count("GET", "/manifests/") <= 2,
        "{:#?}",
        upstream.requests()
    );
    let coalesced = hoard.metric(r#"hoard_cache_requests_total{kind="blob",result="coalesced"}"#);
    let hits = hoard.metric(r#"hoard_cache_requests_total{kind="blob",result="hit"}"#);
    assert!(
        coalesced + hits >= 6.0,
        "two of three clients were served without a fetch"
    );
}
