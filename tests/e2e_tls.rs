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
    let upstream = Distribution::start();
    seed(&upstream);
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new("hoard e2e CA");
    let (cert, key) = ca.server_files(pki.path());
    let users = htpasswd(pki.path());
    let hoard = HoardProcess::start(
        &upstream.url(),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--htpasswd",
            &users,
        ],
    );
    // containers/image reads *.crt in the cert dir as CAs.
    let certs = tempfile::tempdir().unwrap();
    write(certs.path(), "ca.crt", &ca.pem());
    let out = tempfile::tempdir().unwrap();

    let before = upstream.requests().len();
    let wrong = skopeo_copy(
        &hoard,
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
        &hoard,
        "library/alpine-like:3",
        certs.path(),
        None,
        &out.path().join("b"),
    );
    assert!(!anonymous.status.success(), "no login, no pull");

    let good = skopeo_copy(
        &hoard,
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
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("ci:{PASSWORD}"));
    assert!(
        !log.contains(&basic),
        "the Authorization header reached the log"
    );
}

#[test]
fn skopeo_needs_a_client_certificate_when_the_mirror_asks_for_one() {
    let upstream = Distribution::start();
    seed(&upstream);
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new("hoard e2e CA");
    let clients = Ca::new("hoard e2e clients CA");
    let (cert, key) = ca.server_files(pki.path());
    let client_ca = write(pki.path(), "clients.pem", &clients.pem());
    let hoard = HoardProcess::start(
        &upstream.url(),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--tls-client-ca",
            client_ca.to_str().unwrap(),
        ],
    );
    let out = tempfile::tempdir().unwrap();
    let certs = tempfile::tempdir().unwrap();
    write(certs.path(), "ca.crt", &ca.pem());
    let without = skopeo_copy(
        &hoard,
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
        &hoard,
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
    let upstream = Distribution::start();
    seed(&upstream);
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new("hoard e2e CA");
    let (cert, key) = ca.server_files(pki.path());
    let users = htpasswd(pki.path());
    let hoard = HoardProcess::start(
        &upstream.url(),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--htpasswd",
            &users,
        ],
    );
    let ca_file = write(pki.path(), "hoard-ca.crt", &ca.pem());
    // deploy/clients' TLS hosts.toml, with only the address, the CA path and
    // the login filled in.
    let hosts_toml = |password: &str| {
        let login = base64::engine::general_purpose::STANDARD.encode(format!("ci:{password}"));
        client_config(
            "containerd/certs.d-tls/docker.io/hosts.toml",
            &format!("localhost:{}", hoard.port),
        )
        .replace(
            "/etc/containerd/certs.d/docker.io/hoard-ca.crt",
            ca_file.to_str().unwrap(),
        )
        .replace("Basic Y2k6c2VjcmV0", &format!("Basic {login}"))
    };
    let wrong = hosts_toml("wrong");
    let ctr = Containerd::start_with(|hosts| {
        std::fs::create_dir_all(hosts.join("docker.io")).unwrap();
        write(&hosts.join("docker.io"), "hosts.toml", &wrong);
    });
    // The fallback `server` (registry-1.docker.io) does not resolve here, so
    // a pull only succeeds through hoard.
    let refused = ctr
        .ctr()
        .args(["images", "pull", "--hosts-dir"])
        .arg(&ctr.hosts)
        .arg("docker.io/library/alpine-like:3")
        .output()
        .unwrap();
    assert!(!refused.status.success());

    write(
        &ctr.hosts.join("docker.io"),
        "hosts.toml",
        &hosts_toml(PASSWORD),
    );
    ctr.pull("docker.io/library/alpine-like:3", &[]);
    assert!(upstream.count("GET", "/v2/library/alpine-like/blobs/") > 0);
    assert!(!hoard.daemon.log_text().contains(PASSWORD));
}

#[test]
fn containerd_presents_the_client_certificate_from_hosts_toml() {
    let upstream = Distribution::start();
    seed(&upstream);
    let pki = tempfile::tempdir().unwrap();
    let ca = Ca::new("hoard e2e CA");
    let clients = Ca::new("hoard e2e clients CA");
    let (cert, key) = ca.server_files(pki.path());
    let client_ca = write(pki.path(), "clients.pem", &clients.pem());
    let users = htpasswd(pki.path());
    let hoard = HoardProcess::start(
        &upstream.url(),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--tls-client-ca",
            client_ca.to_str().unwrap(),
            "--htpasswd",
            &users,
        ],
    );
    let ca_file = write(pki.path(), "hoard-ca.crt", &ca.pem());
    let (client_cert, client_key) = clients.issue(&["ci-runner"], Purpose::ClientAuth);
    let cert_file = write(pki.path(), "client.cert", &client_cert);
    let key_file = write(pki.path(), "client.key", &client_key);
    let login = base64::engine::general_purpose::STANDARD.encode(format!("ci:{PASSWORD}"));
    // deploy/clients' TLS hosts.toml with its `client` line uncommented.
    let toml = client_config(
        "containerd/certs.d-tls/docker.io/hosts.toml",
        &format!("localhost:{}", hoard.port),
    )
    .replace(
        "/etc/containerd/certs.d/docker.io/hoard-ca.crt",
        ca_file.to_str().unwrap(),
    )
    .replace("  # client = ", "  client = ")
    .replace(
        "/etc/containerd/certs.d/docker.io/client.cert",
        cert_file.to_str().unwrap(),
    )
    .replace(
        "/etc/containerd/certs.d/docker.io/client.key",
        key_file.to_str().unwrap(),
    )
    .replace("Basic Y2k6c2VjcmV0", &format!("Basic {login}"));
    assert!(
        toml.contains("\n  client = [["),
        "the client line is in the shipped file"
    );
    let ctr = Containerd::start_with(|hosts| {
        std::fs::create_dir_all(hosts.join("docker.io")).unwrap();
        write(&hosts.join("docker.io"), "hosts.toml", &toml);
    });
    ctr.pull("docker.io/library/alpine-like:3", &[]);

    // The same file without the client certificate: refused in the handshake.
    let without: String = toml
        .lines()
        .filter(|l| !l.trim_start().starts_with("client = "))
        .map(|l| format!("{l}\n"))
        .collect();
    write(&ctr.hosts.join("docker.io"), "hosts.toml", &without);
    ctr.remove("docker.io/library/alpine-like:3");
    let refused = ctr
        .ctr()
        .args(["images", "pull", "--hosts-dir"])
        .arg(&ctr.hosts)
        .arg("docker.io/library/alpine-like:3")
        .output()
        .unwrap();
    assert!(!refused.status.success());
}
