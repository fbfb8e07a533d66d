//! Issue 13: replicas sharing a bucket, against `object_store`'s in-memory
//! store wrapped in `Faulty` (uploads that fail halfway, a store that goes
//! down). The real S3 server (Garage) is in tests/e2e_replicas.rs.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{
    GetOptions, GetResult, ListResult, MultipartId, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

use crate::fake::{digest_of, Fake, Fault};
use crate::{error_code, eventually, eventually_async, Hoard};

/// The in-memory store with switches: fail every request (`down`), or fail
/// multipart parts after the first `parts_ok`.
#[derive(Debug, Default)]
struct Faulty {
    inner: InMemory,
    down: AtomicBool,
    parts_ok: AtomicUsize,
    fail_parts: AtomicBool,
    parts_sent: AtomicUsize,
    aborted: AtomicUsize,
    /// Reads of tag records take this long (ms).
    slow_tags_ms: AtomicUsize,
}

impl std::fmt::Display for Faulty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Faulty")
    }
}

fn down() -> object_store::Error {
    object_store::Error::Generic {
        store: "faulty",
        source: "503 Service Unavailable (injected)".into(),
    }
}

impl Faulty {
    fn check(&self) -> object_store::Result<()> {
        if self.down.load(Ordering::SeqCst) {
            Err(down())
        } else {
            Ok(())
        }
    }

    /// Keys under `prefix` (a test's view of the bucket).
    async fn keys(&self, prefix: &str) -> Vec<String> {
        use futures_util::StreamExt;
        let prefix = Path::from(prefix);
        self.inner
            .list(Some(&prefix))
            .map(|m| m.unwrap().location.to_string())
            .collect()
            .await
    }
}

#[async_trait]
impl ObjectStore for Faulty {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.check()?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.check()?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.check()?;
        let slow = self.slow_tags_ms.load(Ordering::SeqCst);
        if slow > 0 && location.as_ref().contains("/tags/") {
            // Read now, answer late: the answer is already old when it
            // arrives, as over a slow link.
            let result = self.inner.get_opts(location, options).await;
            tokio::time::sleep(Duration::from_millis(slow as u64)).await;
            return result;
        }
        self.inner.get_opts(location, options).await
    }

    async fn delete(&self, location: &Path) -> object_store::Result<()> {
        self.check()?;
        self.inner.delete(location).await
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        if self.down.load(Ordering::SeqCst) {
            return Box::pin(futures_util::stream::once(async { Err(down()) }));
        }
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.check()?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.check()?;
        self.inner.copy(from, to).await
    }

    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.check()?;
        self.inner.copy_if_not_exists(from, to).await
    }
}

#[async_trait]
impl MultipartStore for Faulty {
    async fn create_multipart(&self, path: &Path) -> object_store::Result<MultipartId> {
        self.check()?;
        self.inner.create_multipart(path).await
    }

    async fn put_part(
        &self,
        path: &Path,
        id: &MultipartId,
        part_idx: usize,
        data: PutPayload,
    ) -> object_store::Result<PartId> {
        self.check()?;
        let sent = self.parts_sent.fetch_add(1, Ordering::SeqCst);
        if self.fail_parts.load(Ordering::SeqCst) && sent >= self.parts_ok.load(Ordering::SeqCst) {
            return Err(down());
        }
        self.inner.put_part(path, id, part_idx, data).await
    }

    async fn complete_multipart(
        &self,
        path: &Path,
        id: &MultipartId,
        parts: Vec<PartId>,
    ) -> object_store::Result<PutResult> {
        self.check()?;
        self.inner.complete_multipart(path, id, parts).await
    }

    async fn abort_multipart(&self, path: &Path, id: &MultipartId) -> object_store::Result<()> {
        self.aborted.fetch_add(1, Ordering::SeqCst);
        self.inner.abort_multipart(path, id).await
    }
}

fn bucket(objects: &Arc<Faulty>, replica: &str) -> Arc<hoard::store::Bucket> {
    Arc::new(hoard::store::Bucket::new(
        objects.clone(),
        None,
        "fleet/",
        "memory://fleet/".into(),
        replica,
    ))
}

/// Every upstream request the fake saw.
fn upstream_requests(fake: &Fake) -> usize {
    fake.all_hits().len()
}

/// A layer of `len` pseudo-random bytes (not compressible, not repeating).
fn layer(len: usize, seed: u8) -> Vec<u8> {
    // Distinct seeds give distinct streams (xorshift needs a non-zero state).
    let mut x = 0x9e37_79b9_7f4a_7c15 ^ (u64::from(seed) << 40 | u64::from(seed));
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Waits (20 s at most) until `digest` is in the bucket.
async fn reaches_bucket(objects: &Faulty, digest: &str) {
    assert!(
        eventually_async(Duration::from_secs(20), || in_bucket(objects, digest)).await,
        "{digest} never reached the bucket"
    );
}

/// `hoard` serves blob `digest` of `name` whole, and it reaches the bucket.
async fn pull_into_bucket(hoard: &Hoard, objects: &Faulty, name: &str, digest: &str) {
    let r = hoard.get(&format!("/v2/{name}/blobs/{digest}")).await;
    assert_eq!(digest_of(&r.bytes().await.unwrap()), digest);
    reaches_bucket(objects, digest).await;
}

async fn in_bucket(objects: &Faulty, digest: &str) -> bool {
    let hex = digest.trim_start_matches("sha256:");
    objects
        .keys("fleet/blobs")
        .await
        .iter()
        .any(|k| k.ends_with(hex))
}

#[tokio::test]
async fn issue_13_a_replica_with_an_empty_disk_serves_from_the_bucket_without_upstream() {
    let fake = Fake::start().await;
    // 20 MiB: three parts of a multipart upload.
    let big = layer(20 << 20, 1);
    let (manifest, layer_digest) = fake.put_image("library/app", "1.0", &big);
    let objects = Arc::new(Faulty::default());

    let first = Hoard::start_with_bucket(&fake.url(), bucket(&objects, "a")).await;
    let r = first.get("/v2/library/app/manifests/1.0").await;
    assert_eq!(r.status(), 200);
    let image: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    let config_digest = image["config"]["digest"].as_str().unwrap().to_owned();
    for digest in [&config_digest, &layer_digest] {
        pull_into_bucket(&first, &objects, "library/app", digest).await;
    }
    // One multipart upload (the layer), one single PUT (the config).
    let uploaded = || async { first.metric("hoard_bucket_uploads_total{result=\"ok\"}") == 2.0 };
    assert!(eventually_async(Duration::from_secs(20), uploaded).await);
    let before = upstream_requests(&fake);

    // Another replica, empty disk, same bucket: everything without upstream.
    let second = Hoard::start_with_bucket(&fake.url(), bucket(&objects, "b")).await;
    let r = second.get("/v2/library/app/manifests/1.0").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-content-digest"], manifest.as_str());
    let config: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    for digest in [
        config["config"]["digest"].as_str().unwrap(),
        layer_digest.as_str(),
    ] {
        let r = second.get(&format!("/v2/library/app/blobs/{digest}")).await;
        assert_eq!(r.status(), 200, "{digest}");
        assert_eq!(digest_of(&r.bytes().await.unwrap()), digest);
    }
    assert_eq!(
        upstream_requests(&fake),
        before,
        "the second replica asked upstream: {:?}",
        &fake.all_hits()[before..]
    );
    assert_eq!(
        second.metric("hoard_cache_requests_total{kind=\"blob\",result=\"hit\"}"),
        2.0
    );
    // Kept on its own disk: the next pull does not read the bucket.
    objects.down.store(true, Ordering::SeqCst);
    let r = second
        .get(&format!("/v2/library/app/blobs/{layer_digest}"))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(digest_of(&r.bytes().await.unwrap()), layer_digest);
}

#[tokio::test]
async fn issue_13_a_repository_not_vouched_for_in_the_bucket_is_asked_upstream() {
    let fake = Fake::start().await;
    let data = layer(1000, 2);
    let (_, layer_digest) = fake.put_image("library/app", "1.0", &data);
    let objects = Arc::new(Faulty::default());
    let first = Hoard::start_with_bucket(&fake.url(), bucket(&objects, "a")).await;
    pull_into_bucket(&first, &objects, "library/app", &layer_digest).await;

    // The bytes are in the bucket, but upstream never said `other/repo`
    // has them: a replica asks before serving, and refuses on its 404.
    let second = Hoard::start_with_bucket(&fake.url(), bucket(&objects, "b")).await;
    let r = second
        .get(&format!("/v2/other/repo/blobs/{layer_digest}"))
        .await;
    assert_eq!(r.status(), 404);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
    assert_eq!(
        fake.hits("HEAD", &format!("/v2/other/repo/blobs/{layer_digest}")),
        1
    );
}

#[tokio::test]
async fn issue_13_an_upload_that_fails_halfway_leaves_nothing_in_the_bucket() {
    let fake = Fake::start().await;
    let big = layer(20 << 20, 3);
    let (_, layer_digest) = fake.put_image("library/app", "1.0", &big);
    let objects = Arc::new(Faulty::default());
    objects.parts_ok.store(1, Ordering::SeqCst);
    objects.fail_parts.store(true, Ordering::SeqCst);

    let hoard = Hoard::start_with_bucket(&fake.url(), bucket(&objects, "a")).await;
    let r = hoard
        .get(&format!("/v2/library/app/blobs/{layer_digest}"))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        digest_of(&r.bytes().await.unwrap()),
        layer_digest,
        "the client is served whatever the bucket does"
    );
    let failed = || async { hoard.metric("hoard_bucket_uploads_total{result=\"error\"}") == 1.0 };
    assert!(eventually_async(Duration::from_secs(20), failed).await);
    assert!(!in_bucket(&objects, &layer_digest).await);
    assert!(
        objects.aborted.load(Ordering::SeqCst) >= 1,
        "the upload was not aborted"
    );
    assert_eq!(
        objects.keys("fleet/uploads").await,
        Vec::<String>::new(),
        "the upload's marker stayed"
    );
    // Still cached on this replica's disk.
    let r = hoard
        .get(&format!("/v2/library/app/blobs/{layer_digest}"))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        fake.hits("GET", &format!("/v2/library/app/blobs/{layer_digest}")),
        1
    );
}

#[tokio::test]
async fn issue_13_a_download_cut_upstream_is_never_completed_in_the_bucket() {
    let fake = Fake::start().await;
    let big = layer(20 << 20, 4);
    let (_, layer_digest) = fake.put_image("library/app", "1.0", &big);
    fake.fault(&format!("/blobs/{layer_digest}"), Fault::CutBody);
    let objects = Arc::new(Faulty::default());
    let hoard = Hoard::start_with_bucket(&fake.url(), bucket(&objects, "a")).await;
    let r = hoard
        .get(&format!("/v2/library/app/blobs/{layer_digest}"))
        .await;
    let _ = r.bytes().await;
    let abandoned =
        || async { hoard.metric("hoard_bucket_uploads_total{result=\"abandoned\"}") == 1.0 };
    assert!(eventually_async(Duration::from_secs(20), abandoned).await);
    assert!(!in_bucket(&objects, &layer_digest).await);
    assert_eq!(objects.keys("fleet/uploads").await, Vec::<String>::new());
}

#[tokio::test]
async fn issue_13_a_bucket_that_is_down_fails_misses_with_unavailable_and_serves_local_hits() {
    let fake = Fake::start().await;
    let (_, cached) = fake.put_image("library/app", "1.0", b"cached layer");
    let (_, missing) = fake.put_image("library/other", "1.0", b"never fetched");
    let objects = Arc::new(Faulty::default());
    let hoard = Hoard::start_with_bucket(&fake.url(), bucket(&objects, "a")).await;
    let r = hoard.get(&format!("/v2/library/app/blobs/{cached}")).await;
    assert_eq!(digest_of(&r.bytes().await.unwrap()), cached);

    objects.down.store(true, Ordering::SeqCst);
    let r = hoard
        .get(&format!("/v2/library/other/blobs/{missing}"))
        .await;
    assert_eq!(r.status(), 503);
    let body = r.text().await.unwrap();
    assert!(body.contains("UNAVAILABLE"), "{body}");
    assert!(
        !body.contains("fleet"),
        "the error names a bucket key: {body}"
    );
    assert_eq!(
        fake.hits("GET", &format!("/v2/library/other/blobs/{missing}")),
        0,
        "a bucket outage must not turn into upstream pulls"
    );
    let r = hoard.get(&format!("/v2/library/app/blobs/{cached}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(digest_of(&r.bytes().await.unwrap()), cached);

    // Back up: the miss is served (and fetched once).
    objects.down.store(false, Ordering::SeqCst);
    let r = hoard
        .get(&format!("/v2/library/other/blobs/{missing}"))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(digest_of(&r.bytes().await.unwrap()), missing);
}

/// Leftover uploads: a marker this replica left before it restarted is
/// aborted at start; another replica's recent one is left alone.
#[tokio::test]
async fn issue_13_uploads_left_by_a_crash_are_swept_at_start() {
    let objects = Arc::new(Faulty::default());
    let digest = hoard::reference::Digest::parse(&digest_of(b"x")).unwrap();
    let mine = bucket(&objects, "a");
    let theirs = bucket(&objects, "b");
    let left = mine.start_upload(&digest).await.unwrap();
    let running = theirs.start_upload(&digest).await.unwrap();
    std::mem::forget(left); // a crash: neither completed nor aborted
    let later = hoard::clock::unix_ms() + 1;
    let restarted = bucket(&objects, "a");
    let swept = restarted
        .sweep_uploads(Duration::from_secs(3600), later)
        .await
        .unwrap();
    assert_eq!(swept, 1);
    let markers = objects.keys("fleet/uploads").await;
    assert_eq!(markers.len(), 1, "{markers:?}");
    assert!(markers[0].starts_with("fleet/uploads/b/"), "{markers:?}");
    running.abort().await;
    assert_eq!(objects.keys("fleet/uploads").await, Vec::<String>::new());
}

/// The sum of one series over every replica.
fn fleet_metric(replicas: &[Hoard], series: &str) -> f64 {
    replicas.iter().map(|r| r.metric(series)).sum()
}

#[tokio::test]
async fn issue_13_thirty_clients_on_three_replicas_make_one_upstream_fetch_of_each_object() {
    let fake = Fake::start().await;
    // Two parts of a multipart upload; 300 MiB sent to clients in all.
    let big = layer(10 << 20, 5);
    let (manifest, layer_digest) = fake.put_image("library/app", "1.0", &big);
    let gate = Arc::new(tokio::sync::Notify::new());
    // Upstream sends half the layer, then holds the rest until every
    // client is waiting on the download.
    fake.fault(&format!("/blobs/{layer_digest}"), Fault::Gate(gate.clone()));
    let objects = Arc::new(Faulty::default());
    let replicas =
        Hoard::start_cluster(&fake.url(), 3, |i| bucket(&objects, &format!("r{i}"))).await;

    let mut manifests = tokio::task::JoinSet::new();
    for i in 0..30 {
        let (client, url) = (
            replicas[i % 3].client.clone(),
            replicas[i % 3].url("/v2/library/app/manifests/1.0"),
        );
        manifests.spawn(async move { client.get(url).send().await.unwrap() });
    }
    while let Some(r) = manifests.join_next().await {
        let r = r.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["docker-content-digest"], manifest.as_str());
    }
    assert_eq!(fake.hits("GET", "/v2/library/app/manifests/1.0"), 1);
    assert_eq!(fake.hits("HEAD", "/v2/library/app/manifests/"), 0);

    let mut blobs = tokio::task::JoinSet::new();
    // A generous limit: several copies of the suites at once on 2 cores
    // slow every body down.
    let patient = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap();
    for i in 0..30 {
        let (client, url) = (
            patient.clone(),
            replicas[i % 3].url(&format!("/v2/library/app/blobs/{layer_digest}")),
        );
        blobs.spawn(async move { client.get(url).send().await.unwrap().bytes().await });
    }
    // Every client has its answer's head (the lookups are counted then),
    // while upstream still holds half the layer back: 30 lookups, plus the
    // owner's lookups for the two replicas that stream from it.
    let waiting = || async {
        fleet_metric(
            &replicas,
            "hoard_cache_requests_total{kind=\"blob\",result=\"miss\"}",
        ) + fleet_metric(
            &replicas,
            "hoard_cache_requests_total{kind=\"blob\",result=\"coalesced\"}",
        ) + fleet_metric(
            &replicas,
            "hoard_cache_requests_total{kind=\"blob\",result=\"hit\"}",
        ) == 32.0
    };
    assert!(eventually_async(Duration::from_secs(20), waiting).await);
    gate.notify_one();
    while let Some(body) = blobs.join_next().await {
        let body = body.unwrap().expect("a whole body");
        assert_eq!(digest_of(&body), layer_digest);
    }
    assert_eq!(
        fake.hits("GET", &format!("/v2/library/app/blobs/{layer_digest}")),
        1,
        "{:?}",
        fake.all_hits()
    );
    // Two replicas asked the owner of the tag, two the owner of the layer.
    assert_eq!(
        fleet_metric(&replicas, "hoard_peer_requests_total{result=\"ok\"}"),
        4.0
    );
    reaches_bucket(&objects, &layer_digest).await;
}

#[tokio::test]
async fn issue_13_a_replica_that_is_gone_is_skipped_and_its_objects_fetched_by_the_next() {
    let fake = Fake::start().await;
    let objects = Arc::new(Faulty::default());
    let mut replicas =
        Hoard::start_cluster(&fake.url(), 2, |i| bucket(&objects, &format!("r{i}"))).await;
    let gone = replicas.pop().unwrap();
    let gone_url = gone.url("");
    gone.stop().await;
    let survivor = &replicas[0];
    // Some images are owned by the stopped replica: each still pulls, once.
    for i in 0..6 {
        let name = format!("library/app{i}");
        let (_, layer_digest) = fake.put_image(&name, "1.0", format!("layer {i}").as_bytes());
        let r = survivor.get(&format!("/v2/{name}/manifests/1.0")).await;
        assert_eq!(r.status(), 200, "{name}");
        let r = survivor
            .get(&format!("/v2/{name}/blobs/{layer_digest}"))
            .await;
        assert_eq!(r.status(), 200, "{name}");
        assert_eq!(digest_of(&r.bytes().await.unwrap()), layer_digest);
        assert_eq!(fake.hits("GET", &format!("/v2/{name}/blobs/")), 1);
    }
    assert!(
        survivor.metric("hoard_peer_requests_total{result=\"unreachable\"}") >= 1.0,
        "no request went to {gone_url}"
    );
}

/// A request that looked for the tag before a lookup finished, and starts
/// its own after, finds the record that lookup left instead of fetching
/// again (the bucket's read between the two widens that moment).
#[tokio::test]
async fn issue_13_a_slow_bucket_read_does_not_let_a_tag_be_fetched_twice() {
    let fake = Fake::start().await;
    fake.put_image("library/app", "1.0", b"layer");
    fake.fault("/manifests/", Fault::Delay(Duration::from_millis(50)));
    let objects = Arc::new(Faulty::default());
    objects.slow_tags_ms.store(150, Ordering::SeqCst);
    let hoard = Hoard::start_with_bucket(&fake.url(), bucket(&objects, "a")).await;
    let mut requests = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (client, url) = (
            hoard.client.clone(),
            hoard.url("/v2/library/app/manifests/1.0"),
        );
        requests.spawn(async move { client.get(url).send().await.unwrap().status() });
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    while let Some(status) = requests.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    assert_eq!(fake.hits("GET", "/v2/library/app/manifests/1.0"), 1);
}

/// An image of `layers` tagged `1` in the fake (its config names them).
fn put_layered(fake: &Fake, name: &str, layers: &[&[u8]]) {
    let digests: Vec<String> = layers
        .iter()
        .map(|l| fake.put_blob(name, l.to_vec()))
        .collect();
    let config = serde_json::json!({"architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": digests}})
    .to_string();
    let config_digest = fake.put_blob(name, config.clone().into_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": digests.iter().zip(layers).map(|(d, l)| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": l.len()})).collect::<Vec<_>>(),
    });
    fake.put_manifest(
        name,
        Some("1"),
        "application/vnd.oci.image.manifest.v1+json",
        manifest.to_string().into_bytes(),
    );
}

/// Makes `repo:tag`'s record in the bucket look confirmed `age` ago.
async fn age_tag(bucket: &hoard::store::Bucket, name: &str, tag: &str, age: Duration) {
    let repo = hoard::reference::Repository::new("docker.io", name).unwrap();
    let mut record = bucket.tag(&repo, tag).await.unwrap().expect("a tag record");
    record.checked_at_ms -= age.as_millis() as u64;
    bucket.put_tag(&repo, tag, &record).await.unwrap();
}

/// Every digest an image of the fake needs: manifest, config, layer.
async fn image_digests(hoard: &Hoard, name: &str) -> Vec<String> {
    let r = hoard.get(&format!("/v2/{name}/manifests/1")).await;
    let manifest = r.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: serde_json::Value = serde_json::from_slice(&r.bytes().await.unwrap()).unwrap();
    let mut digests = vec![
        manifest,
        body["config"]["digest"].as_str().unwrap().to_owned(),
    ];
    for layer in body["layers"].as_array().unwrap() {
        digests.push(layer["digest"].as_str().unwrap().to_owned());
    }
    for digest in &digests[1..] {
        let r = hoard.get(&format!("/v2/{name}/blobs/{digest}")).await;
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await;
    }
    digests
}

async fn gc_hoard(fake: &Fake, objects: &Arc<Faulty>, config: &str) -> (Hoard, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hoard.toml");
    std::fs::write(&file, config).unwrap();
    let hoard = Hoard::start_with_bucket_and(&fake.url(), bucket(objects, "a"), |args| {
        args.config = Some(file);
        args.admin_listen = Some("127.0.0.1:0".parse().unwrap());
        args.admin_token = Some("t".into());
    })
    .await;
    (hoard, dir)
}

async fn collect(hoard: &Hoard) {
    let url = format!("http://{}/admin/gc", hoard.admin.unwrap());
    let r = hoard
        .client
        .post(url)
        .bearer_auth("t")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

#[tokio::test]
async fn issue_13_the_bucket_gc_keeps_pinned_recent_and_shared_content_and_removes_the_rest() {
    let fake = Fake::start().await;
    // old and kept share a layer: collecting old must leave it to kept.
    let shared = layer(3000, 9);
    put_layered(&fake, "library/old", &[&shared, &layer(2000, 10)]);
    put_layered(&fake, "library/kept", &[&shared, &layer(2000, 11)]);
    fake.put_image("library/pinned", "1", &layer(2000, 12));
    let shared_layer = digest_of(&shared);
    let objects = Arc::new(Faulty::default());
    let (hoard, _dir) = gc_hoard(
        &fake,
        &objects,
        "[store]\nmax_tag_age = \"1h\"\n[store.s3]\nbucket = \"fleet\"\ngc_grace = \"0s\"\n",
    )
    .await;
    let old = image_digests(&hoard, "library/old").await;
    let kept = image_digests(&hoard, "library/kept").await;
    let pinned = image_digests(&hoard, "library/pinned").await;
    for digest in old
        .iter()
        .chain(&kept)
        .chain(&pinned)
        .chain([&shared_layer])
    {
        reaches_bucket(&objects, digest).await;
    }
    let fleet = bucket(&objects, "test");
    age_tag(&fleet, "library/old", "1", Duration::from_secs(7200)).await;
    age_tag(&fleet, "library/pinned", "1", Duration::from_secs(7200)).await;
    fleet.add_pin("docker.io/library/pinned:1").await.unwrap();

    collect(&hoard).await;
    for digest in kept.iter().chain(&pinned).chain([&shared_layer]) {
        assert!(in_bucket(&objects, digest).await, "{digest} was collected");
    }
    for digest in old.iter().filter(|d| **d != shared_layer) {
        assert!(!in_bucket(&objects, digest).await, "{digest} was kept");
    }
    let repo = |name: &str| hoard::reference::Repository::new("docker.io", name).unwrap();
    assert!(fleet
        .tag(&repo("library/old"), "1")
        .await
        .unwrap()
        .is_none());
    assert!(fleet
        .tag(&repo("library/pinned"), "1")
        .await
        .unwrap()
        .is_some());
    assert!(hoard.metric("hoard_bucket_bytes") > 0.0);
}

#[tokio::test]
async fn issue_13_over_the_bucket_s_size_limit_the_least_recently_confirmed_tags_go_first() {
    let fake = Fake::start().await;
    for (i, name) in ["library/a", "library/b", "library/c"].iter().enumerate() {
        fake.put_image(name, "1", &layer(100_000, 20 + i as u8));
    }
    let objects = Arc::new(Faulty::default());
    // Room for two of the three images.
    let (hoard, _dir) = gc_hoard(
        &fake,
        &objects,
        "[store.s3]\nbucket = \"fleet\"\ngc_grace = \"0s\"\nmax_size = 250000\n",
    )
    .await;
    let mut images = Vec::new();
    for name in ["library/a", "library/b", "library/c"] {
        images.push(image_digests(&hoard, name).await);
    }
    for digest in images.iter().flatten() {
        reaches_bucket(&objects, digest).await;
    }
    let fleet = bucket(&objects, "test");
    // b was confirmed longest ago, then a; c just now.
    age_tag(&fleet, "library/b", "1", Duration::from_secs(300)).await;
    age_tag(&fleet, "library/a", "1", Duration::from_secs(200)).await;
    collect(&hoard).await;
    for digest in &images[1] {
        assert!(!in_bucket(&objects, digest).await, "b's {digest} was kept");
    }
    for digest in images[0].iter().chain(&images[2]) {
        assert!(in_bucket(&objects, digest).await, "{digest} was collected");
    }
}

#[tokio::test]
async fn issue_13_one_replica_at_a_time_holds_the_gc_lease() {
    let objects = Arc::new(Faulty::default());
    let (a, b) = (bucket(&objects, "a"), bucket(&objects, "b"));
    assert!(a.take_lease("gc", Duration::from_secs(60)).await.unwrap());
    assert!(!b.take_lease("gc", Duration::from_secs(60)).await.unwrap());
    // The holder renews its own.
    assert!(a
        .take_lease("gc", Duration::from_millis(100))
        .await
        .unwrap());
    assert_eq!(b.lease_holder("gc").await.unwrap(), None, "expired");
    // Expired: the other may take it.
    assert!(b.take_lease("gc", Duration::from_secs(60)).await.unwrap());
    assert_eq!(a.lease_holder("gc").await.unwrap().unwrap().holder, "b");
}

/// With logins on, a replica forwards a miss to the owner with the
/// client's own credentials (the owner checks them), and the mark of a
/// replica's request grants a client nothing.
#[tokio::test]
async fn issue_13_logins_hold_between_replicas() {
    use base64::Engine as _;
    let fake = Fake::start().await;
    let (_, layer_digest) = fake.put_image("library/private", "1", &layer(5000, 30));
    let dir = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash("pw", 4).unwrap();
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, format!("runner:{hash}\n")).unwrap();
    let config = dir.path().join("hoard.toml");
    std::fs::write(&config, "[auth.access]\n\"runner\" = [\"docker.io/*\"]\n").unwrap();
    let objects = Arc::new(Faulty::default());
    let replicas = Hoard::start_cluster_with(
        &fake.url(),
        2,
        |i| bucket(&objects, &format!("r{i}")),
        |args| {
            args.config = Some(config.clone());
            args.htpasswd = Some(htpasswd.clone());
        },
    )
    .await;
    let login = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("runner:pw")
    );
    let path = format!("/v2/library/private/blobs/{layer_digest}");
    // A forged replica mark without a login: refused like any request.
    for replica in &replicas {
        let r = replica
            .client
            .get(replica.url(&path))
            .header("x-hoard-peer", "http://127.0.0.1:1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    // With the login, through both replicas at once while upstream holds
    // the layer back: the one that is not the owner forwards, with the
    // login, to the one that is (a refused login would fail it).
    let gate = Arc::new(tokio::sync::Notify::new());
    fake.fault("/blobs/", Fault::Gate(gate.clone()));
    let mut pulls = tokio::task::JoinSet::new();
    for replica in &replicas {
        let request = replica
            .client
            .get(replica.url(&path))
            .header("authorization", &login);
        pulls.spawn(async move { request.send().await.unwrap() });
    }
    let forwarded = || async {
        fleet_metric(&replicas, "hoard_peer_requests_total{result=\"ok\"}")
            + fleet_metric(&replicas, "hoard_peer_requests_total{result=\"error\"}")
            >= 1.0
    };
    assert!(eventually_async(Duration::from_secs(20), forwarded).await);
    gate.notify_waiters();
    while let Some(r) = pulls.join_next().await {
        let r = r.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(digest_of(&r.bytes().await.unwrap()), layer_digest);
    }
    assert_eq!(
        fleet_metric(&replicas, "hoard_peer_requests_total{result=\"ok\"}"),
        1.0
    );
    assert_eq!(
        fleet_metric(&replicas, "hoard_peer_requests_total{result=\"error\"}"),
        0.0
    );
    assert_eq!(fake.hits("GET", &path), 1);
}

/// A tag past its TTL is revalidated once for the fleet, not once per
/// replica: the owner asks upstream, the others take its answer.
#[tokio::test]
async fn issue_13_a_tag_is_revalidated_once_per_ttl_for_the_fleet() {
    let fake = Fake::start().await;
    let (manifest, _) = fake.put_image("library/app", "1.0", b"layer");
    let objects = Arc::new(Faulty::default());
    let replicas = Hoard::start_cluster_with(
        &fake.url(),
        3,
        |i| bucket(&objects, &format!("r{i}")),
        |args| args.tag_ttl = Some("1s".into()),
    )
    .await;
    for replica in &replicas {
        let r = replica.get("/v2/library/app/manifests/1.0").await;
        assert_eq!(r.headers()["docker-content-digest"], manifest.as_str());
    }
    assert_eq!(fake.hits("GET", "/v2/library/app/manifests/1.0"), 1);
    // Until every record is past its TTL (a clock condition, checked).
    let expired_at = std::time::Instant::now() + Duration::from_millis(1100);
    assert!(
        eventually(Duration::from_secs(5), || std::time::Instant::now()
            >= expired_at)
        .await
    );
    for replica in &replicas {
        let r = replica.get("/v2/library/app/manifests/1.0").await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["docker-content-digest"], manifest.as_str());
    }
    assert_eq!(
        fake.hits("HEAD", "/v2/library/app/manifests/1.0"),
        1,
        "{:?}",
        fake.all_hits()
    );
    assert_eq!(fake.hits("GET", "/v2/library/app/manifests/1.0"), 1);
}

#[tokio::test]
async fn issue_13_a_blob_head_on_an_empty_replica_is_answered_from_the_bucket() {
    let fake = Fake::start().await;
    let data = layer(4000, 40);
    let (_, layer_digest) = fake.put_image("library/app", "1.0", &data);
    let objects = Arc::new(Faulty::default());
    let first = Hoard::start_with_bucket(&fake.url(), bucket(&objects, "a")).await;
    let r = first
        .get(&format!("/v2/library/app/blobs/{layer_digest}"))
        .await;
    assert_eq!(digest_of(&r.bytes().await.unwrap()), layer_digest);
    // In the bucket, with upstream's word that library/app has it.
    let hex = layer_digest.trim_start_matches("sha256:").to_owned();
    let linked = || async {
        objects
            .keys("fleet/links")
            .await
            .iter()
            .any(|k| k.ends_with(&hex))
    };
    assert!(eventually_async(Duration::from_secs(20), linked).await);
    assert!(in_bucket(&objects, &layer_digest).await);
    let before = upstream_requests(&fake);
    let second = Hoard::start_with_bucket(&fake.url(), bucket(&objects, "b")).await;
    let r = second
        .head(&format!("/v2/library/app/blobs/{layer_digest}"))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"],
        data.len().to_string().as_str()
    );
    assert_eq!(upstream_requests(&fake), before, "{:?}", fake.all_hits());
}

/// A replica listed under a second name would send requests to itself and
/// wait on its own download: it answers them 508 at once, and the sender
/// skips that name.
#[tokio::test]
async fn issue_13_a_request_a_replica_sent_itself_is_answered_508() {
    let fake = Fake::start().await;
    let (_, layer_digest) = fake.put_image("library/app", "1.0", b"layer");
    let objects = Arc::new(Faulty::default());
    let replicas =
        Hoard::start_cluster(&fake.url(), 2, |i| bucket(&objects, &format!("r{i}"))).await;
    let me = replicas[0].url("");
    let r = replicas[0]
        .client
        .get(replicas[0].url(&format!("/v2/library/app/blobs/{layer_digest}")))
        .header("x-hoard-peer", me.trim_end_matches('/'))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 508);
    assert_eq!(error_code(r).await, "UNAVAILABLE");
    assert_eq!(fake.hits("GET", "/blobs/"), 0);
}

#[tokio::test]
async fn issue_13_a_layer_asked_for_as_a_manifest_is_never_read_from_the_bucket() {
    let fake = Fake::start().await;
    let data = layer(4000, 50);
    let (_, layer_digest) = fake.put_image("library/app", "1.0", &data);
    let objects = Arc::new(Faulty::default());
    let first = Hoard::start_with_bucket(&fake.url(), bucket(&objects, "a")).await;
    pull_into_bucket(&first, &objects, "library/app", &layer_digest).await;
    let second = Hoard::start_with_bucket(&fake.url(), bucket(&objects, "b")).await;
    let r = second
        .get(&format!("/v2/library/app/manifests/{layer_digest}"))
        .await;
    assert_eq!(r.status(), 404, "a layer was served as a manifest");
    assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
}

#[tokio::test]
async fn issue_13_blobs_of_no_bytes_and_of_whole_parts_reach_the_bucket_whole() {
    let fake = Fake::start().await;
    let empty = fake.put_blob("library/app", Vec::new());
    // Exactly two parts: nothing left for a last, shorter one.
    let two_parts = fake.put_blob("library/app", layer(16 << 20, 51));
    let objects = Arc::new(Faulty::default());
    let first = Hoard::start_with_bucket(&fake.url(), bucket(&objects, "a")).await;
    for digest in [&empty, &two_parts] {
        let r = first.get(&format!("/v2/library/app/blobs/{digest}")).await;
        assert_eq!(r.status(), 200);
        assert_eq!(digest_of(&r.bytes().await.unwrap()), *digest);
    }
    let uploaded = || async { first.metric("hoard_bucket_uploads_total{result=\"ok\"}") == 2.0 };
    assert!(eventually_async(Duration::from_secs(20), uploaded).await);
    let before = upstream_requests(&fake);
    let second = Hoard::start_with_bucket(&fake.url(), bucket(&objects, "b")).await;
    for digest in [&empty, &two_parts] {
        // Linked in the bucket when the upload ended: no upstream HEAD.
        let r = second.get(&format!("/v2/library/app/blobs/{digest}")).await;
        assert_eq!(r.status(), 200);
        assert_eq!(digest_of(&r.bytes().await.unwrap()), *digest);
    }
    assert_eq!(upstream_requests(&fake), before, "{:?}", fake.all_hits());
}

/// An image pulled only by digest (as Kubernetes pins them) is a root of
/// the bucket's GC like a tag, and ages like one.
#[tokio::test]
async fn issue_13_an_image_pulled_by_digest_is_kept_by_the_gc_until_it_ages() {
    let fake = Fake::start().await;
    let (manifest, layer_digest) =
        fake.put_image("library/pinned-by-digest", "1", &layer(3000, 60));
    let objects = Arc::new(Faulty::default());
    let (hoard, _dir) = gc_hoard(
        &fake,
        &objects,
        "[store]\nmax_tag_age = \"1h\"\n[store.s3]\nbucket = \"fleet\"\ngc_grace = \"0s\"\n",
    )
    .await;
    let r = hoard
        .get(&format!(
            "/v2/library/pinned-by-digest/manifests/{manifest}"
        ))
        .await;
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await;
    let r = hoard
        .get(&format!(
            "/v2/library/pinned-by-digest/blobs/{layer_digest}"
        ))
        .await;
    assert_eq!(digest_of(&r.bytes().await.unwrap()), layer_digest);
    let fleet = bucket(&objects, "test");
    let repo = hoard::reference::Repository::new("docker.io", "library/pinned-by-digest").unwrap();
    let root = format!("@{}", manifest.trim_start_matches("sha256:"));
    let recorded = || async { fleet.tag(&repo, &root).await.unwrap().is_some() };
    assert!(eventually_async(Duration::from_secs(20), recorded).await);
    for digest in [&manifest, &layer_digest] {
        reaches_bucket(&objects, digest).await;
    }
    collect(&hoard).await;
    for digest in [&manifest, &layer_digest] {
        assert!(in_bucket(&objects, digest).await, "{digest} was collected");
    }
    age_tag(
        &fleet,
        "library/pinned-by-digest",
        &root,
        Duration::from_secs(7200),
    )
    .await;
    collect(&hoard).await;
    for digest in [&manifest, &layer_digest] {
        assert!(
            !in_bucket(&objects, digest).await,
            "{digest} outlived max_tag_age"
        );
    }
}

#[tokio::test]
async fn issue_14_a_range_of_a_blob_in_the_bucket_is_read_from_the_bucket() {
    let fake = Fake::start().await;
    let big = layer(4 << 20, 9);
    let len = big.len();
    let (_, layer_digest) = fake.put_image("library/app", "1.0", &big);
    let objects = Arc::new(Faulty::default());
    let first = Hoard::start_with_bucket(&fake.url(), bucket(&objects, "a")).await;
    pull_into_bucket(&first, &objects, "library/app", &layer_digest).await;
    let before = upstream_requests(&fake);

    // A replica with an empty disk: the tail comes from the bucket, by
    // range, at once; the blob is copied to its disk in the background.
    let second = Hoard::start_with_bucket(&fake.url(), bucket(&objects, "b")).await;
    let path = format!("/v2/library/app/blobs/{layer_digest}");
    let r = second
        .client
        .get(second.url(&path))
        .header("range", "bytes=-4096")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes {}-{}/{len}", len - 4096, len - 1).as_str()
    );
    assert_eq!(r.bytes().await.unwrap().as_ref(), &big[len - 4096..]);
    assert_eq!(
        second.metric("hoard_blob_ranges_total{source=\"cache\"}"),
        1.0
    );
    assert!(eventually(Duration::from_secs(20), || second.blob_files() == 1).await);
    assert_eq!(upstream_requests(&fake), before, "upstream never asked");
    assert_eq!(fake.range_hits(&layer_digest), 0);
}
