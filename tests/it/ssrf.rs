//! Issue 15: with `allow_any_upstream`, a client-named registry must not
//! make hoard a probe into its own machine or network (loopback by address
//! or by a name resolving to it, ports other than the allowed ones), while
//! explicitly configured loopback upstreams keep working; and an upstream
//! that cannot be reached says why (connection refused, DNS, TLS).
//! Every address used here is on 127.0.0.0/8; the other ranges are unit
//! tests of the address check (`upstream::guard`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::fake::Fake;
use crate::pki::Ca;
use crate::Hoard;

/// A listener on 127.0.0.1 that counts the connections it accepts.
async fn counting_listener() -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    (port, seen)
}

async fn error_body(response: reqwest::Response) -> serde_json::Value {
    let body = response.bytes().await.unwrap();
    serde_json::from_slice::<serde_json::Value>(&body).expect("a JSON error body")["errors"][0]
        .clone()
}

#[tokio::test]
async fn issue_15_any_upstream_refuses_loopback_by_address_and_by_name() {
    let fake = Fake::start().await;
    let (port, seen) = counting_listener().await;
    let hoard = Hoard::start(&fake.url(), &[], |args| {
        args.allow_any_upstream = Some(true);
        // The port allowed, so the address rule is what refuses.
        args.any_ports = vec![port];
    })
    .await;
    for ns in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
        let r = hoard
            .get(&format!("/v2/library/alpine/manifests/1?ns={ns}"))
            .await;
        assert_eq!(r.status(), 403, "{ns}");
        let error = error_body(r).await;
        assert_eq!(error["code"], "DENIED", "{ns}");
        // The client is told the address is not public, not which range it
        // is in; the operator's metric says loopback.
        assert_eq!(
            error["message"],
            "destination not allowed: the registry does not resolve to a public address",
            "{ns}"
        );
        assert_eq!(error["detail"]["rule"], "address");
    }
    // Refused before connecting: the 403 came back, nothing was opened.
    assert_eq!(seen.load(Ordering::SeqCst), 0, "connections to the probe");
    // Hosts clients name are one `other` label, not a series each.
    let metrics = hoard.metrics.render();
    assert!(
        !metrics.contains("registry=\"127.0.0.1") && !metrics.contains("registry=\"localhost"),
        "{metrics}"
    );
    assert!(metrics.contains("registry=\"other\""), "{metrics}");
    assert_eq!(
        hoard.metric(r#"hoard_upstream_refused_total{reason="loopback"}"#),
        2.0
    );
    // The configured registry on loopback still works.
    fake.put_image("library/alpine", "1", b"a");
    assert_eq!(hoard.status("/v2/library/alpine/manifests/1").await, 200);
}

#[tokio::test]
async fn issue_15_any_upstream_refuses_other_ports() {
    let fake = Fake::start().await;
    let (port, seen) = counting_listener().await;
    let hoard = Hoard::start(&fake.url(), &[], |args| {
        args.allow_any_upstream = Some(true);
    })
    .await;
    for ns in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
        let r = hoard
            .get(&format!("/v2/library/alpine/manifests/1?ns={ns}"))
            .await;
        assert_eq!(r.status(), 403, "{ns}");
        let error = error_body(r).await;
        assert_eq!(error["code"], "DENIED");
        assert_eq!(error["detail"]["rule"], "port");
    }
    assert_eq!(seen.load(Ordering::SeqCst), 0, "connections to the probe");
    assert_eq!(
        hoard.metric(r#"hoard_upstream_refused_total{reason="port"}"#),
        2.0
    );
}

#[tokio::test]
async fn issue_15_a_refused_connection_says_so() {
    let (_socket, port) = crate::support::fleet::refusing_port();
    let hoard = Hoard::start(&format!("http://127.0.0.1:{port}"), &[], |_| {}).await;
    assert_unreachable(&hoard, "connection refused").await;
}

/// A manifest GET through `hoard` is a 502 `UNAVAILABLE` whose detail
/// names `cause`.
async fn assert_unreachable(hoard: &Hoard, cause: &str) {
    let r = hoard.get("/v2/library/alpine/manifests/1").await;
    assert_eq!(r.status(), 502);
    let error = error_body(r).await;
    assert_eq!(error["code"], "UNAVAILABLE");
    assert_eq!(error["detail"]["cause"], cause);
}

#[tokio::test]
async fn issue_15_a_token_service_that_refuses_connections_says_so() {
    let (_socket, port) = crate::support::fleet::refusing_port();
    let fake = Fake::start().await;
    fake.require_token("tok", None);
    fake.token_realm(&format!("http://127.0.0.1:{port}/token"));
    fake.put_image("library/alpine", "1", b"a");
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    assert_unreachable(&hoard, "connection refused").await;
}

#[tokio::test]
async fn issue_15_an_untrusted_certificate_says_why() {
    // The upstream is another hoard serving TLS with a certificate from a
    // CA the first one does not trust.
    let fake = Fake::start().await;
    let ca = Ca::new("untrusted test ca");
    let pki = tempfile::tempdir().unwrap();
    let (cert, key) = ca.server_files(pki.path());
    let upstream = Hoard::start(&fake.url(), &[], |args| {
        args.tls_cert = Some(cert);
        args.tls_key = Some(key);
    })
    .await;
    let url = format!("https://localhost:{}", upstream.addr.port());
    let hoard = Hoard::start(&url, &[], |_| {}).await;
    let r = hoard.get("/v2/library/alpine/manifests/1").await;
    assert_eq!(r.status(), 502);
    let error = error_body(r).await;
    assert_eq!(
        error["detail"]["cause"],
        "tls handshake: certificate issuer not trusted"
    );
}

/// Through an HTTP proxy (`HTTPS_PROXY`), the proxy would resolve and
/// connect to the client-named host past the checks, so registries that are
/// not configured never go through one: the proxy here sees nothing.
#[test]
fn issue_15_any_upstream_does_not_go_through_a_proxy() {
    let proxy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    proxy.set_nonblocking(true).unwrap();
    let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
    let (_target, port) = crate::support::fleet::refusing_port();
    let data = tempfile::tempdir().unwrap();
    let mut command = crate::support::hoard_command();
    command
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--allow-any-upstream"])
        .args(["--any-port", &port.to_string()])
        // Without the fix, the request waits on the silent proxy this long.
        .args(["--connect-timeout", "2s"])
        .arg("--data-dir")
        .arg(data.path().join("store"));
    for var in ["NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"] {
        command.env_remove(var);
    }
    for var in ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"] {
        command.env(var, &proxy_url);
    }
    let hoard = crate::support::HoardProcess::spawn(data, command);
    let url = format!(
        "http://{}/v2/library/alpine/manifests/1?ns=localhost:{port}",
        hoard.addr()
    );
    let r = reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(url)
        .send()
        .unwrap();
    assert_eq!(r.status(), 403);
    // A proxied request would have connected before the answer came back.
    match proxy.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the proxy was contacted: {other:?}"),
    }
}
