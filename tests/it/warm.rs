//! The `warm` list in the config: pulled at start, only the listed platforms.

use std::time::Duration;

use crate::fake::Fake;
use crate::{eventually, Hoard};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_warm_list_is_pulled_at_start_for_the_listed_platforms() {
    let fake = Fake::start().await;
    let (amd, amd_layer) = fake.put_image("library/multi", "amd", b"amd64 layer");
    let (arm, arm_layer) = fake.put_image("library/multi", "arm", b"arm64 layer");
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
        {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{amd}","size":1,"platform":{{"os":"linux","architecture":"amd64"}}}},
        {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{arm}","size":1,"platform":{{"os":"linux","architecture":"arm64"}}}}]}}"#
    );
    fake.put_manifest(
        "library/multi",
        Some("1"),
        "application/vnd.oci.image.index.v1+json",
        index.into_bytes(),
    );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hoard.toml");
    std::fs::write(
        &config,
        "[warm]\nimages = [\"multi:1\"]\nplatforms = [\"linux/arm64\"]\n",
    )
    .unwrap();
    let hoard = Hoard::start(&fake.url(), &[], |args| args.config = Some(config.clone())).await;

    assert!(
        eventually(Duration::from_secs(10), || fake.hits("GET", &arm_layer)
            == 1)
        .await,
        "{:?}",
        fake.all_hits()
    );
    assert_eq!(
        fake.hits("GET", &amd_layer),
        0,
        "other platforms are not warmed"
    );
    // Once the warmed layer is committed, the first real pull is a hit.
    let file = crate::support::blob_file(hoard.data.path(), &arm_layer);
    assert!(
        eventually(Duration::from_secs(10), || file.exists()).await,
        "the warmed layer was never committed"
    );
    let r = hoard.get(&format!("/v2/multi/blobs/{arm_layer}")).await;
    assert_eq!(r.headers()["x-hoard-cache"], "hit");
}
