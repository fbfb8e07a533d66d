//! Manifests: the type as served (exact upstream bytes, media type, digest,
//! and the digests it references, which upstream thereby vouches its
//! repository has) and the policy that finds one. By digest, a stored
//! manifest is served without asking upstream. By tag, the index answers
//! inside the tag's TTL; after it, a `HEAD` upstream revalidates (free on
//! Docker Hub) and the manifest is fetched again only if the digest moved;
//! upstream 5xx, 429 or timeouts get the cached copy (stale), a 404 never.
//! Each lookup runs once however many clients ask at the same moment.

use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use tracing::warn;

use super::error::{Error, Result};
use super::shared::Shared;
use super::{evict, fleet, flight, Accept, Caller, Outcome};
use crate::clock;
use crate::cluster::{self, Owner};
use crate::reference::{Digest, Reference, Repository};
use crate::store::{self, TagRecord};
use crate::upstream;

/// Memory for the cache of manifests recently served.
const HOT_BYTES: u64 = 64 * 1024 * 1024;

/// Manifest lookups in progress, by repository and reference.
pub(super) type Flights = flight::Flights<(Repository, Reference), (Arc<Manifest>, Outcome)>;

/// The in-memory cache of manifests recently served, bounded by bytes.
pub(super) fn hot_cache() -> moka::sync::Cache<Digest, Arc<Manifest>> {
    moka::sync::Cache::builder()
        .max_capacity(HOT_BYTES)
        .weigher(|_, m: &Arc<Manifest>| m.bytes.len().try_into().unwrap_or(u32::MAX))
        .build()
}

/// A verified manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
}

/// What a manifest names, split by whether it is a manifest too (an
/// index's platforms) or a blob (config, layers).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Children {
    pub(super) manifests: Vec<Digest>,
    pub(super) blobs: Vec<Digest>,
}

impl Children {
    /// The children named in manifest `bytes`; unparseable manifests name
    /// nothing.
    pub(super) fn of(bytes: &[u8]) -> Children {
        #[derive(Deserialize)]
        struct Descriptor {
            digest: String,
        }
        #[derive(Deserialize)]
        struct Body {
            config: Option<Descriptor>,
            #[serde(default)]
            layers: Vec<Descriptor>,
            #[serde(default)]
            manifests: Vec<Descriptor>,
        }
        let Ok(body) = serde_json::from_slice::<Body>(bytes) else {
            return Children::default();
        };
        let parse = |d: Descriptor| Digest::parse(&d.digest).ok();
        Children {
            manifests: body.manifests.into_iter().filter_map(parse).collect(),
            blobs: body
                .config
                .into_iter()
                .chain(body.layers)
                .filter_map(parse)
                .collect(),
        }
    }
}

impl Manifest {
    /// Config, layer and child-manifest digests named by this manifest.
    /// Unparseable manifests reference nothing.
    pub fn references(&self) -> Vec<Digest> {
        let Children { manifests, blobs } = Children::of(&self.bytes);
        blobs.into_iter().chain(manifests).collect()
    }
}

/// The manifest `reference` of `repo`, as the client's `accept` allows.
pub(super) async fn lookup(
    shared: &Arc<Shared>,
    repo: &Repository,
    reference: &Reference,
    accept: &Accept,
    caller: &Caller,
) -> Result<(Arc<Manifest>, Outcome)> {
    match reference {
        Reference::Digest(digest) => by_digest(shared, repo, digest, accept, caller).await,
        Reference::Tag(tag) => by_tag(shared, repo, tag, accept, caller).await,
    }
}

async fn by_tag(
    shared: &Arc<Shared>,
    repo: &Repository,
    tag: &str,
    accept: &Accept,
    caller: &Caller,
) -> Result<(Arc<Manifest>, Outcome)> {
    let ttl = shared.tag_ttl.for_registry(repo.registry());
    let cached = match fleet_tag(shared, repo, tag, ttl).await? {
        Some(record) if accept.allows(&record.media_type) => {
            load(shared, &record.digest).await?.map(|m| (record, m))
        }
        _ => None,
    };
    if let Some((record, manifest)) = &cached {
        let age = clock::unix_ms().saturating_sub(record.checked_at_ms);
        if u128::from(age) < ttl.as_millis() {
            return Ok((manifest.clone(), Outcome::Hit));
        }
        // Upstream's budget is nearly spent: keep it for real misses and
        // stretch the TTL (the upstream logs when this starts).
        if shared.upstream.budget_low(repo.registry()) {
            return Ok((manifest.clone(), Outcome::Stale));
        }
    }
    let key = (repo.clone(), Reference::Tag(tag.to_owned()));
    let work = {
        let shared = shared.clone();
        let (repo, tag, accept, caller) =
            (repo.clone(), tag.to_owned(), accept.clone(), caller.clone());
        async move {
            // A lookup that finished between this request's check and its
            // flight (the bucket read above widens that moment) left a
            // fresh record: use it rather than fetch again.
            if let Some(fresh) = fresh_tag(&shared, &repo, &tag, &accept, ttl).await? {
                return Ok((fresh, Outcome::Hit));
            }
            let reference = Reference::Tag(tag.clone());
            match from_owner(&shared, &repo, &reference, &accept, &caller).await {
                Ok(Some(answer)) => Ok(answer),
                Ok(None) => resolve_tag(&shared, &repo, &tag, &accept, cached).await,
                // The owner failed (its upstream is down, or it died): a
                // cached tag is served stale, as for an upstream outage.
                Err(Error::Peer(e)) if cached.is_some() => {
                    warn!(repository = %repo, tag, error = %e, "owning replica failed, serving stale tag");
                    let (_, manifest) = cached.expect("checked");
                    Ok((manifest, Outcome::Stale))
                }
                Err(e) => Err(e),
            }
        }
    };
    let (result, joined) = shared.manifest_flights.run(key, work).await;
    result.map(|(m, outcome)| (m, if joined { Outcome::Coalesced } else { outcome }))
}
/// The manifest `repo:tag` points to if this replica's record of it is
/// inside the TTL and the client accepts its type.
async fn fresh_tag(
    shared: &Shared,
    repo: &Repository,
    tag: &str,
    accept: &Accept,
    ttl: std::time::Duration,
) -> Result<Option<Arc<Manifest>>> {
    let Some(record) = shared.store.tag(repo, tag)? else {
        return Ok(None);
    };
    let age = clock::unix_ms().saturating_sub(record.checked_at_ms);
    if u128::from(age) >= ttl.as_millis() || !accept.allows(&record.media_type) {
        return Ok(None);
    }
    load(shared, &record.digest).await
}

/// What `repo:tag` resolved to: this replica's record, or the fleet's
/// when that one is newer (another replica fetched or revalidated it), so
/// a tag is revalidated once per TTL for the whole fleet. The bucket is
/// asked only when the local record is missing or past its TTL.
async fn fleet_tag(
    shared: &Shared,
    repo: &Repository,
    tag: &str,
    ttl: std::time::Duration,
) -> Result<Option<TagRecord>> {
    let local = shared.store.tag(repo, tag)?;
    let Some(bucket) = &shared.bucket else {
        return Ok(local);
    };
    let fresh = |record: &TagRecord| {
        u128::from(clock::unix_ms().saturating_sub(record.checked_at_ms)) < ttl.as_millis()
    };
    if local.as_ref().is_some_and(fresh) {
        return Ok(local);
    }
    let fleet = match bucket.tag(repo, tag).await {
        Ok(fleet) => fleet,
        // The bucket is down: what this replica knows is served, stale if
        // need be; only a missing tag fails.
        Err(e) if local.is_some() => {
            warn!(repository = %repo, tag, error = %e, "bucket unavailable, using the local tag record");
            return Ok(local);
        }
        Err(e) => return Err(e.into()),
    };
    match (local, fleet) {
        (Some(local), Some(fleet)) if fleet.checked_at_ms <= local.checked_at_ms => Ok(Some(local)),
        (_, Some(fleet)) => {
            shared.store.put_tag(repo, tag, &fleet)?;
            Ok(Some(fleet))
        }
        (local, None) => Ok(local),
    }
}

/// Records what `repo:tag` resolves to here and, with a bucket, for the
/// fleet; a bucket failure costs the fleet a revalidation, not the client.
async fn record_tag(
    shared: &Shared,
    repo: &Repository,
    tag: &str,
    record: &TagRecord,
) -> Result<()> {
    shared.store.put_tag(repo, tag, record)?;
    if let Some(bucket) = &shared.bucket {
        if let Err(e) = bucket.put_tag(repo, tag, record).await {
            warn!(repository = %repo, tag, error = %e, "cannot record the tag in the bucket");
        }
    }
    Ok(())
}

/// Whether upstream confirmed (to this replica or, with a bucket, to any)
/// that `repo` has `digest`; a yes from the fleet is recorded here.
async fn is_linked(shared: &Shared, repo: &Repository, digest: &Digest) -> Result<bool> {
    if shared.store.is_linked(repo, digest)? {
        return Ok(true);
    }
    let Some(bucket) = &shared.bucket else {
        return Ok(false);
    };
    if bucket.is_linked(repo, digest).await? {
        shared.store.link(repo, digest)?;
        return Ok(true);
    }
    Ok(false)
}

async fn by_digest(
    shared: &Arc<Shared>,
    repo: &Repository,
    digest: &Digest,
    accept: &Accept,
    caller: &Caller,
) -> Result<(Arc<Manifest>, Outcome)> {
    let found = digest_lookup(shared, repo, digest, accept, caller).await;
    if let Ok((manifest, _)) = &found {
        fleet::note_digest_pull(shared, repo, manifest);
    }
    found
}

async fn digest_lookup(
    shared: &Arc<Shared>,
    repo: &Repository,
    digest: &Digest,
    accept: &Accept,
    caller: &Caller,
) -> Result<(Arc<Manifest>, Outcome)> {
    if let Some(manifest) = load(shared, digest).await? {
        if !is_linked(shared, repo, digest).await? {
            // Cached for another repository: only upstream may say this
            // one has it too.
            let reference = Reference::Digest(digest.clone());
            shared
                .upstream
                .head_manifest(repo, &reference, &accept.upstream_header())
                .await
                .map_err(|e| manifest_error(e, repo, &reference))?;
            shared.store.link(repo, digest)?;
            if let Some(bucket) = &shared.bucket {
                if let Err(e) = bucket.link(repo, std::slice::from_ref(digest)).await {
                    warn!(repository = %repo, %digest, error = %e, "cannot record a link in the bucket");
                }
            }
        }
        return Ok((manifest, Outcome::Hit));
    }
    let reference = Reference::Digest(digest.clone());
    let work = {
        let shared = shared.clone();
        let (repo, reference, accept, caller) = (
            repo.clone(),
            reference.clone(),
            accept.clone(),
            caller.clone(),
        );
        async move {
            // Stored by a lookup that ended since this request looked.
            if let Reference::Digest(digest) = &reference {
                if let Some(manifest) = load(&shared, digest).await? {
                    return Ok((manifest, Outcome::Hit));
                }
            }
            if let Some(answer) = from_owner(&shared, &repo, &reference, &accept, &caller).await? {
                return Ok(answer);
            }
            let manifest = fetch(&shared, &repo, &reference, &accept).await?;
            Ok((manifest, Outcome::Miss))
        }
    };
    let (result, joined) = shared
        .manifest_flights
        .run((repo.clone(), reference), work)
        .await;
    result.map(|(m, outcome)| (m, if joined { Outcome::Coalesced } else { outcome }))
}

/// The manifest from the first replica above this one (for `repo` and
/// `reference`) that answers, verified and kept here; `None`: this replica
/// owns the lookup (or every one above it is down). The owner fetches or
/// revalidates once for the fleet and records it in the bucket; a tag's
/// answer says when upstream last confirmed it (`x-hoard-checked-at`), so
/// the tag's TTL here runs from then, not from now.
async fn from_owner(
    shared: &Shared,
    repo: &Repository,
    reference: &Reference,
    accept: &Accept,
    caller: &Caller,
) -> Result<Option<(Arc<Manifest>, Outcome)>> {
    let Some(cluster) = shared.cluster.as_ref().filter(|_| !caller.from_peer) else {
        return Ok(None);
    };
    let key = format!("{repo}:{reference}");
    let path = format!(
        "/v2/{}/manifests/{reference}?ns={}",
        repo.name(),
        repo.registry()
    );
    let mut headers = caller.headers();
    if let Ok(value) = http::HeaderValue::from_str(&accept.upstream_header()) {
        headers.insert(http::header::ACCEPT, value);
    }
    for owner in cluster.owners(key.as_bytes()) {
        let Owner::Peer(peer) = owner else {
            return Ok(None);
        };
        let response = match cluster.get(&peer, &path, &headers).await {
            Ok(response) => response,
            Err(cluster::Error::Unreachable { .. }) => continue,
            Err(cluster::Error::Status { status: 404, .. }) => {
                return Err(Error::ManifestUnknown {
                    repo: repo.clone(),
                    reference: reference.to_string(),
                })
            }
            Err(e) => return Err(e.into()),
        };
        let manifest = peer_manifest(shared, &peer, repo, reference, accept, response).await?;
        return Ok(Some(manifest));
    }
    Ok(None)
}

/// A replica's manifest answer, checked like upstream's and kept here.
async fn peer_manifest(
    shared: &Shared,
    peer: &str,
    repo: &Repository,
    reference: &Reference,
    accept: &Accept,
    response: reqwest::Response,
) -> Result<(Arc<Manifest>, Outcome)> {
    let broken = |message: String| {
        Error::Peer(cluster::Error::Body {
            peer: peer.to_owned(),
            message,
        })
    };
    let headers = response.headers().clone();
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let media_type = text("content-type").ok_or_else(|| broken("no content type".into()))?;
    let outcome = text("x-hoard-cache")
        .and_then(|v| v.parse().ok())
        .unwrap_or(Outcome::Miss);
    let checked_at = cluster::checked_at(&headers).unwrap_or_else(clock::unix_ms);
    let limit = shared.upstream.max_manifest_bytes();
    if response.content_length().is_some_and(|len| len > limit) {
        return Err(broken("manifest too large".into()));
    }
    let bytes = response.bytes().await.map_err(|e| broken(e.to_string()))?;
    if bytes.len() as u64 > limit {
        return Err(broken("manifest too large".into()));
    }
    let actual = Digest::of(&bytes);
    let expected = match reference {
        Reference::Digest(d) => Some(d.clone()),
        Reference::Tag(_) => text("docker-content-digest").and_then(|d| Digest::parse(&d).ok()),
    };
    if expected.as_ref() != Some(&actual) {
        shared.metrics.digest_mismatches.inc();
        return Err(Error::DigestMismatch {
            repo: repo.clone(),
            expected: expected.unwrap_or_else(|| actual.clone()),
            actual,
        });
    }
    let manifest = Arc::new(Manifest {
        digest: actual,
        media_type,
        bytes,
    });
    // The owner checked that upstream vouches for `repo` (or the fleet's
    // record of it did).
    keep(shared, Some(repo), manifest.clone()).await?;
    if let (Reference::Tag(tag), true) = (reference, accept.is_complete()) {
        let record = TagRecord {
            digest: manifest.digest.clone(),
            media_type: manifest.media_type.clone(),
            checked_at_ms: checked_at,
        };
        shared.store.put_tag(repo, tag, &record)?;
    }
    evict::check(shared);
    shared.hot.insert(manifest.digest.clone(), manifest.clone());
    Ok((manifest, outcome))
}

/// A tag past its TTL (or not cached): `HEAD` upstream, re-fetch only if
/// the digest moved, serve the cached copy if upstream is unavailable.
async fn resolve_tag(
    shared: &Shared,
    repo: &Repository,
    tag: &str,
    accept: &Accept,
    cached: Option<(TagRecord, Arc<Manifest>)>,
) -> Result<(Arc<Manifest>, Outcome)> {
    let reference = Reference::Tag(tag.to_owned());
    let Some((mut record, manifest)) = cached else {
        return Ok((
            fetch(shared, repo, &reference, accept).await?,
            Outcome::Miss,
        ));
    };
    let head = shared
        .upstream
        .head_manifest(repo, &reference, &accept.upstream_header())
        .await;
    let result = match head {
        Ok(head) if head.digest.as_ref() == Some(&manifest.digest) => {
            record.checked_at_ms = clock::unix_ms();
            record_tag(shared, repo, tag, &record).await?;
            return Ok((manifest, Outcome::Revalidated));
        }
        Ok(_) => fetch(shared, repo, &reference, accept).await,
        Err(e) => Err(manifest_error(e, repo, &reference)),
    };
    match result {
        Ok(fresh) => Ok((fresh, Outcome::Miss)),
        Err(Error::Upstream(e)) if e.is_unavailable() => {
            warn!(repository = %repo, tag, error = %e, "upstream unavailable, serving stale tag");
            Ok((manifest, Outcome::Stale))
        }
        Err(e @ Error::ManifestUnknown { .. }) => {
            shared.store.remove_tag(repo, tag)?;
            if let Some(bucket) = &shared.bucket {
                if let Err(e) = bucket.remove_tag(repo, tag).await {
                    warn!(repository = %repo, tag, error = %e, "cannot remove the tag from the bucket");
                }
            }
            Err(e)
        }
        Err(e) => Err(e),
    }
}

/// `GET` a manifest upstream, verify it, store it, link what it names.
async fn fetch(
    shared: &Shared,
    repo: &Repository,
    reference: &Reference,
    accept: &Accept,
) -> Result<Arc<Manifest>> {
    let response = shared
        .upstream
        .get_manifest(repo, reference, &accept.upstream_header())
        .await
        .map_err(|e| manifest_error(e, repo, reference))?;
    let actual = Digest::of(&response.bytes);
    let expected = match reference {
        Reference::Digest(d) => Some(d.clone()),
        Reference::Tag(_) => response.digest.clone(),
    };
    if let Some(expected) = expected.filter(|e| *e != actual) {
        shared.metrics.digest_mismatches.inc();
        return Err(Error::DigestMismatch {
            repo: repo.clone(),
            expected,
            actual,
        });
    }
    let manifest = Arc::new(Manifest {
        digest: actual,
        media_type: response.media_type,
        bytes: response.bytes,
    });
    // Upstream serving this manifest for `repo` vouches that `repo` has
    // everything it names (registries refuse manifests otherwise).
    let children = keep(shared, Some(repo), manifest.clone()).await?;
    if let Some(bucket) = &shared.bucket {
        // For the fleet: the manifest, then what upstream vouched for. A
        // failure here costs another replica an upstream request later,
        // never this client its manifest.
        let shared_copy = bucket
            .put_verified(
                &manifest.digest,
                Some(&manifest.media_type),
                manifest.bytes.clone(),
            )
            .await;
        let linked = match shared_copy {
            Ok(()) => {
                let mut vouched = children.clone();
                vouched.push(manifest.digest.clone());
                bucket.link(repo, &vouched).await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = linked {
            warn!(repository = %repo, digest = %manifest.digest, error = %e, "cannot copy the manifest to the bucket");
        }
    }
    evict::check(shared);
    if let Reference::Tag(tag) = reference {
        // A client that accepts only some types may get a converted
        // manifest: it must not become what the tag means for others.
        if accept.is_complete() {
            let record = TagRecord {
                digest: manifest.digest.clone(),
                media_type: manifest.media_type.clone(),
                checked_at_ms: clock::unix_ms(),
            };
            record_tag(shared, repo, tag, &record).await?;
        }
    }
    shared.hot.insert(manifest.digest.clone(), manifest.clone());
    Ok(manifest)
}

/// Stores a verified manifest here with what it names (for eviction), and
/// with `vouched_for`, links it and its children to that repository.
/// Returns the children. Blocking work on the blocking pool.
pub(super) async fn keep(
    shared: &Shared,
    vouched_for: Option<&Repository>,
    manifest: Arc<Manifest>,
) -> Result<Vec<Digest>> {
    let store = shared.store.clone();
    let repo = vouched_for.cloned();
    let children = tokio::task::spawn_blocking(move || -> store::Result<Vec<Digest>> {
        store.put_bytes(
            &manifest.digest,
            Some(manifest.media_type.clone()),
            &manifest.bytes,
        )?;
        let children = manifest.references();
        if let Some(repo) = &repo {
            store.link(repo, &manifest.digest)?;
            for child in &children {
                store.link(repo, child)?;
            }
        }
        store.add_refs(&manifest.digest, &children)?;
        Ok(children)
    })
    .await??;
    Ok(children)
}

/// A stored manifest, from memory if hot, else this replica's store, else
/// (verified, and kept here from then on) the bucket.
pub(super) async fn load(shared: &Shared, digest: &Digest) -> Result<Option<Arc<Manifest>>> {
    if let Some(manifest) = shared.hot.get(digest) {
        return Ok(Some(manifest));
    }
    let store = shared.store.clone();
    let key = digest.clone();
    let mut loaded =
        tokio::task::spawn_blocking(move || -> store::Result<Option<(String, Bytes)>> {
            let Some(blob) = store.open_blob(&key)? else {
                return Ok(None);
            };
            let Some(media_type) = blob.meta.media_type.clone() else {
                return Ok(None);
            };
            let bytes = blob
                .reader
                .read_all(blob.meta.size)
                .map_err(|e| store::Error::io(key.hex(), e))?;
            Ok(Some((media_type, bytes)))
        })
        .await??;
    if loaded.is_none() {
        if let Some(bucket) = &shared.bucket {
            // `get_manifest` checks the bytes against the digest.
            let limit = shared.upstream.max_manifest_bytes();
            if let Some((media_type, bytes)) = bucket.get_manifest(digest, limit).await? {
                let manifest = Manifest {
                    digest: digest.clone(),
                    media_type: media_type.clone(),
                    bytes: bytes.clone(),
                };
                // Not linked: which repository may see it is the caller's
                // check.
                keep(shared, None, Arc::new(manifest)).await?;
                loaded = Some((media_type, bytes));
            }
        }
    }
    Ok(loaded.map(|(media_type, bytes)| {
        let manifest = Arc::new(Manifest {
            digest: digest.clone(),
            media_type,
            bytes,
        });
        shared.hot.insert(digest.clone(), manifest.clone());
        manifest
    }))
}

fn manifest_error(e: upstream::Error, repo: &Repository, reference: &Reference) -> Error {
    match e {
        upstream::Error::NotFound { .. } => Error::ManifestUnknown {
            repo: repo.clone(),
            reference: reference.to_string(),
        },
        e => Error::Upstream(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_cover_config_layers_and_children() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        let c = Digest::of(b"c");
        let json = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{a}"}},"layers":[{{"digest":"{b}"}},{{"digest":"bogus"}}],"manifests":[{{"digest":"{c}"}}]}}"#
        );
        let m = Manifest {
            digest: Digest::of(json.as_bytes()),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            bytes: json.into(),
        };
        assert_eq!(m.references(), vec![a, b, c]);
        let junk = Manifest {
            bytes: Bytes::from_static(b"not json"),
            ..m
        };
        assert!(junk.references().is_empty());
    }
}
