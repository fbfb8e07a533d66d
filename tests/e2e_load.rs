//! A bounded load test against the real hoard binary: 200 concurrent clients
//! pull a mix of cached and cold images while the upstream (the in-process
//! fake) fails 20% of requests. Every 200 body must match its digest, every
//! failure must be a registry JSON error, and hoard's memory must stay flat.
//! Bounded: 200 clients x 10 pulls, 120 s at most. Prints the figures.

#[path = "it/fake.rs"]
#[allow(dead_code)]
mod fake;
mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fake::{Fake, Fault};
use support::*;

const CLIENTS: usize = 200;
const PULLS_PER_CLIENT: usize = 10;
const IMAGES: usize = 40;
const TIME_LIMIT: Duration = Duration::from_secs(120);

#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    ok: AtomicU64,
    json_errors: AtomicU64,
    corrupt: AtomicU64,
    other_failures: AtomicU64,
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

async fn fetch(
    client: &reqwest::Client,
    url: &str,
    tally: &Tally,
    want_digest: Option<&str>,
) -> Option<bytes::Bytes> {
    tally.requests.fetch_add(1, Ordering::Relaxed);
    let response = match client.get(url).send().await {
        Ok(r) => r,
        Err(_) => {
            tally.other_failures.fetch_add(1, Ordering::Relaxed);
            return None;
        }
    };
    let status = response.status();
    let body = match response.bytes().await {
        Ok(b) => b,
        Err(_) => {
            tally.other_failures.fetch_add(1, Ordering::Relaxed);
            return None;
        }
    };
    if status.is_success() {
        if want_digest.is_some_and(|d| digest_of(&body) != d) {
            tally.corrupt.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        tally.ok.fetch_add(1, Ordering::Relaxed);
        return Some(body);
    }
    let is_registry_error = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_owned))
        .is_some();
    if is_registry_error {
        tally.json_errors.fetch_add(1, Ordering::Relaxed);
    } else {
        tally.other_failures.fetch_add(1, Ordering::Relaxed);
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_against_a_flaky_upstream() {
    let fake = Fake::start().await;
    let mut images = Vec::new();
    for i in 0..IMAGES {
        let layer = noise(256 * 1024 + i * 4096, i as u32);
        let (manifest, layer_digest) = fake.put_image(&format!("library/img{i}"), "1", &layer);
        images.push((format!("img{i}"), manifest, layer_digest));
    }
    let hoard = tokio::task::spawn_blocking({
        let url = fake.url();
        move || HoardProcess::start(&url, &["--log-format", "json"])
    })
    .await
    .unwrap();
    let pid = hoard.daemon.pid();
    let base = format!("http://{}", hoard.addr());
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CLIENTS)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();

    // Half the images are cached before the storm.
    for (name, _, layer) in images.iter().take(IMAGES / 2) {
        get_bytes(&client, &format!("{base}/v2/{name}/manifests/1")).await;
        get_bytes(&client, &format!("{base}/v2/{name}/blobs/{layer}")).await;
    }
    let rss_before = vm_hwm_kib(pid);
    let upstream_before = fake.all_hits().len() as u64;
    fake.fault("/v2/", Fault::Random(20));

    let tally = Arc::new(Tally::default());
    let images = Arc::new(images);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (client, tally, images, base) =
            (client.clone(), tally.clone(), images.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            for p in 0..PULLS_PER_CLIENT {
                if started.elapsed() > TIME_LIMIT {
                    return;
                }
                let (name, manifest, layer) = &images[(c * 7 + p * 13) % IMAGES];
                let url = format!("{base}/v2/{name}/manifests/1");
                if fetch(&client, &url, &tally, Some(manifest)).await.is_some() {
                    let url = format!("{base}/v2/{name}/blobs/{layer}");
                    fetch(&client, &url, &tally, Some(layer)).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();
    let rss_after = vm_hwm_kib(pid);
    let requests = tally.requests.load(Ordering::Relaxed);
    let ok = tally.ok.load(Ordering::Relaxed);
    let json_errors = tally.json_errors.load(Ordering::Relaxed);
    let injected = fake.state.injected.load(Ordering::Relaxed);
    let upstream_requests = fake.all_hits().len() as u64 - upstream_before;
    println!(
        "load: {requests} requests in {:.1}s ({:.0} req/s) by {CLIENTS} clients; ok {ok}, registry errors {json_errors} ({:.1}% of requests); upstream failed {injected} of the {upstream_requests} requests hoard sent it ({:.1}%); hoard peak RSS {} MiB before, {} MiB after",
        elapsed.as_secs_f64(),
        requests as f64 / elapsed.as_secs_f64(),
        json_errors as f64 * 100.0 / requests as f64,
        injected as f64 * 100.0 / upstream_requests.max(1) as f64,
        rss_before / 1024,
        rss_after / 1024,
    );
    assert_eq!(tally.corrupt.load(Ordering::Relaxed), 0, "no corrupt body");
    assert_eq!(
        tally.other_failures.load(Ordering::Relaxed),
        0,
        "every failure is a registry JSON error"
    );
    assert!(ok > 0 && injected > 0, "the storm happened");
    assert!(elapsed < TIME_LIMIT + Duration::from_secs(60));
    assert!(
        rss_after < 256 * 1024,
        "hoard's peak RSS stayed bounded: {} KiB",
        rss_after
    );
    tokio::task::spawn_blocking(move || drop(hoard))
        .await
        .unwrap();
}
