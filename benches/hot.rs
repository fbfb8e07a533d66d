//! Criterion benchmarks of the functions on hoard's request path: hashing
//! streamed chunks, parsing routes and references, and index lookups.
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

criterion_group!(benches, hashing, routing, index);
criterion_main!(benches);
