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
    #[serde(rename = "checked_at")]
    pub checked_at_ms: u64,
    /// Unix seconds of the last time a client read its manifest.
    #[serde(rename = "last_pulled")]
    pub last_pulled_secs: u64,
    pub pinned: bool,
    /// `os/arch[/variant]` of each platform it has (an index's, or its
    /// config's); empty when not known here.
    #[serde(default)]
    pub platforms: Vec<String>,
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
            .map(|r| r.digest),
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
        let root = record.digest;
        let last_pulled_ms = store.blob_meta(&root)?.map_or(0, |m| m.last_access_ms);
        let size = tree(store, &root)
            .iter()
            .filter_map(|d| store.blob_meta(d).ok().flatten())
            .map(|m| m.size)
            .sum();
        out.push(CachedImage {
            image: key,
            platforms: platforms(store, &root),
            pinned: protected.contains(&root),
            digest: root.to_string(),
            media_type: record.media_type,
            size,
            checked_at_ms: record.checked_at_ms,
            last_pulled_secs: last_pulled_ms / 1000,
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

/// Removes images whose manifest nobody read for `max_age` (pins stay).
pub fn expire(
    store: &Store,
    config_pins: &[ImageRef],
    max_age: std::time::Duration,
) -> store::Result<Evicted> {
    let max_age_ms = u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX);
    let cutoff_ms = crate::clock::unix_ms().saturating_sub(max_age_ms);
    let protected = pinned(store, config_pins);
    let mut total = Evicted::default();
    for (_, record) in store.all_tags()? {
        let root = record.digest;
        // Not pulled for `max_age` or longer.
        let stale = store
            .blob_meta(&root)?
            .is_some_and(|meta| meta.last_access_ms <= cutoff_ms);
        if stale && !protected.contains(&root) {
            let evicted = store.remove_image(&tree(store, &root), &protected)?;
            total.blobs += evicted.blobs;
            total.bytes += evicted.bytes;
            total.manifests.extend(evicted.manifests);
        }
    }
    Ok(total)
}

/// Largest image config read for its platform; configs are a few KiB.
const MAX_CONFIG: u64 = 1 << 20;

/// The platforms of the image `root` is: an index's entries (attestation
/// manifests, `unknown/unknown`, left out), or a manifest's config's.
fn platforms(store: &Store, root: &Digest) -> Vec<String> {
    #[derive(Deserialize)]
    struct Platform {
        #[serde(default)]
        os: String,
        #[serde(default)]
        architecture: String,
        variant: Option<String>,
    }
    impl Platform {
        fn name(self) -> Option<String> {
            if self.os.is_empty() || self.os == "unknown" {
                return None;
            }
            Some(match self.variant.filter(|v| !v.is_empty()) {
                Some(variant) => format!("{}/{}/{variant}", self.os, self.architecture),
                None => format!("{}/{}", self.os, self.architecture),
            })
        }
    }
    #[derive(Deserialize)]
    struct Entry {
        platform: Option<Platform>,
    }
    #[derive(Deserialize)]
    struct Config {
        digest: String,
    }
    #[derive(Deserialize)]
    struct Body {
        #[serde(default)]
        manifests: Vec<Entry>,
        config: Option<Config>,
    }
    let Some(manifest) = read_manifest(store, root) else {
        return Vec::new();
    };
    let Ok(body) = serde_json::from_slice::<Body>(&manifest.bytes) else {
        return Vec::new();
    };
    if !body.manifests.is_empty() {
        let mut names: Vec<String> = body
            .manifests
            .into_iter()
            .filter_map(|entry| entry.platform?.name())
            .collect();
        names.dedup();
        return names;
    }
    let config = body
        .config
        .and_then(|c| Digest::parse(&c.digest).ok())
        .and_then(|digest| store.peek_blob(&digest).ok().flatten())
        .filter(|blob| blob.meta.size <= MAX_CONFIG)
        .and_then(|blob| blob.reader.read_all(blob.meta.size).ok())
        .and_then(|bytes| serde_json::from_slice::<Platform>(&bytes).ok());
    config.and_then(Platform::name).into_iter().collect()
}

fn read_manifest(store: &Store, digest: &Digest) -> Option<Manifest> {
    let blob = store.peek_blob(digest).ok()??;
    let media_type = blob.meta.media_type.clone()?;
    let bytes = blob.reader.read_all(blob.meta.size).ok()?;
    Some(Manifest {
        digest: digest.clone(),
        media_type,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::Repository;
    use crate::store::TagRecord;

    /// Stores a layer and a manifest naming it, tagged `name:1`.
    fn image(store: &Store, name: &str, layer: &[u8]) -> (Digest, Digest) {
        let layer_digest = Digest::of(layer);
        store.put_bytes(&layer_digest, None, layer).unwrap();
        let manifest = format!(r#"{{"schemaVersion":2,"layers":[{{"digest":"{layer_digest}"}}]}}"#);
        let media_type = "application/vnd.oci.image.manifest.v1+json";
        let digest = Digest::of(manifest.as_bytes());
        store
            .put_bytes(&digest, Some(media_type.into()), manifest.as_bytes())
            .unwrap();
        store
            .add_refs(&digest, std::slice::from_ref(&layer_digest))
            .unwrap();
        tag(store, name, &digest, media_type);
        (digest, layer_digest)
    }

    /// Tags `digest` as `docker.io/name:1`.
    fn tag(store: &Store, name: &str, digest: &Digest, media_type: &str) {
        let record = TagRecord {
            digest: digest.clone(),
            media_type: media_type.into(),
            checked_at_ms: 0,
        };
        store
            .put_tag(&Repository::new("docker.io", name).unwrap(), "1", &record)
            .unwrap();
    }

    #[test]
    fn listing_pins_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (kept, kept_layer) = image(&store, "kept", b"kept layer");
        let (old, old_layer) = image(&store, "old", b"old layer");
        store.add_pin("docker.io/library/kept:1").unwrap();

        let listed = images(&store, &[], None).unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].image, "docker.io/library/kept:1");
        assert!(listed[0].pinned && !listed[1].pinned);
        assert_eq!(
            listed[1].size,
            (b"old layer".len() + store.blob_meta(&old).unwrap().unwrap().size as usize) as u64
        );
        assert_eq!(images(&store, &[], Some("ghcr.io")).unwrap().len(), 0);

        let evicted = expire(&store, &[], std::time::Duration::ZERO).unwrap();
        assert_eq!(evicted.manifests, vec![old.clone()]);
        assert!(store.blob_meta(&old_layer).unwrap().is_none());
        assert!(store.blob_meta(&kept).unwrap().is_some());
        assert!(store.blob_meta(&kept_layer).unwrap().is_some());
        assert_eq!(images(&store, &[], None).unwrap().len(), 1);
    }

    #[test]
    fn platforms_come_from_the_index_or_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let put = |bytes: &[u8], media_type: Option<&str>| {
            let digest = Digest::of(bytes);
            store
                .put_bytes(&digest, media_type.map(str::to_owned), bytes)
                .unwrap();
            digest
        };
        let oci = "application/vnd.oci.image.manifest.v1+json";
        let config = put(
            br#"{"os":"linux","architecture":"arm","variant":"v7"}"#,
            None,
        );
        let single = put(
            format!(r#"{{"schemaVersion":2,"config":{{"digest":"{config}"}},"layers":[]}}"#)
                .as_bytes(),
            Some(oci),
        );
        tag(&store, "single", &single, oci);
        let index_type = "application/vnd.oci.image.index.v1+json";
        let index = put(
            format!(
                r#"{{"schemaVersion":2,"manifests":[
                {{"digest":"{single}","platform":{{"os":"linux","architecture":"amd64"}}}},
                {{"digest":"{single}","platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
                {{"digest":"{single}","platform":{{"os":"unknown","architecture":"unknown"}}}}]}}"#
            )
            .as_bytes(),
            Some(index_type),
        );
        tag(&store, "multi", &index, index_type);
        let listed = images(&store, &[], None).unwrap();
        let of = |name: &str| {
            listed
                .iter()
                .find(|i| i.image.contains(name))
                .unwrap()
                .platforms
                .clone()
        };
        assert_eq!(
            of("multi"),
            ["linux/amd64", "linux/arm64/v8"],
            "attestations left out"
        );
        assert_eq!(of("single"), ["linux/arm/v7"]);
    }
}
