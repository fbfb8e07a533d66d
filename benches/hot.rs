//! Criterion benchmarks of the functions on hoard's request path: hashing
//! streamed chunks, parsing routes and references, index lookups, and
//! reading a cached blob's chunks (the pooled buffers of issue 16).
//! `cargo bench`; the daemon-level comparison is scripts/bench.sh.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use hoard::reference::{Digest, Repository};
use hoard::registry::route;
use hoard::store::{Store, TagRecord};
use sha2::{Digest as _, Sha256};

fn hashing(c: &mut Criterion) {
    let chunk = vec![0x5au8; 256 * 1024];
    let mut group = c.benchmark_group("sha256");
    group.throughput(Throughput::Bytes(16 * chunk.len() as u64));
    group.bench_function("16 x 256 KiB chunks", |b| {
        b.iter(|| {
            let mut hasher = Sha256::new();
            for _ in 0..16 {
                hasher.update(black_box(&chunk));
            }
            Digest::from_hasher(hasher)
        })
    });
    group.finish();
}

fn routing(c: &mut Criterion) {
    let digest = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    let blob = format!("/v2/library/alpine/blobs/{digest}");
    c.bench_function("route manifest by tag", |b| {
        b.iter(|| {
            route(
                black_box("/v2/alpine/manifests/3.19"),
                black_box(Some("ns=docker.io")),
            )
        })
    });
    c.bench_function("route blob by digest", |b| {
        b.iter(|| route(black_box(&blob), None))
    });
    c.bench_function("parse digest", |b| {
        b.iter(|| Digest::parse(black_box(digest)))
    });
}

fn index(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let repo = Repository::new("docker.io", "alpine").unwrap();
    let mut digests = Vec::new();
    for i in 0..1000u32 {
        let data = i.to_le_bytes();
        let digest = Digest::of(&data);
        store.put_bytes(&digest, None, &data).unwrap();
        store.link(&repo, &digest).unwrap();
        digests.push(digest);
    }
    let record = TagRecord {
        digest: digests[0].clone(),
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        checked_at_ms: 0,
    };
    store.put_tag(&repo, "3.19", &record).unwrap();
    let mut i = 0;
    c.bench_function("index: blob meta + link", |b| {
        b.iter_batched(
            || {
                i = (i + 1) % digests.len();
                &digests[i]
            },
            |d| {
                (
                    store.blob_meta(d).unwrap(),
                    store.is_linked(&repo, d).unwrap(),
                )
            },
            BatchSize::SmallInput,
        )
    });
    c.bench_function("index: tag lookup", |b| {
        b.iter(|| store.tag(&repo, black_box("3.19")).unwrap())
    });
}

/// A cached blob's first chunk as a stored-blob response reads it: a 64 KiB
/// blob whole (a plain buffer) and a 256 KiB chunk of a larger one (a
/// pooled buffer, dropped as hyper drops it after the write).
fn reading(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    let digest = Digest::of(&data);
    store.put_bytes(&digest, None, &data).unwrap();
    let reader = store.open_blob(&digest).unwrap().unwrap().reader;
    // Into the page cache.
    reader.read_all(data.len() as u64).unwrap();
    let mut group = c.benchmark_group("read cached");
    for (name, n) in [("64 KiB blob", 64 << 10), ("256 KiB chunk", 256 << 10)] {
        group.throughput(Throughput::Bytes(n as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                let chunk = reader.read_cached(0, black_box(n)).unwrap().unwrap();
                assert_eq!(chunk.len(), n);
                chunk
            })
        });
    }
    group.finish();
    // What plain HTTP/1 pays per chunk instead of the read: asking the page
    // cache whether it holds the chunk before handing out a sendfile range.
    let mut group = c.benchmark_group("is cached");
    for (name, n) in [("64 KiB blob", 64 << 10), ("256 KiB chunk", 256 << 10)] {
        group.throughput(Throughput::Bytes(n as u64));
        group.bench_function(name, |b| {
            b.iter(|| assert!(reader.is_cached(0, black_box(n))))
        });
    }
    group.finish();
}

criterion_group!(benches, hashing, routing, index, reading);
criterion_main!(benches);
