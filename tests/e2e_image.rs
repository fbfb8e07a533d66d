//! End to end, issue 18: the shipped container image, built and run. The
//! shipped Dockerfile's runtime stage is built with BuildKit (dockerd 20.10
//! and Debian's docker CLI) on a runtime base made here from Debian's
//! packages (debootstrap, cached under target/), with the binary this
//! `cargo test` built coming in through `BINARY_FROM`, so the Rust stage is
//! skipped. The image then runs as shipped (user 65532, its VOLUME,
//! ENTRYPOINT, default CMD, JSON logs) under a dockerd started here, set up
//! through HOARD_* variables only, in front of a real distribution; skopeo
//! and containerd pull through it.
//!
//! The test thread moves into a network namespace of its own before it
//! starts anything, so the fixed ports a container is told to listen on
//! (`HOARD_LISTEN`, which its HEALTHCHECK follows) cannot meet another
//! test's; every process it starts inherits that namespace, and its only
//! interface is loopback. Needs root, dockerd, Debian's /usr/bin/docker,
//! debootstrap, skopeo, containerd and strip (scripts/test.sh installs them).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::*;

/// Debian's docker CLI (20.10): BuildKit through dockerd's own builder,
/// without buildx.
const DOCKER: &str = "/usr/bin/docker";
const IMAGE: &str = "hoard-e2e:shipped";

/// Where the runtime base made by debootstrap is kept between runs.
fn cache_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("e2e-image")
}

/// A minimal Debian bookworm root file system with CA certificates, as a
/// tar, made once (about 30 s) and reused. This is the one step that reads
/// from Debian's package mirror (apt's configured one), like the installs in
/// scripts/test.sh, and it runs before the test leaves the host's network.
fn runtime_base() -> PathBuf {
    let tar = cache_dir().join("bookworm-minbase.tar");
    if tar.is_file() {
        return tar;
    }
    let debootstrap = require_tool("debootstrap");
    let work = tempfile::tempdir_in(cache_dir().parent().unwrap()).unwrap();
    let root = work.path().join("root");
    let mirror = apt_mirror();
    run(Command::new(debootstrap)
        .args(["--variant=minbase", "--include=ca-certificates", "bookworm"])
        .arg(&root)
        .arg(&mirror));
    std::fs::create_dir_all(cache_dir()).unwrap();
    let partial = work.path().join("base.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&partial)
        .arg("."));
    // Renamed into place whole: a run cut short leaves no half tar.
    std::fs::rename(&partial, &tar).unwrap();
    tar
}

/// The Debian mirror apt is configured with here.
fn apt_mirror() -> String {
    let sources = std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources")
        .or_else(|_| std::fs::read_to_string("/etc/apt/sources.list"))
        .unwrap_or_default();
    sources
        .lines()
        .find_map(|line| {
            let line = line.trim();
            line.strip_prefix("URIs:")
                .map(str::trim)
                .or_else(|| {
                    // `deb [options] URI suite ...`
                    line.strip_prefix("deb ").and_then(|rest| {
                        rest.split_whitespace()
                            .find(|w| !w.starts_with('[') && !w.ends_with(']'))
                    })
                })
                .filter(|uri| !uri.contains("security"))
                .map(|uri| uri.split_whitespace().next().unwrap_or(uri).to_owned())
        })
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_owned())
}

/// Moves the calling thread into a new network namespace with loopback up.
fn private_network() {
    // SAFETY: unshare(2) with CLONE_NEWNET changes only the calling
    // thread's network namespace; no memory is touched.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
    run(Command::new(require_tool("ip")).args(["link", "set", "lo", "up"]));
}

/// A dockerd of this test's own on this test's containerd (a dockerd left
/// to find one would take the host's if its socket exists, and run the
/// containers outside the namespace), driven by Debian's CLI.
fn dockerd(containerd: &Containerd) -> Dockerd {
    let namespace = containerd.namespace();
    let extra: Vec<std::ffi::OsString> = vec![
        "--containerd".into(),
        containerd.socket().into(),
        format!("--containerd-namespace={namespace}-docker").into(),
        format!("--containerd-plugins-namespace={namespace}-plugins").into(),
        "--shutdown-timeout=2".into(),
    ];
    Dockerd::start("{}", &extra, PathBuf::from(DOCKER))
}

/// Waits (at most `limit`) until Docker reports `container` healthy.
fn wait_healthy(dockerd: &Dockerd, container: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let health = dockerd.inspect(container, "{{.State.Health.Status}}");
        if health == "healthy" {
            return;
        }
        if dockerd.inspect(container, "{{.State.Running}}") != "true" {
            let out = dockerd.docker().args(["logs", container]).output().unwrap();
            panic!(
                "{container} exited: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(
            Instant::now() < deadline,
            "{container} is {health}: {}",
            dockerd.inspect(container, "{{json .State.Health}}"),
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Builds the shipped Dockerfile's runtime stage on `base` with this
/// test's binary.
fn build_image(dockerd: &Dockerd, base: &Path, commit: &str) {
    run(dockerd
        .docker()
        .arg("import")
        .arg(base)
        .arg("hoard-e2e-runtime:bookworm"));
    // The prebuilt binary, as BINARY_FROM expects it: /out/hoard and a data
    // folder owned by the image's user.
    let context = tempfile::tempdir().unwrap();
    let out = context.path().join("out");
    std::fs::create_dir_all(out.join("data")).unwrap();
    run(Command::new(require_tool("strip"))
        .arg("--strip-debug")
        .arg("-o")
        .arg(out.join("hoard"))
        .arg(env!("CARGO_BIN_EXE_hoard")));
    std::fs::write(
        context.path().join("Dockerfile"),
        "FROM scratch\nCOPY out/hoard /out/hoard\nCOPY --chown=65532:65532 out/data /out/data\n",
    )
    .unwrap();
    run(dockerd
        .docker()
        .args(["build", "-t", "hoard-e2e-binary:test"])
        .arg(context.path()));
    run(dockerd
        .docker()
        .args(["build", "-t", IMAGE])
        .args(["--build-arg", "RUNTIME_IMAGE=hoard-e2e-runtime:bookworm"])
        .args(["--build-arg", "BINARY_FROM=hoard-e2e-binary:test"])
        .args(["--build-arg", &format!("HOARD_GIT_COMMIT={commit}")])
        .args([
            "--build-arg",
            concat!("HOARD_VERSION=", env!("CARGO_PKG_VERSION")),
        ])
        .arg(env!("CARGO_MANIFEST_DIR")));
}

#[test]
fn issue_18_the_shipped_image_builds_runs_and_stays_healthy() {
    // SAFETY: geteuid(2) reads the process's user id; nothing else.
    let euid = unsafe { libc::geteuid() };
    assert!(euid == 0, "the image test needs root (it starts dockerd)");
    let started = Instant::now();
    let base = runtime_base();
    assert!(base.is_file());
    private_network();

    // The commit the binary says it was built from: the labels must agree.
    let version = run(Command::new(env!("CARGO_BIN_EXE_hoard")).arg("--version"));
    let commit = version
        .split("commit ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap_or_else(|| panic!("no commit in {version:?}"))
        .to_owned();
    let upstream = Distribution::start();
    let seeded = seed(&upstream);
    // containerd with the hosts.toml users copy from deploy/clients: it
    // pulls through the containerised hoard, and runs dockerd's containers.
    let containerd = Containerd::start("127.0.0.1:18990", "containerd/certs.d");
    let dockerd = dockerd(&containerd);
    build_image(&dockerd, &base, &commit);

    // Labels and --version carry the version and the commit.
    let labels = dockerd.inspect(IMAGE, "{{json .Config.Labels}}");
    let labels: serde_json::Value = serde_json::from_str(&labels).unwrap();
    assert_eq!(
        labels["org.opencontainers.image.version"],
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(labels["org.opencontainers.image.revision"], commit.as_str());
    let version =
        run(dockerd
            .docker()
            .args(["run", "--rm", "--network", "host", IMAGE, "--version"]));
    assert!(
        version.contains(env!("CARGO_PKG_VERSION")) && version.contains(&commit),
        "{version}"
    );
    assert_eq!(dockerd.inspect(IMAGE, "{{.Config.User}}"), "65532:65532");
    let size: u64 = dockerd.inspect(IMAGE, "{{.Size}}").parse().unwrap();
    eprintln!("image size: {} MiB (runtime base and binary)", size >> 20);

    // As shipped: entrypoint, default CMD, volume; set through HOARD_* only,
    // on a port that is not 5000, so the HEALTHCHECK must follow it.
    let upstream_env = format!("HOARD_UPSTREAM=docker.io={}", upstream.url());
    let run_hoard = |name: &str, env: &[&str], mounts: &[&str]| {
        let mut command = dockerd.docker();
        command.args([
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "host",
            "--health-interval",
            "1s",
        ]);
        command.args(["-v", "hoard-e2e-data:/var/lib/hoard"]);
        for mount in mounts {
            command.args(["-v", mount]);
        }
        for var in env {
            command.args(["-e", var]);
        }
        run(command.arg(IMAGE));
    };
    run_hoard(
        "hoard-a",
        &["HOARD_LISTEN=127.0.0.1:18990", &upstream_env],
        &[],
    );
    wait_healthy(&dockerd, "hoard-a", Duration::from_secs(60));
    let pulled = tempfile::tempdir().unwrap();
    skopeo_copy("127.0.0.1:18990", "owner/app:1.0", &pulled.path().join("a"));
    skopeo_copy(
        "127.0.0.1:18990",
        "library/alpine-like:3",
        &pulled.path().join("b"),
    );
    assert_eq!(upstream.count("GET", &seeded.oci.config.digest()), 1);
    containerd.pull("docker.io/library/multi:1", &["--platform", "linux/arm64"]);
    assert_eq!(upstream.count("GET", &seeded.arm.layers[0].digest()), 1);

    // JSON logs; `docker stop` ends it cleanly within the grace period.
    let stop_started = Instant::now();
    run(dockerd.docker().args(["stop", "hoard-a"]));
    assert!(
        stop_started.elapsed() < Duration::from_secs(10),
        "stopped before SIGKILL"
    );
    assert_eq!(dockerd.inspect("hoard-a", "{{.State.ExitCode}}"), "0");
    // hoard logs to standard error, which `docker logs` passes on as such.
    let logs = dockerd.docker().args(["logs", "hoard-a"]).output().unwrap();
    let logs = String::from_utf8_lossy(&logs.stderr).into_owned();
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let said = |text: &str| lines.iter().any(|l| l.to_string().contains(text));
    assert!(
        said("SIGTERM received, shutting down") && said("stopped"),
        "{logs}"
    );

    // A new container on the same volume serves the cached image without
    // asking upstream.
    let before = upstream.total();
    run_hoard(
        "hoard-b",
        &["HOARD_LISTEN=127.0.0.1:18990", &upstream_env],
        &[],
    );
    wait_healthy(&dockerd, "hoard-b", Duration::from_secs(60));
    let by_digest = format!("owner/app@{}", seeded.oci.manifest.digest());
    skopeo_copy("127.0.0.1:18990", &by_digest, &pulled.path().join("c"));
    // By tag too: its record, written by the first container, is in the
    // volume and inside its TTL.
    skopeo_copy("127.0.0.1:18990", "owner/app:1.0", &pulled.path().join("d"));
    assert_eq!(
        upstream.total(),
        before + 1,
        "only the count's own marker request"
    );
    run(dockerd.docker().args(["rm", "-f", "hoard-b"]));

    // TLS on: the HEALTHCHECK speaks TLS to wherever HOARD_LISTEN says.
    let pki = tempfile::tempdir().unwrap();
    let (cert, key) = support::pki::Ca::new("image test CA").server_files(pki.path());
    for file in [&cert, &key] {
        // Readable by the image's user.
        run(Command::new("chmod").arg("0644").arg(file));
    }
    run(Command::new("chmod").arg("0755").arg(pki.path()));
    run_hoard(
        "hoard-tls",
        &[
            "HOARD_LISTEN=127.0.0.1:18991",
            &upstream_env,
            &format!(
                "HOARD_TLS_CERT=/pki/{}",
                cert.file_name().unwrap().to_str().unwrap()
            ),
            &format!(
                "HOARD_TLS_KEY=/pki/{}",
                key.file_name().unwrap().to_str().unwrap()
            ),
        ],
        &[&format!("{}:/pki:ro", pki.path().display())],
    );
    wait_healthy(&dockerd, "hoard-tls", Duration::from_secs(60));
    run(dockerd.docker().args(["rm", "-f", "hoard-tls"]));
    eprintln!("image test took {:?}", started.elapsed());
    drop(dockerd);
    drop(containerd);
}
