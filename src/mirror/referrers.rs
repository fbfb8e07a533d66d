//! Referrers lists (`/v2/<name>/referrers/<digest>`, OCI distribution spec
//! 1.1): what upstream lists as pointing at a subject (signatures, SBOMs,
//! attestations). A list changes whenever someone attaches an artifact, so
//! it is cached like a tag: served from the store inside the tag TTL, asked
//! again after it, served stale when upstream is down or rate-limits, and
//! never after an upstream 404, which means "no referrers API here" and
//! sends clients to the `sha256-<hex>` fallback tag (an ordinary tag, see
//! `manifest`). The referrer manifests and their blobs are ordinary
//! content: they come through `manifest` and `blob` when a client pulls
//! them. Spec: <https://github.com/opencontainers/distribution-spec/blob/main/spec.md#listing-referrers>
//!
//! One list is kept per subject, as upstream sends it unfiltered; an
//! `artifactType` filter is applied here when served (and said so with
//! `OCI-Filters-Applied`, as the spec lets a registry do): one upstream GET
//! per subject per TTL whatever filters clients use, and no cache entry
//! per filter string a client can make up.
//!
//! Lists are kept on this replica only, not in the shared bucket: the
//! bucket's tag namespace is what its GC and the fleet's image listing walk
//! (a list there would read as a tag of an image), a list is one small GET
//! per replica per TTL, and the costly part, the referrer manifests and
//! blobs, does go through the bucket like any content.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tracing::warn;

use super::error::{Error, Result};
use super::manifest::{self, Manifest};
use super::shared::Shared;
use super::{flight, Outcome};
use crate::clock;
use crate::reference::{Digest, Repository, OCI_INDEX};
use crate::store::TagRecord;
use crate::upstream;

/// Referrers lookups in progress, by repository and subject.
pub(super) type Flights = flight::Flights<(Repository, Digest), (Arc<Manifest>, Outcome)>;

/// A referrers list as served: an image index.
#[derive(Debug, Clone)]
pub struct Referrers {
    /// The index (`application/vnd.oci.image.index.v1+json`).
    pub bytes: Bytes,
    /// The `artifactType` filter was applied (by upstream or here): the
    /// answer carries `OCI-Filters-Applied: artifactType`.
    pub filtered: bool,
}

/// The referrers of `subject` in `repo`, filtered on `artifact_type`.
pub(super) async fn lookup(
    shared: &Arc<Shared>,
    repo: &Repository,
    subject: &Digest,
    artifact_type: Option<&str>,
) -> Result<(Referrers, Outcome)> {
    let (index, outcome) = list(shared, repo, subject).await?;
    Ok((served(&index, artifact_type)?, outcome))
}

/// The whole list of `subject`'s referrers: cached, or asked upstream.
async fn list(
    shared: &Arc<Shared>,
    repo: &Repository,
    subject: &Digest,
) -> Result<(Arc<Manifest>, Outcome)> {
    let ttl = shared.tag_ttl.for_registry(repo.registry());
    let cached = stored(shared, repo, subject).await?;
    if let Some((record, index)) = cached {
        if is_fresh(&record, ttl) {
            return Ok((index, Outcome::Hit));
        }
        // As for tags: keep a nearly spent budget for real misses.
        if shared.upstream.budget_low(repo.registry()) {
            return Ok((index, Outcome::Stale));
        }
    }
    let key = (repo.clone(), subject.clone());
    let work = {
        let shared = shared.clone();
        let (repo, subject) = key.clone();
        async move {
            // A lookup that ended between this request's check and its
            // flight left a fresh record: use it rather than ask again.
            let cached = stored(&shared, &repo, &subject).await?;
            if let Some((record, index)) = &cached {
                if is_fresh(record, ttl) {
                    return Ok((index.clone(), Outcome::Hit));
                }
            }
            refresh(&shared, &repo, &subject, cached).await
        }
    };
    let (result, joined) = shared.referrer_flights.run(key, work).await;
    result.map(|(list, outcome)| (list, if joined { Outcome::Coalesced } else { outcome }))
}

fn is_fresh(record: &TagRecord, ttl: Duration) -> bool {
    u128::from(clock::unix_ms().saturating_sub(record.checked_at_ms)) < ttl.as_millis()
}

/// The list as a client asked for it: all of it, or the descriptors of
/// one `artifactType` (spec: the answer then carries
/// `OCI-Filters-Applied: artifactType`).
fn served(index: &Manifest, artifact_type: Option<&str>) -> Result<Referrers> {
    Ok(Referrers {
        bytes: match artifact_type {
            Some(filter) => filter_locally(&index.bytes, filter)?,
            None => index.bytes.clone(),
        },
        filtered: artifact_type.is_some(),
    })
}

/// The stored list and its record; a record whose index was evicted is
/// no list at all.
async fn stored(
    shared: &Shared,
    repo: &Repository,
    subject: &Digest,
) -> Result<Option<(TagRecord, Arc<Manifest>)>> {
    let Some(record) = shared.store.referrers(repo, subject)? else {
        return Ok(None);
    };
    Ok(manifest::load(shared, &record.digest)
        .await?
        .map(|index| (record, index)))
}

/// Asks upstream for the list (it is missing or past its TTL), keeps what
/// it answers, or serves the cached list if upstream is unavailable.
async fn refresh(
    shared: &Shared,
    repo: &Repository,
    subject: &Digest,
    cached: Option<(TagRecord, Arc<Manifest>)>,
) -> Result<(Arc<Manifest>, Outcome)> {
    let response = match shared.upstream.get_referrers(repo, subject).await {
        Ok(response) => response,
        // Spec, "Listing Referrers": a registry with the API never answers
        // 404, so this one lacks it (or the repository): the client must
        // see the 404 to fall back to the tag schema. An empty list cached
        // here would hide the fallback tag's signatures.
        Err(upstream::Error::NotFound { .. }) => {
            shared.store.remove_referrers(repo, subject)?;
            return Err(Error::ReferrersUnknown {
                repo: repo.clone(),
                subject: subject.clone(),
            });
        }
        Err(e) if e.is_unavailable() => {
            let Some((_, index)) = cached else {
                return Err(e.into());
            };
            warn!(repository = %repo, %subject, error = %e, "upstream unavailable, serving stale referrers");
            return Ok((index, Outcome::Stale));
        }
        Err(e) => return Err(e.into()),
    };
    let digest = Digest::of(&response.bytes);
    let record = TagRecord {
        digest: digest.clone(),
        media_type: OCI_INDEX.to_owned(),
        checked_at_ms: clock::unix_ms(),
    };
    if let Some((old, index)) = cached.filter(|(old, _)| old.digest == digest) {
        let record = TagRecord {
            checked_at_ms: record.checked_at_ms,
            ..old
        };
        shared.store.put_referrers(repo, subject, &record)?;
        return Ok((index, Outcome::Revalidated));
    }
    let index = Arc::new(Manifest {
        digest,
        media_type: OCI_INDEX.to_owned(),
        bytes: response.bytes,
    });
    // Content first, then the record that names it: a crash in between
    // leaves an unnamed index, never a record of missing content. Not
    // linked to `repo`: the list is served only through this route.
    manifest::keep(shared, None, index.clone()).await?;
    shared.store.put_referrers(repo, subject, &record)?;
    Ok((index, Outcome::Miss))
}

/// The descriptors of `index` whose `artifactType` is `filter`; the rest
/// of the index as upstream sent it.
fn filter_locally(index: &[u8], filter: &str) -> Result<Bytes> {
    let mut index: Value = serde_json::from_slice(index)
        .map_err(|e| Error::Internal(format!("referrers list unreadable: {e}")))?;
    if let Some(Value::Array(manifests)) = index.get_mut("manifests") {
        manifests.retain(|d| d.get("artifactType").and_then(Value::as_str) == Some(filter));
    }
    Ok(serde_json::to_vec(&index).expect("json").into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_local_filter_keeps_only_the_asked_type() {
        let index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
            {"digest":"sha256:a","artifactType":"application/vnd.example.sig"},
            {"digest":"sha256:b","artifactType":"application/spdx+json"},
            {"digest":"sha256:c"}]}"#;
        let kept: Value =
            serde_json::from_slice(&filter_locally(index, "application/spdx+json").unwrap())
                .unwrap();
        assert_eq!(kept["manifests"].as_array().unwrap().len(), 1);
        assert_eq!(kept["manifests"][0]["digest"], "sha256:b");
        assert_eq!(kept["mediaType"], OCI_INDEX);
        let none: Value =
            serde_json::from_slice(&filter_locally(index, "text/plain").unwrap()).unwrap();
        assert_eq!(none["manifests"], serde_json::json!([]));
    }
}
