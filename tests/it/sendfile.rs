//! Cached blobs on plain HTTP/1 leave with `sendfile` (issue 16): every
//! byte must still be the blob's, whatever the client does on the
//! connection (keep-alive, ranges, pipelining, reading slowly).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::fake::{digest_of, Fake};
use crate::Hoard;

const SENT: &str = "hoard_sendfile_bytes_total";
const SERVED: &str = r#"hoard_served_bytes_total{source="cache"}"#;

/// Bytes that differ at every offset (a misplaced range shows).
fn blob(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8)
        .collect()
}

/// hoard with `blob` cached: fetched, committed, and read once more so
/// that the page cache holds it (a download's own writes bypass it).
async fn cached(data: &[u8]) -> (Fake, Hoard, String) {
    let fake = Fake::start().await;
    let digest = fake.put_blob("library/big", data.to_vec());
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let path = format!("/v2/big/blobs/{digest}");
    let body = hoard.get(&path).await.bytes().await.unwrap();
    assert_eq!(digest_of(&body), digest);
    committed(&hoard, 1).await;
    let body = hoard.get(&path).await.bytes().await.unwrap();
    assert_eq!(digest_of(&body), digest);
    assert_eq!(fake.hits("GET", "/blobs/"), 1);
    (fake, hoard, path)
}

/// Waits until `n` downloads are committed and none runs: until then a
/// GET follows the download instead of reading the stored file.
async fn committed(hoard: &Hoard, n: usize) {
    assert!(
        crate::eventually(Duration::from_secs(20), || {
            hoard.blob_files() == n && hoard.metric("hoard_inflight_fetches") == 0.0
        })
        .await,
        "the downloads were never committed"
    );
}

#[tokio::test]
async fn cached_blobs_are_sent_from_the_page_cache_and_every_byte_is_the_blobs() {
    // Several chunks and a short last one.
    let data = blob(3 * 256 * 1024 + 12_345, 1);
    let (_fake, hoard, path) = cached(&data).await;
    let before = hoard.metric(SENT);
    let served_before = hoard.metric(SERVED);
    // One keep-alive connection: whole blob, a range, HEAD, whole again.
    for _ in 0..2 {
        let body = hoard.get(&path).await.bytes().await.unwrap();
        assert!(body == data, "the whole blob differs");
        let r = hoard
            .client
            .get(hoard.url(&path))
            .header("range", "bytes=262000-600000")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 206);
        assert!(r.bytes().await.unwrap() == data[262_000..=600_000]);
        let head = hoard.head(&path).await;
        assert_eq!(head.headers()["content-length"], data.len().to_string());
    }
    // The page cache held it (the test just read it): all of it left with
    // sendfile, nothing was copied.
    let sent = hoard.metric(SENT) - before;
    let expected = 2.0 * (data.len() as f64 + (600_000 - 262_000 + 1) as f64);
    assert_eq!(sent, expected, "bytes sent with sendfile");
    // Counted once each as served from the cache, as any other bytes.
    assert_eq!(hoard.metric(SERVED) - served_before, expected);
}

#[tokio::test]
async fn pipelined_requests_get_their_own_bytes_in_order() {
    let small = blob(70_000, 2);
    let large = blob(600_000, 3);
    let fake = Fake::start().await;
    let small_digest = fake.put_blob("library/p", small.clone());
    let large_digest = fake.put_blob("library/p", large.clone());
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    for digest in [&small_digest, &large_digest] {
        let body = hoard
            .get(&format!("/v2/p/blobs/{digest}"))
            .await
            .bytes()
            .await
            .unwrap();
        assert_eq!(&digest_of(&body), digest);
    }
    committed(&hoard, 2).await;
    let before = hoard.metric(SENT);
    // Four requests in one write: hyper answers them in turn while the
    // earlier answers may still sit in its write queue.
    let mut raw = String::new();
    for (digest, range) in [
        (&large_digest, None),
        (&small_digest, Some("bytes=5-69999")),
        (&large_digest, Some("bytes=-300001")),
        (&small_digest, None),
    ] {
        raw.push_str(&format!("GET /v2/p/blobs/{digest} HTTP/1.1\r\nHost: t\r\n"));
        if let Some(range) = range {
            raw.push_str(&format!("Range: {range}\r\n"));
        }
        raw.push_str("\r\n");
    }
    let mut stream = tokio::net::TcpStream::connect(hoard.addr).await.unwrap();
    stream.write_all(raw.as_bytes()).await.unwrap();
    let expected: [&[u8]; 4] = [&large, &small[5..], &large[large.len() - 300_001..], &small];
    let mut buffer = Vec::new();
    for (i, want) in expected.iter().enumerate() {
        let body = read_response(&mut stream, &mut buffer).await;
        assert!(body == *want, "response {i} differs");
    }
    assert!(hoard.metric(SENT) - before > 0.0);
}

/// One response's body off `stream` (Content-Length framed); bytes past it
/// stay in `buffer` for the next.
async fn read_response(stream: &mut tokio::net::TcpStream, buffer: &mut Vec<u8>) -> Vec<u8> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        fill(stream, buffer, deadline).await;
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .expect("a content-length")
        .trim()
        .parse()
        .unwrap();
    while buffer.len() < head_end + len {
        fill(stream, buffer, deadline).await;
    }
    let body = buffer[head_end..head_end + len].to_vec();
    buffer.drain(..head_end + len);
    body
}

/// Appends what `stream` has next to `buffer`.
async fn fill(
    stream: &mut tokio::net::TcpStream,
    buffer: &mut Vec<u8>,
    deadline: tokio::time::Instant,
) {
    let mut chunk = [0u8; 16 * 1024];
    let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
        .await
        .expect("response in time")
        .unwrap();
    assert!(n > 0, "connection closed early");
    buffer.extend_from_slice(&chunk[..n]);
}

#[tokio::test]
async fn a_slow_reader_with_a_tiny_window_gets_every_byte() {
    let data = blob(4 * 1024 * 1024 + 7, 4);
    let (_fake, hoard, path) = cached(&data).await;
    let before = hoard.metric(SENT);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(hoard.addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
        .await
        .unwrap();
    // A 4 KiB window read 8 KiB at a time: hoard's socket fills, sendfile
    // sends part of a chunk, waits for room, goes on.
    let mut buffer = Vec::new();
    let mut piece = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n = tokio::time::timeout_at(deadline, stream.read(&mut piece))
            .await
            .expect("the blob in time")
            .unwrap();
        assert!(n > 0, "connection closed early");
        buffer.extend_from_slice(&piece[..n]);
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            if buffer.len() >= at + 4 + data.len() {
                assert!(buffer[at + 4..] == data, "the blob differs");
                break;
            }
        }
    }
    assert_eq!(hoard.metric(SENT) - before, data.len() as f64);
}

#[tokio::test]
async fn the_first_hit_after_a_download_is_sent_from_the_page_cache_too() {
    // Downloads are written around the page cache (O_DIRECT where the file
    // system allows): the first hit loads the blob there without copying
    // it through hoard, then sends it like any later hit.
    let data = blob(2 * 1024 * 1024 + 99, 5);
    let fake = Fake::start().await;
    let digest = fake.put_blob("library/first", data.clone());
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let path = format!("/v2/first/blobs/{digest}");
    assert!(hoard.get(&path).await.bytes().await.unwrap() == data);
    committed(&hoard, 1).await;
    // Whatever of it the page cache still holds (a buffered tail, a file
    // system without O_DIRECT), dropped: the next GET finds none of it.
    evict(&crate::support::blob_file(hoard.data.path(), &digest));
    let before = hoard.metric(SENT);
    assert!(hoard.get(&path).await.bytes().await.unwrap() == data);
    assert_eq!(hoard.metric(SENT) - before, data.len() as f64);
    assert_eq!(fake.hits("GET", "/blobs/"), 1);
}

/// Drops `path`'s pages from the page cache (a no-op on tmpfs, where the
/// page cache is the file).
fn evict(path: &std::path::Path) {
    use std::os::unix::io::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    file.sync_all().unwrap();
    // SAFETY: plain advice on a file descriptor this test owns.
    let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0);
}
