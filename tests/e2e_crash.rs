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
        get_status(&client, &format!("{base}/v2/big/manifests/1")).await,
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
    let layer_file = blob_file(&store, &layer);
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
        get_status(&client, &format!("{base}/v2/big/manifests/1")).await,
        200
    );
    let body = get_bytes(&client, &format!("{base}/v2/big/blobs/{layer}")).await;
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

/// A small tmpfs, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let uid = Command::new("id").arg("-u").output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&uid.stdout).trim(),
            "0",
            "the disk-full test mounts a tmpfs and needs root"
        );
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mount tmpfs failed");
        Tmpfs { dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_fills_mid_download_still_serves_the_client() {
    let disk = Tmpfs::mount("24m");
    let fake = Fake::start().await;
    let data = noise(40 << 20, 11);
    let (_, layer) = fake.put_image("library/huge", "1", &data);
    let url = fake.url();
    let dir = tempfile::TempDir::new_in(disk.dir.path()).unwrap();
    let hoard = tokio::task::spawn_blocking(move || {
        HoardProcess::start_in(dir, &url, &["--min-free-space", "1MiB"])
    })
    .await
    .unwrap();
    let base = format!("http://{}", hoard.addr());
    let client = reqwest::Client::new();
    // Two clients follow the same download; the disk fills at ~24 MiB.
    let fetch = |client: reqwest::Client, url: String| async move {
        let r = client.get(url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await
    };
    let url = format!("{base}/v2/huge/blobs/{layer}");
    let (a, b) = tokio::join!(
        fetch(client.clone(), url.clone()),
        fetch(client.clone(), url)
    );
    for body in [a, b] {
        let body = body.expect("the client got the whole blob");
        assert_eq!(digest_of(&body), layer);
    }
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("hoard_store_write_errors_total 1"),
        "{metrics}"
    );
    let store = hoard.store();
    assert!(!blob_file(&store, &layer).exists(), "nothing partial kept");
    assert_eq!(std::fs::read_dir(store.join("tmp")).unwrap().count(), 0);
    tokio::task::spawn_blocking(move || drop(hoard))
        .await
        .unwrap();
}
