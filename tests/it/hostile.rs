//! A corpus of hostile requests: path traversal in every encoding and
//! position, NUL bytes, invalid UTF-8, overlong targets and heads, huge and
//! overflowing Range headers, slow heads and connection floods. Every one
//! gets an error (a registry JSON error wherever hoard, not the HTTP parser,
//! answers), nothing reaches upstream, and nothing is written.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::fake::Fake;
use crate::{count_files, send_raw, Hoard};

async fn send(hoard: &Hoard, raw: &[u8]) -> (u16, String) {
    send_raw(hoard.addr, raw).await
}

fn request(method: &str, target: &[u8], headers: &str) -> Vec<u8> {
    let mut raw = format!("{method} ").into_bytes();
    raw.extend_from_slice(target);
    raw.extend_from_slice(
        format!(" HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{headers}\r\n").as_bytes(),
    );
    raw
}

fn json_code(body: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(body).ok()?;
    value["errors"][0]["code"].as_str().map(str::to_owned)
}

/// Traversal and junk payloads, each placed in every part of a request.
const PAYLOADS: &[&str] = &[
    "..",
    "%2e%2e",
    "%2E%2E",
    ".%2e",
    "%2e.",
    "%252e%252e",
    "..%2f..%2fetc%2fpasswd",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "..%5c..%5cwindows",
    "..\\..\\windows",
    "%c0%ae%c0%ae",
    "%ef%bc%8e%ef%bc%8e",
    "..;",
    "....//",
    "%00",
    "a%00b",
    "..%00",
    "%ff%fe",
    "%2f",
    "a%2fb",
    "~root",
    "$(id)",
    "%0d%0aSet-Cookie:x",
    "*",
];

const DIGEST: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

fn targets(p: &str) -> Vec<String> {
    vec![
        format!("/v2/{p}/manifests/latest"),
        format!("/v2/library/{p}/manifests/latest"),
        format!("/v2/a/{p}/b/blobs/{DIGEST}"),
        format!("/v2/{p}/blobs/{DIGEST}"),
        format!("/v2/alpine/manifests/{p}"),
        format!("/v2/alpine/blobs/sha256:{p}"),
        format!("/v2/alpine/blobs/{p}"),
        format!("/v2/{p}/tags/list"),
        format!("/v2/alpine/manifests/{p}?ns=docker.io"),
        format!("/v2/alpine/manifests/latest?ns={p}"),
        format!("/v2/{p}/alpine/manifests/latest"),
        format!("/v2/alpine/tags/list?n={p}"),
    ]
}

#[tokio::test]
async fn a_corpus_of_malicious_requests_gets_errors_and_writes_nothing() {
    let fake = Fake::start().await;
    // The data dir sits alone in a folder of this test's own, so "nothing
    // appeared beside it" counts only what this test's daemon could write.
    let sandbox = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir_in(sandbox.path()).unwrap();
    let hoard = Hoard::start_in(data, &fake.url(), &[], |_| {}).await;
    let beside = || -> Vec<_> {
        std::fs::read_dir(sandbox.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect()
    };
    assert_eq!(beside().len(), 1, "only the data dir");
    let mut tried = 0;
    let mut json = 0;

    for payload in PAYLOADS {
        for target in targets(payload) {
            for method in ["GET", "HEAD"] {
                tried += 1;
                let (status, body) = send(&hoard, &request(method, target.as_bytes(), "")).await;
                // Some payloads make a valid name or tag (`~root` is not,
                // `*` is not...): none may be served or reach upstream.
                assert!(
                    (400..500).contains(&status),
                    "{method} {target}: {status} {body}"
                );
                if method == "GET" {
                    // hoard answers JSON; a 400 without body is the HTTP
                    // parser refusing the request line itself.
                    match json_code(&body) {
                        Some(_) => json += 1,
                        None => assert_eq!(status, 400, "{target}: {body}"),
                    }
                }
            }
        }
    }

    // Raw bytes the HTTP parser sees first: NUL, invalid UTF-8, CR/LF, space.
    for target in [
        &b"/v2/a\x00b/manifests/latest"[..],
        b"/v2/\xff\xfe/manifests/latest",
        b"/v2/a/manifests/\xc0\xae\xc0\xae",
        b"/v2/a\r\nX: y/manifests/latest",
        b"/v2/a b/manifests/latest",
    ] {
        tried += 1;
        let (status, _) = send(&hoard, &request("GET", target, "")).await;
        assert!(
            (400..500).contains(&status) || status == 0,
            "{target:?}: {status}"
        );
    }

    // Overlong target: a JSON 414.
    tried += 1;
    let long = format!("/v2/alpine/manifests/latest?ns={}", "a".repeat(5000));
    let (status, body) = send(&hoard, &request("GET", long.as_bytes(), "")).await;
    assert_eq!(status, 414, "{body}");
    assert_eq!(json_code(&body).as_deref(), Some("UNSUPPORTED"));

    // Oversized head, too many headers: refused by the parser (431).
    for headers in [
        format!("X-Big: {}\r\n", "a".repeat(100 * 1024)),
        (0..500)
            .map(|i| format!("X-{i}: v\r\n"))
            .collect::<String>(),
    ] {
        tried += 1;
        let (status, _) = send(&hoard, &request("GET", b"/v2/", &headers)).await;
        assert!(status == 431 || status == 0, "{status}");
    }

    assert!(
        fake.all_hits().is_empty(),
        "reached upstream: {:?}",
        fake.all_hits()
    );
    assert_eq!(hoard.blob_files(), 0);
    assert_eq!(count_files(&hoard.data.path().join("tmp")), 0);
    assert_eq!(beside().len(), 1, "a file appeared beside the data dir");
    println!("hostile corpus: {tried} requests, {json} answered with a registry JSON error");
}

#[tokio::test]
async fn hostile_ranges_are_refused_or_ignored_never_crash() {
    let fake = Fake::start().await;
    let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    let digest = fake.put_blob("library/a", data.clone());
    let hoard = Hoard::start(&fake.url(), &[], |_| {}).await;
    let path = format!("/v2/a/blobs/{digest}");
    assert_eq!(hoard.get(&path).await.bytes().await.unwrap().len(), 10_000);

    let many = (0..2000)
        .map(|i| format!("{}-{}", i * 2, i * 2 + 1))
        .collect::<Vec<_>>()
        .join(",");
    let cases = [
        format!("bytes={many}"),
        "bytes=-0".into(),
        "bytes=5-2".into(),
        "bytes=18446744073709551615-18446744073709551615".into(),
        "bytes=18446744073709551614-".into(),
        "bytes=99999999999999999999999-".into(),
        "bytes=-99999999999999999999999".into(),
        "bytes=--1".into(),
        "bytes=0--1".into(),
        "bytes=0-0,-1".into(),
        "bytes= 0-1".into(),
        "bytes=0-1 ".into(),
        "bytes=1-\u{0}".into(),
        "bytes=".into(),
        "bytes".into(),
        "items=0-1".into(),
        format!("bytes=0-{}", "9".repeat(5000)),
    ];
    for range in &cases {
        let (status, body) = send(
            &hoard,
            &request("GET", path.as_bytes(), &format!("Range: {range}\r\n")),
        )
        .await;
        match status {
            // An unsupported unit or form is ignored: the whole blob.
            // (The body comes back as lossy UTF-8.)
            200 => assert_eq!(body.len(), String::from_utf8_lossy(&data).len(), "{range}"),
            // Leading whitespace is tolerated: a proper part.
            206 => assert!(body.len() < 10_000, "{range}"),
            416 => assert_eq!(
                json_code(&body).as_deref(),
                Some("RANGE_INVALID"),
                "{range}"
            ),
            400 | 431 => {}
            other => panic!("Range {range:.60}: {other} {body:.200}"),
        }
    }
    assert_eq!(fake.hits("GET", "/blobs/"), 1);
}

#[tokio::test]
async fn a_slow_head_is_cut_and_a_connection_flood_gets_429() {
    let fake = Fake::start().await;
    let hoard = Hoard::start(&fake.url(), &[], |args| {
        args.header_read_timeout = Some("1s".into());
        args.max_connections_per_client = Some(3);
    })
    .await;

    // Slowloris: half a request head, then nothing.
    let mut slow = tokio::net::TcpStream::connect(hoard.addr).await.unwrap();
    slow.write_all(b"GET /v2/ HTTP/1.1\r\nHost: te")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "the slow client was not cut within 5 s");

    // Three idle connections are this client's share; a fourth gets 429.
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(tokio::net::TcpStream::connect(hoard.addr).await.unwrap());
    }
    // The server counts a connection once it accepts it: ask until the
    // fourth is refused.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (status, body) = send(&hoard, &request("GET", b"/v2/", "")).await;
        if status == 429 {
            break body;
        }
        assert_eq!(status, 200, "{body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the fourth connection was never refused"
        );
    };
    assert_eq!(json_code(&body).as_deref(), Some("TOOMANYREQUESTS"));
    drop(idle);
    // And frees them once it sees them closed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _) = send(&hoard, &request("GET", b"/v2/", "")).await;
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slots did not come back when connections closed"
        );
    }
}
