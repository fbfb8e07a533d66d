//! Blob lookups and downloads. A stored, linked blob is a hit. A missing one
//! starts (or joins) the one download for its digest; the download runs in
//! a detached task that outlives the client that started it: it hashes each
//! chunk as it arrives and hands it to readers from memory, while a blocking
//! thread appends it to the temp file, and commits only verified bytes.

use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::error::{Error, Result};
use super::fill::{Fill, FillState};
use super::fills::Lead;
use super::resume::Resumer;
use super::shared::Shared;
use super::stream::{self, ByteStream, Follow, Handoff, Piece};
use super::upload;
use super::Caller;
use super::Outcome;
use crate::cluster::{self, Owner};
use crate::reference::{Digest, Repository};
use crate::store::{self, BlobReader, BlobWriter, Bucket, StoredBlob, VerifiedBlob};
use crate::upstream;

/// Chunks queued between the network and the writer thread.
const WRITE_QUEUE: usize = 16;
/// Bytes received between two wake-ups of the readers.
const ANNOUNCE_EVERY: u64 = 128 << 10;

/// A blob ready to be sent.
pub struct Blob {
    /// How the lookup was answered.
    pub outcome: Outcome,
    /// The length, when known (always for stored blobs; for downloads when
    /// upstream sent `Content-Length`).
    pub len: Option<u64>,
    source: Source,
    served: prometheus::IntCounterVec,
}

enum Source {
    /// From the store; the callback takes the blob out if it proves damaged.
    Stored(StoredBlob, stream::OnDamaged),
    /// Following a download; the callback finishes a transfer the download
    /// fails locally.
    Filling(Arc<Fill>, stream::Resume),
    /// Not cached (the disk is nearly full): upstream's body relayed to
    /// this one client, still verified.
    Passthrough(Box<upstream::BlobResponse>, Digest),
}

impl Blob {
    /// Streams `start..end` (the whole blob with `None`).
    pub fn stream(self, range: Option<(u64, u64)>) -> ByteStream {
        let piece = match range {
            Some((start, end)) => Piece::Range(start, Some(end)),
            None => Piece::Range(0, self.len),
        };
        self.stream_pieces(vec![piece])
    }

    /// Whether `stream_pieces` can send several ranges: not for a blob
    /// relayed uncached, whose upstream body only goes forward once.
    pub fn serves_parts(&self) -> bool {
        !matches!(self.source, Source::Passthrough(..))
    }

    /// Streams ranges of the blob with the caller's bytes between them (a
    /// `multipart/byteranges` answer), in order.
    pub fn stream_pieces(self, pieces: Vec<Piece>) -> ByteStream {
        let source = if self.outcome == Outcome::Hit {
            "cache"
        } else {
            "upstream"
        };
        let served = self.served.with_label_values(&[source]);
        match self.source {
            Source::Stored(blob, on_damaged) => {
                stream::spawn(blob.reader, pieces, Follow::Stored(on_damaged), served)
            }
            Source::Filling(fill, resume) => {
                stream::spawn(fill.reader(), pieces, Follow::Fill(fill, resume), served)
            }
            Source::Passthrough(response, digest) => {
                // One pass over upstream's body: one range (`serves_parts`).
                debug_assert!(pieces.len() == 1);
                let (start, end) = match pieces.first() {
                    Some(Piece::Range(start, end)) => (*start, *end),
                    _ => (0, self.len),
                };
                stream::relay(*response, digest, start, end, served)
            }
        }
    }
}

/// Where a download gets the blob from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// The registry; with a bucket, the download is copied there too.
    Upstream,
    /// The shared bucket: another replica fetched it already.
    Bucket,
}

/// What `decide` settled, or what it needs first.
enum Decision {
    Step(Step),
    /// The blob is here (stored or downloading) but not known to be this
    /// repository's: only upstream (or the fleet's record of what upstream
    /// said) may say it is.
    Confirm,
    /// Nothing here: ask the shared bucket before going upstream.
    AskBucket,
}

/// What a request does about a blob.
enum Step {
    /// Serve it from the store.
    Stored(StoredBlob),
    /// Follow the download another request leads.
    Join(Arc<Fill>),
    /// Follow the download this request just started.
    Lead(Arc<Fill>, Origin),
    /// Relay it uncached (the disk is nearly full).
    Passthrough,
}

/// Finds or fetches `digest` for `repo`: this replica's store, a download
/// running here, the shared bucket, then upstream.
pub(super) async fn lookup(
    shared: &Arc<Shared>,
    repo: &Repository,
    digest: &Digest,
    caller: &Caller,
) -> Result<Blob> {
    let mut confirmed = false;
    // `None`: not asked yet; `Some(found)`: what the bucket said.
    let mut in_bucket: Option<bool> = None;
    let step = loop {
        match decide(shared, repo, digest, confirmed, in_bucket, caller)? {
            Decision::Step(step) => break step,
            Decision::Confirm => {
                confirm(shared, repo, digest).await?;
                confirmed = true;
            }
            Decision::AskBucket => {
                let bucket = shared.bucket.as_ref().expect("asked only with a bucket");
                let found = bucket.blob_size(digest).await?.is_some();
                if found && !confirmed {
                    vouch(shared, bucket, repo, digest).await?;
                    confirmed = true;
                }
                in_bucket = Some(found);
            }
        }
    };
    let (source, outcome, len) = match step {
        Step::Stored(blob) => {
            let len = Some(blob.meta.size);
            let on_damaged = damaged(shared, digest);
            (Source::Stored(blob, on_damaged), Outcome::Hit, len)
        }
        Step::Join(fill) => {
            // A verified download still being committed is as good as
            // stored: a hit.
            let outcome = if fill.is_complete() {
                Outcome::Hit
            } else {
                Outcome::Coalesced
            };
            let len = fill.started().await?;
            let resume = resume(shared, repo, digest, len);
            (Source::Filling(fill, resume), outcome, len)
        }
        Step::Lead(fill, origin) => {
            let len = fill.started().await?;
            let resume = resume(shared, repo, digest, len);
            // From the bucket: the cache answered, upstream was not asked.
            let outcome = match origin {
                Origin::Bucket => Outcome::Hit,
                Origin::Upstream => Outcome::Miss,
            };
            (Source::Filling(fill, resume), outcome, len)
        }
        Step::Passthrough => {
            // Relay without caching, and make room for next time.
            shared.metrics.store_bypassed.inc();
            shared.evict_wake.notify_one();
            let response = shared
                .upstream
                .get_blob(repo, digest)
                .await
                .map_err(|e| blob_error(e, repo, digest))?;
            let len = response.len;
            (
                Source::Passthrough(Box::new(response), digest.clone()),
                Outcome::Miss,
                len,
            )
        }
    };
    Ok(Blob {
        outcome,
        len,
        source,
        served: shared.metrics.served_bytes.clone(),
    })
}

/// What to do about `digest` for `repo`. The download decision is taken
/// under the downloads' lock, re-checking the store there: a download
/// commits before its lead leaves the map, so there is no moment when
/// neither shows the blob, and exactly one request leads. With a bucket,
/// a blob found nowhere here is first looked for there (`AskBucket`, then
/// `decide` again with the answer in `in_bucket`).
fn decide(
    shared: &Arc<Shared>,
    repo: &Repository,
    digest: &Digest,
    confirmed: bool,
    in_bucket: Option<bool>,
    caller: &Caller,
) -> Result<Decision> {
    if let Some(stored) = stored(shared, repo, digest, confirmed)? {
        return Ok(stored);
    }
    let mut fills = shared.fills.lock();
    if let Some(fill) = fills.running(digest) {
        let ours = confirmed || fill.repo() == repo || shared.store.is_linked(repo, digest)?;
        return Ok(if ours {
            Decision::Step(Step::Join(fill))
        } else {
            Decision::Confirm
        });
    }
    if let Some(stored) = stored(shared, repo, digest, confirmed)? {
        return Ok(stored);
    }
    let origin = match (shared.bucket.is_some(), in_bucket) {
        (true, None) => return Ok(Decision::AskBucket),
        (true, Some(true)) => Origin::Bucket,
        _ => Origin::Upstream,
    };
    if shared.low_on_space() {
        return Ok(Decision::Step(Step::Passthrough));
    }
    let writer = shared.store.create_download()?;
    let fill = Arc::new(Fill::new(repo.clone(), writer.reader()));
    fills.lead(digest, fill.clone(), |lead| {
        let task = run(
            shared.clone(),
            repo.clone(),
            digest.clone(),
            lead,
            writer,
            origin,
            caller.clone(),
        );
        tokio::spawn(task).abort_handle()
    });
    Ok(Decision::Step(Step::Lead(fill, origin)))
}

/// Asks upstream whether `repo` has `digest` (content cached for another
/// repository is not served before it says so) and records its yes here
/// and, with a bucket, for the fleet.
async fn confirm(shared: &Arc<Shared>, repo: &Repository, digest: &Digest) -> Result<()> {
    shared
        .upstream
        .head_blob(repo, digest)
        .await
        .map_err(|e| blob_error(e, repo, digest))?;
    shared.store.link(repo, digest)?;
    if let Some(bucket) = &shared.bucket {
        if let Err(e) = bucket.link(repo, std::slice::from_ref(digest)).await {
            warn!(repository = %repo, %digest, error = %e, "cannot record a link in the bucket");
        }
    }
    Ok(())
}

/// Redirect mode (`store.s3.redirect`): where a client may `GET` the blob
/// straight from the bucket (a presigned URL valid for `redirect_ttl`), so
/// its bytes do not pass through this replica; `None` when the bucket does
/// not have it yet (it is then served, and copied there, as usual) or the
/// asker is another replica, which wants the bytes.
pub(super) async fn redirect(
    shared: &Arc<Shared>,
    repo: &Repository,
    digest: &Digest,
    caller: &Caller,
) -> Result<Option<reqwest::Url>> {
    let (Some(bucket), Some(s3)) = (&shared.bucket, &shared.config.s3) else {
        return Ok(None);
    };
    if !s3.redirect || caller.from_peer {
        return Ok(None);
    }
    let signed = async {
        if bucket.blob_size(digest).await?.is_none() {
            return Ok(None);
        }
        vouch(shared, bucket, repo, digest).await?;
        Ok(Some(bucket.signed_blob_url(digest, s3.redirect_ttl).await?))
    };
    match signed.await {
        // The bucket failed: the bytes may still be here (or upstream's).
        Err(Error::Store(e)) if e.is_bucket() => {
            warn!(%digest, error = %e, "bucket unavailable, serving instead of redirecting");
            Ok(None)
        }
        other => other,
    }
}

/// Makes sure `repo` may see `digest`, which the bucket has: this
/// replica's record, the fleet's (a link another replica wrote when
/// upstream vouched), or upstream's word now; recorded here afterwards.
pub(super) async fn vouch(
    shared: &Arc<Shared>,
    bucket: &Bucket,
    repo: &Repository,
    digest: &Digest,
) -> Result<()> {
    if shared.store.is_linked(repo, digest)? {
        return Ok(());
    }
    if bucket.is_linked(repo, digest).await? {
        shared.store.link(repo, digest)?;
        return Ok(());
    }
    confirm(shared, repo, digest).await
}

/// What to do when a stored blob reads short: it was changed behind hoard's
/// back, so it leaves the store (quarantined) and the next request fetches
/// it again; only the transfer that found it is cut.
fn damaged(shared: &Arc<Shared>, digest: &Digest) -> stream::OnDamaged {
    let store = shared.store.clone();
    let digest = digest.clone();
    Box::new(move || {
        warn!(%digest, "stored blob is shorter than recorded: quarantined, will be fetched again");
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.quarantine_damaged(&digest) {
                warn!(%digest, error = %e, "cannot quarantine a damaged blob");
            }
        });
    })
}

/// Finishes a transfer whose download failed on the local side (disk full,
/// I/O error): the rest comes from upstream (`Range` from where the temp
/// file ends), relayed to that client, so it still gets the blob. When the
/// client asked for the whole blob, the bytes already on disk are re-read
/// to verify the whole before its last byte.
fn resume(
    shared: &Arc<Shared>,
    repo: &Repository,
    digest: &Digest,
    len: Option<u64>,
) -> stream::Resume {
    let (shared, repo, digest) = (shared.clone(), repo.clone(), digest.clone());
    Box::new(move |handoff: Handoff| {
        Box::pin(async move {
            // The reader may have sent bytes from memory that never reached
            // the file: ask from where the file ends (or `pos`).
            let on_disk = handoff.reader.file_len().unwrap_or(0);
            let from = handoff.pos.min(on_disk);
            let response = match shared.upstream.get_blob_from(&repo, &digest, from).await {
                Ok(response) => response,
                Err(e) => return handoff.fail(e.to_string()).await,
            };
            let whole = handoff.start == 0 && handoff.end.is_none_or(|end| Some(end) == len);
            let hasher = match (whole, response.offset) {
                (false, _) => None,
                (true, 0) => Some(Sha256::new()),
                (true, offset) => match hash_prefix(&handoff.reader, offset).await {
                    Ok(hasher) => Some(hasher),
                    Err(_) => {
                        let message = "cannot re-read the partial download".to_owned();
                        return handoff.fail(message).await;
                    }
                },
            };
            handoff.relay(response, digest, hasher).await;
        })
    })
}

/// Hashes the first `len` bytes `reader` holds.
async fn hash_prefix(reader: &BlobReader, len: u64) -> std::io::Result<Sha256> {
    let mut hasher = Sha256::new();
    let mut pos = 0;
    while pos < len {
        let chunk = reader
            .read(pos, (len - pos).min(stream::CHUNK) as usize)
            .await?;
        hasher.update(&chunk);
        pos += chunk.len() as u64;
    }
    Ok(hasher)
}

/// Answers a `HEAD`: from the store, a download in progress, or an upstream
/// `HEAD` (a `HEAD` alone does not start a download).
pub(super) async fn head(
    shared: &Arc<Shared>,
    repo: &Repository,
    digest: &Digest,
) -> Result<(Option<u64>, Outcome)> {
    if shared.store.is_linked(repo, digest)? {
        if let Some(meta) = shared.store.blob_meta(digest)? {
            return Ok((Some(meta.size), Outcome::Hit));
        }
    }
    let fill = shared.fills.running(digest);
    if let Some(fill) = fill.filter(|f| f.repo() == repo) {
        return Ok((fill.started().await?, Outcome::Coalesced));
    }
    if let Some(bucket) = &shared.bucket {
        // The fleet has it, and upstream vouched (to some replica) that
        // `repo` does: no upstream request.
        if let Some(size) = bucket.blob_size(digest).await? {
            vouch(shared, bucket, repo, digest).await?;
            return Ok((Some(size), Outcome::Hit));
        }
    }
    let len = shared
        .upstream
        .head_blob(repo, digest)
        .await
        .map_err(|e| blob_error(e, repo, digest))?;
    shared.store.link(repo, digest)?;
    match shared.store.blob_meta(digest)? {
        Some(meta) => Ok((Some(meta.size), Outcome::Hit)),
        None => Ok((len, Outcome::Miss)),
    }
}

/// `None` if the blob is not stored; else the stored blob, or `Confirm` if
/// it is not known to belong to `repo` (and not `confirmed`).
fn stored(
    shared: &Shared,
    repo: &Repository,
    digest: &Digest,
    confirmed: bool,
) -> Result<Option<Decision>> {
    if shared.store.blob_meta(digest)?.is_none() {
        return Ok(None);
    }
    if !confirmed && !shared.store.is_linked(repo, digest)? {
        return Ok(Some(Decision::Confirm));
    }
    // Gone since (evicted): decide as if it never was.
    Ok(shared
        .store
        .open_blob(digest)?
        .map(|blob| Decision::Step(Step::Stored(blob))))
}

/// The download task, holding the lead: fetch and verify (then readers may
/// finish), commit, then drop the lead (leave the map). Readers do not wait
/// for the fsync: they are served from the verified temp file, which stays
/// valid across the rename.
async fn run(
    shared: Arc<Shared>,
    repo: Repository,
    digest: Digest,
    lead: Lead,
    writer: BlobWriter,
    origin: Origin,
    caller: Caller,
) {
    let fill = lead.fill();
    let started = Instant::now();
    let mut uploading = None;
    let downloaded = download(
        &shared,
        &repo,
        &digest,
        fill,
        writer,
        (origin, &caller),
        &mut uploading,
    )
    .await;
    match downloaded {
        Ok(verified) => {
            fill.set(FillState::Complete {
                len: verified.size(),
            });
            let store = shared.store.clone();
            let committed = tokio::task::spawn_blocking(move || store.commit(verified, None)).await;
            match committed {
                Ok(Ok(meta)) => {
                    let linked = shared.store.link(&repo, &digest);
                    if let Err(e) = linked {
                        warn!(repository = %repo, %digest, error = %e, "cannot link blob");
                    }
                    shared
                        .metrics
                        .fetch_duration
                        .observe(started.elapsed().as_secs_f64());
                    super::evict::check(&shared);
                    debug!(repository = %repo, %digest, bytes = meta.size, "blob cached");
                }
                Ok(Err(e)) => {
                    warn!(repository = %repo, %digest, error = %e, "blob served but not cached")
                }
                Err(e) => warn!(repository = %repo, %digest, error = %e, "blob commit task failed"),
            }
        }
        Err(e) => {
            match &e {
                Error::DigestMismatch { .. } => shared.metrics.digest_mismatches.inc(),
                Error::Store(e) if !e.is_bucket() => {
                    // Disk full or failing: readers fetch the rest from
                    // upstream themselves (`resume`); make room.
                    shared.metrics.store_write_errors.inc();
                    shared.evict_wake.notify_one();
                }
                _ => {}
            }
            warn!(repository = %repo, %digest, error = %e, "blob download failed");
            fill.set(FillState::Failed(e));
        }
    }
    // Committed here (or failed): this replica's requests no longer need
    // the download, so it leaves the map before the copy to the bucket
    // ends (the copy reads the committed file, still open in the fill).
    drop(lead);
    if let Some(uploading) = uploading {
        finish_upload(&shared, &repo, &digest, uploading).await;
    }
}

/// Waits for the copy to the bucket and records there that `repo` has the
/// blob; a failure costs the fleet a later fetch, never this client.
async fn finish_upload(
    shared: &Shared,
    repo: &Repository,
    digest: &Digest,
    uploading: tokio::task::JoinHandle<store::Result<upload::Uploaded>>,
) {
    let result = match uploading.await {
        Ok(result) => result,
        Err(e) => Err(store::Error::Bucket {
            op: "upload",
            key: digest.to_string(),
            message: e.to_string(),
        }),
    };
    let label = match &result {
        Ok(upload::Uploaded::Done) => "ok",
        Ok(upload::Uploaded::Abandoned) => "abandoned",
        Err(_) => "error",
    };
    shared
        .metrics
        .bucket_uploads
        .with_label_values(&[label])
        .inc();
    match result {
        Ok(upload::Uploaded::Done) => {
            let bucket = shared.bucket.as_ref().expect("uploads need a bucket");
            if let Err(e) = bucket.link(repo, std::slice::from_ref(digest)).await {
                warn!(repository = %repo, %digest, error = %e, "cannot record a link in the bucket");
            }
            debug!(repository = %repo, %digest, "blob copied to the bucket");
        }
        Ok(upload::Uploaded::Abandoned) => {}
        Err(e) => {
            warn!(repository = %repo, %digest, error = %e, "blob not copied to the bucket")
        }
    }
}

/// A download's body: upstream's, the bucket's copy, or the stream of the
/// replica that owns the fetch.
enum Body {
    Upstream(upstream::BlobResponse),
    Bucket(store::BucketBody),
    Peer(String, reqwest::Response),
}

impl Body {
    fn len(&self) -> Option<u64> {
        match self {
            Body::Upstream(response) => response.len,
            Body::Bucket(body) => Some(body.size),
            Body::Peer(_, response) => response.content_length(),
        }
    }

    async fn chunk(&mut self, stall: std::time::Duration) -> Result<Option<bytes::Bytes>> {
        match self {
            Body::Upstream(response) => response.chunk().await.map_err(Error::Upstream),
            Body::Bucket(body) => match tokio::time::timeout(stall, body.chunk()).await {
                Ok(chunk) => Ok(chunk?),
                Err(_) => Err(Error::Store(store::Error::Bucket {
                    op: "read",
                    key: "blob".into(),
                    message: format!("no data for {}s", stall.as_secs()),
                })),
            },
            Body::Peer(peer, response) => {
                let broken = |message: String| {
                    Error::Peer(cluster::Error::Body {
                        peer: peer.clone(),
                        message,
                    })
                };
                match tokio::time::timeout(stall, response.chunk()).await {
                    Ok(Ok(chunk)) => Ok(chunk),
                    Ok(Err(e)) => Err(broken(e.to_string())),
                    Err(_) => Err(broken(format!("no data for {}s", stall.as_secs()))),
                }
            }
        }
    }
}

/// The body of the first replica above this one (for `digest`) that
/// answers; `None`: this replica owns the fetch (or every one above it is
/// down), so it asks upstream itself.
async fn from_owner(
    shared: &Shared,
    repo: &Repository,
    digest: &Digest,
    caller: &Caller,
) -> Result<Option<Body>> {
    let Some(cluster) = shared.cluster.as_ref().filter(|_| !caller.from_peer) else {
        return Ok(None);
    };
    let path = format!("/v2/{}/blobs/{digest}?ns={}", repo.name(), repo.registry());
    for owner in cluster.owners(digest.as_bytes()) {
        let Owner::Peer(peer) = owner else {
            return Ok(None);
        };
        match cluster.get(&peer, &path, &caller.headers()).await {
            Ok(response) => return Ok(Some(Body::Peer(peer, response))),
            Err(cluster::Error::Unreachable { .. }) => continue,
            Err(cluster::Error::Status { status: 404, .. }) => {
                return Err(Error::BlobUnknown {
                    repo: repo.clone(),
                    digest: digest.clone(),
                })
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(None)
}

async fn download(
    shared: &Arc<Shared>,
    repo: &Repository,
    digest: &Digest,
    fill: &Arc<Fill>,
    mut writer: BlobWriter,
    (origin, caller): (Origin, &Caller),
    uploading: &mut Option<tokio::task::JoinHandle<store::Result<upload::Uploaded>>>,
) -> Result<VerifiedBlob> {
    let from_bucket = match (origin, &shared.bucket) {
        (Origin::Bucket, Some(bucket)) => bucket.get_blob(digest, None).await?,
        _ => None,
    };
    let from_owner = match from_bucket {
        Some(body) => Some(Body::Bucket(body)),
        // Not in the bucket (or gone since: removed by its GC).
        None => from_owner(shared, repo, digest, caller).await?,
    };
    let mut response = match from_owner {
        Some(body) => body,
        None => Body::Upstream(
            shared
                .upstream
                .get_blob(repo, digest)
                .await
                .map_err(|e| blob_error(e, repo, digest))?,
        ),
    };
    let len = response.len();
    if let (Body::Upstream(_), Some(bucket)) = (&response, &shared.bucket) {
        *uploading = Some(upload::spawn(
            bucket.clone(),
            digest.clone(),
            fill.clone(),
            len,
            shared.uploads.clone(),
        ));
    }
    fill.set(FillState::Streaming { len, received: 0 });

    // Three stages side by side: this task receives, hashes and hands each
    // chunk to readers (through the fill's window); a blocking thread
    // appends to the temp file. The bounded queue keeps memory flat when
    // the disk is slower than the network.
    let (tx, mut rx) = mpsc::channel::<bytes::Bytes>(WRITE_QUEUE);
    let progress = fill.clone();
    let writing = tokio::task::spawn_blocking(move || -> store::Result<BlobWriter> {
        while let Some(chunk) = rx.blocking_recv() {
            writer.append(&chunk)?;
            progress.on_disk(writer.in_file());
        }
        writer.finish()?;
        progress.on_disk(writer.in_file());
        Ok(writer)
    });
    let mut hasher = Sha256::new();
    let mut received: u64 = 0;
    let mut announced: u64 = 0;
    let stall = shared.upstream.stall_timeout();
    // Upstream's bodies are resumed where they broke; the bucket's and a
    // peer's are not (the client retries, and the fleet's copy is there).
    let mut resumer = match &response {
        Body::Upstream(first) => Some(Resumer::new(shared, repo, digest, first)),
        _ => None,
    };
    let network = loop {
        let cut = match response.chunk(stall).await {
            Ok(Some(chunk)) => {
                let chunk = match resumer.as_mut().map(|r| r.fresh(chunk.clone())) {
                    None => chunk,
                    Some(Ok(fresh)) => fresh,
                    Some(Err(e)) => break Err(e),
                };
                if chunk.is_empty() {
                    continue;
                }
                received += chunk.len() as u64;
                if len.is_some_and(|len| received > len) {
                    break Err(Error::Upstream(upstream::Error::Body {
                        registry: repo.registry().to_owned(),
                        message: "body longer than content-length".into(),
                    }));
                }
                hasher.update(&chunk);
                fill.push(chunk.clone());
                // Wake readers per batch: each wake-up costs every reader a
                // poll, and network chunks are small.
                if announced == 0 || received - announced >= ANNOUNCE_EVERY {
                    announced = received;
                    fill.received(received);
                }
                if tx.send(chunk).await.is_err() {
                    break Ok(()); // the writer failed; its error is below
                }
                continue;
            }
            Ok(None) if len.is_none_or(|len| received >= len) => break Ok(()),
            Ok(None) => Error::Upstream(upstream::Error::Body {
                registry: repo.registry().to_owned(),
                message: format!("body ended after {received} bytes"),
            }),
            Err(e) => e,
        };
        // Cut or stalled: resume an upstream body while attempts remain.
        let Some(resumer) = resumer.as_mut() else {
            break Err(cut);
        };
        let Body::Upstream(broken) = response else {
            unreachable!("only upstream bodies have a resumer")
        };
        match resumer.reopen(broken, received, &hasher, len, cut).await {
            Ok(body) => response = Body::Upstream(body),
            Err(e) => break Err(e),
        }
    };
    fill.received(received);
    drop(tx);
    let writer = writing.await??;
    network?;
    if len.is_some_and(|len| writer.written() != len) {
        return Err(Error::Upstream(upstream::Error::Body {
            registry: repo.registry().to_owned(),
            message: format!(
                "body ended after {} of {} bytes",
                writer.written(),
                len.unwrap_or(0)
            ),
        }));
    }
    writer.verify_hashed(hasher, digest).map_err(|e| match e {
        store::Error::DigestMismatch { actual, .. } => Error::DigestMismatch {
            repo: repo.clone(),
            expected: digest.clone(),
            actual,
        },
        e => e.into(),
    })
}

pub(super) fn blob_error(e: upstream::Error, repo: &Repository, digest: &Digest) -> Error {
    match e {
        upstream::Error::NotFound { .. } => Error::BlobUnknown {
            repo: repo.clone(),
            digest: digest.clone(),
        },
        e => Error::Upstream(e),
    }
}
