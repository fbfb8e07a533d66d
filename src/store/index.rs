//! The sled 0.34 index: what the blob files are (size, media type, last
//! access), which repository may see which digest, and what each tag pointed
//! to when it was last fetched. Records are small JSON values.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::error::{Error, Result};
use crate::reference::{Digest, Repository};

/// What the store knows of one committed blob or manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "StoredMeta")]
pub struct BlobMeta {
    /// Size in bytes.
    pub size: u64,
    /// Set for manifests (their `Content-Type`), absent for layer blobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// Unix milliseconds of the last read, for least-recently-used eviction
    /// (milliseconds: content fetched within one second still has an order).
    pub last_access_ms: u64,
}

/// A `BlobMeta` record as any version wrote it: before milliseconds, the
/// last access was `last_access`, in seconds.
#[derive(Deserialize)]
struct StoredMeta {
    size: u64,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    last_access_ms: Option<u64>,
    #[serde(default)]
    last_access: Option<u64>,
}

impl From<StoredMeta> for BlobMeta {
    fn from(stored: StoredMeta) -> BlobMeta {
        BlobMeta {
            size: stored.size,
            media_type: stored.media_type,
            last_access_ms: stored
                .last_access_ms
                .or(stored.last_access.map(|secs| secs.saturating_mul(1000)))
                .unwrap_or(0),
        }
    }
}

/// What a tag resolved to at its last upstream fetch or revalidation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagRecord {
    /// Digest of the manifest the tag points to.
    pub digest: Digest,
    /// Its media type.
    pub media_type: String,
    /// Unix milliseconds of the last time upstream confirmed it.
    #[serde(rename = "checked_at")]
    pub checked_at_ms: u64,
}

/// The sled trees.
pub struct Index {
    db: sled::Db,
    blobs: sled::Tree,
    links: sled::Tree,
    tags: sled::Tree,
    /// child digest ++ parent digest (64 raw bytes): which manifests name a
    /// blob, so evicting the blob can drop them too.
    refs: sled::Tree,
    /// Images pinned at run time (`hoard pin`), as `registry/name:tag` or
    /// `registry/name@digest`.
    pins: sled::Tree,
    /// Referrers lists: `registry/name@subject` (plus `?artifactType` when
    /// filtered) to the stored index and when upstream last confirmed it.
    /// A tree of their own, not pseudo-tags: tag listings, the image
    /// catalog and eviction's tag sweep must never see them.
    referrers: sled::Tree,
}

impl Index {
    /// Opens (or creates) the index under `dir`.
    pub fn open(dir: &Path) -> Result<Index> {
        // No background flusher thread: commits flush explicitly (a blob is
        // durable in the index once `commit` returns), and the lock on the
        // index is released as soon as the store is dropped.
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(64 * 1024 * 1024)
            .flush_every_ms(None)
            .open()?;
        Ok(Index {
            blobs: db.open_tree("blobs")?,
            links: db.open_tree("links")?,
            tags: db.open_tree("tags")?,
            refs: db.open_tree("refs")?,
            pins: db.open_tree("pins")?,
            referrers: db.open_tree("referrers")?,
            db,
        })
    }

    pub fn blob(&self, digest: &Digest) -> Result<Option<BlobMeta>> {
        decode(self.blobs.get(digest.as_bytes())?, || digest.to_string())
    }

    pub fn put_blob(&self, digest: &Digest, meta: &BlobMeta) -> Result<()> {
        self.blobs.insert(digest.as_bytes(), encode(meta))?;
        Ok(())
    }

    pub fn remove_blob(&self, digest: &Digest) -> Result<()> {
        self.blobs.remove(digest.as_bytes())?;
        Ok(())
    }

    /// Every committed blob and its record.
    pub fn blobs(&self) -> Result<Vec<(Digest, BlobMeta)>> {
        let mut out = Vec::new();
        for entry in self.blobs.iter() {
            let (key, value) = entry?;
            let digest =
                Digest::from_bytes(&key).ok_or_else(|| Error::CorruptRecord(hex::encode(&key)))?;
            let meta: BlobMeta = serde_json::from_slice(&value)
                .map_err(|_| Error::CorruptRecord(digest.to_string()))?;
            out.push((digest, meta));
        }
        Ok(out)
    }

    /// Records that manifest `parent` names `child`.
    pub fn add_ref(&self, parent: &Digest, child: &Digest) -> Result<()> {
        self.refs.insert(ref_key(child, parent), &[])?;
        Ok(())
    }

    /// Forgets that `parent` names `child`.
    pub fn remove_ref(&self, parent: &Digest, child: &Digest) -> Result<()> {
        self.refs.remove(ref_key(child, parent))?;
        Ok(())
    }

    /// The manifests that name `child`.
    pub fn parents_of(&self, child: &Digest) -> Result<Vec<Digest>> {
        let mut out = Vec::new();
        for entry in self.refs.scan_prefix(child.as_bytes()) {
            let (key, _) = entry?;
            out.extend(Digest::from_bytes(&key[32..]));
        }
        Ok(out)
    }

    /// Every tag record, with its `registry/name:tag` key.
    pub fn all_tags(&self) -> Result<Vec<(String, TagRecord)>> {
        let mut out = Vec::new();
        for entry in self.tags.iter() {
            let (key, value) = entry?;
            let key = String::from_utf8_lossy(&key).into_owned();
            let record =
                serde_json::from_slice(&value).map_err(|_| Error::CorruptRecord(key.clone()))?;
            out.push((key, record));
        }
        Ok(out)
    }

    /// Removes a tag by its `registry/name:tag` key.
    pub fn remove_tag_key(&self, key: &str) -> Result<()> {
        self.tags.remove(key)?;
        Ok(())
    }

    /// Sum of the sizes of all committed blobs.
    pub fn total_size(&self) -> Result<u64> {
        let mut total = 0;
        for entry in self.blobs.iter() {
            let (key, value) = entry?;
            let meta: BlobMeta = serde_json::from_slice(&value)
                .map_err(|_| Error::CorruptRecord(hex::encode(&key)))?;
            total += meta.size;
        }
        Ok(total)
    }

    pub fn is_linked(&self, repo: &Repository, digest: &Digest) -> Result<bool> {
        Ok(self.links.contains_key(link_key(repo, digest))?)
    }

    pub fn link(&self, repo: &Repository, digest: &Digest) -> Result<()> {
        self.links.insert(link_key(repo, digest), &[])?;
        Ok(())
    }

    pub fn tag(&self, repo: &Repository, tag: &str) -> Result<Option<TagRecord>> {
        let key = tag_key(repo, tag);
        decode(self.tags.get(&key)?, || key.clone())
    }

    pub fn put_tag(&self, repo: &Repository, tag: &str, record: &TagRecord) -> Result<()> {
        self.tags.insert(tag_key(repo, tag), encode(record))?;
        Ok(())
    }

    pub fn remove_tag(&self, repo: &Repository, tag: &str) -> Result<()> {
        self.tags.remove(tag_key(repo, tag))?;
        Ok(())
    }

    /// The tags of `repo` the index knows, sorted.
    pub fn tags_of(&self, repo: &Repository) -> Result<Vec<String>> {
        let prefix = format!("{repo}:");
        let mut tags = Vec::new();
        for entry in self.tags.scan_prefix(&prefix) {
            let (key, _) = entry?;
            let key = String::from_utf8_lossy(&key);
            tags.push(key[prefix.len()..].to_owned());
        }
        Ok(tags)
    }

    /// The record of a referrers list.
    pub fn referrers(&self, repo: &Repository, subject: &Digest) -> Result<Option<TagRecord>> {
        let key = referrers_key(repo, subject);
        decode(self.referrers.get(&key)?, || key.clone())
    }

    /// Records what a referrers list is now.
    pub fn put_referrers(
        &self,
        repo: &Repository,
        subject: &Digest,
        record: &TagRecord,
    ) -> Result<()> {
        self.referrers
            .insert(referrers_key(repo, subject), encode(record))?;
        Ok(())
    }

    /// Forgets a referrers list (upstream answered 404 for it).
    pub fn remove_referrers(&self, repo: &Repository, subject: &Digest) -> Result<()> {
        self.referrers.remove(referrers_key(repo, subject))?;
        Ok(())
    }

    /// Adds a pin; true if it was new.
    pub fn add_pin(&self, image: &str) -> Result<bool> {
        Ok(self.pins.insert(image, &[])?.is_none())
    }

    /// Removes a pin; true if it existed.
    pub fn remove_pin(&self, image: &str) -> Result<bool> {
        Ok(self.pins.remove(image)?.is_some())
    }

    /// The pins added at run time, sorted.
    pub fn pins(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for entry in self.pins.iter() {
            let (key, _) = entry?;
            out.push(String::from_utf8_lossy(&key).into_owned());
        }
        Ok(out)
    }

    /// Makes every change so far durable.
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }
}

fn ref_key(child: &Digest, parent: &Digest) -> Vec<u8> {
    let mut key = Vec::with_capacity(64);
    key.extend_from_slice(child.as_bytes());
    key.extend_from_slice(parent.as_bytes());
    key
}

fn link_key(repo: &Repository, digest: &Digest) -> String {
    format!("{repo}@{digest}")
}

/// `?` appears in no repository name, digest or media type: a filtered
/// list's key never equals another's.
fn referrers_key(repo: &Repository, subject: &Digest) -> String {
    format!("{repo}@{subject}")
}

fn tag_key(repo: &Repository, tag: &str) -> String {
    format!("{repo}:{tag}")
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("index records serialize")
}

fn decode<T: for<'de> Deserialize<'de>>(
    raw: Option<sled::IVec>,
    key: impl FnOnce() -> String,
) -> Result<Option<T>> {
    raw.map(|raw| serde_json::from_slice(&raw).map_err(|_| Error::CorruptRecord(key())))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_of_the_seconds_era_read_as_milliseconds() {
        let old: BlobMeta = serde_json::from_str(r#"{"size":3,"last_access":1700000000}"#).unwrap();
        assert_eq!(old.last_access_ms, 1_700_000_000_000);
        let meta = BlobMeta {
            size: 3,
            media_type: None,
            last_access_ms: 1_700_000_000_123,
        };
        let again: BlobMeta = serde_json::from_slice(&encode(&meta)).unwrap();
        assert_eq!(again, meta);
    }

    #[test]
    fn a_tag_record_keeps_its_digest_parsed() {
        let record = TagRecord {
            digest: Digest::of(b"m"),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            checked_at_ms: 5,
        };
        let json = String::from_utf8(encode(&record)).unwrap();
        assert!(json.contains(r#""checked_at":5"#), "{json}");
        assert_eq!(serde_json::from_str::<TagRecord>(&json).unwrap(), record);
        let bad = json.replace(&record.digest.hex(), "zz");
        assert!(serde_json::from_str::<TagRecord>(&bad).is_err());
    }
}
