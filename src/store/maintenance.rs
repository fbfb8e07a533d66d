//! Keeping the store true and within bounds: reconciling the index with the
//! files at start, least-recently-used eviction, re-verification and
//! garbage collection. Eviction removes a blob together with every manifest
//! that names it (and the tags pointing at those), so no cached manifest
//! ever points at content that is gone.

use std::collections::HashSet;
use std::time::Instant;

use super::error::Result;
use super::{BlobMeta, Listed, Store};
use crate::clock;
use crate::reference::Digest;

/// What reconciling the index with the files found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// Index entries checked.
    pub entries: usize,
    /// Entries dropped because their file was missing.
    pub dropped: usize,
    /// Files of the wrong size (corrupt): moved to quarantine/, entry dropped.
    pub quarantined: Vec<Digest>,
    /// Verified files (renamed into place) whose index write was lost, taken back.
    pub adopted: usize,
    /// Stray files removed from the blob tree.
    pub removed: usize,
    pub millis: u128,
}

/// What an eviction removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Evicted {
    pub blobs: usize,
    pub bytes: u64,
    /// Manifests dropped with them (callers forget them in memory too).
    pub manifests: Vec<Digest>,
}

/// What `verify` found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub checked: usize,
    pub bytes: u64,
    /// Blobs whose content did not match their digest, moved to quarantine/.
    pub quarantined: Vec<Digest>,
}

/// What `gc` removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GcReport {
    pub blobs: usize,
    pub bytes: u64,
}

impl Store {
    /// Makes the index and the blob tree agree. A commit renames the file
    /// before it writes the index, so after a crash a file may lack its
    /// entry: it was verified before the rename, so it is taken back. An
    /// entry whose file is gone is dropped; a file of the wrong size is
    /// corrupt and goes to quarantine. Blocking.
    pub fn reconcile(&self) -> Result<Reconciled> {
        let started = Instant::now();
        let mut report = Reconciled::default();
        let mut on_disk = std::collections::HashMap::new();
        for listed in self.backend.list()? {
            match listed {
                Listed::Blob(digest, size) => {
                    on_disk.insert(digest, size);
                }
                Listed::Stray(stray) => {
                    self.backend.remove_stray(&stray)?;
                    report.removed += 1;
                }
            }
        }
        for (digest, meta) in self.index.blobs()? {
            report.entries += 1;
            match on_disk.remove(&digest) {
                Some(size) if size == meta.size => {}
                Some(_) => {
                    self.backend.quarantine(&digest)?;
                    self.index.remove_blob(&digest)?;
                    report.quarantined.push(digest);
                }
                None => {
                    self.index.remove_blob(&digest)?;
                    report.dropped += 1;
                }
            }
        }
        for (digest, size) in on_disk {
            let meta = BlobMeta {
                size,
                media_type: None,
                last_access_ms: clock::unix_ms(),
            };
            self.index.put_blob(&digest, &meta)?;
            report.adopted += 1;
        }
        self.index.flush()?;
        report.millis = started.elapsed().as_millis();
        Ok(report)
    }

    /// Removes least recently used blobs until the store holds at most
    /// `target` bytes, never touching `protected` digests. Readers that have
    /// a removed blob open finish their transfer. Blocking.
    pub fn evict(&self, target: u64, protected: &HashSet<Digest>) -> Result<Evicted> {
        let mut evicted = Evicted::default();
        if self.size_bytes() <= target {
            return Ok(evicted);
        }
        let mut candidates = self.index.blobs()?;
        candidates.retain(|(digest, _)| !protected.contains(digest));
        // Oldest access first; layers before manifests on ties, since a
        // manifest goes anyway with the first of its blobs.
        candidates.sort_by_key(|(_, meta)| (meta.last_access_ms, meta.media_type.is_some()));
        for (digest, _) in candidates {
            if self.size_bytes() <= target {
                break;
            }
            let Some(meta) = self.index.blob(&digest)? else {
                continue; // already gone with a manifest
            };
            self.remove_cascading(&digest, &meta, protected, &mut evicted)?;
        }
        self.index.flush()?;
        Ok(evicted)
    }

    /// Removes an image's digests: each one that nothing outside the set
    /// names, and is not protected. Blocking.
    pub fn remove_image(
        &self,
        digests: &HashSet<Digest>,
        protected: &HashSet<Digest>,
    ) -> Result<Evicted> {
        let mut evicted = Evicted::default();
        for digest in digests {
            if protected.contains(digest) {
                continue;
            }
            let named_elsewhere = self
                .index
                .parents_of(digest)?
                .iter()
                .any(|parent| !digests.contains(parent));
            if named_elsewhere {
                continue;
            }
            if let Some(meta) = self.index.blob(digest)? {
                self.remove_cascading(digest, &meta, protected, &mut evicted)?;
            }
        }
        self.index.flush()?;
        Ok(evicted)
    }

    /// Removes one blob or manifest, then every manifest naming it.
    fn remove_cascading(
        &self,
        digest: &Digest,
        meta: &BlobMeta,
        protected: &HashSet<Digest>,
        evicted: &mut Evicted,
    ) -> Result<()> {
        self.remove_entry(digest, meta)?;
        evicted.blobs += 1;
        evicted.bytes += meta.size;
        if meta.media_type.is_some() {
            evicted.manifests.push(digest.clone());
            for (key, record) in self.index.all_tags()? {
                if record.digest == *digest {
                    self.index.remove_tag_key(&key)?;
                }
            }
        }
        for parent in self.index.parents_of(digest)? {
            self.index.remove_ref(&parent, digest)?;
            if protected.contains(&parent) {
                continue;
            }
            if let Some(parent_meta) = self.index.blob(&parent)? {
                self.remove_cascading(&parent, &parent_meta, protected, evicted)?;
            }
        }
        Ok(())
    }

    fn remove_entry(&self, digest: &Digest, meta: &BlobMeta) -> Result<()> {
        // Index first: from this moment no new reader finds it.
        self.drop_entry(digest, meta)?;
        self.backend.remove(digest)
    }

    /// Hashes every stored blob and manifest again; mismatches are moved to
    /// `<data>/quarantine/` and dropped from the index. `progress` is called
    /// after each blob. Blocking.
    pub fn verify(&self, mut progress: impl FnMut(&Digest, u64)) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        for (digest, meta) in self.index.blobs()? {
            let (actual, size) = self.backend.rehash(&digest)?;
            report.checked += 1;
            report.bytes += size;
            if actual != digest || size != meta.size {
                // The entry first: from this moment no new reader finds it,
                // and the size no longer counts it.
                self.drop_entry(&digest, &meta)?;
                self.backend.quarantine(&digest)?;
                report.quarantined.push(digest.clone());
            }
            progress(&digest, size);
        }
        self.index.flush()?;
        Ok(report)
    }

    /// Removes layer and config blobs that no stored manifest names.
    /// Manifests themselves are kept. Blocking.
    pub fn gc(&self) -> Result<GcReport> {
        let mut report = GcReport::default();
        for (digest, meta) in self.index.blobs()? {
            if meta.media_type.is_some() || !self.index.parents_of(&digest)?.is_empty() {
                continue;
            }
            self.remove_entry(&digest, &meta)?;
            report.blobs += 1;
            report.bytes += meta.size;
        }
        self.index.flush()?;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(store: &Store, data: &[u8], media_type: Option<&str>) -> Digest {
        let digest = Digest::of(data);
        store
            .put_bytes(&digest, media_type.map(str::to_owned), data)
            .unwrap();
        digest
    }

    fn age(store: &Store, digest: &Digest, last_access_ms: u64) {
        let mut meta = store.index.blob(digest).unwrap().unwrap();
        meta.last_access_ms = last_access_ms;
        store.index.put_blob(digest, &meta).unwrap();
    }

    #[test]
    fn a_peek_is_not_an_access_and_an_open_is() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let digest = put(&store, b"listed, not pulled", None);
        age(&store, &digest, 5_000);
        let peeked = store.peek_blob(&digest).unwrap().unwrap();
        assert_eq!(
            peeked.reader.read_all(peeked.meta.size).unwrap().as_ref(),
            b"listed, not pulled"
        );
        assert_eq!(
            store.blob_meta(&digest).unwrap().unwrap().last_access_ms,
            5_000
        );
        store.open_blob(&digest).unwrap().unwrap();
        assert!(store.blob_meta(&digest).unwrap().unwrap().last_access_ms > 5_000);
    }

    #[test]
    fn eviction_is_lru_spares_protected_and_takes_manifests_with_their_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let old = put(&store, &[1u8; 1000], None);
        let pinned = put(&store, &[2u8; 1000], None);
        let recent = put(&store, &[3u8; 1000], None);
        let manifest = put(
            &store,
            b"{\"layers\":[]}",
            Some("application/vnd.oci.image.manifest.v1+json"),
        );
        store
            .add_refs(&manifest, std::slice::from_ref(&old))
            .unwrap();
        let repo = crate::reference::Repository::new("docker.io", "x").unwrap();
        let record = super::super::TagRecord {
            digest: manifest.clone(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            checked_at_ms: 0,
        };
        store.put_tag(&repo, "1", &record).unwrap();
        age(&store, &old, 10);
        age(&store, &pinned, 5);
        age(&store, &recent, 1_000);
        age(&store, &manifest, 1_000);

        let protected: HashSet<Digest> = [pinned.clone()].into();
        let evicted = store.evict(2100, &protected).unwrap();
        assert_eq!(evicted.manifests, vec![manifest.clone()]);
        assert!(store.blob_meta(&old).unwrap().is_none());
        assert!(
            store.blob_meta(&manifest).unwrap().is_none(),
            "the manifest went with its layer"
        );
        assert!(
            store.tag(&repo, "1").unwrap().is_none(),
            "and the tag pointing at it"
        );
        assert!(store.blob_meta(&pinned).unwrap().is_some());
        assert!(store.blob_meta(&recent).unwrap().is_some());
        assert_eq!(store.size_bytes(), 2000);
    }

    #[test]
    fn open_file_survives_eviction() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = put(&store, &[7u8; 4096], None);
        let reader = store.open_blob(&d).unwrap().unwrap();
        store.evict(0, &HashSet::new()).unwrap();
        assert!(store.open_blob(&d).unwrap().is_none());
        assert_eq!(reader.reader.read_all(4096).unwrap().len(), 4096);
    }

    #[test]
    fn reconcile_adopts_orphans_and_drops_dangling_entries() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, lost, orphan);
        {
            let store = Store::open(dir.path()).unwrap();
            kept = put(&store, b"kept", None);
            lost = put(&store, b"lost", None);
            // A crash between the rename and the index write leaves a file
            // without an entry.
            orphan = Digest::of(b"orphan");
            let mut w = store.create_temp().unwrap();
            w.write(b"orphan").unwrap();
            store.backend.commit(w.verify(&orphan).unwrap()).unwrap();
            std::fs::remove_file(super::super::tests::fs_path(&store, &lost)).unwrap();
            std::fs::write(dir.path().join("blobs/sha256/zz-stray"), b"junk").unwrap();
        }
        let (store, report) = Store::open_reconciled(dir.path()).unwrap();
        assert_eq!(
            (
                report.entries,
                report.dropped,
                report.adopted,
                report.removed
            ),
            (2, 1, 1, 1)
        );
        assert!(store.blob_meta(&kept).unwrap().is_some());
        assert!(store.blob_meta(&lost).unwrap().is_none());
        assert_eq!(store.blob_meta(&orphan).unwrap().unwrap().size, 6);
        assert_eq!(store.size_bytes(), 10);
    }

    #[test]
    fn verify_quarantines_corrupt_content() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let good = put(&store, b"good content", None);
        let bad = put(&store, b"will rot", None);
        std::fs::write(super::super::tests::fs_path(&store, &bad), b"has rot!").unwrap();
        let mut seen = 0;
        let report = store.verify(|_, _| seen += 1).unwrap();
        assert_eq!(seen, 2);
        assert_eq!(report.quarantined, vec![bad.clone()]);
        assert!(dir.path().join("quarantine").join(bad.hex()).exists());
        assert!(store.blob_meta(&bad).unwrap().is_none());
        assert!(store.blob_meta(&good).unwrap().is_some());
        assert_eq!(
            store.size_bytes(),
            b"good content".len() as u64,
            "the quarantined blob no longer counts"
        );
    }

    #[test]
    fn gc_removes_blobs_no_manifest_names() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let named = put(&store, b"named layer", None);
        let loose = put(&store, b"loose layer", None);
        let manifest = put(
            &store,
            b"{}",
            Some("application/vnd.oci.image.manifest.v1+json"),
        );
        store
            .add_refs(&manifest, std::slice::from_ref(&named))
            .unwrap();
        let report = store.gc().unwrap();
        assert_eq!(report.blobs, 1);
        assert!(store.blob_meta(&loose).unwrap().is_none());
        assert!(store.blob_meta(&named).unwrap().is_some());
        assert!(store.blob_meta(&manifest).unwrap().is_some());
    }
}
