//! Issue 14: ranges of blobs. Several ranges of a cached blob are one
//! `multipart/byteranges` answer (read back with a real multipart parser,
//! multer); a range of a blob not cached is relayed from upstream at once
//! while the whole blob downloads once in the background; a range a running
//! download has, or will have in a moment, is served from it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::fake::{digest_of, Fake, Fault};
use crate::{error_code, eventually, Hoard};

fn blob(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) ^ (i >> 11) as u8)
        .collect()
}

async fn get_range(hoard: &Hoard, path: &str, range: &str) -> reqwest::Response {
    hoard
        .client
        .get(hoard.url(path))
        .header("range", range)
        .send()
        .await
        .unwrap()
}

/// The parts of a multipart answer, as multer reads them: each part's
/// `Content-Range` and bytes.
async fn parts(response: reqwest::Response) -> Vec<(String, Vec<u8>)> {
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    let declared: usize = response.headers()["content-length"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        content_type.starts_with("multipart/byteranges"),
        "{content_type}"
    );
    // multer's own boundary parser accepts form-data only.
    let (_, boundary) = content_type.split_once("boundary=").unwrap();
    let body = response.bytes().await.unwrap();
    assert_eq!(body.len(), declared, "Content-Length is the body's length");
    let mut multipart = multer::Multipart::with_reader(&body[..], boundary);
    let mut parts = Vec::new();
    while let Some(field) = multipart.next_field().await.unwrap() {
        assert_eq!(
            field.content_type().unwrap().essence_str(),
            "application/octet-stream"
        );
        let range = field.headers()["content-range"]
            .to_str()
            .unwrap()
            .to_owned();
        parts.push((range, field.bytes().await.unwrap().to_vec()));
    }
    parts
}

/// A blob stored in hoard (fetched whole once).
async fn cached(len: usize) -> (Fake, Hoard, Vec<u8>, String) {
    let fake = Fake::start().await;
    let data = blob(len, 7);
    let digest = fake.put_blob("library/x", data.clone());
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let path = format!("/v2/x/blobs/{digest}");
    assert_eq!(hoard.get(&path).await.bytes().await.unwrap().len(), len);
    (fake, hoard, data, path)
}

#[tokio::test]
async fn several_ranges_of_a_cached_blob_are_one_multipart_answer_in_the_order_asked() {
    let (fake, hoard, data, path) = cached(300_000).await;
    let len = data.len();
    for (header, expected) in [
        ("bytes=5000-5999,0-99", vec![(5000, 6000), (0, 100)]),
        ("bytes=0-99,5000-5999", vec![(0, 100), (5000, 6000)]),
        // Overlapping, and a suffix.
        (
            "bytes=100-299,200-399,-50",
            vec![(100, 300), (200, 400), (len - 50, len)],
        ),
    ] {
        let r = get_range(&hoard, &path, header).await;
        assert_eq!(r.status(), 206, "{header}");
        assert_eq!(r.headers()["x-hoard-cache"], "hit");
        let got = parts(r).await;
        assert_eq!(got.len(), expected.len(), "{header}");
        for ((range, bytes), (start, end)) in got.iter().zip(&expected) {
            assert_eq!(range, &format!("bytes {start}-{}/{len}", end - 1));
            assert_eq!(bytes.as_slice(), &data[*start..*end], "{header}");
        }
    }
    assert_eq!(fake.range_hits("/blobs/"), 0, "served from the store");
}

#[tokio::test]
async fn too_many_ranges_or_too_much_overlap_is_a_416_error() {
    let (_fake, hoard, data, path) = cached(10_000).await;
    let many = (0..65)
        .map(|i| format!("{i}-{i}"))
        .collect::<Vec<_>>()
        .join(",");
    let r = get_range(&hoard, &path, &format!("bytes={many}")).await;
    assert_eq!(r.status(), 416);
    assert_eq!(error_code(r).await, "RANGE_INVALID");
    // The whole blob twice over.
    let r = get_range(&hoard, &path, "bytes=0-,0-").await;
    assert_eq!(r.status(), 416);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes */{}", data.len()).as_str()
    );
    assert_eq!(error_code(r).await, "RANGE_INVALID");
    // 64 single bytes are fine.
    let most = (0..64)
        .map(|i| format!("{}-{}", i * 100, i * 100))
        .collect::<Vec<_>>()
        .join(",");
    let r = get_range(&hoard, &path, &format!("bytes={most}")).await;
    assert_eq!(r.status(), 206);
    let got = parts(r).await;
    assert_eq!(got.len(), 64);
    assert!(got
        .iter()
        .enumerate()
        .all(|(i, (_, bytes))| bytes == &[data[i * 100]]));
}

#[tokio::test]
async fn a_tail_range_of_a_cold_blob_is_relayed_while_the_blob_downloads_once() {
    let fake = Fake::start().await;
    let data = blob(4 << 20, 1);
    let digest = fake.put_blob("library/x", data.clone());
    // The whole-blob download stops halfway until the gate opens; ranged
    // requests are answered at once.
    let gate = Arc::new(Notify::new());
    fake.fault("/blobs/", Fault::GateWhole(gate.clone()));
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let path = format!("/v2/x/blobs/{digest}");
    let r = get_range(&hoard, &path, "bytes=-4096").await;
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["x-hoard-cache"], "miss");
    let len = data.len();
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes {}-{}/{len}", len - 4096, len - 1).as_str()
    );
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[len - 4096..]);
    // Relayed while the download is held: it arrived first.
    assert_eq!(hoard.blob_files(), 0);
    assert_eq!(
        hoard.metric("hoard_blob_ranges_total{source=\"upstream\"}"),
        1.0
    );
    gate.notify_one();
    assert!(eventually(Duration::from_secs(20), || hoard.blob_files() == 1).await);
    // One ranged GET and one GET of the whole blob upstream; now a hit.
    assert_eq!(fake.range_hits(&digest), 1);
    assert_eq!(fake.hits("GET", &digest), 2);
    let r = get_range(&hoard, &path, "bytes=-4096").await;
    assert_eq!(r.headers()["x-hoard-cache"], "hit");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[len - 4096..]);
    assert_eq!(fake.hits("GET", &digest), 2);
    assert_eq!(
        digest_of(&hoard.get(&path).await.bytes().await.unwrap()),
        digest
    );
}

#[tokio::test]
async fn with_range_fill_off_a_range_downloads_nothing_else() {
    let fake = Fake::start().await;
    let (on_data, off_data) = (blob(1 << 20, 2), blob(1 << 20, 12));
    let on_digest = fake.put_blob("library/on", on_data.clone());
    let off_digest = fake.put_blob("library/off", off_data.clone());
    let on = Hoard::start(&fake.url(), &[], |_| {}).await;
    let off = Hoard::start(&fake.url(), &[], |args| args.range_fill = Some(false)).await;
    for (hoard, name, digest, data) in [
        (&on, "on", &on_digest, &on_data),
        (&off, "off", &off_digest, &off_data),
    ] {
        let path = format!("/v2/{name}/blobs/{digest}");
        let r = get_range(hoard, &path, "bytes=10-19").await;
        assert_eq!(r.status(), 206);
        assert_eq!(r.bytes().await.unwrap().as_ref(), &data[10..20]);
    }
    // With the fill on, the blob arrives in the background; by then the
    // other one would have started too, had it been asked to.
    assert!(eventually(Duration::from_secs(20), || on.blob_files() == 1).await);
    assert_eq!(fake.hits("GET", &on_digest), 2);
    assert_eq!(fake.hits("GET", &off_digest), 1, "only the range");
    assert_eq!(off.metric("hoard_inflight_fetches"), 0.0);
    assert_eq!(off.blob_files(), 0);
}

#[tokio::test]
async fn a_range_a_running_download_already_has_is_served_from_it() {
    let fake = Fake::start().await;
    let data = blob(4 << 20, 3);
    let digest = fake.put_blob("library/x", data.clone());
    let gate = Arc::new(Notify::new());
    fake.fault("/blobs/", Fault::GateWhole(gate.clone()));
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let path = format!("/v2/x/blobs/{digest}");
    // A client pulling the whole blob gets its first half, then waits.
    let mut whole = hoard.get(&path).await;
    let first = whole.chunk().await.unwrap().unwrap();
    assert!(!first.is_empty());
    let r = get_range(&hoard, &path, "bytes=0-99,1000-1099").await;
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["x-hoard-cache"], "coalesced");
    let got = parts(r).await;
    assert_eq!(got[0].1.as_slice(), &data[..100]);
    assert_eq!(got[1].1.as_slice(), &data[1000..1100]);
    assert_eq!(fake.range_hits(&digest), 0, "nothing asked upstream");
    assert_eq!(
        hoard.metric("hoard_blob_ranges_total{source=\"download\"}"),
        1.0
    );
    gate.notify_one();
    let mut rest = first.to_vec();
    while let Some(chunk) = whole.chunk().await.unwrap() {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(rest, data);
}

#[tokio::test]
async fn a_range_far_ahead_of_a_slow_download_goes_upstream() {
    let fake = Fake::start().await;
    let data = blob(16 << 20, 4);
    let digest = fake.put_blob("library/x", data.clone());
    // 64 KiB every 200 ms: the tail of 16 MiB is a minute away.
    fake.fault("/blobs/", Fault::Slow(Duration::from_millis(200)));
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let path = format!("/v2/x/blobs/{digest}");
    let mut whole = hoard.get(&path).await;
    assert!(!whole.chunk().await.unwrap().unwrap().is_empty());
    let r = get_range(&hoard, &path, "bytes=-100").await;
    assert_eq!(r.status(), 206);
    let len = data.len();
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[len - 100..]);
    assert_eq!(fake.range_hits(&digest), 1);
    // Still the one download of the whole blob.
    assert_eq!(fake.hits("GET", &digest), 2);
    assert_eq!(hoard.metric("hoard_inflight_fetches"), 1.0);
}

#[tokio::test]
async fn several_ranges_of_a_cold_blob_go_upstream_or_get_416_never_a_whole_200() {
    let fake = Fake::start().await;
    let data = blob(100_000, 5);
    let digest = fake.put_blob("library/x", data.clone());
    let gate = Arc::new(Notify::new());
    fake.fault("/blobs/", Fault::GateWhole(gate.clone()));
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let path = format!("/v2/x/blobs/{digest}");
    // An upstream that answers several ranges: relayed as it answered.
    let r = get_range(&hoard, &path, "bytes=900-999,0-9").await;
    assert_eq!(r.status(), 206);
    let got = parts(r).await;
    assert_eq!(got[0].1.as_slice(), &data[900..1000]);
    assert_eq!(got[1].1.as_slice(), &data[..10]);
    gate.notify_one();
    assert!(eventually(Duration::from_secs(20), || hoard.blob_files() == 1).await);

    // One that answers them with the whole blob: 416, and a single range
    // still works.
    let other = blob(100_000, 6);
    let digest = fake.put_blob("library/y", other.clone());
    fake.clear_faults();
    fake.fault("/blobs/", Fault::IgnoreRange);
    let path = format!("/v2/y/blobs/{digest}");
    let r = get_range(&hoard, &path, "bytes=900-999,0-9").await;
    assert_eq!(r.status(), 416);
    assert_eq!(error_code(r).await, "RANGE_INVALID");
    let r = get_range(&hoard, &path, "bytes=10-19").await;
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &other[10..20]);

    // One that refuses several ranges with 416 (many registries do): the
    // same, and an unsatisfiable single range is a 416 naming the length.
    let third = blob(50_000, 7);
    let digest = fake.put_blob("library/z", third.clone());
    fake.clear_faults();
    fake.single_range_only();
    let path = format!("/v2/z/blobs/{digest}");
    let r = get_range(&hoard, &path, "bytes=0-1,5-6").await;
    assert_eq!(r.status(), 416);
    assert_eq!(error_code(r).await, "RANGE_INVALID");
    let r = get_range(&hoard, &path, "bytes=60000-").await;
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["content-range"], "bytes */50000");
    let r = get_range(&hoard, &path, "bytes=49990-").await;
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &third[49_990..]);
}

#[tokio::test]
async fn other_units_are_ignored_and_the_bytes_unit_is_case_insensitive() {
    let (_fake, hoard, data, path) = cached(10_000).await;
    let r = get_range(&hoard, &path, "items=0-1").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().len(), data.len());
    let r = get_range(&hoard, &path, "Bytes=0-1").await;
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[..2]);
}

#[tokio::test]
async fn an_open_range_inside_what_a_download_received_follows_it() {
    let fake = Fake::start().await;
    let data = blob(4 << 20, 8);
    let digest = fake.put_blob("library/x", data.clone());
    let gate = Arc::new(Notify::new());
    fake.fault("/blobs/", Fault::GateWhole(gate.clone()));
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let path = format!("/v2/x/blobs/{digest}");
    let mut whole = hoard.get(&path).await;
    assert!(!whole.chunk().await.unwrap().unwrap().is_empty());
    // A client resuming its own download from byte 100: the rest streams
    // along with the download, not a second transfer upstream.
    let mut r = get_range(&hoard, &path, "bytes=100-").await;
    assert_eq!(r.status(), 206);
    let mut got = r.chunk().await.unwrap().unwrap().to_vec();
    gate.notify_one();
    while let Some(chunk) = r.chunk().await.unwrap() {
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got.as_slice(), &data[100..]);
    assert_eq!(fake.range_hits(&digest), 0);
    assert_eq!(fake.hits("GET", &digest), 1);
    drop(whole);
}

#[tokio::test]
async fn a_partial_answer_without_content_range_is_not_relayed() {
    let fake = Fake::start().await;
    let data = blob(100_000, 9);
    let digest = fake.put_blob("library/x", data.clone());
    fake.fault("/blobs/", Fault::NoContentRange);
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let path = format!("/v2/x/blobs/{digest}");
    let r = get_range(&hoard, &path, "bytes=10-19").await;
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 10-19/100000");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &data[10..20]);
    assert_eq!(
        hoard.metric("hoard_blob_ranges_total{source=\"download\"}"),
        1.0
    );
}
