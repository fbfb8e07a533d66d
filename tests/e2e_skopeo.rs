//! End to end with real software: Debian's docker-registry (distribution
//! 2.8) as the upstream, seeded with images built here, and skopeo pulling
//! through the real hoard binary. Needs `docker-registry` and `skopeo`
//! (scripts/test.sh installs them); a missing tool fails the test.

mod support;

use std::process::Command;
use std::sync::Arc;

use support::*;

fn skopeo() -> Command {
    let mut c = Command::new(require_tool("skopeo"));
    c.arg("--insecure-policy");
    c
}

fn copy(hoard: &HoardProcess, image: &str, dest: &str, extra: &[&str]) {
    run(skopeo()
        .arg("copy")
        .arg("--src-tls-verify=false")
        .args(extra)
        .arg(format!("docker://{}/{image}", hoard.addr()))
        .arg(dest));
}

/// The digests of the blobs skopeo wrote into a `dir:` copy.
fn dir_blobs(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 64)
        .map(|n| format!("sha256:{n}"))
        .collect();
    names.sort();
    names
}

#[test]
fn skopeo_pulls_through_hoard_and_the_second_pull_is_free() {
    let upstream = Distribution::start();
    let seeded = seed(&upstream);
    let hoard = HoardProcess::start(&upstream.url(), &[]);
    let out = tempfile::tempdir().unwrap();

    let pulls: Vec<(&str, &str, Vec<&str>)> = vec![
        ("library/alpine-like:3", "dir", vec![]),
        ("alpine-like:3", "oci", vec![]),
        ("ghcr.io/owner/app:1.0", "dir", vec![]),
        ("quay.io/owner/app:1.0", "oci", vec![]),
        ("library/multi:1", "oci", vec!["--all"]),
        ("library/multi:1", "dir", vec!["--override-arch", "arm64"]),
    ];
    let pull_all = |round: usize| {
        for (i, (image, kind, extra)) in pulls.iter().enumerate() {
            let path = out.path().join(format!("{round}-{i}"));
            let dest = match *kind {
                "dir" => format!("dir:{}", path.display()),
                _ => format!("oci:{}:x", path.display()),
            };
            copy(&hoard, image, &dest, extra);
        }
    };
    pull_all(1);

    // What skopeo wrote is exactly what was pushed upstream.
    let mut want: Vec<String> = seeded
        .docker
        .layers
        .iter()
        .chain([&seeded.docker.config])
        .map(Blob::digest)
        .collect();
    want.sort();
    assert_eq!(dir_blobs(&out.path().join("1-0")), want);
    let manifest = std::fs::read(out.path().join("1-0/manifest.json")).unwrap();
    assert_eq!(digest_of(&manifest), seeded.docker.manifest.digest());
    let mut want_arm: Vec<String> = seeded
        .arm
        .layers
        .iter()
        .chain([&seeded.arm.config])
        .map(Blob::digest)
        .collect();
    want_arm.sort();
    assert_eq!(dir_blobs(&out.path().join("1-5")), want_arm);
    // skopeo converts a Docker manifest for an OCI layout; the layers are
    // the same bytes.
    for layer in &seeded.docker.layers {
        assert!(out
            .path()
            .join("1-1/blobs/sha256")
            .join(&layer.digest()[7..])
            .exists());
    }
    let all_index = std::fs::read_to_string(out.path().join("1-4/index.json")).unwrap();
    assert!(all_index.contains(&seeded.index.digest()), "{all_index}");
    assert!(out
        .path()
        .join("1-4/blobs/sha256")
        .join(&seeded.amd.config.digest()[7..])
        .exists());
    assert!(out.path().join("1-2/manifest.json").exists());
    let app = std::fs::read(out.path().join("1-2/manifest.json")).unwrap();
    assert_eq!(digest_of(&app), seeded.oci.manifest.digest());

    let blob_gets = upstream.count("GET", "/blobs/");
    let manifest_gets = upstream.count("GET", "/manifests/");
    assert!(
        blob_gets > 0 && manifest_gets > 0,
        "{:?}",
        upstream.requests()
    );

    // Second round, inside the tag TTL: no GET of any blob or manifest upstream.
    pull_all(2);
    assert_eq!(
        upstream.count("GET", "/blobs/"),
        blob_gets,
        "{:#?}",
        upstream.requests()
    );
    assert_eq!(
        upstream.count("GET", "/manifests/"),
        manifest_gets,
        "{:#?}",
        upstream.requests()
    );
    assert_eq!(dir_blobs(&out.path().join("2-0")), want);
    assert!(hoard.metric(r#"hoard_cache_requests_total{kind="blob",result="hit"}"#) > 0.0);
    assert!(hoard.metric(r#"hoard_served_bytes_total{source="cache"}"#) > 0.0);
}

#[test]
fn skopeo_inspect_lists_tags_through_hoard() {
    let upstream = Distribution::start();
    let seeded = seed(&upstream);
    let hoard = HoardProcess::start(&upstream.url(), &[]);
    for image in [
        "library/alpine-like:3",
        "ghcr.io/owner/app:1.0",
        "quay.io/owner/app:1.0",
    ] {
        let out = run(skopeo()
            .arg("inspect")
            .arg("--tls-verify=false")
            .arg(format!("docker://{}/{image}", hoard.addr())));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert!(
            v["RepoTags"].as_array().is_some_and(|t| !t.is_empty()),
            "{out}"
        );
        let digest = v["Digest"].as_str().unwrap();
        assert!(
            digest == seeded.docker.manifest.digest() || digest == seeded.oci.manifest.digest(),
            "{out}"
        );
    }
    assert!(
        upstream.count("GET", "/tags/list") >= 3,
        "{:?}",
        upstream.requests()
    );
}

#[test]
fn fifty_concurrent_pulls_of_a_cold_50mib_blob_make_one_upstream_get() {
    let upstream = Distribution::start();
    let big = Blob {
        media_type: OCI_LAYER.into(),
        data: noise(50 << 20, 50),
    };
    let digest = big.digest();
    Pusher::new(&upstream.url()).blob("library/big", &big);
    drop(big);
    let hoard = HoardProcess::start(&upstream.url(), &[]);
    let url = Arc::new(format!(
        "http://{}/v2/library/big/blobs/{digest}",
        hoard.addr()
    ));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let digests: Vec<String> = runtime.block_on(async {
        let client = reqwest::Client::new();
        let clients: Vec<_> = (0..50)
            .map(|_| {
                let (client, url) = (client.clone(), url.clone());
                tokio::spawn(async move {
                    let mut r = client.get(url.as_str()).send().await.unwrap();
                    assert_eq!(r.status(), 200);
                    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
                    while let Some(chunk) = r.chunk().await.unwrap() {
                        sha2::Digest::update(&mut hasher, &chunk);
                    }
                    format!("sha256:{}", hex::encode(sha2::Digest::finalize(hasher)))
                })
            })
            .collect();
        let mut out = Vec::new();
        for c in clients {
            out.push(c.await.unwrap());
        }
        out
    });
    assert!(digests.iter().all(|d| *d == digest));
    assert_eq!(
        upstream.count("GET", &digest),
        1,
        "{:#?}",
        upstream.requests()
    );
    assert_eq!(hoard.metric("hoard_inflight_fetches"), 0.0);
}
