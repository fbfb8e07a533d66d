//! Issue 13 end to end: three real hoard replicas sharing a real S3 server
//! (Garage), behind a real nginx balancing round-robin, in front of real
//! distribution; skopeo pulling through the balancer. One upstream fetch
//! per object for the whole fleet, a replica with an empty disk that needs
//! no upstream at all, and what happens when the upstream, a replica or the
//! object store fails.

#[path = "it/fake.rs"]
#[allow(dead_code)]
mod fake;
mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::fleet::{bound, replica, Garage, Nginx};
use support::*;

/// A raw 64 MiB layer (incompressible), its config and manifest.
fn big_image(push: &Pusher, name: &str, tag: &str, len: usize) -> (Blob, Blob) {
    let layer = Blob {
        media_type: OCI_LAYER.into(),
        data: noise(len, 13),
    };
    let config = Blob {
        media_type: OCI_CONFIG.into(),
        data: br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
            .to_vec(),
    };
    let manifest = Blob {
        media_type: OCI_MANIFEST.into(),
        data: serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config.digest(), "size": config.data.len()},
            "layers": [{"mediaType": OCI_LAYER, "digest": layer.digest(), "size": layer.data.len()}],
        }))
        .unwrap(),
    };
    push.blob(name, &layer);
    push.blob(name, &config);
    push.manifest(name, tag, &manifest);
    (manifest, layer)
}

/// Three replicas on sockets bound here, each listing all three.
struct Fleet {
    replicas: Vec<Option<HoardProcess>>,
    urls: Vec<String>,
    nginx: Nginx,
}

fn fleet(garage: &Garage, upstream: &str, extra: &[&str]) -> Fleet {
    let sockets: Vec<_> = (0..3).map(|_| bound()).collect();
    let urls: Vec<String> = sockets
        .iter()
        .map(|s| format!("http://{}", s.local_addr().unwrap()))
        .collect();
    let replicas = sockets
        .iter()
        .zip(&urls)
        .map(|(socket, me)| {
            let mut args = garage.hoard_args_to(upstream);
            for peer in &urls {
                args.extend(["--peer".into(), peer.clone()]);
            }
            args.extend(["--advertise".into(), me.clone()]);
            args.extend(extra.iter().map(|a| a.to_string()));
            Some(replica(
                tempfile::tempdir().unwrap(),
                socket,
                &args,
                &garage.hoard_env(),
            ))
        })
        .collect();
    let nginx = Nginx::start(&bound(), &urls);
    Fleet {
        replicas,
        urls,
        nginx,
    }
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

fn get(url: &str) -> (u16, Vec<u8>) {
    let r = client().get(url).send().unwrap();
    let status = r.status().as_u16();
    (status, r.bytes().unwrap().to_vec())
}

/// Every replica's log, for a failure message.
fn logs(fleet: &Fleet) -> String {
    fleet
        .replicas
        .iter()
        .flatten()
        .map(|r| r.daemon.log_text())
        .collect::<Vec<_>>()
        .join("\n---\n")
}

/// The sum of one series over every live replica.
fn fleet_metric(fleet: &Fleet, series: &str) -> f64 {
    fleet
        .replicas
        .iter()
        .flatten()
        .map(|r| r.metric(series))
        .sum()
}

/// Keys in the bucket under `prefix` (listed with the fleet's own key).
fn bucket_keys(garage: &Garage, prefix: &str) -> Vec<String> {
    use futures_util::StreamExt as _;
    use object_store::ObjectStore as _;
    let s3 = object_store::aws::AmazonS3Builder::new()
        .with_endpoint(&garage.endpoint)
        .with_bucket_name(&garage.bucket)
        .with_region("garage")
        .with_access_key_id(&garage.key_id)
        .with_secret_access_key(&garage.secret)
        .with_allow_http(true)
        .build()
        .unwrap();
    let prefix = object_store::path::Path::from(prefix);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        s3.list(Some(&prefix))
            .map(|m| m.unwrap().location.to_string())
            .collect()
            .await
    })
}

fn in_bucket(garage: &Garage, digest: &str) -> bool {
    let hex = digest.trim_start_matches("sha256:");
    bucket_keys(garage, "blobs/sha256")
        .iter()
        .any(|k| k.ends_with(hex))
}

fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_fleet_fetches_each_object_once_and_serves_it_from_the_bucket_whatever_fails() {
    let garage = Garage::start();
    let upstream = Distribution::start();
    let seeded = seed(&upstream);
    let push = Pusher::new(&upstream.url());
    let (manifest, layer) = big_image(&push, "library/big", "1", 64 << 20);
    let mut fleet = fleet(&garage, &upstream.url(), &[]);
    let lb = fleet.nginx.url.clone();

    // 30 clients through the balancer on a cold tag, then on its 64 MiB
    // layer: one upstream GET of each, every body verified.
    let manifests: Vec<_> = (0..30)
        .map(|_| {
            let url = format!("{lb}/v2/library/big/manifests/1");
            std::thread::spawn(move || {
                // No Accept: every manifest type, as containerd asks.
                let r = client().get(url).send().unwrap();
                let status = r.status().as_u16();
                (status, r.bytes().unwrap().to_vec())
            })
        })
        .collect();
    for m in manifests {
        let (status, body) = m.join().unwrap();
        assert_eq!(status, 200);
        assert_eq!(digest_of(&body), manifest.digest());
    }
    let started = Instant::now();
    let blobs: Vec<_> = (0..30)
        .map(|_| {
            let url = format!("{lb}/v2/library/big/blobs/{}", layer.digest());
            std::thread::spawn(move || get(&url))
        })
        .collect();
    for b in blobs {
        let (status, body) = b.join().unwrap();
        assert_eq!(status, 200);
        assert_eq!(digest_of(&body), layer.digest(), "a client got a bad body");
    }
    eprintln!(
        "herd: 30 clients x 64 MiB through nginx over 3 replicas in {:.2}s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        upstream.count("GET", "/v2/library/big/manifests/1"),
        1,
        "the fleet fetched the tag more than once: {:?}\n{}",
        upstream.requests(),
        logs(&fleet)
    );
    assert_eq!(
        upstream.count("GET", &format!("/blobs/{}", layer.digest())),
        1,
        "the fleet fetched the layer more than once: {:?}\n{}",
        upstream.requests(),
        logs(&fleet)
    );
    wait_for("the layer in the bucket", Duration::from_secs(60), || {
        in_bucket(&garage, &layer.digest())
    });
    // Copied to the bucket once, by its owner.
    wait_for("the upload's count", Duration::from_secs(10), || {
        fleet_metric(&fleet, "hoard_bucket_uploads_total{result=\"ok\"}") == 1.0
    });

    // skopeo through the balancer.
    let out = tempfile::tempdir().unwrap();
    run(Command::new(require_tool("skopeo"))
        .arg("--insecure-policy")
        .arg("copy")
        .arg("--src-tls-verify=false")
        .arg(format!(
            "docker://{}/library/alpine-like:3",
            lb.trim_start_matches("http://")
        ))
        .arg(format!("dir:{}", out.path().display())));
    for blob in seeded.docker.layers.iter().chain([&seeded.docker.config]) {
        let written = out.path().join(blob.digest().trim_start_matches("sha256:"));
        assert_eq!(digest_of(&std::fs::read(written).unwrap()), blob.digest());
    }
    // Every blob skopeo pulled is in the bucket (uploads end after the
    // bodies do).
    for blob in seeded.docker.layers.iter().chain([&seeded.docker.config]) {
        wait_for(
            "skopeo's blobs in the bucket",
            Duration::from_secs(60),
            || in_bucket(&garage, &blob.digest()),
        );
    }

    // A fresh replica, empty disk, alone: everything from the bucket, not
    // one request upstream.
    let before = upstream.total();
    let fresh = replica(
        tempfile::tempdir().unwrap(),
        &bound(),
        &garage.hoard_args_to(&upstream.url()),
        &garage.hoard_env(),
    );
    let fresh_url = format!("http://{}", fresh.addr());
    let (status, body) = get(&format!("{fresh_url}/v2/library/big/manifests/1"));
    assert_eq!((status, digest_of(&body)), (200, manifest.digest()));
    let (status, body) = get(&format!(
        "{fresh_url}/v2/library/big/blobs/{}",
        layer.digest()
    ));
    assert_eq!((status, digest_of(&body)), (200, layer.digest()));
    let out2 = tempfile::tempdir().unwrap();
    run(Command::new(require_tool("skopeo"))
        .arg("--insecure-policy")
        .arg("copy")
        .arg("--src-tls-verify=false")
        .arg(format!("docker://{}/library/alpine-like:3", fresh.addr()))
        .arg(format!("dir:{}", out2.path().display())));
    // `total` sends one marker request itself: nothing else may be new.
    assert_eq!(
        upstream.total(),
        before + 1,
        "the fresh replica asked upstream: {:?}",
        upstream.requests()
    );

    // Redirect mode: the replica sends clients to the bucket with a
    // presigned URL, and the bytes come from Garage.
    let config_dir = tempfile::tempdir().unwrap();
    let config_file = config_dir.path().join("hoard.toml");
    std::fs::write(
        &config_file,
        "[store.s3]\nredirect = true\nredirect_ttl = \"2m\"\n",
    )
    .unwrap();
    let redirecting = replica(
        tempfile::tempdir().unwrap(),
        &bound(),
        &{
            let mut args = garage.hoard_args_to(&upstream.url());
            args.extend(["--config".into(), config_file.display().to_string()]);
            args
        },
        &garage.hoard_env(),
    );
    let no_follow = reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let blob_url = format!(
        "http://{}/v2/library/big/blobs/{}",
        redirecting.addr(),
        layer.digest()
    );
    let r = no_follow.get(&blob_url).send().unwrap();
    assert_eq!(r.status(), 307);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&garage.endpoint), "{location}");
    assert!(location.contains("X-Amz-Signature="), "{location}");
    assert!(
        !location.contains(&garage.secret),
        "the secret is in the URL"
    );
    let (status, body) = get(&blob_url);
    assert_eq!((status, digest_of(&body)), (200, layer.digest()));
    let out3 = tempfile::tempdir().unwrap();
    run(Command::new(require_tool("skopeo"))
        .arg("--insecure-policy")
        .arg("copy")
        .arg("--src-tls-verify=false")
        .arg(format!(
            "docker://{}/library/alpine-like:3",
            redirecting.addr()
        ))
        .arg(format!("dir:{}", out3.path().display())));
    assert_eq!(
        redirecting.metric("hoard_bucket_redirects_total"),
        // Ours, twice; skopeo's layers and config.
        2.0 + seeded.docker.layers.len() as f64 + 1.0,
        "every blob GET was redirected"
    );
    assert!(
        !redirecting.daemon.log_text().contains("X-Amz-Signature"),
        "a presigned URL reached the log"
    );

    // Upstream down: every live replica serves the cached images.
    drop(upstream);
    for url in fleet.urls.iter().chain([&fresh_url]) {
        let (status, body) = get(&format!("{url}/v2/library/big/manifests/1"));
        assert_eq!(
            (status, digest_of(&body)),
            (200, manifest.digest()),
            "{url}"
        );
        let (status, body) = get(&format!("{url}/v2/library/big/blobs/{}", layer.digest()));
        assert_eq!((status, digest_of(&body)), (200, layer.digest()), "{url}");
    }

    // The object store hangs: a replica that must read it answers 503 in
    // bounded time and stays up; what it holds locally is still served;
    // once the store is back, so is everything.
    let config = seeded.docker.config.digest();
    let other = replica(
        tempfile::tempdir().unwrap(),
        &bound(),
        &garage.hoard_args(),
        &garage.hoard_env(),
    );
    let other_url = format!("http://{}", other.addr());
    garage.freeze();
    let asked = Instant::now();
    let (status, body) = get(&format!(
        "{other_url}/v2/library/alpine-like/blobs/{config}"
    ));
    let waited = asked.elapsed();
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("UNAVAILABLE"));
    assert!(
        waited < Duration::from_secs(60),
        "the error took {waited:?}"
    );
    assert_eq!(get(&format!("{other_url}/healthz")).0, 200);
    let (status, body) = get(&format!(
        "{fresh_url}/v2/library/big/blobs/{}",
        layer.digest()
    ));
    assert_eq!(
        (status, digest_of(&body)),
        (200, layer.digest()),
        "the local tier"
    );
    garage.thaw();
    let (status, body) = get(&format!(
        "{other_url}/v2/library/alpine-like/blobs/{config}"
    ));
    assert_eq!((status, digest_of(&body)), (200, config));
    eprintln!("object store frozen: a read that needed it failed with 503 after {waited:?}");
    fleet.replicas.clear();
}

/// Waits (60 s at most) until `check`, run on the blocking pool, is `Ok`;
/// fails with `what` and the last `Err` it said.
async fn wait_blocking(
    what: &str,
    check: impl Fn() -> Result<(), String> + Clone + Send + 'static,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let last = tokio::task::spawn_blocking(check.clone()).await.unwrap();
        match last {
            Ok(()) => return,
            Err(state) => assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {state}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_replica_leading_a_download_loses_nothing() {
    let garage = tokio::task::spawn_blocking(Garage::start).await.unwrap();
    let fake = fake::Fake::start().await;
    let data = noise(24 << 20, 21);
    let (_, layer) = fake.put_image("library/big", "1", &data);
    let gate = Arc::new(tokio::sync::Notify::new());
    fake.fault("/blobs/", fake::Fault::Gate(gate.clone()));
    let upstream = fake.url();
    let (garage, mut fleet) = tokio::task::spawn_blocking(move || {
        let fleet = fleet(&garage, &upstream, &[]);
        (garage, fleet)
    })
    .await
    .unwrap();
    let lb = fleet.nginx.url.clone();
    let client = reqwest::Client::new();
    let mut cut = client
        .get(format!("{lb}/v2/library/big/blobs/{layer}"))
        .send()
        .await
        .unwrap();
    assert_eq!(cut.status(), 200);
    cut.chunk().await.unwrap().unwrap();

    // The leader: the replica fetching from upstream itself (a download in
    // progress, and nothing asked of another replica).
    let leader = tokio::task::spawn_blocking({
        let addrs: Vec<String> = fleet.replicas.iter().flatten().map(|r| r.addr()).collect();
        move || {
            addrs
                .iter()
                .map(|addr| {
                    reqwest::blocking::get(format!("http://{addr}/metrics"))
                        .and_then(|r| r.text())
                        .unwrap()
                })
                .position(|m| {
                    metric_value(&m, "hoard_inflight_fetches") == 1.0
                        && metric_value(&m, "hoard_peer_requests_total{result=\"ok\"}") == 0.0
                })
                .expect("one replica leads the download")
        }
    })
    .await
    .unwrap();
    let killed = fleet.replicas[leader].take().unwrap();
    let killed_data = tokio::task::spawn_blocking(move || killed.kill())
        .await
        .unwrap();
    assert!(
        expect_cut(cut, "the client of the killed replica").await < data.len(),
        "the cut client got the whole layer"
    );
    let garage = Arc::new(garage);
    let check = garage.clone();
    let layer_in_bucket = {
        let layer = layer.clone();
        move || in_bucket(&check, &layer)
    };
    assert!(
        !tokio::task::spawn_blocking(layer_in_bucket.clone())
            .await
            .unwrap(),
        "a partial layer is in the bucket"
    );

    // A retry through the balancer: another replica owns it now.
    gate.notify_waiters();
    fake.clear_faults();
    let body = client
        .get(format!("{lb}/v2/library/big/blobs/{layer}"))
        .send()
        .await
        .unwrap();
    assert_eq!(body.status(), 200);
    assert_eq!(digest_of(&body.bytes().await.unwrap()), layer);
    wait_blocking("the retry's layer in the bucket", {
        let layer_in_bucket = layer_in_bucket.clone();
        move || layer_in_bucket().then_some(()).ok_or_else(String::new)
    })
    .await;
    // The killed replica comes back on its own disk and aborts the upload
    // it left: no unfinished upload stays in the bucket.
    let restarted = {
        let garage = garage.clone();
        let upstream = fake.url();
        tokio::task::spawn_blocking(move || {
            let args = garage.hoard_args_to(&upstream);
            replica(killed_data, &bound(), &args, &garage.hoard_env())
        })
        .await
        .unwrap()
    };
    wait_blocking("no abandoned upload in the bucket", {
        let garage = garage.clone();
        move || {
            let info = garage.bucket_info();
            let none = info["unfinishedMultipartUploads"].as_u64() == Some(0);
            none.then_some(()).ok_or_else(|| info.to_string())
        }
    })
    .await;
    let leftovers = {
        let garage = garage.clone();
        tokio::task::spawn_blocking(move || bucket_keys(&garage, "uploads"))
            .await
            .unwrap()
    };
    assert_eq!(leftovers, Vec::<String>::new());
    drop(restarted);
    tokio::task::spawn_blocking(move || drop(fleet))
        .await
        .unwrap();
}

/// `hoard serve` with `args` must exit non-zero, saying `expected`.
fn refused_start(args: &[String], env: &[(&'static str, String)], expected: &str) -> Duration {
    let data = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let output = hoard_command()
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "hoard started with {args:?}");
    assert!(stderr.contains(expected), "{args:?}: {stderr}");
    started.elapsed()
}

#[test]
fn a_bucket_that_is_missing_refused_or_unreachable_stops_the_start_naming_the_key() {
    let garage = Garage::start();
    let mut wrong_bucket = garage.hoard_args();
    wrong_bucket[3] = "no-such-bucket".into();
    refused_start(&wrong_bucket, &garage.hoard_env(), "store.s3.bucket");
    let mut wrong_secret = garage.hoard_env();
    wrong_secret[1].1 = "0".repeat(64);
    refused_start(
        &garage.hoard_args(),
        &wrong_secret,
        "credentials were refused",
    );
    // A port on 127.0.0.1 bound here and never listening: refused.
    let (_held, port) = support::fleet::refusing_port();
    let mut unreachable = garage.hoard_args();
    unreachable[1] = format!("http://127.0.0.1:{port}");
    let took = refused_start(&unreachable, &garage.hoard_env(), "store.s3");
    eprintln!("an unreachable endpoint stopped the start after {took:?}");
    // `hoard config check` makes the same check.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hoard.toml");
    std::fs::write(
        &file,
        format!(
            "[store.s3]\nendpoint = \"{}\"\nregion = \"garage\"\nbucket = \"no-such-bucket\"\naccess_key_id = \"{}\"\nsecret_access_key_file = \"{}\"\n",
            garage.endpoint,
            garage.key_id,
            garage.secret_file.display()
        ),
    )
    .unwrap();
    let output = hoard_command()
        .args(["config", "check"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("store.s3.bucket"), "{stderr}");
    assert!(
        !stderr.contains(&garage.secret),
        "the secret reached the output"
    );
}
