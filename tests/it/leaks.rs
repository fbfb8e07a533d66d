//! Secrets stay where they belong: the upstream password, the upstream's
//! bearer token and a client's Authorization header are sought, as canary
//! strings, in hoard's trace-level log, its metrics, its error bodies and
//! the requests the redirected CDN received. This runs the real binary (the
//! log is what an operator would see) against the in-process fake upstream.

use std::time::Duration;

use base64::Engine as _;

use crate::fake::Fake;
use crate::support::{hoard_command, HoardProcess};

const UPSTREAM_PASSWORD: &str = "upstream-pw-canary-71c3";
const UPSTREAM_TOKEN: &str = "upstream-token-canary-9ab2";
const CLIENT_PASSWORD: &str = "client-pw-canary-5e0f";

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_logs_metrics_error_bodies_or_the_cdn() {
    let registry = Fake::start().await;
    let cdn = Fake::start().await;
    registry.require_token(
        UPSTREAM_TOKEN,
        Some(&format!(
            "Basic {}",
            b64(&format!("bot:{UPSTREAM_PASSWORD}"))
        )),
    );
    registry.redirect_blobs_to(&cdn.url());
    let layer = b"layer from the cdn".to_vec();
    let (_, layer_digest) = registry.put_image("library/alpine", "1", &layer);
    cdn.put_blob("cdn", layer);
    registry.put_image("library/other", "1", b"other");

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hoard.toml");
    std::fs::write(
        &config,
        format!(
            "[registries.\"docker.io\"]\nusername = \"bot\"\npassword = \"{UPSTREAM_PASSWORD}\"\n"
        ),
    )
    .unwrap();
    let mut command = hoard_command();
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--upstream")
        .arg(format!("docker.io={}", registry.url()))
        .arg("--config")
        .arg(&config)
        .env("HOARD_LOG", "trace");
    let mut hoard = tokio::task::spawn_blocking(move || HoardProcess::spawn(dir, command))
        .await
        .unwrap();
    let base = format!("http://{}", hoard.ready.api);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    let client_auth = format!("Basic {}", b64(&format!("me:{CLIENT_PASSWORD}")));
    let get = |path: String| {
        client
            .get(format!("{base}{path}"))
            .header("authorization", client_auth.clone())
            .send()
    };
    let mut bodies = Vec::new();
    // A pull: token flow upstream, the blob redirected to the CDN.
    let r = get("/v2/library/alpine/manifests/1".into()).await.unwrap();
    assert_eq!(r.status(), 200);
    let r = get(format!("/v2/library/alpine/blobs/{layer_digest}"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"layer from the cdn");
    // The token endpoint fails: an error body.
    registry.fail_token_endpoint();
    let r = get("/v2/library/other/manifests/1".into()).await.unwrap();
    assert_eq!(r.status(), 502);
    bodies.push(r.text().await.unwrap());
    // Unknown content and a malformed request: more error bodies.
    for path in [
        "/v2/library/nothing/manifests/1",
        "/v2/library/a/blobs/sha256:zz",
    ] {
        bodies.push(get(path.into()).await.unwrap().text().await.unwrap());
    }
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    // SIGTERM, then read everything it logged.
    let (hoard, status) = tokio::task::spawn_blocking(move || {
        let status = hoard.daemon.terminate(Duration::from_secs(10));
        (hoard, status)
    })
    .await
    .unwrap();
    assert!(status.success(), "{status}");
    let log = hoard.daemon.log_text();
    assert!(
        log.contains("DEBUG") || log.contains("TRACE"),
        "debug logging was on"
    );

    let secrets = [
        UPSTREAM_PASSWORD.to_owned(),
        b64(&format!("bot:{UPSTREAM_PASSWORD}")),
        UPSTREAM_TOKEN.to_owned(),
        CLIENT_PASSWORD.to_owned(),
        b64(&format!("me:{CLIENT_PASSWORD}")),
    ];
    for secret in &secrets {
        assert!(!log.contains(secret.as_str()), "{secret} in the log");
        assert!(
            !metrics.contains(secret.as_str()),
            "{secret} in the metrics"
        );
        for body in &bodies {
            assert!(
                !body.contains(secret.as_str()),
                "{secret} in an error body: {body}"
            );
        }
    }
    // The CDN got no credentials at all; upstream never saw the client's.
    let cdn_seen = cdn.state.authorizations.lock().unwrap().clone();
    assert_eq!(cdn.hits("GET", "/cdn/"), 1);
    assert!(
        cdn_seen.iter().all(|(_, auth)| auth.is_none()),
        "{cdn_seen:?}"
    );
    let upstream_seen = registry.state.authorizations.lock().unwrap().clone();
    assert!(upstream_seen.iter().all(|(_, auth)| !auth
        .as_deref()
        .unwrap_or("")
        .contains(&b64(&format!("me:{CLIENT_PASSWORD}")))));
}
