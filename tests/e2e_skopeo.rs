//! End to end with real software: Debian's docker-registry (distribution
//! 2.8) as the upstream, seeded with images built here, and skopeo pulling
//! through the real hoard binary. Needs `docker-registry` and `skopeo`
//! (scripts/test.sh installs them); a missing tool fails the test. Also the
//! referrers fallback (issue 14): distribution 2.8 lacks the referrers API,
//! so signatures live under `sha256-<hex>` tags, copied through hoard.

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

/// Issue 14: against a registry without the referrers API (distribution
/// 2.8), hoard's referrers route answers upstream's 404, which sends
/// clients to the referrers tag schema; the `sha256-<hex>` tag and the
/// signature it lists copy through hoard like any image.
#[test]
fn issue_14_without_the_referrers_api_the_fallback_tag_copies_through_hoard() {
    let upstream = Distribution::start();
    let push = Pusher::new(&upstream.url());
    let app = image(Format::Oci, "amd64", &[busybox_layer()]);
    push.image("library/signed", Some("1"), &app);
    let subject = app.manifest.digest();

    // A cosign-style signature: an image manifest whose `subject` is the
    // image (distribution 2.8 stores the field without reading it).
    let payload = Blob {
        media_type: "application/vnd.dev.cosign.simplesigning.v1+json".into(),
        data: br#"{"critical":{"image":{"docker-manifest-digest":"x"}}}"#.to_vec(),
    };
    let config = Blob {
        media_type: OCI_CONFIG.into(),
        data: b"{}".to_vec(),
    };
    let descriptor = |blob: &Blob| serde_json::json!({"mediaType": blob.media_type, "digest": blob.digest(), "size": blob.data.len()});
    let signature = Blob {
        media_type: OCI_MANIFEST.into(),
        data: serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json",
            "config": descriptor(&config),
            "layers": [descriptor(&payload)],
            "subject": descriptor(&app.manifest),
        }))
        .unwrap(),
    };
    for blob in [&payload, &config] {
        push.blob("library/signed", blob);
    }
    push.manifest("library/signed", &signature.digest(), &signature);
    // The referrers tag schema: an index of the referrers under
    // `sha256-<hex of the subject>`, as a client without the API pushes it.
    let mut listed = descriptor(&signature);
    listed["artifactType"] = "application/vnd.dev.cosign.artifact.sig.v1+json".into();
    let fallback = Blob {
        media_type: OCI_INDEX.into(),
        data: serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [listed],
        }))
        .unwrap(),
    };
    let tag = format!("sha256-{}", &subject["sha256:".len()..]);
    push.manifest("library/signed", &tag, &fallback);

    let hoard = HoardProcess::start(&upstream.url(), &[]);
    let status = reqwest::blocking::get(format!(
        "http://{}/v2/library/signed/referrers/{subject}",
        hoard.addr()
    ))
    .unwrap()
    .status();
    assert_eq!(status, 404, "a registry without the API stays without it");
    assert_eq!(
        upstream.count("GET", "/referrers/"),
        1,
        "{:#?}",
        upstream.requests()
    );
    assert_eq!(
        hoard.metric(r#"hoard_referrers_requests_total{result="not_found"}"#),
        1.0
    );

    let out = tempfile::tempdir().unwrap();
    let layout = out.path().join("sigs");
    copy(
        &hoard,
        &format!("library/signed:{tag}"),
        &format!("oci:{}:sigs", layout.display()),
        &["--all"],
    );
    // skopeo writes the index again in its own form (its image-spec
    // predates `artifactType`), so the check is what it lists.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let top = index["manifests"][0]["digest"].as_str().unwrap();
    let top = std::fs::read_to_string(layout.join("blobs/sha256").join(&top[7..])).unwrap();
    assert!(top.contains(&signature.digest()), "{top}");
    for digest in [signature.digest(), payload.digest()] {
        let copied = std::fs::read(layout.join("blobs/sha256").join(&digest[7..])).unwrap();
        assert_eq!(digest_of(&copied), digest);
    }
    assert_eq!(upstream.count("GET", &format!("/manifests/{tag}")), 1);
    // hoard served the tag's own bytes (inside the TTL: from its cache).
    let served = reqwest::blocking::Client::new()
        .get(format!(
            "http://{}/v2/library/signed/manifests/{tag}",
            hoard.addr()
        ))
        .header("accept", OCI_INDEX)
        .send()
        .unwrap();
    assert_eq!(served.headers()["x-hoard-cache"], "hit");
    assert_eq!(digest_of(&served.bytes().unwrap()), fallback.digest());
}
