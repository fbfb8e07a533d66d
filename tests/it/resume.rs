//! Issue 14: a cut upstream body is resumed from the byte after the last
//! one received, hashing across the seam; clients following the download
//! see no cut; a registry that ignores `Range` or changed the blob between
//! attempts never gets two versions spliced; after the last attempt the
//! client is cut and nothing is kept.

use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::fake::{digest_of, Fake, Fault};
use crate::{eventually, Hoard};

const LEN: usize = 3 << 20;

fn blob(seed: u8) -> Vec<u8> {
    (0..LEN)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn cut(after: usize, times: usize) -> Fault {
    Fault::CutAfter(after, Arc::new(AtomicUsize::new(times)))
}

fn resumes(hoard: &Hoard, result: &str) -> f64 {
    hoard.metric(&format!(
        "hoard_upstream_resumes_total{{result=\"{result}\"}}"
    ))
}

#[tokio::test]
async fn a_body_cut_once_is_resumed_and_both_clients_get_it_whole() {
    let fake = Fake::start().await;
    let data = blob(1);
    let digest = fake.put_blob("library/x", data.clone());
    fake.fault("/blobs/", cut(LEN / 4, 1));
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let path = format!("/v2/x/blobs/{digest}");
    let (a, b) = tokio::join!(hoard.get(&path), hoard.get(&path));
    let (a, b) = (a.bytes().await.unwrap(), b.bytes().await.unwrap());
    assert_eq!(digest_of(&a), digest);
    assert_eq!(a, b);
    // One whole GET, cut; one ranged GET from where it broke.
    assert_eq!(fake.hits("GET", &digest), 2);
    assert_eq!(fake.range_hits(&digest), 1);
    assert_eq!(resumes(&hoard, "resumed"), 1.0);
    // Kept, and a hit from now on.
    let r = hoard.get(&path).await;
    assert_eq!(r.headers()["x-hoard-cache"], "hit");
    assert_eq!(r.bytes().await.unwrap(), a);
    assert_eq!(fake.hits("GET", &digest), 2);
}

#[tokio::test]
async fn a_body_cut_three_times_is_resumed_three_times() {
    let fake = Fake::start().await;
    let data = blob(2);
    let digest = fake.put_blob("library/x", data.clone());
    // Each response (the ranged ones too) is cut 512 KiB in.
    fake.fault("/blobs/", cut(512 << 10, 3));
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let path = format!("/v2/x/blobs/{digest}");
    let body = hoard.get(&path).await.bytes().await.unwrap();
    assert_eq!(body.as_ref(), data.as_slice());
    assert_eq!(fake.range_hits(&digest), 3);
    assert_eq!(resumes(&hoard, "resumed"), 3.0);
    assert!(eventually(Duration::from_secs(20), || hoard.blob_files() == 1).await);
}

#[tokio::test]
async fn after_the_last_attempt_the_client_is_cut_and_nothing_is_kept() {
    let fake = Fake::start().await;
    let digest = fake.put_blob("library/x", blob(3));
    // Cut once, then every resume fails: no progress, two attempts.
    fake.fault("/blobs/", cut(512 << 10, 1));
    fake.fault("/blobs/", Fault::Status(503, None));
    let hoard = Hoard::start(&fake.url(), &[], |args| {
        args.resume_attempts = Some(2);
    })
    .await;
    let path = format!("/v2/x/blobs/{digest}");
    assert!(hoard.get(&path).await.bytes().await.is_err());
    assert_eq!(fake.range_hits(&digest), 2);
    assert_eq!(resumes(&hoard, "failed"), 2.0);
    assert_eq!(hoard.blob_files(), 0);
    assert!(eventually(Duration::from_secs(20), || hoard.temp_files() == 0).await);
    // Upstream is back: the next request downloads it whole.
    fake.clear_faults();
    let body = hoard.get(&path).await.bytes().await.unwrap();
    assert_eq!(digest_of(&body), digest);
}

#[tokio::test]
async fn an_upstream_that_ignores_range_is_read_again_from_the_start() {
    let fake = Fake::start().await;
    let data = blob(4);
    let digest = fake.put_blob("library/x", data.clone());
    // The first body is cut halfway; the resume's Range is ignored (the
    // cut fault is spent, the next one answers): a 200 with everything.
    fake.fault("/blobs/", cut(LEN / 2, 1));
    fake.fault("/blobs/", Fault::IgnoreRange);
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let path = format!("/v2/x/blobs/{digest}");
    let body = hoard.get(&path).await.bytes().await.unwrap();
    assert_eq!(body.as_ref(), data.as_slice());
    assert_eq!(fake.range_hits(&digest), 1);
    assert_eq!(resumes(&hoard, "reread"), 1.0);
    assert_eq!(resumes(&hoard, "resumed"), 0.0);
    assert!(eventually(Duration::from_secs(20), || hoard.blob_files() == 1).await);
}

#[tokio::test]
async fn a_whole_answer_cut_while_compared_then_a_partial_one_goes_on() {
    let fake = Fake::start().await;
    let data = blob(7);
    let digest = fake.put_blob("library/x", data.clone());
    // Cut halfway; the resume gets the whole blob (range ignored), cut a
    // quarter in, so before the repeated half was compared; the next
    // resume gets a 206 from the half: nothing of it repeats.
    fake.fault("/blobs/", cut(LEN / 2, 1));
    fake.fault(
        "/blobs/",
        Fault::IgnoreRangeCutAfter(LEN / 4, Arc::new(AtomicUsize::new(1))),
    );
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let path = format!("/v2/x/blobs/{digest}");
    let body = hoard.get(&path).await.bytes().await.unwrap();
    assert_eq!(body.as_ref(), data.as_slice());
    assert_eq!(fake.range_hits(&digest), 2);
    assert_eq!(resumes(&hoard, "resumed"), 1.0);
    assert_eq!(resumes(&hoard, "changed"), 0.0);
}

#[tokio::test]
async fn attempts_count_per_cut_so_progress_is_never_failed() {
    let fake = Fake::start().await;
    let data = blob(8);
    let digest = fake.put_blob("library/x", data.clone());
    // Four cuts, each after more bytes arrived, with one attempt allowed.
    fake.fault("/blobs/", cut(512 << 10, 4));
    let hoard = Hoard::start(&fake.url(), &[], |args| {
        args.resume_attempts = Some(1);
    })
    .await;
    let path = format!("/v2/x/blobs/{digest}");
    let body = hoard.get(&path).await.bytes().await.unwrap();
    assert_eq!(body.as_ref(), data.as_slice());
    assert_eq!(resumes(&hoard, "resumed"), 4.0);
}

#[tokio::test]
async fn a_blob_that_changed_between_attempts_is_never_spliced() {
    let fake = Fake::start().await;
    let data = blob(5);
    let digest = fake.put_blob("library/x", data.clone());
    // The first answer is another version (its own ETag), cut halfway; the
    // resume's If-Range no longer matches, so the fake sends the real
    // blob whole, whose first half differs.
    let mut other = data.clone();
    other[10] ^= 0xff;
    fake.fault(
        "/blobs/",
        Fault::ChangedOnce(Bytes::from(other), Arc::new(AtomicBool::new(false))),
    );
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let path = format!("/v2/x/blobs/{digest}");
    assert!(hoard.get(&path).await.bytes().await.is_err());
    assert_eq!(resumes(&hoard, "changed"), 1.0);
    assert_eq!(hoard.blob_files(), 0);
    assert_eq!(hoard.temp_files(), 0);
    // Started over by the next request: one version, verified.
    let body = hoard.get(&path).await.bytes().await.unwrap();
    assert_eq!(body.as_ref(), data.as_slice());
}

#[tokio::test]
async fn a_new_etag_with_the_same_bytes_goes_on_without_a_cut() {
    let fake = Fake::start().await;
    let data = blob(6);
    let digest = fake.put_blob("library/x", data.clone());
    // Same bytes, another ETag (another CDN node): If-Range fails, the
    // whole blob comes again, its first half matches what arrived.
    fake.fault(
        "/blobs/",
        Fault::ChangedOnce(Bytes::from(data.clone()), Arc::new(AtomicBool::new(false))),
    );
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let path = format!("/v2/x/blobs/{digest}");
    let body = hoard.get(&path).await.bytes().await.unwrap();
    assert_eq!(body.as_ref(), data.as_slice());
    assert_eq!(resumes(&hoard, "reread"), 1.0);
    assert_eq!(fake.range_hits(&digest), 1);
    assert!(eventually(Duration::from_secs(20), || hoard.blob_files() == 1).await);
}
