//! Upstream faults: rate limits, outages, corrupt, cut and stalled bodies.
//! The store stays consistent and cached content stays servable.

use std::time::Duration;

use bytes::Bytes;

use crate::fake::{digest_of, Fake, Fault};
use crate::{count_files, error_code, Hoard};

fn short_ttl(args: &mut hoard::config::ServeArgs) {
    args.tag_ttl = Some("100ms".into());
}

async fn past_ttl() {
    tokio::time::sleep(Duration::from_millis(150)).await;
}

#[tokio::test]
async fn rate_limited_miss_is_toomanyrequests_with_retry_after() {
    let fake = Fake::start().await;
    fake.put_image("library/alpine", "1", b"x");
    fake.fault("/manifests/", Fault::Status(429, Some(37)));
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let r = hoard.get("/v2/alpine/manifests/1").await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "37");
    assert_eq!(error_code(r).await, "TOOMANYREQUESTS");
    assert_eq!(hoard.blob_files(), 0);
}

#[tokio::test]
async fn tag_past_ttl_is_revalidated_with_head_and_refetched_only_when_moved() {
    let fake = Fake::start().await;
    let (first, _) = fake.put_image("library/alpine", "latest", b"v1");
    let hoard = Hoard::start(&fake.url(), &[], short_ttl).await;
    assert_eq!(hoard.status("/v2/alpine/manifests/latest").await, 200);
    // Inside the TTL: no upstream request at all.
    hoard.get("/v2/alpine/manifests/latest").await;
    assert_eq!(fake.all_hits().len(), 1);
    past_ttl().await;
    let r = hoard.get("/v2/alpine/manifests/latest").await;
    assert_eq!(r.headers()["docker-content-digest"], first.as_str());
    assert_eq!(fake.hits("HEAD", "/manifests/latest"), 1);
    assert_eq!(
        fake.hits("GET", "/manifests/"),
        1,
        "unchanged tag: HEAD only"
    );
    assert_eq!(
        hoard.metric(r#"hoard_cache_requests_total{kind="manifest",result="revalidated"}"#),
        1.0
    );
    let (second, _) = fake.put_image("library/alpine", "latest", b"v2");
    past_ttl().await;
    let r = hoard.get("/v2/alpine/manifests/latest").await;
    assert_eq!(r.headers()["docker-content-digest"], second.as_str());
    assert_eq!(fake.hits("GET", "/manifests/"), 2);
}

#[tokio::test]
async fn cached_tag_is_served_stale_on_5xx_429_and_outage_but_not_on_404() {
    let fake = Fake::start().await;
    let (digest, layer) = fake.put_image("library/alpine", "3", b"layer");
    let hoard = Hoard::start(&fake.url(), &[], short_ttl).await;
    assert_eq!(hoard.status("/v2/alpine/manifests/3").await, 200);
    assert_eq!(
        hoard.status(&format!("/v2/alpine/blobs/{layer}")).await,
        200
    );

    for fault in [
        Fault::Status(500, None),
        Fault::Status(503, None),
        Fault::Status(429, Some(1)),
    ] {
        fake.clear_faults();
        fake.fault("/manifests/", fault);
        past_ttl().await;
        let r = hoard.get("/v2/alpine/manifests/3").await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["docker-content-digest"], digest.as_str());
    }
    assert_eq!(
        hoard.metric(r#"hoard_cache_requests_total{kind="manifest",result="stale"}"#),
        3.0
    );

    fake.clear_faults();
    fake.remove_manifest("library/alpine", "3");
    // While the 429's back-off (Retry-After: 1) lasts, hoard does not ask
    // upstream and serves the cached tag; once it has passed, upstream's
    // 404 is the answer, never the stale tag.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let r = loop {
        let r = hoard.get("/v2/alpine/manifests/3").await;
        if r.status() != 200 {
            break r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "upstream was never asked again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        r.status(),
        404,
        "a tag upstream deleted is never served stale"
    );
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    // By digest, the content itself is still there.
    assert_eq!(
        hoard
            .status(&format!("/v2/alpine/manifests/{digest}"))
            .await,
        200
    );
}

#[tokio::test]
async fn cached_image_stays_pullable_when_upstream_is_gone() {
    let fake = Fake::start().await;
    let (digest, layer) = fake.put_image("library/alpine", "3", b"still here");
    let hoard = Hoard::start(&fake.url(), &[], |args| {
        short_ttl(args);
        args.connect_timeout = Some("500ms".into());
    })
    .await;
    assert_eq!(hoard.status("/v2/alpine/manifests/3").await, 200);
    assert_eq!(
        hoard.status(&format!("/v2/alpine/blobs/{layer}")).await,
        200
    );
    drop(fake);
    past_ttl().await;
    let r = hoard.get("/v2/alpine/manifests/3").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], digest.as_str());
    let r = hoard.get(&format!("/v2/alpine/blobs/{layer}")).await;
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"still here");
    let r = hoard.get("/v2/alpine/manifests/other").await;
    assert_eq!(r.status(), 502);
    assert_eq!(error_code(r).await, "UNAVAILABLE");
    let r = hoard.get("/v2/alpine/tags/list").await;
    assert_eq!(
        r.status(),
        200,
        "tags known locally are listed while upstream is down"
    );
}

#[tokio::test]
async fn blob_with_wrong_digest_is_cut_and_never_kept() {
    let fake = Fake::start().await;
    let real = vec![7u8; 300_000];
    let digest = fake.put_blob("library/x", real.clone());
    fake.fault("/blobs/", Fault::WrongBody(Bytes::from(vec![8u8; 300_000])));
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let path = format!("/v2/x/blobs/{digest}");
    let r = hoard.get(&path).await;
    assert_eq!(r.status(), 200, "headers go out before the digest is known");
    assert!(
        r.bytes().await.is_err(),
        "the client sees a cut connection, not a bad body"
    );
    assert_eq!(hoard.metric("hoard_digest_mismatches_total"), 1.0);
    assert_eq!(hoard.blob_files(), 0);
    assert_eq!(hoard.temp_files(), 0);

    fake.clear_faults();
    let body = hoard.get(&path).await.bytes().await.unwrap();
    assert_eq!(digest_of(&body), digest);
    assert_eq!(
        fake.hits("GET", "/blobs/"),
        2,
        "the bad copy was not served from cache"
    );
}

#[tokio::test]
async fn manifest_with_wrong_digest_is_refused() {
    let fake = Fake::start().await;
    let (digest, _) = fake.put_image("library/x", "1", b"x");
    fake.fault(
        "/manifests/",
        Fault::WrongBody(Bytes::from_static(b"{\"schemaVersion\":2}")),
    );
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let r = hoard.get(&format!("/v2/x/manifests/{digest}")).await;
    assert_eq!(r.status(), 502);
    assert_eq!(error_code(r).await, "UNAVAILABLE");
    assert_eq!(hoard.blob_files(), 0);
}

#[tokio::test]
async fn cut_body_leaves_nothing_and_the_next_request_refetches() {
    let fake = Fake::start().await;
    let data = vec![3u8; 1 << 20];
    let digest = fake.put_blob("library/x", data.clone());
    fake.fault("/blobs/", Fault::CutBody);
    // No resume: what a download does once its attempts are spent.
    let hoard = Hoard::start(&fake.url(), &[], |args| {
        args.resume_attempts = Some(0);
    })
    .await;
    let path = format!("/v2/x/blobs/{digest}");
    let r = hoard.get(&path).await;
    assert!(r.bytes().await.is_err());
    assert_eq!(hoard.blob_files(), 0);
    assert_eq!(hoard.temp_files(), 0);
    fake.clear_faults();
    assert_eq!(hoard.get(&path).await.bytes().await.unwrap().len(), 1 << 20);
    assert_eq!(fake.hits("GET", "/blobs/"), 2);
}

#[tokio::test]
async fn stalled_body_is_abandoned_after_the_stall_timeout() {
    let fake = Fake::start().await;
    let digest = fake.put_blob("library/x", vec![1u8; 256 * 1024]);
    fake.fault("/blobs/", Fault::Slow(Duration::from_secs(3)));
    let hoard = Hoard::start(&fake.url(), &[], |args| {
        args.stall_timeout = Some("300ms".into());
        args.resume_attempts = Some(0);
    })
    .await;
    let r = hoard.get(&format!("/v2/x/blobs/{digest}")).await;
    assert!(r.bytes().await.is_err());
    assert_eq!(hoard.blob_files(), 0);
    assert_eq!(hoard.temp_files(), 0);
}

#[tokio::test]
async fn upstream_500_on_a_cold_blob_is_a_502() {
    let fake = Fake::start().await;
    let digest = fake.put_blob("library/x", b"x".to_vec());
    fake.fault("/blobs/", Fault::Status(500, None));
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let r = hoard.get(&format!("/v2/x/blobs/{digest}")).await;
    assert_eq!(r.status(), 502);
    assert_eq!(error_code(r).await, "UNAVAILABLE");
}

#[tokio::test]
async fn content_cached_for_one_repository_needs_upstream_confirmation_for_another() {
    let fake = Fake::start().await;
    let secret = b"private layer".to_vec();
    let digest = fake.put_blob("acme/private", secret.clone());
    fake.put_blob("acme/public", secret.clone());
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    assert_eq!(
        hoard
            .status(&format!("/v2/acme/private/blobs/{digest}"))
            .await,
        200
    );

    // Upstream says this repository does not have it: refused, even by digest.
    let r = hoard.get(&format!("/v2/acme/other/blobs/{digest}")).await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
    assert_eq!(fake.hits("HEAD", "/v2/acme/other/blobs/"), 1);

    // Upstream confirms this one has it: served from cache, no second GET.
    let r = hoard.get(&format!("/v2/acme/public/blobs/{digest}")).await;
    assert_eq!(r.bytes().await.unwrap().as_ref(), secret.as_slice());
    assert_eq!(fake.hits("HEAD", "/v2/acme/public/blobs/"), 1);
    assert_eq!(fake.hits("GET", "/blobs/"), 1);
    // And linked from then on.
    hoard.get(&format!("/v2/acme/public/blobs/{digest}")).await;
    assert_eq!(fake.hits("HEAD", "/v2/acme/public/blobs/"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_mid_download_cuts_cleanly_and_promotes_nothing() {
    let fake = Fake::start().await;
    let digest = fake.put_blob("library/x", vec![5u8; 1 << 20]);
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    fake.fault("/blobs/", Fault::Gate(gate.clone()));
    let hoard = Hoard::start(&fake.url(), &[], |args| {
        args.shutdown_timeout = Some("300ms".into());
    })
    .await;
    let path = format!("/v2/x/blobs/{digest}");
    let mut r = hoard.get(&path).await;
    r.chunk().await.unwrap().unwrap();
    assert_eq!(hoard.temp_files(), 1, "the download is in progress");

    // Upstream never finishes within the grace period: the client is cut,
    // the download cancelled, its temp file deleted.
    let data = hoard.stop().await;
    let rest = loop {
        match r.chunk().await {
            Ok(Some(_)) => continue,
            end => break end,
        }
    };
    assert!(
        rest.is_err(),
        "the client sees a cut connection, not an end"
    );
    assert_eq!(count_files(&data.path().join("tmp")), 0);
    assert_eq!(count_files(&data.path().join("blobs")), 0);

    // A restart serves a fresh, complete download.
    gate.notify_one();
    fake.clear_faults();
    let hoard = Hoard::start_in(data, &fake.url(), &[], |_| {}).await;
    let body = hoard.get(&path).await.bytes().await.unwrap();
    assert_eq!(digest_of(&body), digest);
}

#[tokio::test]
async fn a_failing_upstream_opens_the_circuit_and_cached_tags_keep_serving() {
    let fake = Fake::start().await;
    let (digest, _) = fake.put_image("library/alpine", "3", b"layer");
    let hoard = Hoard::start(&fake.url(), &[], short_ttl).await;
    assert_eq!(hoard.status("/v2/alpine/manifests/3").await, 200);
    fake.fault("/manifests/", Fault::Status(500, None));
    for i in 0..5 {
        let r = hoard
            .get(&format!("/v2/alpine/manifests/missing-{i}"))
            .await;
        assert_eq!(r.status(), 502);
    }
    let sent = fake.all_hits().len();
    // Open: no request reaches upstream, the answer is immediate.
    let r = hoard.get("/v2/alpine/manifests/missing-again").await;
    assert_eq!(r.status(), 503);
    assert_eq!(error_code(r).await, "UNAVAILABLE");
    past_ttl().await;
    let r = hoard.get("/v2/alpine/manifests/3").await;
    assert_eq!(
        r.status(),
        200,
        "cached tag served stale while the circuit is open"
    );
    assert_eq!(r.headers()["docker-content-digest"], digest.as_str());
    assert_eq!(fake.all_hits().len(), sent);
    assert_eq!(
        hoard.metric(r#"hoard_upstream_circuit_open{registry="docker.io"}"#),
        1.0
    );
}

#[tokio::test]
async fn after_a_429_misses_back_off_without_asking_upstream() {
    let fake = Fake::start().await;
    fake.put_image("library/a", "1", b"a");
    fake.put_image("library/b", "1", b"b");
    fake.fault("/manifests/", Fault::Status(429, Some(30)));
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    assert_eq!(hoard.get("/v2/a/manifests/1").await.status(), 429);
    let r = hoard.get("/v2/b/manifests/1").await;
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((28..=31).contains(&retry), "{retry}");
    assert_eq!(fake.all_hits().len(), 1, "{:?}", fake.all_hits());
}

#[tokio::test]
async fn low_rate_limit_budget_stretches_the_tag_ttl() {
    let fake = Fake::start().await;
    // The fake reports ratelimit-remaining: 42.
    fake.put_image("library/alpine", "3", b"layer");
    let hoard = Hoard::start(&fake.url(), &[], |args| {
        short_ttl(args);
        args.rate_limit_floor = Some(100);
    })
    .await;
    assert_eq!(hoard.status("/v2/alpine/manifests/3").await, 200);
    past_ttl().await;
    assert_eq!(hoard.status("/v2/alpine/manifests/3").await, 200);
    assert_eq!(fake.hits("HEAD", "/manifests/"), 0, "no revalidation spent");
    assert_eq!(
        hoard.metric(r#"hoard_upstream_ratelimit_remaining{registry="docker.io"}"#),
        42.0
    );
    // A real miss still goes upstream.
    fake.put_image("library/alpine", "4", b"other");
    assert_eq!(hoard.status("/v2/alpine/manifests/4").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_downloads_per_registry_are_capped() {
    let fake = Fake::start().await;
    let first = fake.put_blob("library/x", vec![1u8; 1 << 20]);
    let second = fake.put_blob("library/x", vec![2u8; 1 << 20]);
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    fake.fault(&first, Fault::Gate(gate.clone()));
    let hoard = Hoard::start(&fake.url(), &[], |args| {
        args.max_concurrent_fetches = Some(1)
    })
    .await;
    let mut held = hoard.get(&format!("/v2/x/blobs/{first}")).await;
    held.chunk().await.unwrap().unwrap();
    let waiting = {
        let client = hoard.client.clone();
        let url = hoard.url(&format!("/v2/x/blobs/{second}"));
        tokio::spawn(async move { client.get(url).send().await.unwrap().bytes().await.unwrap() })
    };
    // Both downloads have started (the gauge counts them from before they
    // ask upstream); the second is held at the cap.
    assert!(
        crate::eventually(Duration::from_secs(10), || hoard
            .metric("hoard_inflight_fetches")
            == 2.0)
        .await,
        "the second download never started"
    );
    assert_eq!(
        fake.hits("GET", &second),
        0,
        "the second download waits for a slot"
    );
    gate.notify_one();
    while held.chunk().await.unwrap().is_some() {}
    assert_eq!(digest_of(&waiting.await.unwrap()), second);
}

#[tokio::test]
async fn a_nearly_full_disk_relays_blobs_uncached_and_still_verifies() {
    let fake = Fake::start().await;
    let data = vec![4u8; 700_000];
    let digest = fake.put_blob("library/x", data.clone());
    // No file system has this much free: every blob counts as "disk full".
    let hoard = Hoard::start(&fake.url(), &[], |args| {
        args.min_free_space = Some("1000TiB".into())
    })
    .await;
    let path = format!("/v2/x/blobs/{digest}");
    for _ in 0..2 {
        let r = hoard.get(&path).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap().as_ref(), data.as_slice());
    }
    assert_eq!(hoard.blob_files(), 0, "nothing cached");
    assert_eq!(hoard.temp_files(), 0);
    assert_eq!(hoard.metric("hoard_store_bypassed_total"), 2.0);
    let r = hoard
        .client
        .get(hoard.url(&path))
        .header("range", "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[10..20]);

    fake.fault("/blobs/", Fault::WrongBody(Bytes::from(vec![5u8; 700_000])));
    let r = hoard.get(&path).await;
    assert!(
        r.bytes().await.is_err(),
        "a corrupt relay is cut, not delivered"
    );
}
