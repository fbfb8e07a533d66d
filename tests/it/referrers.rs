//! The OCI 1.1 referrers API through hoard (issue 14): lists cached like a
//! tag (hit, TTL revalidation, stale on outages and 429), the
//! `artifactType` filter applied upstream or here, an upstream 404 kept a
//! 404 (clients then read the `sha256-<hex>` fallback tag, an ordinary
//! tag), grammar errors, access rules, single-flight, Link pages, and a
//! real client (oras-project's rust-oci-client) reading the graph.

use std::time::Duration;

use crate::fake::{digest_of, Fake, Fault, OCI_INDEX, OCI_MANIFEST};
use crate::{error_code, Hoard};

const SIG: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
const SBOM: &str = "application/spdx+json";

fn short_ttl(args: &mut hoard::config::ServeArgs) {
    args.tag_ttl = Some("100ms".into());
}

async fn past_ttl() {
    tokio::time::sleep(Duration::from_millis(150)).await;
}

/// An image with a signature and an SBOM attached upstream. Returns the
/// image's digest and the two referrers' (manifest, payload) digests.
fn signed_image(fake: &Fake) -> (String, (String, String), (String, String)) {
    let (image, _) = fake.put_image("library/alpine", "3", b"layer");
    let sig = fake.put_referrer("library/alpine", &image, SIG, b"signature");
    let sbom = fake.put_referrer("library/alpine", &image, SBOM, b"{\"spdx\":1}");
    (image, sig, sbom)
}

/// The descriptors' digests and artifact types of a referrers answer.
async fn listed(response: reqwest::Response) -> Vec<(String, String)> {
    let index: serde_json::Value = response.json().await.unwrap();
    assert_eq!(index["mediaType"], OCI_INDEX);
    let mut out: Vec<(String, String)> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["digest"].as_str().unwrap().to_owned(),
                d["artifactType"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

fn sorted(mut v: Vec<(String, String)>) -> Vec<(String, String)> {
    v.sort();
    v
}

fn cache(r: &reqwest::Response) -> String {
    r.headers()["x-hoard-cache"].to_str().unwrap().to_owned()
}

fn metric(hoard: &Hoard, result: &str) -> f64 {
    hoard.metric(&format!(
        r#"hoard_referrers_requests_total{{result="{result}"}}"#
    ))
}

#[tokio::test]
async fn issue_14_referrers_are_proxied_then_served_from_the_cache() {
    let fake = Fake::start().await;
    let (image, (sig, _), (sbom, _)) = signed_image(&fake);
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let path = format!("/v2/alpine/referrers/{image}");

    let r = hoard.get(&path).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], OCI_INDEX);
    assert_eq!(cache(&r), "miss");
    assert!(r.headers().get("oci-filters-applied").is_none());
    let body: serde_json::Value = r.json().await.unwrap();
    let annotated = body["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d["annotations"]["org.example.kind"] == d["artifactType"]);
    assert!(annotated, "descriptors keep their annotations: {body}");

    let r = hoard.get(&path).await;
    assert_eq!(cache(&r), "hit");
    assert_eq!(
        listed(r).await,
        sorted(vec![(sig, SIG.into()), (sbom, SBOM.into())])
    );
    assert_eq!(fake.hits("GET", "/referrers/"), 1, "the second is a hit");
    let head = hoard.head(&path).await;
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-type"], OCI_INDEX);
    let len: usize = head.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(len > 0);
    assert!(head.bytes().await.unwrap().is_empty());
    assert_eq!((metric(&hoard, "miss"), metric(&hoard, "hit")), (1.0, 2.0));

    // A subject upstream knows nothing of: the API's answer is an empty
    // index, served (and cached) as such.
    let unknown = digest_of(b"no such manifest");
    let r = hoard.get(&format!("/v2/alpine/referrers/{unknown}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(listed(r).await, vec![]);
}

#[tokio::test]
async fn issue_14_a_list_past_its_ttl_is_asked_again_and_picks_up_new_referrers() {
    let fake = Fake::start().await;
    let (image, (sig, _), (sbom, _)) = signed_image(&fake);
    let hoard = Hoard::start(&fake.url(), &[], short_ttl).await;
    let path = format!("/v2/alpine/referrers/{image}");
    assert_eq!(cache(&hoard.get(&path).await), "miss");

    past_ttl().await;
    let r = hoard.get(&path).await;
    assert_eq!(cache(&r), "revalidated");
    assert_eq!(listed(r).await.len(), 2);
    assert_eq!(fake.hits("GET", "/referrers/"), 2);

    let (attestation, _) = fake.put_referrer(
        "library/alpine",
        &image,
        "application/vnd.in-toto+json",
        b"att",
    );
    past_ttl().await;
    let r = hoard.get(&path).await;
    assert_eq!(cache(&r), "miss", "the list moved");
    assert_eq!(
        listed(r).await,
        sorted(vec![
            (sig, SIG.into()),
            (sbom, SBOM.into()),
            (attestation, "application/vnd.in-toto+json".into())
        ])
    );
    assert_eq!(metric(&hoard, "revalidated"), 1.0);
}

#[tokio::test]
async fn issue_14_a_cached_list_is_served_stale_on_5xx_429_and_outage() {
    let fake = Fake::start().await;
    let (image, _, _) = signed_image(&fake);
    let hoard = Hoard::start(&fake.url(), &[], |args| {
        short_ttl(args);
        args.connect_timeout = Some("500ms".into());
    })
    .await;
    let path = format!("/v2/alpine/referrers/{image}");
    let first = listed(hoard.get(&path).await).await;

    // Nothing cached for this subject: an outage is an error, not an
    // empty list.
    let other = digest_of(b"other");
    fake.fault("/referrers/", Fault::Status(500, None));
    let r = hoard.get(&format!("/v2/alpine/referrers/{other}")).await;
    assert_eq!(r.status(), 502);
    assert_eq!(error_code(r).await, "UNAVAILABLE");

    for fault in [Fault::Status(503, None), Fault::Status(429, Some(1))] {
        fake.clear_faults();
        fake.fault("/referrers/", fault);
        past_ttl().await;
        let r = hoard.get(&path).await;
        assert_eq!(r.status(), 200);
        assert_eq!(cache(&r), "stale");
        assert_eq!(listed(r).await, first);
    }
    drop(fake);
    past_ttl().await;
    let r = hoard.get(&path).await;
    assert_eq!((r.status().as_u16(), cache(&r)), (200, "stale".into()));
    assert_eq!(listed(r).await, first);
    assert_eq!(metric(&hoard, "stale"), 3.0);
    assert_eq!(metric(&hoard, "error"), 1.0);
}

#[tokio::test]
async fn issue_14_an_upstream_404_stays_a_404_and_is_never_cached_or_served_stale() {
    let fake = Fake::start().await;
    let (image, _, _) = signed_image(&fake);
    let hoard = Hoard::start(&fake.url(), &[], short_ttl).await;
    let path = format!("/v2/alpine/referrers/{image}");
    assert_eq!(hoard.status(&path).await, 200);

    // The registry loses the API (or never had it): once the list is past
    // its TTL the client must see the 404, to fall back to the tag schema.
    fake.referrers_api(false);
    past_ttl().await;
    let r = hoard.get(&path).await;
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(error_code(r).await, "UNSUPPORTED");
    // Not cached as anything: every request asks upstream again.
    assert_eq!(hoard.status(&path).await, 404);
    assert_eq!(fake.hits("GET", "/referrers/"), 3);
    assert_eq!(metric(&hoard, "not_found"), 2.0);

    fake.referrers_api(true);
    let r = hoard.get(&path).await;
    assert_eq!((r.status().as_u16(), cache(&r)), (200, "miss".into()));
}

#[tokio::test]
async fn issue_14_one_cached_list_answers_every_artifact_type_filter() {
    let fake = Fake::start().await;
    let (image, (sig, _), _) = signed_image(&fake);
    // Even an upstream that filters is asked for the whole list: hoard
    // keeps one list per subject and filters it for each client.
    fake.referrers_filter(true);
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let path = format!("/v2/alpine/referrers/{image}");

    let r = hoard.get(&format!("{path}?artifactType={SIG}")).await;
    assert_eq!(r.headers()["oci-filters-applied"], "artifactType");
    assert_eq!(cache(&r), "miss");
    assert_eq!(listed(r).await, vec![(sig.clone(), SIG.to_owned())]);
    let asked = fake.all_hits();
    assert!(
        !asked.iter().any(|l| l.contains("artifactType=")),
        "{asked:?}"
    );

    // An encoded filter from the client, from the same cached list.
    let encoded = SBOM.replace('/', "%2F").replace('+', "%2B");
    let sbom_list = hoard.get(&format!("{path}?artifactType={encoded}")).await;
    assert_eq!(sbom_list.headers()["oci-filters-applied"], "artifactType");
    assert_eq!(cache(&sbom_list), "hit");
    let sbom_list = listed(sbom_list).await;
    assert_eq!(sbom_list.len(), 1);
    assert_eq!(sbom_list[0].1, SBOM);

    // Unfiltered: no header, both; a filter nobody has: empty, filtered.
    let r = hoard.get(&path).await;
    assert!(r.headers().get("oci-filters-applied").is_none());
    assert_eq!(listed(r).await.len(), 2);
    let r = hoard
        .get(&format!("{path}?artifactType=application/x-none"))
        .await;
    assert_eq!(
        (
            cache(&r),
            r.headers()["oci-filters-applied"].to_str().unwrap()
        ),
        ("hit".into(), "artifactType")
    );
    assert!(listed(r).await.is_empty());
    assert_eq!(fake.hits("GET", "/referrers/"), 1);
}

#[tokio::test]
async fn issue_14_a_sha256_fallback_tag_is_revalidated_like_any_tag() {
    let fake = Fake::start().await;
    let (image, (sig, _), _) = signed_image(&fake);
    let fallback = format!("sha256-{}", image.trim_start_matches("sha256:"));
    fake.put_manifest(
        "library/alpine",
        Some(&fallback),
        OCI_INDEX,
        fake.referrers_index("library/alpine", &image),
    );
    let hoard = Hoard::start(&fake.url(), &[], short_ttl).await;
    let path = format!("/v2/alpine/manifests/{fallback}");
    let r = hoard.get(&path).await;
    assert_eq!(r.status(), 200);
    let first = r.headers()["docker-content-digest"].clone();
    assert_eq!(listed(r).await.len(), 2);

    past_ttl().await;
    let r = hoard.get(&path).await;
    assert_eq!(cache(&r), "revalidated");
    assert_eq!(fake.hits("HEAD", &format!("/manifests/{fallback}")), 1);

    // A client attached another signature and pushed the tag again.
    fake.put_referrer("library/alpine", &image, SIG, b"second signature");
    fake.put_manifest(
        "library/alpine",
        Some(&fallback),
        OCI_INDEX,
        fake.referrers_index("library/alpine", &image),
    );
    past_ttl().await;
    let r = hoard.get(&path).await;
    assert_ne!(r.headers()["docker-content-digest"], first);
    let now = listed(r).await;
    assert_eq!(now.len(), 3);
    assert!(now.contains(&(sig, SIG.to_owned())));
}

#[tokio::test]
async fn issue_14_bad_digests_and_filters_are_400s_and_write_nothing() {
    let fake = Fake::start().await;
    let (image, _, _) = signed_image(&fake);
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    for (path, code) in [
        (
            "/v2/alpine/referrers/sha256:abc".to_owned(),
            "DIGEST_INVALID",
        ),
        ("/v2/alpine/referrers/latest".to_owned(), "DIGEST_INVALID"),
        ("/v2/alpine/referrers/md5:abc".to_owned(), "DIGEST_INVALID"),
        ("/v2/alpine/referrers/".to_owned(), "DIGEST_INVALID"),
        (
            format!("/v2/alpine/referrers/{image}?artifactType=junk"),
            "UNSUPPORTED",
        ),
        (
            format!("/v2/alpine/referrers/{image}?artifactType=a/b%0d%0ax:y"),
            "UNSUPPORTED",
        ),
        (format!("/v2/Alpine/referrers/{image}"), "NAME_INVALID"),
    ] {
        let r = hoard.get(&path).await;
        assert_eq!(r.status(), 400, "{path}");
        assert_eq!(error_code(r).await, code, "{path}");
    }
    assert_eq!(fake.all_hits(), Vec::<String>::new());
    assert_eq!(hoard.blob_files(), 0);
    // Read-only, like every route.
    let r = hoard
        .client
        .delete(hoard.url(&format!("/v2/alpine/referrers/{image}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
}

#[tokio::test]
async fn issue_14_referrer_manifests_and_their_blobs_pull_through() {
    let fake = Fake::start().await;
    let (image, (sig, payload), _) = signed_image(&fake);
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let listed = listed(hoard.get(&format!("/v2/alpine/referrers/{image}")).await).await;
    assert!(listed.contains(&(sig.clone(), SIG.to_owned())));
    for _ in 0..2 {
        let r = hoard
            .client
            .get(hoard.url(&format!("/v2/alpine/manifests/{sig}")))
            .header("accept", OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["docker-content-digest"], sig.as_str());
        let manifest: serde_json::Value = r.json().await.unwrap();
        assert_eq!(manifest["subject"]["digest"], image.as_str());
        let r = hoard.get(&format!("/v2/alpine/blobs/{payload}")).await;
        assert_eq!(r.bytes().await.unwrap().as_ref(), b"signature");
    }
    assert_eq!(fake.hits("GET", &format!("/manifests/{sig}")), 1);
    assert_eq!(fake.hits("GET", &format!("/blobs/{payload}")), 1);
}

#[tokio::test]
async fn issue_14_the_referrers_route_needs_pull_rights_on_the_repository() {
    let fake = Fake::start().await;
    let (image, _) = fake.put_image("acme/app", "1", b"private");
    fake.put_referrer("acme/app", &image, SIG, b"sig");
    let dir = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash("pw", 4).unwrap();
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, format!("runner:{hash}\nguest:{hash}\n")).unwrap();
    let config = dir.path().join("hoard.toml");
    std::fs::write(
        &config,
        r#"
[auth]
realm = "office mirror"
[auth.access]
"runner" = ["ghcr.io/acme/*"]
"guest" = ["docker.io/library/*"]
"anonymous" = ["docker.io/library/*"]
"#,
    )
    .unwrap();
    let ghcr = format!("ghcr.io={}", fake.url());
    let hoard = Hoard::start(&fake.url(), &[&ghcr], |args| {
        args.config = Some(config);
        args.htpasswd = Some(htpasswd);
    })
    .await;
    let path = format!("/v2/acme/app/referrers/{image}?ns=ghcr.io");
    let get = |user: Option<&str>| {
        let mut request = hoard.client.get(hoard.url(&path));
        if let Some(user) = user {
            request = request.basic_auth(user, Some("pw"));
        }
        request.send()
    };
    let r = get(None).await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    assert_eq!(get(Some("guest")).await.unwrap().status(), 403);
    assert_eq!(fake.hits("GET", "/referrers/"), 0);
    let r = get(Some("runner")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(listed(r).await.len(), 1);
}

#[tokio::test]
async fn issue_14_concurrent_requests_for_one_list_make_one_upstream_get() {
    let fake = Fake::start().await;
    let (image, _, _) = signed_image(&fake);
    // Long enough that every client asks while the first GET is upstream.
    fake.fault("/referrers/", Fault::Delay(Duration::from_millis(500)));
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let url = hoard.url(&format!("/v2/alpine/referrers/{image}"));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (client, url) = (hoard.client.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let r = client.get(url).send().await.unwrap();
            (r.status().as_u16(), r.bytes().await.unwrap())
        }));
    }
    let mut bodies = Vec::new();
    for task in tasks {
        let (status, body) = task.await.unwrap();
        assert_eq!(status, 200);
        bodies.push(body);
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(fake.hits("GET", "/referrers/"), 1);
    let (miss, hit, coalesced) = (
        metric(&hoard, "miss"),
        metric(&hoard, "hit"),
        metric(&hoard, "coalesced"),
    );
    assert_eq!((miss, hit + coalesced), (1.0, 19.0));
}

#[tokio::test]
async fn issue_14_link_pages_are_followed_and_served_as_one_list() {
    let fake = Fake::start().await;
    let (image, _, _) = signed_image(&fake);
    fake.put_referrer("library/alpine", &image, SIG, b"another");
    fake.referrers_page_size(1);
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let r = hoard.get(&format!("/v2/alpine/referrers/{image}")).await;
    assert!(
        r.headers().get("link").is_none(),
        "hoard sends the whole list"
    );
    assert_eq!(listed(r).await.len(), 3);
    assert_eq!(fake.hits("GET", "/referrers/"), 3);
}

/// A real client nobody here wrote: oras-project's rust-oci-client reads
/// the graph through hoard (referrers, filtered referrers), then pulls a
/// signature's manifest and payload through it.
#[tokio::test]
async fn issue_14_oci_client_reads_the_referrers_graph_through_hoard() {
    use oci_client::client::{ClientConfig, ClientProtocol};
    use oci_client::manifest::OciManifest;
    use oci_client::secrets::RegistryAuth;
    use oci_client::{Client, Reference};

    let fake = Fake::start().await;
    let (image, (sig, _), (sbom, _)) = signed_image(&fake);
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    });
    let subject: Reference = format!("{}/library/alpine@{image}", hoard.addr)
        .parse()
        .unwrap();

    let all = client.pull_referrers(&subject, None).await.unwrap();
    let mut digests: Vec<&str> = all.manifests.iter().map(|d| d.digest.as_str()).collect();
    digests.sort();
    let mut want = vec![sig.as_str(), sbom.as_str()];
    want.sort();
    assert_eq!(digests, want);
    assert!(all.manifests.iter().all(|d| d.media_type == OCI_MANIFEST
        && d.annotations
            .as_ref()
            .is_some_and(|a| a.contains_key("org.example.kind"))));

    let sigs = client.pull_referrers(&subject, Some(SIG)).await.unwrap();
    assert_eq!(sigs.manifests.len(), 1);
    assert_eq!(sigs.manifests[0].digest, sig);

    let signature: Reference = format!("{}/library/alpine@{sig}", hoard.addr)
        .parse()
        .unwrap();
    let (manifest, digest) = client
        .pull_manifest(&signature, &RegistryAuth::Anonymous)
        .await
        .unwrap();
    assert_eq!(digest, sig);
    let OciManifest::Image(manifest) = manifest else {
        panic!("a signature is an image manifest");
    };
    assert_eq!(manifest.subject.as_ref().unwrap().digest, image);
    assert_eq!(manifest.artifact_type.as_deref(), Some(SIG));
    let mut payload = Vec::new();
    client
        .pull_blob(&signature, &manifest.layers[0], &mut payload)
        .await
        .unwrap();
    assert_eq!(payload, b"signature");
    // One list fetched; the filtered read came from it.
    assert_eq!(metric(&hoard, "miss"), 1.0);
    assert_eq!(metric(&hoard, "hit"), 1.0);
}
