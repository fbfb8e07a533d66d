//! Eviction by size: least recently used first, pinned images spared,
//! readers of an evicted blob finish, manifests go with their blobs.

use std::time::Duration;

use sha2::{Digest as _, Sha256};

use crate::fake::Fake;
use crate::{eventually, noise, Hoard};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lru_eviction_spares_pins_and_lets_readers_finish() {
    let fake = Fake::start().await;
    let (_, keep_layer) = fake.put_image("library/keep", "1", &noise(1 << 20, 1));
    let a_data = noise(8 << 20, 2);
    let (_, a_layer) = fake.put_image("library/a", "1", &a_data);
    let (_, c_layer) = fake.put_image("library/c", "1", &noise(8 << 20, 3));
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("hoard.toml");
    std::fs::write(
        &config,
        "[store]\nmax_size = \"12MiB\"\npins = [\"keep:1\"]\n",
    )
    .unwrap();
    let hoard = Hoard::start(&fake.url(), &[], |args| args.config = Some(config.clone())).await;
    assert_eq!(hoard.metric("hoard_store_max_bytes"), (12 << 20) as f64);

    let pull = |name: &'static str, layer: String| {
        let hoard = &hoard;
        async move {
            assert_eq!(hoard.status(&format!("/v2/{name}/manifests/1")).await, 200);
            assert_eq!(
                hoard.status(&format!("/v2/{name}/blobs/{layer}")).await,
                200
            );
        }
    };
    // `keep` is the oldest content of all, and pinned.
    pull("keep", keep_layer.clone()).await;
    pull("a", a_layer.clone()).await;

    // A client starts reading `a` and stalls.
    let mut reader = hoard.get(&format!("/v2/a/blobs/{a_layer}")).await;
    let mut hasher = Sha256::new();
    hasher.update(reader.chunk().await.unwrap().unwrap());

    // `c` pushes the store past the high-water mark: `a` is now the least
    // recently used content that is not pinned.
    pull("c", c_layer.clone()).await;
    assert!(
        eventually(Duration::from_secs(10), || hoard
            .metric("hoard_evicted_bytes_total")
            >= (8 << 20) as f64)
        .await,
        "eviction ran"
    );
    assert!(hoard.metric("hoard_store_bytes") <= (12 << 20) as f64 * 0.85);

    // The stalled reader still gets every byte.
    while let Some(chunk) = reader.chunk().await.unwrap() {
        hasher.update(chunk);
    }
    assert_eq!(
        format!("sha256:{}", hex::encode(hasher.finalize())),
        a_layer
    );

    // Pinned and recent content is still cached; `a` is fetched again, its
    // manifest and tag went with its layer.
    let gets = |path: &str| fake.hits("GET", path);
    assert_eq!(
        hoard.status(&format!("/v2/keep/blobs/{keep_layer}")).await,
        200
    );
    assert_eq!(hoard.status(&format!("/v2/c/blobs/{c_layer}")).await, 200);
    assert_eq!((gets(&keep_layer), gets(&c_layer)), (1, 1));
    assert_eq!(hoard.status("/v2/a/manifests/1").await, 200);
    assert_eq!(
        gets("/v2/library/a/manifests/1"),
        2,
        "the evicted image's tag was dropped"
    );
    assert_eq!(hoard.status(&format!("/v2/a/blobs/{a_layer}")).await, 200);
    assert_eq!(gets(&a_layer), 2);
}
