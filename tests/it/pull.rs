//! The pull path against a well-behaved upstream: headers, hits, ranges,
//! routing, and requests refused before anything is written.

use crate::fake::{digest_of, Fake};
use crate::{error_code, raw_request, Hoard};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

#[tokio::test]
async fn base_endpoint_answers_api_version() {
    let fake = Fake::start().await;
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let r = hoard.get("/v2/").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );
    assert_eq!(r.text().await.unwrap(), "{}");
    assert_eq!(hoard.status("/healthz").await, 200);
}

#[tokio::test]
async fn manifest_and_blob_are_fetched_once_then_served_from_cache() {
    let fake = Fake::start().await;
    let (manifest_digest, layer) = fake.put_image("library/alpine", "3.19", b"layer bytes");
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;

    for path in [
        "/v2/alpine/manifests/3.19",
        "/v2/library/alpine/manifests/3.19",
    ] {
        let r = hoard.get(path).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], OCI_MANIFEST);
        assert_eq!(
            r.headers()["docker-content-digest"],
            manifest_digest.as_str()
        );
        assert_eq!(
            r.headers()["etag"],
            format!("\"{manifest_digest}\"").as_str()
        );
        let len: usize = r.headers()["content-length"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let body = r.bytes().await.unwrap();
        assert_eq!(body.len(), len);
        assert_eq!(digest_of(&body), manifest_digest);
    }
    let by_digest = hoard
        .get(&format!("/v2/alpine/manifests/{manifest_digest}"))
        .await;
    assert_eq!(by_digest.status(), 200);
    let head = hoard.head("/v2/alpine/manifests/3.19").await;
    assert_eq!(head.status(), 200);
    assert_eq!(
        head.headers()["docker-content-digest"],
        manifest_digest.as_str()
    );
    assert_eq!(head.headers()["content-type"], OCI_MANIFEST);
    assert!(
        head.headers()["content-length"]
            .to_str()
            .unwrap()
            .parse::<usize>()
            .unwrap()
            > 0
    );

    for _ in 0..3 {
        let r = hoard.get(&format!("/v2/alpine/blobs/{layer}")).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["docker-content-digest"], layer.as_str());
        assert_eq!(r.headers()["accept-ranges"], "bytes");
        assert_eq!(r.bytes().await.unwrap().as_ref(), b"layer bytes");
    }
    assert_eq!(fake.hits("GET", "/manifests/"), 1, "{:?}", fake.all_hits());
    assert_eq!(fake.hits("GET", "/blobs/"), 1, "{:?}", fake.all_hits());
    assert_eq!(
        hoard.metric(r#"hoard_cache_requests_total{kind="blob",result="hit"}"#),
        2.0
    );
    assert_eq!(
        hoard.metric(r#"hoard_cache_requests_total{kind="manifest",result="miss"}"#),
        1.0
    );
    assert!(hoard.metric(r#"hoard_served_bytes_total{source="cache"}"#) >= 22.0);
    assert_eq!(
        hoard.metric(r#"hoard_upstream_ratelimit_remaining{registry="docker.io"}"#),
        42.0
    );
    assert!(hoard.metric("hoard_store_bytes") > 0.0);
}

#[tokio::test]
async fn cache_survives_a_restart() {
    let fake = Fake::start().await;
    let (_, layer) = fake.put_image("library/busybox", "1", b"persisted");
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    assert_eq!(hoard.status("/v2/busybox/manifests/1").await, 200);
    // Shutdown waits for the download this request started.
    assert_eq!(
        hoard.status(&format!("/v2/busybox/blobs/{layer}")).await,
        200
    );
    let data = hoard.stop().await;
    let hoard = Hoard::start_in(data, &fake.url(), &[], |_| {}).await;
    let r = hoard.get(&format!("/v2/busybox/blobs/{layer}")).await;
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"persisted");
    assert_eq!(hoard.status("/v2/busybox/manifests/1").await, 200);
    assert_eq!(fake.hits("GET", "/blobs/"), 1);
    assert_eq!(fake.hits("GET", "/manifests/"), 1);
}

#[tokio::test]
async fn ranges_are_served_from_the_store() {
    let fake = Fake::start().await;
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let digest = fake.put_blob("library/r", data.clone());
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let path = format!("/v2/r/blobs/{digest}");
    assert_eq!(hoard.get(&path).await.bytes().await.unwrap().len(), 10_000);

    let r = hoard
        .client
        .get(hoard.url(&path))
        .header("range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 100-199/10000");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[100..200]);

    let r = hoard
        .client
        .get(hoard.url(&path))
        .header("range", "bytes=-10")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[9990..]);

    let r = hoard
        .client
        .get(hoard.url(&path))
        .header("range", "bytes=10000-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["content-range"], "bytes */10000");
    assert_eq!(error_code(r).await, "RANGE_INVALID");

    // Several ranges: one multipart answer (tests/it/ranges.rs reads it).
    let r = hoard
        .client
        .get(hoard.url(&path))
        .header("range", "bytes=0-1,5-6")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("multipart/byteranges; boundary="));

    let head = hoard.head(&path).await;
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], "10000");
    assert_eq!(fake.hits("GET", "/blobs/"), 1);
}

#[tokio::test]
async fn ns_parameter_and_host_prefix_route_to_other_registries() {
    let hub = Fake::start().await;
    let ghcr = Fake::start().await;
    let (hub_digest, _) = hub.put_image("owner/app", "1.0", b"from hub");
    let (ghcr_digest, ghcr_layer) = ghcr.put_image("owner/app", "1.0", b"from ghcr");
    let ghcr_map = format!("ghcr.io={}", ghcr.url());
    let hoard = Hoard::start(&hub.url(), &[&ghcr_map], |_| {}).await;

    let r = hoard.get("/v2/owner/app/manifests/1.0").await;
    assert_eq!(r.headers()["docker-content-digest"], hub_digest.as_str());
    let r = hoard.get("/v2/owner/app/manifests/1.0?ns=ghcr.io").await;
    assert_eq!(r.headers()["docker-content-digest"], ghcr_digest.as_str());
    let r = hoard.get("/v2/ghcr.io/owner/app/manifests/1.0").await;
    assert_eq!(r.headers()["docker-content-digest"], ghcr_digest.as_str());
    let r = hoard
        .get(&format!("/v2/ghcr.io/owner/app/blobs/{ghcr_layer}"))
        .await;
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"from ghcr");
    assert_eq!(ghcr.hits("GET", "/v2/owner/app/manifests/1.0"), 1);

    let r = hoard.get("/v2/quay.io/org/app/manifests/1.0").await;
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(r).await, "DENIED");
    let r = hoard.get("/v2/org/app/manifests/1.0?ns=quay.io").await;
    assert_eq!(error_code(r).await, "DENIED");
}

#[tokio::test]
async fn tags_are_listed_through_the_mirror() {
    let fake = Fake::start().await;
    fake.put_image("library/alpine", "3.18", b"a");
    fake.put_image("library/alpine", "3.19", b"b");
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let r = hoard.get("/v2/alpine/tags/list").await;
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    assert_eq!(body["tags"], serde_json::json!(["3.18", "3.19"]));
    hoard.get("/v2/alpine/tags/list").await;
    assert_eq!(fake.hits("GET", "/tags/list"), 1, "short-lived cache");
    let r = hoard.get("/v2/nothing/tags/list").await;
    assert_eq!(error_code(r).await, "NAME_UNKNOWN");
}

#[tokio::test]
async fn unknown_content_is_a_registry_404() {
    let fake = Fake::start().await;
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let r = hoard.get("/v2/alpine/manifests/nope").await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    let r = hoard
        .get(&format!("/v2/alpine/blobs/{}", digest_of(b"nope")))
        .await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
    let r = hoard
        .head(&format!("/v2/alpine/blobs/{}", digest_of(b"nope")))
        .await;
    assert_eq!(r.status(), 404);
    assert_eq!(hoard.blob_files(), 0);
}

#[tokio::test]
async fn malformed_requests_get_json_errors_and_write_nothing() {
    let fake = Fake::start().await;
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let cases = [
        ("GET", "/v2/Alpine/manifests/latest", 400, "NAME_INVALID"),
        (
            "GET",
            "/v2/%2e%2e/%2e%2e/etc/manifests/latest",
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2/a/../../etc/passwd/manifests/latest",
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2/a/%2F..%2F/manifests/latest",
            400,
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2/alpine/blobs/..%2f..%2fetc%2fpasswd",
            400,
            "NAME_INVALID",
        ),
        ("GET", "/v2/alpine/blobs/sha256:1234", 400, "DIGEST_INVALID"),
        ("GET", "/v2/alpine/blobs/sha512:1234", 400, "DIGEST_INVALID"),
        ("GET", "/v2/alpine/manifests/-bad", 400, "TAG_INVALID"),
        ("GET", "/v2/nothing-here", 404, "UNSUPPORTED"),
        ("POST", "/v2/alpine/blobs/uploads/", 405, "UNSUPPORTED"),
        ("PUT", "/v2/alpine/manifests/latest", 405, "UNSUPPORTED"),
        (
            "DELETE",
            &format!("/v2/alpine/blobs/{}", digest_of(b"x")),
            405,
            "UNSUPPORTED",
        ),
        ("GET", "/v2/_catalog", 405, "UNSUPPORTED"),
    ];
    for (method, path, status, code) in cases {
        let (got, body) = raw_request(hoard.addr, method, path).await;
        assert_eq!(got, status, "{method} {path}");
        let body: serde_json::Value = serde_json::from_str(&body).expect("json error body");
        assert_eq!(body["errors"][0]["code"], code, "{method} {path}");
    }
    let long = format!("/v2/{}/manifests/latest", "a".repeat(300));
    assert_eq!(error_code(hoard.get(&long).await).await, "NAME_INVALID");
    assert!(
        fake.all_hits().is_empty(),
        "nothing reached upstream: {:?}",
        fake.all_hits()
    );
    assert_eq!(hoard.blob_files(), 0);
}

#[tokio::test]
async fn every_accept_line_is_forwarded_and_partial_accept_does_not_rewrite_the_tag() {
    let fake = Fake::start().await;
    let (digest, _) = fake.put_image("library/a", "1", b"x");
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let r = hoard
        .client
        .get(hoard.url("/v2/a/manifests/1"))
        .header(
            "accept",
            "application/vnd.docker.distribution.manifest.v2+json",
        )
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], digest.as_str());
    // That client did not accept indexes, so the tag is not recorded:
    // the next complete-Accept request goes upstream.
    hoard.get("/v2/a/manifests/1").await;
    assert_eq!(fake.hits("GET", "/manifests/1"), 2);
    hoard.get("/v2/a/manifests/1").await;
    assert_eq!(fake.hits("GET", "/manifests/1"), 2);
}

#[tokio::test]
async fn metrics_endpoint_exports_the_contract() {
    let fake = Fake::start().await;
    fake.put_image("library/m", "1", b"m");
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    hoard.get("/v2/m/manifests/1").await;
    let text = hoard.get("/metrics").await.text().await.unwrap();
    for name in [
        "hoard_cache_requests_total",
        "hoard_served_bytes_total",
        "hoard_upstream_requests_total{method=\"GET\",registry=\"docker.io\",status=\"200\"}",
        "hoard_upstream_ratelimit_remaining",
        "hoard_store_bytes",
        "hoard_inflight_fetches",
    ] {
        assert!(text.contains(name), "{name} missing from\n{text}");
    }
}

#[tokio::test]
async fn unconfigured_registries_are_denied_unless_any_upstream_is_allowed() {
    let fake = Fake::start().await;
    let denied = Hoard::start(&fake.url(), &[], |_| {}).await;
    let r = denied.get("/v2/registry.example/app/manifests/1").await;
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(r).await, "DENIED");

    // Allowed: hoard contacts https://<host> itself. This one does not
    // resolve here, so the answer is an upstream failure, not a refusal.
    let open = Hoard::start(&fake.url(), &[], |args| {
        args.allow_any_upstream = Some(true);
        args.connect_timeout = Some("2s".into());
    })
    .await;
    let r = open.get("/v2/registry.invalid/app/manifests/1").await;
    assert_eq!(r.status(), 502);
    assert_eq!(error_code(r).await, "UNAVAILABLE");
    assert_eq!(
        // Counted under `other`: client-named hosts are not a series each.
        open.metric(
            r#"hoard_upstream_requests_total{method="GET",registry="other",status="error"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn oversized_request_heads_are_refused() {
    let fake = Fake::start().await;
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let r = hoard
        .client
        .get(hoard.url("/v2/"))
        .header("x-padding", "a".repeat(100 * 1024))
        .send()
        .await;
    // hyper answers 431 or closes the connection; either way nothing is served.
    if let Ok(r) = r {
        assert_eq!(r.status(), 431);
    }
    assert_eq!(hoard.status("/v2/").await, 200, "the server is still fine");
}
