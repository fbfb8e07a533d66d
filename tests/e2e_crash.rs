//! `kill -9` of the real hoard binary in the middle of a download, then
//! `hoard verify` and a restart: nothing partial or corrupt is ever served.
//! The upstream is the in-process fake, gated so the download is surely in
//! progress when the process dies.

#[path = "it/fake.rs"]
#[allow(dead_code)]
mod fake;
mod support;

use std::process::Command;
use std::sync::Arc;

use fake::{Fake, Fault};
use support::*;

fn hoard_cli(args: &[&str], data: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hoard"))
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_download_leaves_nothing_served_and_verify_agrees() {
    let fake = Fake::start().await;
    let data = noise(16 << 20, 9);
    let (_, layer) = fake.put_image("library/big", "1", &data);
    let gate = Arc::new(tokio::sync::Notify::new());
    fake.fault("/blobs/", Fault::Gate(gate.clone()));

    let hoard = tokio::task::spawn_blocking({
        let url = fake.url();
        move || HoardProcess::start(&url, &[])
    })
    .await
    .unwrap();
    let store = hoard.store();
    let client = reqwest::Client::new();
    let base = format!("http://{}", hoard.addr());
    assert_eq!(
        client
            .get(format!("{base}/v2/big/manifests/1"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let mut r = client
        .get(format!("{base}/v2/big/blobs/{layer}"))
        .send()
        .await
        .unwrap();
    r.chunk().await.unwrap().unwrap();
    assert_eq!(
        std::fs::read_dir(store.join("tmp")).unwrap().count(),
        1,
        "download in progress"
    );

    // SIGKILL: no shutdown code runs.
    let data_dir = tokio::task::spawn_blocking(move || hoard.kill())
        .await
        .unwrap();
    let rest = loop {
        match r.chunk().await {
            Ok(Some(_)) => continue,
            end => break end,
        }
    };
    assert!(
        rest.is_err(),
        "the client was cut off, not handed a short body"
    );
    let layer_file = store
        .join("blobs/sha256")
        .join(&layer[7..9])
        .join(&layer[7..]);
    assert!(!layer_file.exists(), "no partial blob in place");

    // verify, on the stopped store: reconciles, re-hashes, finds nothing wrong.
    let out = hoard_cli(&["verify"], &store);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(": 0 corrupt"), "{stdout}");
    assert_eq!(
        std::fs::read_dir(store.join("tmp")).unwrap().count(),
        0,
        "leftovers removed"
    );

    // A corrupted file is caught, quarantined, and the exit code says so.
    let stored = walk(&store.join("blobs"));
    let victim = stored.first().expect("the manifest and config were stored");
    std::fs::write(victim, b"bit rot").unwrap();
    let out = hoard_cli(&["verify"], &store);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(store.join("quarantine").read_dir().unwrap().count(), 1);

    // Restart on the same store: the blob is fetched fresh and complete.
    gate.notify_one();
    fake.clear_faults();
    let url = fake.url();
    let hoard = tokio::task::spawn_blocking(move || HoardProcess::start_in(data_dir, &url, &[]))
        .await
        .unwrap();
    let base = format!("http://{}", hoard.addr());
    assert_eq!(
        client
            .get(format!("{base}/v2/big/manifests/1"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let body = client
        .get(format!("{base}/v2/big/blobs/{layer}"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(digest_of(&body), layer);
    assert_eq!(body.len(), data.len());
    tokio::task::spawn_blocking(move || drop(hoard))
        .await
        .unwrap();
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        if entry.path().is_dir() {
            out.extend(walk(&entry.path()));
        } else {
            out.push(entry.path());
        }
    }
    out
}
