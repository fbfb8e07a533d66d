//! Regressions, named after the issue that found them. These run the real
//! binary where the failure is the process's (a deleted temp file, SIGBUS),
//! against the in-process fake upstream.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::fake::{digest_of, Fake, Fault};
use crate::support::{
    blob_file, count_files, eventually, expect_cut, get_bytes, hoard_command, HoardProcess,
};

/// The real binary on a fresh store, every registry mapped to `upstream`.
async fn start_binary(upstream: &str) -> HoardProcess {
    let upstream = upstream.to_owned();
    tokio::task::spawn_blocking(move || {
        HoardProcess::start_in(tempfile::tempdir().unwrap(), &upstream, &[])
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_12_ls_against_a_running_daemon_leaves_its_download_alone() {
    let fake = Fake::start().await;
    let data = crate::noise(4 << 20, 12);
    let digest = fake.put_blob("library/x", data.clone());
    let gate = Arc::new(Notify::new());
    fake.fault(&digest, Fault::Gate(gate.clone()));
    let hoard = start_binary(&fake.url()).await;
    let store = hoard.store();
    let client = reqwest::Client::new();
    let url = format!("http://{}/v2/x/blobs/{digest}", hoard.addr());

    // The download holds at half its bytes, its temp file open.
    let mut response = client.get(&url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.chunk().await.unwrap().unwrap().to_vec();
    assert!(
        eventually(Duration::from_secs(10), || count_files(&store.join("tmp"))
            == 1)
        .await
    );

    let ls = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            hoard_command()
                .arg("ls")
                .arg("--data-dir")
                .arg(&store)
                .output()
                .unwrap()
        })
        .await
        .unwrap()
    };
    let stderr = String::from_utf8_lossy(&ls.stderr);
    assert!(!ls.status.success(), "ls opened a store a daemon holds");
    assert!(
        stderr.contains("in use by another hoard process"),
        "{stderr}"
    );
    assert_eq!(
        count_files(&store.join("tmp")),
        1,
        "the refused ls removed the running download's temp file"
    );

    gate.notify_one();
    while let Some(chunk) = response.chunk().await.unwrap() {
        body.extend_from_slice(&chunk);
    }
    assert_eq!(digest_of(&body), digest);
    assert!(
        eventually(Duration::from_secs(10), || count_files(
            &store.join("blobs")
        ) == 1)
        .await,
        "the download was committed"
    );
    assert_eq!(digest_of(&get_bytes(&client, &url).await), digest);
    assert_eq!(fake.hits("GET", &digest), 1, "the second GET was a hit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_12_a_blob_truncated_behind_hoards_back_costs_one_request() {
    let fake = Fake::start().await;
    // Larger than what loopback socket buffers and the send queue hold, so
    // the daemon is still reading the file when it is cut.
    let data = crate::noise(48 << 20, 4);
    let digest = fake.put_blob("library/x", data.clone());
    let hoard = start_binary(&fake.url()).await;
    let client = reqwest::Client::new();
    let url = format!("http://{}/v2/x/blobs/{digest}", hoard.addr());
    assert_eq!(digest_of(&get_bytes(&client, &url).await), digest);
    let file = blob_file(&hoard.store(), &digest);
    assert!(
        eventually(Duration::from_secs(10), || file.exists()).await,
        "the blob was committed"
    );

    // A client starts reading the cached blob; meanwhile something outside
    // hoard truncates the file.
    let mut reading = client.get(&url).send().await.unwrap();
    assert_eq!(reading.status(), 200);
    reading.chunk().await.unwrap().unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let received = expect_cut(reading, "a truncated blob").await;
    assert!(received < data.len());
    // Asked for again at once (before or after it is set aside): with the
    // file mapped, the daemon touched a page past the new end and died of
    // SIGBUS here; read, it is one more cut or a fresh fetch.
    if let Ok(again) = client.get(&url).send().await {
        let _ = again.bytes().await;
    }

    // The daemon lives on, the damaged blob is set aside, and the next
    // request fetches it again.
    let health = client
        .get(format!("http://{}/healthz", hoard.addr()))
        .send()
        .await
        .expect("the daemon survived");
    assert_eq!(health.status(), 200);
    let quarantined = hoard
        .store()
        .join("quarantine")
        .join(digest.trim_start_matches("sha256:"));
    assert!(eventually(Duration::from_secs(10), || quarantined.exists()).await);
    assert_eq!(digest_of(&get_bytes(&client, &url).await), digest);
    assert_eq!(fake.hits("GET", &digest), 2);
}
