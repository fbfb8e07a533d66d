//! End to end over TLS with client logins: skopeo and containerd pull from
//! the real hoard binary serving TLS with a CA this test makes, with a
//! password (htpasswd) and with client certificates. Upstream is Debian's
//! docker-registry seeded with images built here. A wrong password gets
//! 401 and nothing else: no upstream request, no password in the log.

mod support;

use std::path::Path;
use std::process::Command;

use base64::Engine as _;
use support::pki::{write, Ca, Purpose};
use support::*;

/// The canary password: it must never show up in hoard's log.
const PASSWORD: &str = "canary-pw-4f1d9a";

/// An htpasswd file with user `ci` in `dir`.
fn htpasswd(dir: &Path) -> String {
    let hash = bcrypt::hash(PASSWORD, 4).unwrap();
    write(dir, "htpasswd", &format!("ci:{hash}\n"))
        .display()
        .to_string()
}

/// A seeded upstream and hoard serving TLS with a CA made here; with
/// `login`, the htpasswd user `ci`; with `client_certs`, a client CA.
struct TlsMirror {
    upstream: Distribution,
    pki: tempfile::TempDir,
    ca: Ca,
    clients: Ca,
    hoard: HoardProcess,
}

impl TlsMirror {
    fn start(login: bool, client_certs: bool) -> TlsMirror {
        let upstream = Distribution::start();
        seed(&upstream);
        let pki = tempfile::tempdir().unwrap();
        let ca = Ca::new("hoard e2e CA");
        let clients = Ca::new("hoard e2e clients CA");
        let (cert, key) = ca.server_files(pki.path());
        let mut args = vec![
            "--tls-cert".to_owned(),
            cert.display().to_string(),
            "--tls-key".to_owned(),
            key.display().to_string(),
        ];
        if client_certs {
            let client_ca = write(pki.path(), "clients.pem", &clients.pem());
            args.extend([
                "--tls-client-ca".to_owned(),
                client_ca.display().to_string(),
            ]);
        }
        if login {
            args.extend(["--htpasswd".to_owned(), htpasswd(pki.path())]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let hoard = HoardProcess::start(&upstream.url(), &args);
        TlsMirror {
            upstream,
            pki,
            ca,
            clients,
            hoard,
        }
    }

    /// deploy/clients' TLS hosts.toml with the address, the CA and the
    /// login (for `password`) filled in.
    fn hosts_toml(&self, password: &str) -> String {
        let ca_file = write(self.pki.path(), "hoard-ca.crt", &self.ca.pem());
        client_config(
            "containerd/certs.d-tls/docker.io/hosts.toml",
            &format!("localhost:{}", self.hoard.port),
        )
        .replace(
            "/etc/containerd/certs.d/docker.io/hoard-ca.crt",
            ca_file.to_str().unwrap(),
        )
        .replace("Basic Y2k6c2VjcmV0", &format!("Basic {}", basic(password)))
    }
}

/// base64 of `ci:<password>`, as in a Basic header.
fn basic(password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("ci:{password}"))
}

/// containerd with `toml` as its docker.io hosts.toml.
fn containerd_with(toml: &str) -> Containerd {
    Containerd::start_with(|hosts| {
        std::fs::create_dir_all(hosts.join("docker.io")).unwrap();
        write(&hosts.join("docker.io"), "hosts.toml", toml);
    })
}

/// A `ctr` pull that is expected to fail: its output.
fn failed_pull(ctr: &Containerd, image: &str) -> std::process::Output {
    ctr.ctr()
        .args(["images", "pull", "--hosts-dir"])
        .arg(&ctr.hosts)
        .arg(image)
        .output()
        .unwrap()
}

fn skopeo_copy(
    hoard: &HoardProcess,
    image: &str,
    cert_dir: &Path,
    creds: Option<&str>,
    dest: &Path,
) -> std::process::Output {
    let mut c = Command::new(require_tool("skopeo"));
    c.arg("--insecure-policy")
        .arg("copy")
        .arg("--src-cert-dir")
        .arg(cert_dir);
    if let Some(creds) = creds {
        c.arg("--src-creds").arg(creds);
    } else {
        c.arg("--src-no-creds");
    }
    c.arg(format!("docker://localhost:{}/{image}", hoard.port))
        .arg(format!("dir:{}", dest.display()))
        .output()
        .expect("skopeo runs")
}

#[test]
fn skopeo_pulls_over_tls_with_a_password_and_a_wrong_one_gets_401() {
    let mirror = TlsMirror::start(true, false);
    let (upstream, ca, hoard) = (&mirror.upstream, &mirror.ca, &mirror.hoard);
    // containers/image reads *.crt in the cert dir as CAs.
    let certs = tempfile::tempdir().unwrap();
    write(certs.path(), "ca.crt", &ca.pem());
    let out = tempfile::tempdir().unwrap();

    let before = upstream.requests().len();
    let wrong = skopeo_copy(
        hoard,
        "library/alpine-like:3",
        certs.path(),
        Some("ci:wrong"),
        &out.path().join("a"),
    );
    assert!(!wrong.status.success());
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        stderr.contains("401") || stderr.to_lowercase().contains("unauthorized"),
        "{stderr}"
    );
    assert_eq!(
        upstream.requests().len(),
        before,
        "a refused client reaches nothing upstream"
    );

    let anonymous = skopeo_copy(
        hoard,
        "library/alpine-like:3",
        certs.path(),
        None,
        &out.path().join("b"),
    );
    assert!(!anonymous.status.success(), "no login, no pull");

    let good = skopeo_copy(
        hoard,
        "library/alpine-like:3",
        certs.path(),
        Some(&format!("ci:{PASSWORD}")),
        &out.path().join("c"),
    );
    assert!(
        good.status.success(),
        "{}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(out.path().join("c/manifest.json").exists());

    let log = hoard.daemon.log_text();
    assert!(!log.contains(PASSWORD), "the password reached the log");
    assert!(
        !log.contains(&basic(PASSWORD)),
        "the Authorization header reached the log"
    );
}

#[test]
fn skopeo_needs_a_client_certificate_when_the_mirror_asks_for_one() {
    let mirror = TlsMirror::start(false, true);
    let (ca, clients, hoard) = (&mirror.ca, &mirror.clients, &mirror.hoard);
    let out = tempfile::tempdir().unwrap();
    let certs = tempfile::tempdir().unwrap();
    write(certs.path(), "ca.crt", &ca.pem());
    let without = skopeo_copy(
        hoard,
        "owner/app:1.0",
        certs.path(),
        None,
        &out.path().join("a"),
    );
    assert!(!without.status.success());

    // A *.cert with its *.key is the client certificate.
    let (client_cert, client_key) = clients.issue(&["ci-runner"], Purpose::ClientAuth);
    write(certs.path(), "client.cert", &client_cert);
    write(certs.path(), "client.key", &client_key);
    let with = skopeo_copy(
        hoard,
        "owner/app:1.0",
        certs.path(),
        None,
        &out.path().join("b"),
    );
    assert!(
        with.status.success(),
        "{}",
        String::from_utf8_lossy(&with.stderr)
    );
}

#[test]
fn containerd_pulls_over_tls_with_the_ca_and_login_from_hosts_toml() {
    let mirror = TlsMirror::start(true, false);
    let ctr = containerd_with(&mirror.hosts_toml("wrong"));
    // The fallback `server` (registry-1.docker.io) does not resolve here, so
    // a pull only succeeds through hoard.
    let refused = failed_pull(&ctr, "docker.io/library/alpine-like:3");
    assert!(!refused.status.success());

    write(
        &ctr.hosts.join("docker.io"),
        "hosts.toml",
        &mirror.hosts_toml(PASSWORD),
    );
    ctr.pull("docker.io/library/alpine-like:3", &[]);
    assert!(
        mirror
            .upstream
            .count("GET", "/v2/library/alpine-like/blobs/")
            > 0
    );
    assert!(!mirror.hoard.daemon.log_text().contains(PASSWORD));
}

#[test]
fn containerd_presents_the_client_certificate_from_hosts_toml() {
    let mirror = TlsMirror::start(true, true);
    let (client_cert, client_key) = mirror.clients.issue(&["ci-runner"], Purpose::ClientAuth);
    let cert_file = write(mirror.pki.path(), "client.cert", &client_cert);
    let key_file = write(mirror.pki.path(), "client.key", &client_key);
    // The shipped file with its `client` line uncommented.
    let toml = mirror
        .hosts_toml(PASSWORD)
        .replace("  # client = ", "  client = ")
        .replace(
            "/etc/containerd/certs.d/docker.io/client.cert",
            cert_file.to_str().unwrap(),
        )
        .replace(
            "/etc/containerd/certs.d/docker.io/client.key",
            key_file.to_str().unwrap(),
        );
    assert!(
        toml.contains("\n  client = [["),
        "the client line is in the shipped file"
    );
    let ctr = containerd_with(&toml);
    ctr.pull("docker.io/library/alpine-like:3", &[]);

    // The same file without the client certificate: refused in the handshake.
    let without: String = toml
        .lines()
        .filter(|l| !l.trim_start().starts_with("client = "))
        .map(|l| format!("{l}\n"))
        .collect();
    write(&ctr.hosts.join("docker.io"), "hosts.toml", &without);
    ctr.remove("docker.io/library/alpine-like:3");
    let refused = failed_pull(&ctr, "docker.io/library/alpine-like:3");
    assert!(!refused.status.success());
}

#[test]
fn sighup_reloads_the_certificate() {
    let mirror = TlsMirror::start(false, false);
    let trusting = |ca: &Ca| {
        reqwest::blocking::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap())
            .timeout(std::time::Duration::from_secs(5))
            .build()
            .unwrap()
    };
    let url = format!("https://localhost:{}/v2/", mirror.hoard.port);
    assert!(trusting(&mirror.ca).get(&url).send().is_ok());

    // Renewed in place, with the old modification times put back: only the
    // signal can make hoard notice.
    let cert = mirror.pki.path().join("cert.pem");
    let key = mirror.pki.path().join("key.pem");
    let mtime = |p: &Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let (cert_time, key_time) = (mtime(&cert), mtime(&key));
    let renewed = Ca::new("renewed CA");
    renewed.server_files(mirror.pki.path());
    for (path, time) in [(&cert, cert_time), (&key, key_time)] {
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(time)
            .unwrap();
    }
    let hup = Command::new("kill")
        .args(["-HUP", &mirror.hoard.daemon.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let client = trusting(&renewed);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while client.get(&url).send().is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the renewed certificate was not served after SIGHUP"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(trusting(&mirror.ca).get(&url).send().is_err());
}
