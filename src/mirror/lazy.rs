//! Ranges of blobs (lazy pulling). stargz-snapshotter, SOCI and nydus start
//! containers before their layers are downloaded: they read a layer by
//! `Range`, its table of contents (at the end) first. A range hoard can
//! serve from what it has, or will have within a moment, is served here;
//! one range of a blob in the fleet's bucket is read from the bucket; any
//! other is forwarded upstream as a range and relayed at once. Either way
//! the one download of the whole blob starts (or goes on) in the background
//! (`upstream.range_fill`), so later requests are hits.

use std::sync::Arc;
use std::time::Duration;

use tracing::debug;

use super::blob::{self, Blob};
use super::error::{Error, Result};
use super::fill::Fill;
use super::shared::Shared;
use super::stream::{self, ByteStream};
use super::Caller;
use crate::ranges::Ranges;
use crate::reference::{Digest, Repository};
use crate::upstream::{self, ContentRange};

/// How soon the bytes a range needs must be due from a download running
/// here for the range to wait for them rather than go upstream: about the
/// time a ranged request upstream would take anyway.
const JOIN_WITHIN: Duration = Duration::from_secs(1);

/// A ranged blob, ready to be sent.
pub enum Ranged {
    /// Stored here, or downloading with the bytes at hand or due soon: the
    /// ranges are served from it.
    Here(Blob),
    /// One range read from the bucket, or upstream's answer to the
    /// client's own `Range`, relayed as it comes.
    Relayed(Relayed),
}

/// A partial answer (`206`) relayed.
pub struct Relayed {
    /// `multipart/byteranges; boundary=…` for several ranges; `None`: the
    /// blob's own type.
    pub content_type: Option<String>,
    /// The single range's `Content-Range`.
    pub content_range: Option<String>,
    pub len: Option<u64>,
    pub body: ByteStream,
}

/// Where the ranges can be served from without asking upstream.
enum AtHand {
    /// Stored here (`cache`) or downloading here (`download`).
    Here(&'static str),
    /// In the fleet's bucket, this long.
    Bucket(u64),
    Nowhere,
}

/// Where the bytes of `ranges` of `digest` come from, for `repo`; `header`
/// is the client's `Range` as sent.
pub(super) async fn lookup(
    shared: &Arc<Shared>,
    repo: &Repository,
    digest: &Digest,
    caller: &Caller,
    ranges: &Ranges,
    header: &str,
) -> Result<Ranged> {
    let count = |source: &str| {
        shared
            .metrics
            .blob_ranges
            .with_label_values(&[source])
            .inc()
    };
    match at_hand(shared, repo, digest, ranges).await? {
        AtHand::Here(source) => {
            count(source);
            return Ok(Ranged::Here(
                blob::lookup(shared, repo, digest, caller).await?,
            ));
        }
        AtHand::Bucket(size) => {
            count("cache");
            return from_bucket(shared, repo, digest, caller, ranges, size).await;
        }
        AtHand::Nowhere => {}
    }
    let response = match shared.upstream.get_blob_range(repo, digest, header).await {
        Ok(response) => Some(response),
        // Refused: many registries take one range only. One range is
        // then answered below, several refused in turn.
        Err(upstream::Error::Status { status: 416, .. }) => None,
        Err(e) => return Err(blob::blob_error(e, repo, digest)),
    };
    // The whole blob starts downloading once the range is answered, so
    // the two do not compete for the link before the range's first byte.
    if shared.range_fill {
        fill_in_background(shared, repo, digest, caller);
    }
    let Some((response, content_type)) = response.and_then(partial) else {
        // Upstream ignores or refuses ranges: one range is served from
        // the download of the whole blob as its bytes arrive (which also
        // knows the length a 416 must name); several are refused.
        if !ranges.is_single() {
            return Err(Error::RangesRefused);
        }
        count("download");
        return Ok(Ranged::Here(
            blob::lookup(shared, repo, digest, caller).await?,
        ));
    };
    count("upstream");
    // These bytes are relayed unverified: no digest covers part of a blob,
    // so a range can only be checked by the client, which is how lazy
    // pulling works (stargz and SOCI check each chunk against the digests
    // in the layer's table of contents, itself covered by the manifest's
    // annotations). They are never stored: the blob is kept only from the
    // download of all of it, verified against its digest.
    let len = response.body.len;
    let served = shared.metrics.served_bytes.with_label_values(&["upstream"]);
    Ok(Ranged::Relayed(Relayed {
        content_type,
        content_range: response.content_range,
        len,
        body: stream::forward(response.body, served),
    }))
}

/// Upstream's answer if it is a well-formed partial one (RFC 9110 §15.3.7:
/// a single part carries a valid `Content-Range`, several are
/// `multipart/byteranges`), with the type to relay; else `None`, and the
/// blob is served from its download instead.
fn partial(response: upstream::RangeResponse) -> Option<(upstream::RangeResponse, Option<String>)> {
    if !response.partial {
        return None;
    }
    let multipart = response
        .content_type
        .clone()
        .filter(|t| t.to_ascii_lowercase().starts_with("multipart/byteranges"));
    let single = response
        .content_range
        .as_deref()
        .and_then(ContentRange::parse)
        .is_some();
    (multipart.is_some() || single).then_some((response, multipart))
}

/// Where the ranges can be served from without asking upstream: stored on
/// this replica, a download running here that has the bytes or will
/// within `JOIN_WITHIN`, or the fleet's bucket.
async fn at_hand(
    shared: &Shared,
    repo: &Repository,
    digest: &Digest,
    ranges: &Ranges,
) -> Result<AtHand> {
    // The running download first: it commits before it leaves the map, so
    // if it is gone by now the store below has the blob.
    let running = shared.fills.running(digest);
    // Stored for another repository too: `blob::lookup` asks upstream to
    // confirm before serving it.
    if shared.store.blob_meta(digest)?.is_some() {
        return Ok(AtHand::Here("cache"));
    }
    if let Some(fill) = running {
        let ours = fill.repo() == repo || shared.store.is_linked(repo, digest)?;
        if ours && due(&fill, ranges) {
            return Ok(AtHand::Here("download"));
        }
    }
    if let Some(bucket) = &shared.bucket {
        if let Some(size) = bucket.blob_size(digest).await? {
            return Ok(AtHand::Bucket(size));
        }
    }
    Ok(AtHand::Nowhere)
}

/// Whether a download has, or will soon have, the bytes `ranges` need
/// before they can be sent (see `Ranges::needed`).
fn due(fill: &Fill, ranges: &Ranges) -> bool {
    let Some((len, _)) = fill.progress() else {
        return false;
    };
    match ranges.needed(len) {
        Some(needed) => fill.due_within(needed, JOIN_WITHIN),
        None => false,
    }
}

/// One range of a blob the fleet's bucket holds, read from the bucket
/// (object stores serve single ranges; several come from the whole blob
/// read into this replica). The blob is copied to this replica's disk in
/// the background either way (`range_fill`).
async fn from_bucket(
    shared: &Arc<Shared>,
    repo: &Repository,
    digest: &Digest,
    caller: &Caller,
    ranges: &Ranges,
    size: u64,
) -> Result<Ranged> {
    let parts = match ranges.resolve(size) {
        Ok(parts) if parts.len() == 1 => parts,
        // Several ranges, or none satisfiable: from the whole blob, which
        // also answers the 416 with the length.
        _ => {
            return Ok(Ranged::Here(
                blob::lookup(shared, repo, digest, caller).await?,
            ))
        }
    };
    let bucket = shared.bucket.as_ref().expect("only with a bucket");
    blob::vouch(shared, bucket, repo, digest).await?;
    let (start, end) = parts[0];
    let Some(body) = bucket.get_blob(digest, Some(start..end)).await? else {
        // Gone since (the bucket's GC): from upstream, as a miss.
        return Ok(Ranged::Here(
            blob::lookup(shared, repo, digest, caller).await?,
        ));
    };
    if shared.range_fill {
        fill_in_background(shared, repo, digest, caller);
    }
    let served = shared.metrics.served_bytes.with_label_values(&["cache"]);
    Ok(Ranged::Relayed(Relayed {
        content_type: None,
        content_range: Some(format!("bytes {start}-{}/{size}", end - 1)),
        len: Some(end - start),
        body: stream::forward(body, served),
    }))
}

/// Starts the download of the whole blob unless one runs (the same
/// single-flight as any request: exactly one), without following it.
fn fill_in_background(shared: &Arc<Shared>, repo: &Repository, digest: &Digest, caller: &Caller) {
    if shared.low_on_space() {
        return; // it would be relayed uncached: a second transfer for nothing
    }
    let (shared, repo, digest, caller) =
        (shared.clone(), repo.clone(), digest.clone(), caller.clone());
    tokio::spawn(async move {
        if let Err(e) = blob::lookup(&shared, &repo, &digest, &caller).await {
            debug!(repository = %repo, %digest, error = %e, "background fill for a range failed");
        }
    });
}
