//! The shared tier: an S3-compatible bucket (through `object_store`) that
//! every replica reads and writes, so what one replica fetched from
//! upstream every other one serves without asking upstream again. Holds:
//!
//! - `blobs/sha256/<hex>`: content (layers, configs and manifests alike),
//!   written only after its sha256 matched: a manifest with one `PUT`, a
//!   blob with a multipart upload completed after verification (`Upload`),
//!   so nothing partial or unverified ever exists under a content key;
//! - `tags/<registry>/<name>/<tag>`: what a tag resolved to and when
//!   upstream last confirmed it (a `TagRecord`), so a tag is revalidated
//!   once per TTL for the whole fleet;
//! - `links/<registry>/<name>/sha256/<hex>`: empty objects saying upstream
//!   confirmed that repository has that digest (the cross-repository check
//!   survives a replica with an empty disk);
//! - `uploads/<replica>/<id>`: one marker per multipart upload in progress,
//!   so uploads a crash abandoned can be found and aborted
//!   (`sweep_uploads`): the S3 API lists them, `object_store` does not.
//!
//! Every call is async and bounded by the client's timeouts; a failure is
//! `Error::Bucket`, which the registry answers as `UNAVAILABLE`.

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{
    Attribute, Attributes, BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore,
    PutOptions, PutPayload, RetryConfig,
};
use serde::{Deserialize, Serialize};

use super::error::{Error, Result};
use super::index::TagRecord;
use crate::clock;
use crate::config::{S3Config, S3Credentials};
use crate::reference::{Digest, Repository, MANIFEST_MEDIA_TYPES};

/// Bytes per part of a multipart upload (S3's minimum is 5 MiB, except
/// the last part).
pub const PART_SIZE: u64 = 8 << 20;
/// The content type of everything that is not a manifest (layers,
/// configs): what tells the two apart in the bucket.
const BLOB_TYPE: &str = "application/octet-stream";
/// Parts in flight at once across every upload: bounds the memory uploads
/// hold (each part is in memory while it is sent).
const PARTS_IN_FLIGHT: usize = 4;

/// What the bucket needs of an object store: objects and multipart
/// uploads (S3 in production, `object_store`'s in-memory store in tests).
pub trait Objects: ObjectStore + MultipartStore {}
impl<T: ObjectStore + MultipartStore> Objects for T {}

/// The bucket, its key prefix and this replica's name in upload markers.
#[derive(Debug)]
pub struct Bucket {
    /// Small requests (HEAD, records, listing), with a short timeout: a
    /// bucket that hangs fails them in seconds.
    s3: Arc<dyn Objects>,
    /// Blob bodies (GETs that stream to clients, upload parts), whose
    /// requests last as long as the transfer; a stalled body is caught by
    /// its reader's idle timeout.
    data: Arc<dyn Objects>,
    /// Presigns redirect URLs (S3 only).
    signer: Option<Arc<dyn Signer>>,
    prefix: String,
    /// `s3://bucket/prefix`, for messages.
    label: String,
    /// This replica's identity in upload markers (persistent per data dir).
    replica: String,
    parts: tokio::sync::Semaphore,
    /// Request latency and failures by operation, once `report_to` says
    /// where.
    observed: std::sync::OnceLock<(prometheus::HistogramVec, prometheus::IntCounterVec)>,
}

/// A blob's bytes coming from the bucket.
pub struct BucketBody {
    /// The blob's full size.
    pub size: u64,
    stream: futures_util::stream::BoxStream<'static, object_store::Result<Bytes>>,
    key: String,
}

impl BucketBody {
    /// The next chunk; `None` at the end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>> {
        match self.stream.next().await {
            None => Ok(None),
            Some(Ok(chunk)) => Ok(Some(chunk)),
            Some(Err(e)) => Err(Error::bucket("read", &self.key, e)),
        }
    }
}

/// What an upload marker records.
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    key: String,
    upload_id: String,
    started_ms: u64,
}

/// A multipart upload of one blob under its content key, invisible until
/// `complete`. Dropped without `complete` or `abort`, it stays as a marker
/// that `sweep_uploads` finds.
pub struct Upload {
    bucket: Arc<Bucket>,
    path: Path,
    id: String,
    marker: Path,
    parts: Vec<PartId>,
}

impl Bucket {
    /// Connects to the bucket and checks it is there and writable (a probe
    /// object written and removed), so a wrong name, wrong credentials or
    /// an unreachable endpoint stop the start with an error naming the
    /// key to fix. `replica` names this replica in upload markers.
    pub async fn open(config: &S3Config, replica: &str) -> Result<Bucket> {
        let bucket = Bucket::connect(config, replica)?;
        bucket.check().await?;
        Ok(bucket)
    }

    /// The client, without touching the network.
    pub fn connect(config: &S3Config, replica: &str) -> Result<Bucket> {
        let control = Arc::new(s3_client(config, CONTROL_TIMEOUT)?);
        let data = Arc::new(s3_client(config, DATA_TIMEOUT)?);
        let label = format!("s3://{}/{}", config.bucket, config.prefix);
        let mut bucket = Bucket::new(
            control.clone(),
            Some(control),
            &config.prefix,
            label,
            replica,
        );
        bucket.data = data;
        Ok(bucket)
    }

    /// A bucket over any object store (`signer`: for redirects); `prefix`
    /// is empty or ends with `/`.
    pub fn new(
        objects: Arc<dyn Objects>,
        signer: Option<Arc<dyn Signer>>,
        prefix: &str,
        label: String,
        replica: &str,
    ) -> Bucket {
        Bucket {
            s3: objects.clone(),
            data: objects,
            signer,
            prefix: prefix.to_owned(),
            label,
            replica: replica.to_owned(),
            parts: tokio::sync::Semaphore::new(PARTS_IN_FLIGHT),
            observed: std::sync::OnceLock::new(),
        }
    }

    /// Records each request's latency in `duration` and its failures in
    /// `errors` (both by operation) from now on.
    pub fn report_to(&self, duration: prometheus::HistogramVec, errors: prometheus::IntCounterVec) {
        let _ = self.observed.set((duration, errors));
    }

    /// `request`, timed and its failure counted (a missing object is an
    /// answer, not a failure).
    async fn timed<T>(
        &self,
        op: &'static str,
        request: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> object_store::Result<T> {
        let started = std::time::Instant::now();
        let result = request.await;
        if let Some((duration, errors)) = self.observed.get() {
            duration
                .with_label_values(&[op])
                .observe(started.elapsed().as_secs_f64());
            if matches!(&result, Err(e) if !matches!(e, object_store::Error::NotFound { .. })) {
                errors.with_label_values(&[op]).inc();
            }
        }
        result
    }

    /// Lists, writes and removes a probe object: the bucket exists, the
    /// credentials sign, and they may write.
    pub async fn check(&self) -> Result<()> {
        let listing = self.s3.list_with_delimiter(Some(&self.path("blobs"))).await;
        if let Err(e) = listing {
            let key = match Refusal::of(&e) {
                Some(Refusal::NoBucket) => "store.s3.bucket",
                _ => "store.s3",
            };
            return Err(Error::Config {
                key,
                message: format!("cannot list {}: {}", self.label, describe(&e)),
            });
        }
        let probe = self.path(&format!("uploads/{}/probe", self.replica));
        let written = self.s3.put(&probe, PutPayload::from_static(b"probe")).await;
        if let Err(e) = written {
            return Err(Error::Config {
                key: "store.s3",
                message: format!("cannot write to {}: {}", self.label, describe(&e)),
            });
        }
        self.s3
            .delete(&probe)
            .await
            .map_err(|e| Error::bucket("delete", probe.as_ref(), e))?;
        Ok(())
    }

    fn path(&self, key: &str) -> Path {
        Path::from(format!("{}{key}", self.prefix))
    }

    fn blob_path(&self, digest: &Digest) -> Path {
        self.path(&format!("blobs/sha256/{}", digest.hex()))
    }

    fn tag_path(&self, repo: &Repository, tag: &str) -> Path {
        self.path(&format!("tags/{repo}/{tag}"))
    }

    fn link_path(&self, repo: &Repository, digest: &Digest) -> Path {
        self.path(&format!("links/{repo}/sha256/{}", digest.hex()))
    }

    /// The size of a stored blob, `None` if it is not there.
    pub async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>> {
        let path = self.blob_path(digest);
        match self.timed("head", self.s3.head(&path)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::bucket("head", path.as_ref(), e)),
        }
    }

    /// A stored blob's bytes (`range` of them), streamed; `None` if it is
    /// not there.
    pub async fn get_blob(
        &self,
        digest: &Digest,
        range: Option<Range<u64>>,
    ) -> Result<Option<BucketBody>> {
        let path = self.blob_path(digest);
        let options = GetOptions {
            range: range.map(GetRange::Bounded),
            ..GetOptions::default()
        };
        match self.timed("get", self.data.get_opts(&path, options)).await {
            Ok(result) => Ok(Some(BucketBody {
                size: result.meta.size,
                key: path.to_string(),
                stream: result.into_stream(),
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::bucket("get", path.as_ref(), e)),
        }
    }

    /// A stored manifest: its media type and bytes, checked against its
    /// digest (the bucket is trusted no more than upstream). `None` if the
    /// object is not there, is not a manifest (its type is no manifest
    /// type: blobs are stored as `BLOB_TYPE`), or
    /// is larger than `limit` (its body is then never read).
    pub async fn get_manifest(
        &self,
        digest: &Digest,
        limit: u64,
    ) -> Result<Option<(String, Bytes)>> {
        let path = self.blob_path(digest);
        let result = match self.timed("get", self.s3.get(&path)).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(Error::bucket("get", path.as_ref(), e)),
        };
        let media_type = result
            .attributes
            .get(&Attribute::ContentType)
            .map(|v| v.to_string())
            // Multipart uploads (large blobs) get the server's default type.
            .filter(|t| t.contains("manifest") || MANIFEST_MEDIA_TYPES.contains(&t.as_str()));
        let Some(media_type) = media_type.filter(|_| result.meta.size <= limit) else {
            return Ok(None);
        };
        let bytes = result
            .bytes()
            .await
            .map_err(|e| Error::bucket("get", path.as_ref(), e))?;
        let actual = Digest::of(&bytes);
        if actual != *digest {
            return Err(Error::DigestMismatch {
                expected: digest.clone(),
                actual,
                size: bytes.len() as u64,
            });
        }
        Ok(Some((media_type, bytes)))
    }

    /// Stores verified content small enough for one request (a manifest,
    /// a small blob): a single `PUT` is atomic, so the object is whole or
    /// absent. `media_type` is set for manifests.
    pub async fn put_verified(
        &self,
        digest: &Digest,
        media_type: Option<&str>,
        bytes: Bytes,
    ) -> Result<()> {
        debug_assert_eq!(Digest::of(&bytes), *digest);
        let path = self.blob_path(digest);
        let mut attributes = Attributes::new();
        attributes.insert(
            Attribute::ContentType,
            media_type.unwrap_or(BLOB_TYPE).to_owned().into(),
        );
        let options = PutOptions {
            attributes,
            ..PutOptions::default()
        };
        self.timed("put", self.data.put_opts(&path, bytes.into(), options))
            .await
            .map_err(|e| Error::bucket("put", path.as_ref(), e))?;
        Ok(())
    }

    /// A permit to hold one part (or one small blob) in memory: at most
    /// `PARTS_IN_FLIGHT` at once across every upload.
    pub async fn part_permit(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.parts.acquire().await.expect("never closed")
    }

    /// Starts the multipart upload of `digest`, leaving a marker first
    /// found by `sweep_uploads` if this replica dies before it ends.
    pub async fn start_upload(self: &Arc<Self>, digest: &Digest) -> Result<Upload> {
        let path = self.blob_path(digest);
        let id = self
            .s3
            .create_multipart(&path)
            .await
            .map_err(|e| Error::bucket("create upload", path.as_ref(), e))?;
        let marker_path = self.path(&format!(
            "uploads/{}/{}-{}",
            self.replica,
            digest.hex(),
            clock::unix_ms()
        ));
        let marker = Marker {
            key: path.to_string(),
            upload_id: id.clone(),
            started_ms: clock::unix_ms(),
        };
        let body = serde_json::to_vec(&marker).expect("markers serialize");
        if let Err(e) = self.s3.put(&marker_path, body.into()).await {
            let _ = self.s3.abort_multipart(&path, &id).await;
            return Err(Error::bucket("put", marker_path.as_ref(), e));
        }
        Ok(Upload {
            bucket: self.clone(),
            path,
            id,
            marker: marker_path,
            parts: Vec::new(),
        })
    }

    /// Aborts uploads whose marker is older than `older_than`, and the ones
    /// this replica started before `own_before` (unix ms: when this process
    /// started, so what it finds of its own was left by a crash). Returns
    /// how many it aborted.
    pub async fn sweep_uploads(&self, older_than: Duration, own_before: u64) -> Result<usize> {
        let prefix = self.path("uploads");
        let mine = format!("{}uploads/{}/", self.prefix, self.replica);
        let listed: Vec<_> = self
            .s3
            .list(Some(&prefix))
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<object_store::Result<_>>()
            .map_err(|e| Error::bucket("list", prefix.as_ref(), e))?;
        let now = clock::unix_ms();
        let mut aborted = 0;
        for meta in listed {
            let written = meta.last_modified.timestamp_millis().max(0) as u64;
            let old = u128::from(now.saturating_sub(written)) >= older_than.as_millis();
            let own = meta.location.as_ref().starts_with(&mine);
            if !old && !own {
                continue;
            }
            let body = match self.s3.get(&meta.location).await {
                Ok(result) => result.bytes().await.ok(),
                Err(_) => None,
            };
            let marker = body.and_then(|b| serde_json::from_slice::<Marker>(&b).ok());
            // Our own clock decides for our own markers (the server's may
            // differ); what is not a marker (a probe) goes too.
            let left_by_crash = own && marker.as_ref().is_none_or(|m| m.started_ms < own_before);
            if !old && !left_by_crash {
                continue;
            }
            if let Some(marker) = marker {
                let path = Path::from(marker.key);
                // Already completed or aborted: S3 answers 404, fine. Any
                // other failure keeps the marker for the next sweep.
                match self.s3.abort_multipart(&path, &marker.upload_id).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(_) => continue,
                }
            }
            self.s3
                .delete(&meta.location)
                .await
                .map_err(|e| Error::bucket("delete", meta.location.as_ref(), e))?;
            aborted += 1;
        }
        Ok(aborted)
    }

    /// What `repo:tag` resolved to, as the fleet last recorded it.
    pub async fn tag(&self, repo: &Repository, tag: &str) -> Result<Option<TagRecord>> {
        let path = self.tag_path(repo, tag);
        let bytes = match self.timed("get", self.s3.get(&path)).await {
            Ok(result) => result
                .bytes()
                .await
                .map_err(|e| Error::bucket("get", path.as_ref(), e))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(Error::bucket("get", path.as_ref(), e)),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|_| Error::CorruptRecord(path.to_string()))
    }

    /// Records what `repo:tag` resolves to now.
    pub async fn put_tag(&self, repo: &Repository, tag: &str, record: &TagRecord) -> Result<()> {
        let path = self.tag_path(repo, tag);
        let body = serde_json::to_vec(record).expect("tag records serialize");
        self.timed("put", self.s3.put(&path, body.into()))
            .await
            .map_err(|e| Error::bucket("put", path.as_ref(), e))?;
        Ok(())
    }

    /// Forgets a tag upstream no longer has.
    pub async fn remove_tag(&self, repo: &Repository, tag: &str) -> Result<()> {
        let path = self.tag_path(repo, tag);
        match self.s3.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::bucket("delete", path.as_ref(), e)),
        }
    }

    /// Whether upstream was seen to confirm `repo` has `digest`.
    pub async fn is_linked(&self, repo: &Repository, digest: &Digest) -> Result<bool> {
        let path = self.link_path(repo, digest);
        match self.timed("head", self.s3.head(&path)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(Error::bucket("head", path.as_ref(), e)),
        }
    }

    /// Records that upstream confirmed `repo` has each of `digests`.
    pub async fn link(&self, repo: &Repository, digests: &[Digest]) -> Result<()> {
        let mut writes = tokio::task::JoinSet::new();
        for digest in digests {
            let (s3, path) = (self.s3.clone(), self.link_path(repo, digest));
            writes.spawn(async move {
                s3.put(&path, PutPayload::new())
                    .await
                    .map_err(|e| Error::bucket("put", path.as_ref(), e))
            });
        }
        while let Some(done) = writes.join_next().await {
            done.map_err(|e| Error::Bucket {
                op: "put",
                key: "links".into(),
                message: e.to_string(),
            })??;
        }
        Ok(())
    }

    /// A URL that lets its holder `GET` a blob for `ttl`, signed with the
    /// bucket's credentials (which the URL carries only as a signature).
    pub async fn signed_blob_url(&self, digest: &Digest, ttl: Duration) -> Result<reqwest::Url> {
        let path = self.blob_path(digest);
        let signer = self.signer.as_ref().ok_or_else(|| Error::Config {
            key: "store.s3.redirect",
            message: "this object store cannot presign URLs".into(),
        })?;
        let url = signer
            .signed_url(http::Method::GET, &path, ttl)
            .await
            .map_err(|e| Error::bucket("sign", path.as_ref(), e))?;
        url.as_str().parse().map_err(|e| Error::Bucket {
            op: "sign",
            key: path.to_string(),
            message: format!("{e}"),
        })
    }
}

/// A lease record: who runs a fleet-wide job, until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub holder: String,
    pub until_ms: u64,
}

/// One object under `blobs/`, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedBlob {
    pub digest: Digest,
    pub size: u64,
    /// Unix ms of its upload.
    pub written_ms: u64,
}

impl Bucket {
    /// Every key under `prefix` (relative to the bucket's prefix), with its
    /// size and upload time.
    async fn list_under(&self, prefix: &str) -> Result<Vec<(String, u64, u64)>> {
        let path = self.path(prefix);
        let listed: Vec<_> = self
            .s3
            .list(Some(&path))
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<object_store::Result<_>>()
            .map_err(|e| Error::bucket("list", path.as_ref(), e))?;
        Ok(listed
            .into_iter()
            .map(|meta| {
                let key = meta
                    .location
                    .as_ref()
                    .strip_prefix(&self.prefix)
                    .unwrap_or(meta.location.as_ref())
                    .to_owned();
                let written = meta.last_modified.timestamp_millis().max(0) as u64;
                (key, meta.size, written)
            })
            .collect())
    }

    /// Every blob and manifest in the bucket.
    pub async fn list_blobs(&self) -> Result<Vec<ListedBlob>> {
        Ok(self
            .list_under("blobs/sha256")
            .await?
            .into_iter()
            .filter_map(|(key, size, written_ms)| {
                let hex = key.rsplit('/').next()?;
                let digest = Digest::parse(&format!("sha256:{hex}")).ok()?;
                Some(ListedBlob {
                    digest,
                    size,
                    written_ms,
                })
            })
            .collect())
    }

    /// Every tag record: `registry/name:tag` and what it points to.
    pub async fn list_tags(&self) -> Result<Vec<(Repository, String, TagRecord)>> {
        let mut out = Vec::new();
        for (key, _, _) in self.list_under("tags").await? {
            let Some(rest) = key.strip_prefix("tags/") else {
                continue;
            };
            let Some((repo, tag)) = rest.rsplit_once('/') else {
                continue;
            };
            let Some((registry, name)) = repo.split_once('/') else {
                continue;
            };
            let Ok(repo) = Repository::new(registry, name) else {
                continue;
            };
            // Removed since it was listed: skip it.
            if let Some(record) = self.tag(&repo, tag).await? {
                out.push((repo, tag.to_owned(), record));
            }
        }
        Ok(out)
    }

    /// Removes a blob or manifest (the fleet's GC: only what no kept
    /// manifest names).
    pub async fn delete_blob(&self, digest: &Digest) -> Result<()> {
        let path = self.blob_path(digest);
        match self.s3.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::bucket("delete", path.as_ref(), e)),
        }
    }

    /// Images pinned on any replica (`registry/name:tag` or `@digest`).
    pub async fn pins(&self) -> Result<Vec<String>> {
        Ok(self
            .list_under("pins")
            .await?
            .into_iter()
            .filter_map(|(key, _, _)| {
                let encoded = key.strip_prefix("pins/")?;
                String::from_utf8(hex::decode(encoded).ok()?).ok()
            })
            .collect())
    }

    /// Pins an image for the fleet.
    pub async fn add_pin(&self, image: &str) -> Result<()> {
        let path = self.pin_path(image);
        self.s3
            .put(&path, PutPayload::new())
            .await
            .map_err(|e| Error::bucket("put", path.as_ref(), e))?;
        Ok(())
    }

    /// Unpins an image for the fleet.
    pub async fn remove_pin(&self, image: &str) -> Result<()> {
        let path = self.pin_path(image);
        match self.s3.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::bucket("delete", path.as_ref(), e)),
        }
    }

    /// Pins are keyed by their name in hex: names hold `/`, `:` and `@`.
    fn pin_path(&self, image: &str) -> Path {
        self.path(&format!("pins/{}", hex::encode(image)))
    }

    /// Takes (or renews) the lease `name` for `ttl` unless another replica
    /// holds it. S3-compatible servers differ on conditional writes (Garage
    /// 2.5 accepts `If-None-Match: *` on an existing key and overwrites), so
    /// the lease is written, then read back a moment later: of two
    /// replicas racing, the last writer holds it and the other sees so. The
    /// jobs run under a lease are safe to run twice; the lease only keeps
    /// the fleet from doing the work once per replica.
    pub async fn take_lease(&self, name: &str, ttl: Duration) -> Result<bool> {
        let path = self.path(&format!("leases/{name}"));
        let now = clock::unix_ms();
        if let Some(lease) = self.read_lease(&path).await? {
            if lease.holder != self.replica && lease.until_ms > now {
                return Ok(false);
            }
        }
        let lease = Lease {
            holder: self.replica.clone(),
            until_ms: now + ttl.as_millis() as u64,
        };
        let body = serde_json::to_vec(&lease).expect("leases serialize");
        self.s3
            .put(&path, body.into())
            .await
            .map_err(|e| Error::bucket("put", path.as_ref(), e))?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(self.read_lease(&path).await?.as_ref() == Some(&lease))
    }

    /// Who holds the lease `name` now, if anyone.
    pub async fn lease_holder(&self, name: &str) -> Result<Option<Lease>> {
        let path = self.path(&format!("leases/{name}"));
        let lease = self.read_lease(&path).await?;
        Ok(lease.filter(|l| l.until_ms > clock::unix_ms()))
    }

    async fn read_lease(&self, path: &Path) -> Result<Option<Lease>> {
        match self.s3.get(path).await {
            Ok(result) => {
                let bytes = result
                    .bytes()
                    .await
                    .map_err(|e| Error::bucket("get", path.as_ref(), e))?;
                Ok(serde_json::from_slice(&bytes).ok())
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::bucket("get", path.as_ref(), e)),
        }
    }
}

impl Upload {
    /// Sends the next part (every part but the last at least 5 MiB);
    /// the caller holds a `part_permit` while the part is in memory.
    pub async fn put_part(&mut self, bytes: Bytes) -> Result<()> {
        let sending =
            self.bucket
                .data
                .put_part(&self.path, &self.id, self.parts.len(), bytes.into());
        let part = self
            .bucket
            .timed("put part", sending)
            .await
            .map_err(|e| Error::bucket("put part", self.path.as_ref(), e))?;
        self.parts.push(part);
        Ok(())
    }

    /// Makes the uploaded parts visible as the blob: call only once the
    /// bytes are verified.
    pub async fn complete(self) -> Result<()> {
        let completing =
            self.bucket
                .s3
                .complete_multipart(&self.path, &self.id, self.parts.clone());
        let result = self.bucket.timed("complete upload", completing).await;
        if let Err(e) = result {
            let e = Error::bucket("complete upload", self.path.as_ref(), e);
            self.abort().await;
            return Err(e);
        }
        let _ = self.bucket.s3.delete(&self.marker).await;
        Ok(())
    }

    /// Throws the parts away; nothing becomes visible. The marker goes
    /// only once the server let go of the parts: if the abort fails, the
    /// sweeper finds the marker and tries again.
    pub async fn abort(self) {
        match self.bucket.s3.abort_multipart(&self.path, &self.id).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {
                let _ = self.bucket.s3.delete(&self.marker).await;
            }
            Err(e) => {
                tracing::warn!(key = %self.path, error = %describe(&e), "cannot abort an upload: the sweeper will")
            }
        }
    }
}

/// Whole-request limit of small requests.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// Whole-request limit of blob transfers (bodies included).
const DATA_TIMEOUT: Duration = Duration::from_secs(3600);

/// An S3 client for `config` whose requests end after `timeout`.
fn s3_client(config: &S3Config, timeout: Duration) -> Result<AmazonS3> {
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(&config.bucket)
        .with_client_options(client_options(config, timeout))
        .with_retry(RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: 2,
            retry_timeout: CONTROL_TIMEOUT,
        });
    if let Some(endpoint) = &config.endpoint {
        builder = builder
            .with_endpoint(endpoint.as_str().trim_end_matches('/'))
            // Path-style requests: what S3-compatible servers take
            // without per-bucket DNS names.
            .with_virtual_hosted_style_request(false);
    }
    if let Some(region) = &config.region {
        builder = builder.with_region(region);
    }
    if config.credentials == S3Credentials::Chain {
        if let Some(keys) = profile_keys() {
            builder = builder
                .with_access_key_id(keys.access_key_id)
                .with_secret_access_key(keys.secret_access_key);
            if let Some(token) = keys.session_token {
                builder = builder.with_token(token);
            }
        }
    }
    if let S3Credentials::Static {
        access_key_id,
        secret_access_key_file,
    } = &config.credentials
    {
        let secret =
            std::fs::read_to_string(secret_access_key_file).map_err(|e| Error::Config {
                key: "store.s3.secret_access_key_file",
                message: format!("cannot read {}: {e}", secret_access_key_file.display()),
            })?;
        let secret = secret.trim();
        if secret.is_empty() {
            return Err(Error::Config {
                key: "store.s3.secret_access_key_file",
                message: format!("{} is empty", secret_access_key_file.display()),
            });
        }
        builder = builder
            .with_access_key_id(access_key_id)
            .with_secret_access_key(secret);
    }
    builder.build().map_err(|e| Error::Config {
        key: "store.s3",
        message: e.to_string(),
    })
}

/// Keys from a profile of the AWS shared credentials file.
#[derive(Debug, PartialEq, Eq)]
struct ProfileKeys {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
}

/// The AWS chain's profile step, which object_store leaves out: when the
/// environment names no keys and no web identity, the keys of `AWS_PROFILE`
/// (else `default`) in `AWS_SHARED_CREDENTIALS_FILE` (else
/// `~/.aws/credentials`). Without them, object_store goes on to the
/// container and instance metadata endpoints.
fn profile_keys() -> Option<ProfileKeys> {
    let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    if set("AWS_ACCESS_KEY_ID") || set("AWS_WEB_IDENTITY_TOKEN_FILE") {
        return None;
    }
    let file = std::env::var_os("AWS_SHARED_CREDENTIALS_FILE")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|home| std::path::Path::new(&home).join(".aws/credentials"))
        })?;
    let text = std::fs::read_to_string(file).ok()?;
    let profile = std::env::var("AWS_PROFILE").unwrap_or_else(|_| "default".to_owned());
    parse_profile(&text, &profile)
}

/// `profile`'s keys in the INI text of a shared credentials file.
fn parse_profile(text: &str, profile: &str) -> Option<ProfileKeys> {
    let mut in_profile = false;
    let (mut id, mut secret, mut token) = (None, None, None);
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_profile = section.trim() == profile;
            continue;
        }
        if !in_profile {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            let value = value.trim().to_owned();
            match key.trim() {
                "aws_access_key_id" => id = Some(value),
                "aws_secret_access_key" => secret = Some(value),
                "aws_session_token" => token = Some(value),
                _ => {}
            }
        }
    }
    Some(ProfileKeys {
        access_key_id: id?,
        secret_access_key: secret?,
        session_token: token,
    })
}

fn client_options(config: &S3Config, timeout: Duration) -> ClientOptions {
    let mut options = ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(timeout)
        .with_pool_idle_timeout(Duration::from_secs(60));
    if config
        .endpoint
        .as_ref()
        .is_some_and(|url| url.scheme() == "http")
    {
        options = options.with_allow_http(true);
    }
    options
}

/// How a server refused a request, from its S3 error code (object_store
/// reports most of them as generic errors carrying the server's reply).
enum Refusal {
    NoBucket,
    Credentials,
}

impl Refusal {
    fn of(e: &object_store::Error) -> Option<Refusal> {
        if let object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } = e
        {
            return Some(Refusal::Credentials);
        }
        let text = e.to_string();
        if text.contains("NoSuchBucket") {
            Some(Refusal::NoBucket)
        } else if [
            "AccessDenied",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "403 Forbidden",
        ]
        .iter()
        .any(|code| text.contains(code))
        {
            Some(Refusal::Credentials)
        } else {
            None
        }
    }
}

/// An object-store error in a sentence: what the server or the network
/// said, without the request's signed URL or headers.
fn describe(e: &object_store::Error) -> String {
    match (e, Refusal::of(e)) {
        (_, Some(Refusal::NoBucket)) => "the bucket does not exist".to_owned(),
        (_, Some(Refusal::Credentials)) => {
            "the credentials were refused (check the key id and secret)".to_owned()
        }
        (object_store::Error::NotFound { .. }, None) => "not found".to_owned(),
        (other, None) => {
            // object_store's messages name the URL (bucket and key) and
            // the server's reply; neither holds a credential.
            other.to_string().chars().take(400).collect()
        }
    }
}

impl Error {
    /// A bucket request that failed.
    pub(crate) fn bucket(op: &'static str, key: &str, e: object_store::Error) -> Error {
        Error::Bucket {
            op,
            key: key.to_owned(),
            message: describe(&e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_profile_of_the_shared_credentials_file_gives_its_keys() {
        let text = "[default]\naws_access_key_id = AKIADEFAULT\naws_secret_access_key = s1\n\n\
                    # CI's keys\n[ci]\naws_access_key_id=AKIACI\naws_secret_access_key=s2\naws_session_token = t\n";
        assert_eq!(
            parse_profile(text, "ci"),
            Some(ProfileKeys {
                access_key_id: "AKIACI".into(),
                secret_access_key: "s2".into(),
                session_token: Some("t".into()),
            })
        );
        assert_eq!(
            parse_profile(text, "default").unwrap().access_key_id,
            "AKIADEFAULT"
        );
        assert_eq!(parse_profile(text, "missing"), None);
        assert_eq!(parse_profile("[x]\naws_access_key_id = only\n", "x"), None);
    }
}
