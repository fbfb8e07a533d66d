//! Issue 14 end to end: lazy pulling through a slow link. Real distribution
//! behind a real nginx relay limiting its rate (as an internet link does),
//! real hoard in front. The tail range of a cold layer (where stargz and
//! SOCI keep their table of contents) must arrive about as fast as straight
//! from the relay, not after the whole layer; the layer is then a hit, with
//! one upstream GET for all of it.

mod support;

use std::time::{Duration, Instant};

use support::fleet::{bound, Nginx};
use support::*;

/// Bytes per second the relay lets through, per connection.
const RATE: usize = 12 << 20;
/// The layer: two seconds of the link.
const LEN: usize = 24 << 20;
const TAIL: usize = 4096;

/// `GET url` with `Range: range`: the status, the body and how long the
/// whole answer took.
fn timed_range(
    client: &reqwest::blocking::Client,
    url: &str,
    range: &str,
) -> (u16, Vec<u8>, Duration) {
    let started = Instant::now();
    let response = client.get(url).header("range", range).send().unwrap();
    let status = response.status().as_u16();
    let body = response.bytes().unwrap().to_vec();
    (status, body, started.elapsed())
}

#[test]
fn issue_14_a_tail_range_of_a_cold_layer_arrives_at_link_speed_then_the_layer_is_a_hit() {
    let upstream = Distribution::start();
    let layer = Blob {
        media_type: OCI_LAYER.into(),
        data: noise(LEN, 14),
    };
    let digest = layer.digest();
    Pusher::new(&upstream.url()).blob("library/lazy", &layer);
    let relay = Nginx::relay(&bound(), &upstream.url(), "12m");
    let hoard = HoardProcess::start(&relay.url, &[]);
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let range = format!("bytes=-{TAIL}");
    let tail = &layer.data[LEN - TAIL..];

    let direct_url = format!("{}/v2/library/lazy/blobs/{digest}", relay.url);
    let (status, body, direct) = timed_range(&client, &direct_url, &range);
    assert_eq!((status, body.as_slice()), (206, tail));

    let url = format!("http://{}/v2/lazy/blobs/{digest}", hoard.addr());
    let (status, body, through) = timed_range(&client, &url, &range);
    assert_eq!((status, body.as_slice()), (206, tail));
    let whole = Duration::from_secs_f64(LEN as f64 / RATE as f64);
    println!(
        "tail {TAIL} B of a cold {} MiB layer at {} MiB/s: direct {:.3}s, through hoard {:.3}s ({:.1}x); the whole layer takes {:.1}s",
        LEN >> 20,
        RATE >> 20,
        direct.as_secs_f64(),
        through.as_secs_f64(),
        through.as_secs_f64() / direct.as_secs_f64(),
        whole.as_secs_f64()
    );
    // Before issue 14 the range waited for the whole layer. A small
    // multiple of the direct time, with room for a loaded machine.
    assert!(
        through < direct * 5 + Duration::from_millis(500) && through < whole / 2,
        "the tail range took {through:?} through hoard, {direct:?} direct"
    );

    // The layer downloads once in the background and is then a hit.
    wait_until(&hoard.daemon, Duration::from_secs(60), || {
        let response = client.head(&url).send().unwrap();
        response.headers()["x-hoard-cache"] == "hit"
    });
    let response = client.get(&url).send().unwrap();
    assert_eq!(response.headers()["x-hoard-cache"], "hit");
    assert_eq!(digest_of(&response.bytes().unwrap()), digest);
    let (status, body, _) = timed_range(&client, &url, &range);
    assert_eq!((status, body.as_slice()), (206, tail));

    // Upstream saw hoard's one range and one GET of the whole layer.
    let path = format!("/v2/library/lazy/blobs/{digest}");
    let lines: Vec<String> = relay
        .access_lines()
        .into_iter()
        .filter(|line| line.starts_with(&format!("GET {path} ")))
        .collect();
    let whole_gets = lines.iter().filter(|l| l.contains(" 200 - ")).count();
    let ranged = lines.iter().filter(|l| l.contains(" 206 bytes=")).count();
    // The direct range above is one of the ranged lines.
    assert_eq!((whole_gets, ranged), (1, 2), "{lines:#?}");
    assert_eq!(
        hoard.metric("hoard_blob_ranges_total{source=\"upstream\"}"),
        1.0
    );
}
