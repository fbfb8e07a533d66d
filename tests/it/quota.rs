//! Issue 15: Docker Hub's quota read right (the two 429s told apart, the
//! window shown, the pulls the cache saved counted) and no client left
//! waiting past `limits.response_deadline`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::fake::{Fake, Fault};
use crate::{error_code, eventually_async, Hoard};

/// What docker and containerd accept: every manifest type.
const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

#[tokio::test]
async fn issue_15_the_pull_limit_and_the_abuse_limit_are_counted_apart() {
    let fake = Fake::start().await;
    fake.put_image("library/a", "1", b"a");
    fake.put_image("library/b", "1", b"b");
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    // A normal answer carries the window.
    let ok = Hoard::start(&fake.url(), &[], |_| {}).await;
    assert_eq!(ok.status("/v2/a/manifests/1").await, 200);
    assert_eq!(
        ok.metric("hoard_upstream_ratelimit_window_seconds{registry=\"docker.io\"}"),
        21600.0
    );

    fake.fault("/v2/library/a/", Fault::PullLimit);
    let r = hoard.get("/v2/a/manifests/1").await;
    assert_eq!(r.status(), 429);
    assert_eq!(error_code(r).await, "TOOMANYREQUESTS");
    let series = |kind: &str| {
        format!("hoard_upstream_throttled_total{{kind=\"{kind}\",registry=\"docker.io\"}}")
    };
    assert_eq!(hoard.metric(&series("pull_limit")), 1.0);
    assert_eq!(hoard.metric(&series("abuse")), 0.0);

    // A bare 429 (no quota said) on another mirror: the abuse limit.
    let other = Hoard::start(&fake.url(), &[], |_| {}).await;
    fake.clear_faults();
    fake.fault("/v2/library/b/", Fault::Status(429, Some(30)));
    let r = other.get("/v2/b/manifests/1").await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "30");
    assert_eq!(other.metric(&series("abuse")), 1.0);
    assert_eq!(other.metric(&series("pull_limit")), 0.0);
    // Backing off as the header said: nothing more goes upstream.
    let before = fake.all_hits().len();
    assert_eq!(other.status("/v2/b/manifests/1").await, 429);
    assert_eq!(fake.all_hits().len(), before);
}

#[tokio::test]
async fn issue_15_pulls_answered_from_the_cache_are_counted_as_saved() {
    let fake = Fake::start().await;
    let (digest, _) = fake.put_image("library/app", "1", b"layer");
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let saved = || hoard.metric("hoard_upstream_pulls_saved_total{registry=\"docker.io\"}");
    let get = |path: String| {
        let hoard = &hoard;
        async move {
            hoard
                .client
                .get(hoard.url(&path))
                .header("accept", ACCEPT)
                .send()
                .await
                .unwrap()
        }
    };
    // The first GET went upstream: nothing saved.
    assert_eq!(get("/v2/app/manifests/1".into()).await.status(), 200);
    assert_eq!(saved(), 0.0);
    // Later GETs, by tag and by digest, are pulls Docker Hub never saw.
    let by_tag = get("/v2/app/manifests/1".into()).await;
    let by_digest = get(format!("/v2/app/manifests/{digest}")).await;
    assert_eq!(
        (
            by_tag.headers()["x-hoard-cache"].to_str().unwrap(),
            by_digest.headers()["x-hoard-cache"].to_str().unwrap()
        ),
        ("hit", "hit")
    );
    assert_eq!(saved(), 2.0);
    // A HEAD is not a pull anywhere.
    assert_eq!(hoard.head("/v2/app/manifests/1").await.status(), 200);
    assert_eq!(saved(), 2.0);
    assert_eq!(fake.hits("GET", "/manifests/"), 1);

    // An index GET is free on Docker Hub (its image's GET is the pull):
    // answered from the cache, it saves nothing.
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{digest}","size":1,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
    );
    fake.put_manifest(
        "library/app",
        Some("multi"),
        "application/vnd.oci.image.index.v1+json",
        index.into_bytes(),
    );
    assert_eq!(get("/v2/app/manifests/multi".into()).await.status(), 200);
    let again = get("/v2/app/manifests/multi".into()).await;
    assert_eq!(again.headers()["x-hoard-cache"], "hit");
    assert_eq!(saved(), 2.0);
}

/// A manifest GET as docker sends it.
async fn pull(hoard: &Hoard, path: &str) -> reqwest::Response {
    hoard
        .client
        .get(hoard.url(path))
        .header("accept", ACCEPT)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn issue_15_revalidated_stale_and_coalesced_answers_are_pulls_saved() {
    let fake = Fake::start().await;
    fake.put_image("library/app", "1", b"layer");
    fake.put_image("library/app", "2", b"layer 2");
    // Every tag GET asks upstream again (a HEAD, which Docker Hub does not
    // count): answered from the store, the pull was saved.
    let hoard = Hoard::start(&fake.url(), &[], |args| {
        args.tag_ttl = Some("0s".into());
    })
    .await;
    let saved =
        |hoard: &Hoard| hoard.metric("hoard_upstream_pulls_saved_total{registry=\"docker.io\"}");
    assert_eq!(pull(&hoard, "/v2/app/manifests/1").await.status(), 200);
    let revalidated = pull(&hoard, "/v2/app/manifests/1").await;
    assert_eq!(revalidated.headers()["x-hoard-cache"], "revalidated");
    assert_eq!(saved(&hoard), 1.0);
    fake.fault("/manifests/", Fault::Status(500, None));
    let stale = pull(&hoard, "/v2/app/manifests/1").await;
    assert_eq!(stale.status(), 200);
    assert_eq!(stale.headers()["x-hoard-cache"], "stale");
    assert_eq!(saved(&hoard), 2.0);
    assert_eq!(
        fake.hits("GET", "/manifests/"),
        1,
        "only the first GET left"
    );
    fake.clear_faults();

    // Clients joining a fetch in flight: one pull upstream, the rest saved.
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    fake.fault("/manifests/2", Fault::Delay(Duration::from_secs(3)));
    let first = {
        let (client, url) = (hoard.client.clone(), hoard.url("/v2/app/manifests/2"));
        tokio::spawn(async move { client.get(url).header("accept", ACCEPT).send().await })
    };
    let started = eventually_async(Duration::from_secs(10), || async {
        fake.hits("GET", "/manifests/2") == 1
    })
    .await;
    assert!(started, "the first fetch reached upstream");
    let joined =
        futures_util::future::join_all((0..4).map(|_| pull(&hoard, "/v2/app/manifests/2"))).await;
    assert_eq!(
        first.await.unwrap().unwrap().headers()["x-hoard-cache"],
        "miss"
    );
    for r in &joined {
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-hoard-cache"], "coalesced");
    }
    assert_eq!(saved(&hoard), 4.0);
    assert_eq!(fake.hits("GET", "/manifests/2"), 1);
}

#[tokio::test]
async fn issue_15_a_slow_upstream_gets_the_client_a_503_before_the_deadline() {
    let fake = Fake::start().await;
    fake.put_image("library/slow", "1", b"slow");
    let gate = Arc::new(Notify::new());
    fake.fault("/manifests/", Fault::Gate(gate.clone()));
    let hoard = Hoard::start(&fake.url(), &[], |args| {
        args.response_deadline = Some("300ms".into());
        args.response_timeout = Some("20s".into());
        args.stall_timeout = Some("20s".into());
    })
    .await;
    let r = hoard.get("/v2/slow/manifests/1").await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "5");
    assert_eq!(error_code(r).await, "UNAVAILABLE");
    assert_eq!(hoard.metric("hoard_http_deadline_exceeded_total"), 1.0);
    // The fetch went on: once upstream answers, the next request has it,
    // and upstream was asked once.
    gate.notify_one();
    let ready = || async { hoard.status("/v2/slow/manifests/1").await == 200 };
    assert!(eventually_async(Duration::from_secs(20), ready).await);
    assert_eq!(fake.hits("GET", "/manifests/"), 1);
}

#[tokio::test]
async fn issue_15_a_blob_queued_behind_max_concurrent_fetches_gets_a_503() {
    let fake = Fake::start().await;
    let (_, first) = fake.put_image("library/one", "1", &vec![1u8; 1 << 20]);
    let (_, second) = fake.put_image("library/two", "1", &vec![2u8; 1 << 20]);
    let gate = Arc::new(Notify::new());
    fake.fault(&first, Fault::Gate(gate.clone()));
    let hoard = Hoard::start(&fake.url(), &[], |args| {
        args.response_deadline = Some("500ms".into());
        args.max_concurrent_fetches = Some(1);
        args.stall_timeout = Some("20s".into());
    })
    .await;
    // The first download holds the one permit, stopped halfway.
    let mut held = hoard.get(&format!("/v2/one/blobs/{first}")).await;
    assert_eq!(held.status(), 200);
    assert!(!held.chunk().await.unwrap().unwrap().is_empty());
    let r = hoard.get(&format!("/v2/two/blobs/{second}")).await;
    assert_eq!(r.status(), 503);
    assert_eq!(error_code(r).await, "UNAVAILABLE");
    gate.notify_one();
    while held.chunk().await.unwrap().is_some() {}
    let ready = || async {
        hoard
            .get(&format!("/v2/two/blobs/{second}"))
            .await
            .bytes()
            .await
            .is_ok_and(|b| b.len() == 1 << 20)
    };
    assert!(eventually_async(Duration::from_secs(20), ready).await);
}

#[tokio::test]
async fn issue_15_a_slow_token_endpoint_gets_the_client_a_503() {
    let fake = Fake::start().await;
    fake.put_image("library/private", "1", b"p");
    fake.require_token("t0k3n", None);
    fake.fault("/token", Fault::Delay(Duration::from_secs(3)));
    let hoard = Hoard::start(&fake.url(), &[], |args| {
        args.response_deadline = Some("300ms".into());
    })
    .await;
    let r = hoard.get("/v2/private/manifests/1").await;
    assert_eq!(r.status(), 503);
    assert_eq!(error_code(r).await, "UNAVAILABLE");
}

#[tokio::test]
async fn issue_15_the_login_endpoints_own_limit_is_a_429_and_backed_off() {
    let fake = Fake::start().await;
    fake.put_image("library/private", "1", b"p");
    fake.require_token("t0k3n", None);
    fake.fault("/token", Fault::Status(429, Some(30)));
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let r = hoard.get("/v2/private/manifests/1").await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "30");
    assert_eq!(error_code(r).await, "TOOMANYREQUESTS");
    assert_eq!(
        hoard.metric("hoard_upstream_throttled_total{kind=\"login\",registry=\"docker.io\"}"),
        1.0
    );
    // Backed off: the next request asks neither the registry nor the
    // token endpoint.
    let before = fake.all_hits().len();
    assert_eq!(hoard.status("/v2/private/manifests/1").await, 429);
    assert_eq!(fake.all_hits().len(), before);
}
