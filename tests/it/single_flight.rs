//! One upstream fetch per object however many clients ask at once, with the
//! first bytes reaching every client while the download still runs.

use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest as _, Sha256};
use tokio::sync::Notify;

use crate::fake::{digest_of, Fake, Fault};
use crate::{eventually, noise, Hoard};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_pulls_of_a_cold_50mib_blob_make_one_upstream_get() {
    let fake = Fake::start().await;
    let data = noise(50 << 20, 1);
    let digest = fake.put_blob("library/big", data);
    // Hold the response head back so all fifty requests are in flight together.
    fake.fault("/blobs/", Fault::Delay(Duration::from_millis(300)));
    let hoard = Arc::new(Hoard::start(&fake.url(), &[], |_| {}).await);
    let path = format!("/v2/big/blobs/{digest}");
    let mut clients = Vec::new();
    for _ in 0..50 {
        let hoard = hoard.clone();
        let path = path.clone();
        clients.push(tokio::spawn(async move {
            let mut r = hoard.get(&path).await;
            assert_eq!(r.status(), 200);
            let mut hasher = Sha256::new();
            while let Some(chunk) = r.chunk().await.unwrap() {
                hasher.update(&chunk);
            }
            format!("sha256:{}", hex::encode(hasher.finalize()))
        }));
    }
    for client in clients {
        assert_eq!(client.await.unwrap(), digest);
    }
    assert_eq!(fake.hits("GET", "/blobs/"), 1, "{:?}", fake.all_hits());
    let result = |r: &str| {
        hoard.metric(&format!(
            r#"hoard_cache_requests_total{{kind="blob",result="{r}"}}"#
        ))
    };
    assert_eq!(result("miss"), 1.0);
    assert!(
        result("coalesced") >= 1.0,
        "requests joined the download in flight"
    );
    assert_eq!(result("coalesced") + result("hit"), 49.0);
    assert_eq!(hoard.metric("hoard_inflight_fetches"), 0.0);
    assert_eq!(hoard.temp_files(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_bytes_reach_every_client_before_the_download_ends() {
    let fake = Fake::start().await;
    let data = noise(4 << 20, 2);
    let digest = fake.put_blob("library/stream", data.clone());
    let gate = Arc::new(Notify::new());
    // Upstream sends the first half, then waits for the gate.
    fake.fault("/blobs/", Fault::Gate(gate.clone()));
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let path = format!("/v2/stream/blobs/{digest}");

    let mut first = hoard.get(&path).await;
    let mut second = hoard.get(&path).await;
    let mut got_first = Vec::new();
    let mut got_second = Vec::new();
    for (r, got) in [(&mut first, &mut got_first), (&mut second, &mut got_second)] {
        let chunk = tokio::time::timeout(Duration::from_secs(10), r.chunk())
            .await
            .expect("bytes arrive while upstream is still sending")
            .unwrap()
            .unwrap();
        got.extend_from_slice(&chunk);
    }
    assert_eq!(
        hoard.blob_files(),
        0,
        "nothing is committed before the download ends"
    );
    gate.notify_one();
    for (r, got) in [(&mut first, &mut got_first), (&mut second, &mut got_second)] {
        while let Some(chunk) = r.chunk().await.unwrap() {
            got.extend_from_slice(&chunk);
        }
        assert_eq!(digest_of(got), digest);
    }
    assert_eq!(fake.hits("GET", "/blobs/"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_download_finishes_when_the_client_that_started_it_leaves() {
    let fake = Fake::start().await;
    let data = noise(2 << 20, 3);
    let digest = fake.put_blob("library/leaver", data.clone());
    let gate = Arc::new(Notify::new());
    fake.fault("/blobs/", Fault::Gate(gate.clone()));
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let path = format!("/v2/leaver/blobs/{digest}");
    let mut r = hoard.get(&path).await;
    r.chunk().await.unwrap().unwrap();
    drop(r);
    gate.notify_one();
    assert!(
        eventually(Duration::from_secs(10), || hoard.blob_files() == 1).await,
        "the detached download committed the blob"
    );
    fake.clear_faults();
    let body = hoard.get(&path).await.bytes().await.unwrap();
    assert_eq!(digest_of(&body), digest);
    assert_eq!(fake.hits("GET", "/blobs/"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_manifest_requests_make_one_upstream_get() {
    let fake = Fake::start().await;
    fake.put_image("library/m", "1", b"m");
    fake.fault("/manifests/", Fault::Delay(Duration::from_millis(200)));
    let hoard = Arc::new(Hoard::start(&fake.url(), &[], |_| {}).await);
    let mut clients = Vec::new();
    for _ in 0..20 {
        let hoard = hoard.clone();
        clients.push(tokio::spawn(async move {
            hoard.get("/v2/m/manifests/1").await.status()
        }));
    }
    for c in clients {
        assert_eq!(c.await.unwrap(), 200);
    }
    assert_eq!(fake.hits("GET", "/manifests/"), 1);
}
