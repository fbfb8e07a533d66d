//! What the store holds, image by image: listing cached tags, the digests an
//! image needs (manifest, child manifests, configs, layers), pins, and
//! evicting one image. Works on a bare `Store`, so `hoard ls`/`pin` can run
//! on a stopped store as well as through the admin API.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::manifest::Manifest;
use crate::reference::{Digest, ImageRef, Reference};
use crate::store::{self, Evicted, Store};

/// One cached tag, as `hoard ls` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CachedImage {
    /// `registry/name:tag`.
    pub image: String,
    pub digest: String,
    pub media_type: String,
    /// Bytes of everything the image needs that is in the store.
    pub size: u64,
    /// Unix milliseconds of the last time upstream confirmed the tag.
    pub checked_at: u64,
    pub pinned: bool,
}

/// Every pin: from the config and added at run time.
pub fn all_pins(store: &Store, config_pins: &[ImageRef]) -> Vec<ImageRef> {
    let mut pins = config_pins.to_vec();
    if let Ok(stored) = store.pins() {
        pins.extend(stored.iter().filter_map(|p| ImageRef::parse(p).ok()));
    }
    pins
}

/// The digests `root` needs that the store knows of, root included.
pub fn tree(store: &Store, root: &Digest) -> HashSet<Digest> {
    let mut seen = HashSet::new();
    let mut stack = vec![root.clone()];
    while let Some(digest) = stack.pop() {
        if !seen.insert(digest.clone()) {
            continue;
        }
        if let Some(manifest) = read_manifest(store, &digest) {
            stack.extend(manifest.references());
        }
    }
    seen
}

/// What `image` points to now in the store.
pub fn resolve(store: &Store, image: &ImageRef) -> Option<Digest> {
    match &image.reference {
        Reference::Digest(d) => Some(d.clone()),
        Reference::Tag(tag) => store
            .tag(&image.repository, tag)
            .ok()
            .flatten()
            .and_then(|r| Digest::parse(&r.digest).ok()),
    }
}

/// Every digest a pinned image needs (all platforms). Pins not cached yet
/// protect nothing.
pub fn pinned(store: &Store, config_pins: &[ImageRef]) -> HashSet<Digest> {
    all_pins(store, config_pins)
        .iter()
        .filter_map(|pin| resolve(store, pin))
        .flat_map(|root| tree(store, &root))
        .collect()
}

/// Cached tags, optionally of one registry, sorted by name.
pub fn images(
    store: &Store,
    config_pins: &[ImageRef],
    registry: Option<&str>,
) -> store::Result<Vec<CachedImage>> {
    let protected = pinned(store, config_pins);
    let mut out = Vec::new();
    for (key, record) in store.all_tags()? {
        if registry.is_some_and(|r| !key.starts_with(&format!("{r}/"))) {
            continue;
        }
        let Ok(root) = Digest::parse(&record.digest) else {
            continue;
        };
        let size = tree(store, &root)
            .iter()
            .filter_map(|d| store.blob_meta(d).ok().flatten())
            .map(|m| m.size)
            .sum();
        out.push(CachedImage {
            image: key,
            pinned: protected.contains(&root),
            digest: record.digest,
            media_type: record.media_type,
            size,
            checked_at: record.checked_at,
        });
    }
    out.sort_by(|a, b| a.image.cmp(&b.image));
    Ok(out)
}

/// Removes one image: its manifests, and the blobs no other cached
/// manifest names. Pinned content stays.
pub fn evict_image(
    store: &Store,
    config_pins: &[ImageRef],
    image: &ImageRef,
) -> store::Result<Evicted> {
    let Some(root) = resolve(store, image) else {
        return Ok(Evicted::default());
    };
    let protected = pinned(store, config_pins);
    let digests = tree(store, &root);
    store.remove_image(&digests, &protected)
}

fn read_manifest(store: &Store, digest: &Digest) -> Option<Manifest> {
    let blob = store.open_blob(digest).ok()??;
    let media_type = blob.meta.media_type.clone()?;
    let bytes = std::io::read_to_string(blob.file).ok()?;
    Some(Manifest {
        digest: digest.clone(),
        media_type,
        bytes: bytes.into(),
    })
}
