//! Ranges of blobs (lazy pulling). stargz-snapshotter, SOCI and nydus start
//! containers before their layers are downloaded: they read a layer by
//! `Range`, its table of contents (at the end) first. A range hoard can
//! serve from what it has, or will have within a moment, is served here;
//! any other is forwarded upstream as a range and relayed at once, while
//! the one download of the whole blob starts (or goes on) in the
//! background (`upstream.range_fill`), so later requests are hits.

use std::sync::Arc;
use std::time::Duration;

use tracing::debug;

use super::blob::{self, Blob};
use super::error::{Error, Result};
use super::shared::Shared;
use super::stream::{self, ByteStream};
use super::Caller;
use crate::ranges::Ranges;
use crate::reference::{Digest, Repository};
use crate::upstream;

/// How soon the bytes a range needs must be due from a download running
/// here for the range to wait for them rather than go upstream: about the
/// time a ranged request upstream would take anyway.
const JOIN_WITHIN: Duration = Duration::from_secs(1);

/// A ranged blob, ready to be sent.
pub enum Ranged {
    /// Stored here, or downloading with the bytes at hand or due soon: the
    /// ranges are served from it.
    Here(Blob),
    /// Upstream's answer to the client's own `Range`, relayed as it came.
    Relayed(Relayed),
}

/// Upstream's partial answer (`206`).
pub struct Relayed {
    /// `multipart/byteranges; boundary=…` for several ranges.
    pub content_type: Option<String>,
    /// The single range's `Content-Range`.
    pub content_range: Option<String>,
    pub len: Option<u64>,
    pub body: ByteStream,
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
    if let Some(source) = at_hand(shared, repo, digest, ranges).await? {
        count(source);
        return Ok(Ranged::Here(
            blob::lookup(shared, repo, digest, caller).await?,
        ));
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
    let Some(response) = response.filter(|r| r.partial) else {
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
        content_type: response.content_type,
        content_range: response.content_range,
        len,
        body: stream::forward(response.body, served),
    }))
}

/// Where the ranges can be served from here, if anywhere: `cache` (stored
/// on this replica or in the fleet's bucket) or `download` (a download
/// running here has the bytes or will within `JOIN_WITHIN`).
async fn at_hand(
    shared: &Shared,
    repo: &Repository,
    digest: &Digest,
    ranges: &Ranges,
) -> Result<Option<&'static str>> {
    // The running download first: it commits before it leaves the map, so
    // if it is gone by now the store below has the blob.
    let running = shared.fills.running(digest);
    // Stored for another repository too: `blob::lookup` asks upstream to
    // confirm before serving it.
    if shared.store.blob_meta(digest)?.is_some() {
        return Ok(Some("cache"));
    }
    if let Some(fill) = running {
        let ours = fill.repo() == repo || shared.store.is_linked(repo, digest)?;
        if ours && due(&fill, ranges) {
            return Ok(Some("download"));
        }
    }
    if let Some(bucket) = &shared.bucket {
        if bucket.blob_size(digest).await?.is_some() {
            return Ok(Some("cache"));
        }
    }
    Ok(None)
}

/// Whether a download has, or will soon have, every byte `ranges` need.
fn due(fill: &super::fill::Fill, ranges: &Ranges) -> bool {
    let Some((len, _)) = fill.progress() else {
        return false;
    };
    let end = match (ranges.known_end(), len) {
        (Some(end), _) => end,
        // A suffix or open range needs the end of the blob.
        (None, Some(len)) => len,
        (None, None) => return false,
    };
    fill.due_within(end, JOIN_WITHIN)
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
