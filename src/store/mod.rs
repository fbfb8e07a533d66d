//! The local store: verified blob files plus the sled index that says what
//! they are and who may see them. Knows nothing of HTTP or upstreams; the
//! `mirror` decides what goes in and when.

mod blobs;
mod direct;
mod error;
mod index;
mod maintenance;

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

pub use blobs::{BlobWriter, VerifiedBlob};
pub use error::{Error, Result};
pub use index::{BlobMeta, TagRecord};
pub use maintenance::{Evicted, GcReport, Reconciled, VerifyReport};

use blobs::BlobFiles;
use index::Index;

use crate::reference::{Digest, Repository};

/// How stale `last_access` may get before a read rewrites it: at most one
/// index write per blob per second on the hot read path.
const ACCESS_GRANULARITY_SECS: u64 = 1;

/// Blob files and their index.
pub struct Store {
    root: std::path::PathBuf,
    files: BlobFiles,
    index: Index,
    bytes: AtomicU64,
}

/// A committed blob opened for reading.
#[derive(Debug)]
pub struct StoredBlob {
    pub file: File,
    pub meta: BlobMeta,
}

impl Store {
    /// Opens the store under `root`: removes leftovers of interrupted
    /// downloads and reconciles the index with the blob files (see
    /// `reconcile`). Blocking.
    pub fn open(root: &Path) -> Result<Store> {
        let (store, _) = Store::open_reconciled(root)?;
        Ok(store)
    }

    /// `open`, also saying what reconciling found.
    pub fn open_reconciled(root: &Path) -> Result<(Store, Reconciled)> {
        let files = BlobFiles::open(root)?;
        let index = Index::open(&root.join("index"))?;
        let store = Store {
            root: root.to_owned(),
            files,
            index,
            bytes: AtomicU64::new(0),
        };
        let reconciled = store.reconcile()?;
        store
            .bytes
            .store(store.index.total_size()?, Ordering::Relaxed);
        Ok((store, reconciled))
    }

    /// Total size of the committed blobs.
    pub fn size_bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The index record of a committed blob.
    pub fn blob_meta(&self, digest: &Digest) -> Result<Option<BlobMeta>> {
        self.index.blob(digest)
    }

    /// Opens a committed blob and notes the access. An index entry whose file
    /// is gone (removed by hand) is dropped and reported as absent.
    pub fn open_blob(&self, digest: &Digest) -> Result<Option<StoredBlob>> {
        let Some(mut meta) = self.index.blob(digest)? else {
            return Ok(None);
        };
        let Some(file) = self.files.open_blob(digest)? else {
            self.index.remove_blob(digest)?;
            self.bytes
                .fetch_sub(meta.size.min(self.size_bytes()), Ordering::Relaxed);
            return Ok(None);
        };
        let now = unix_secs();
        if now.saturating_sub(meta.last_access) >= ACCESS_GRANULARITY_SECS {
            meta.last_access = now;
            self.index.put_blob(digest, &meta)?;
        }
        Ok(Some(StoredBlob { file, meta }))
    }

    /// Starts a temp file for new content.
    pub fn create_temp(&self) -> Result<BlobWriter> {
        self.files.create_temp(false)
    }

    /// Temp files not yet committed or deleted.
    pub fn open_temps(&self) -> usize {
        self.files.open_temps()
    }

    /// A temp file for a large download, written around the page cache
    /// where the file system allows.
    pub fn create_download(&self) -> Result<BlobWriter> {
        self.files.create_temp(true)
    }

    /// Makes verified content durable and visible, then records it in the
    /// index (file first, so the index never points at a missing file).
    /// Blocking.
    pub fn commit(&self, verified: VerifiedBlob, media_type: Option<String>) -> Result<BlobMeta> {
        let digest = verified.digest().clone();
        let size = self.files.commit(verified)?;
        let meta = BlobMeta {
            size,
            media_type,
            last_access: unix_secs(),
        };
        let previous = self.index.blob(&digest)?;
        self.index.put_blob(&digest, &meta)?;
        self.index.flush()?;
        if previous.is_none() {
            self.bytes.fetch_add(size, Ordering::Relaxed);
        }
        Ok(meta)
    }

    /// Writes a small in-memory object (a manifest) through the same
    /// verify-then-rename path. Blocking.
    pub fn put_bytes(
        &self,
        digest: &Digest,
        media_type: Option<String>,
        data: &[u8],
    ) -> Result<BlobMeta> {
        let mut writer = self.create_temp()?;
        writer.write(data)?;
        self.commit(writer.verify(digest)?, media_type)
    }

    /// Records which blobs and child manifests `manifest` names, so that
    /// evicting one of them also drops the manifest.
    pub fn add_refs(&self, manifest: &Digest, children: &[Digest]) -> Result<()> {
        for child in children {
            self.index.add_ref(manifest, child)?;
        }
        Ok(())
    }

    /// Whether `repo` was seen upstream to contain `digest`.
    pub fn is_linked(&self, repo: &Repository, digest: &Digest) -> Result<bool> {
        self.index.is_linked(repo, digest)
    }

    /// Records that upstream confirmed `repo` contains `digest`.
    pub fn link(&self, repo: &Repository, digest: &Digest) -> Result<()> {
        self.index.link(repo, digest)
    }

    /// What `repo:tag` last resolved to.
    pub fn tag(&self, repo: &Repository, tag: &str) -> Result<Option<TagRecord>> {
        self.index.tag(repo, tag)
    }

    /// Records what `repo:tag` resolves to now.
    pub fn put_tag(&self, repo: &Repository, tag: &str, record: &TagRecord) -> Result<()> {
        self.index.put_tag(repo, tag, record)
    }

    /// Forgets a tag upstream no longer has.
    pub fn remove_tag(&self, repo: &Repository, tag: &str) -> Result<()> {
        self.index.remove_tag(repo, tag)
    }

    /// Every cached tag: `registry/name:tag` and what it points to.
    pub fn all_tags(&self) -> Result<Vec<(String, TagRecord)>> {
        self.index.all_tags()
    }

    /// Pins an image (by its canonical name) at run time. Durable.
    pub fn add_pin(&self, image: &str) -> Result<bool> {
        let added = self.index.add_pin(image)?;
        self.index.flush()?;
        Ok(added)
    }

    /// Removes a run-time pin. Durable.
    pub fn remove_pin(&self, image: &str) -> Result<bool> {
        let removed = self.index.remove_pin(image)?;
        self.index.flush()?;
        Ok(removed)
    }

    /// Run-time pins.
    pub fn pins(&self) -> Result<Vec<String>> {
        self.index.pins()
    }

    /// Tags of `repo` present in the index.
    pub fn tags_of(&self, repo: &Repository) -> Result<Vec<String>> {
        self.index.tags_of(repo)
    }

    /// Flushes the index (on shutdown; commits flush on their own).
    pub fn flush(&self) -> Result<()> {
        self.index.flush()
    }
}

/// Bytes available to unprivileged users on the file system holding `path`.
pub fn available_space(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is a valid NUL-terminated string and `stat` a valid
    // out-pointer for the duration of the call.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch, the clock of `TagRecord::checked_at`.
pub fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        (dir, store)
    }

    #[test]
    fn commit_verifies_and_makes_visible() {
        let (_dir, store) = store();
        let data = b"hello layer";
        let digest = Digest::of(data);
        assert!(store.open_blob(&digest).unwrap().is_none());
        let mut w = store.create_temp().unwrap();
        w.write(&data[..5]).unwrap();
        w.write(&data[5..]).unwrap();
        let meta = store.commit(w.verify(&digest).unwrap(), None).unwrap();
        assert_eq!(meta.size, data.len() as u64);
        let blob = store.open_blob(&digest).unwrap().unwrap();
        assert_eq!(std::io::read_to_string(blob.file).unwrap().as_bytes(), data);
        assert_eq!(store.size_bytes(), data.len() as u64);
    }

    #[test]
    fn mismatch_is_never_visible_and_temp_is_removed() {
        let (dir, store) = store();
        let claimed = Digest::of(b"the real content");
        let mut w = store.create_temp().unwrap();
        w.write(b"something else").unwrap();
        let err = w.verify(&claimed).unwrap_err();
        assert!(matches!(err, Error::DigestMismatch { .. }));
        assert!(store.open_blob(&claimed).unwrap().is_none());
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        assert!(!store.files.path(&claimed).exists());
    }

    #[test]
    fn dropped_writer_leaves_nothing_and_restart_clears_tmp() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let mut w = store.create_temp().unwrap();
            w.write(b"partial").unwrap();
            drop(w);
            assert_eq!(
                std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
                0
            );
        }
        // A crash leaves a temp file behind: the next start removes it.
        std::fs::write(dir.path().join("tmp").join("leftover"), b"half a layer").unwrap();
        let _store = Store::open(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }

    #[test]
    fn links_and_tags_are_per_repository() {
        let (_dir, store) = store();
        let a = Repository::new("docker.io", "a").unwrap();
        let b = Repository::new("docker.io", "b").unwrap();
        let d = Digest::of(b"x");
        store.link(&a, &d).unwrap();
        assert!(store.is_linked(&a, &d).unwrap());
        assert!(!store.is_linked(&b, &d).unwrap());
        let rec = TagRecord {
            digest: d.to_string(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            checked_at: 1,
        };
        store.put_tag(&a, "1.0", &rec).unwrap();
        store.put_tag(&a, "2.0", &rec).unwrap();
        assert_eq!(store.tag(&a, "1.0").unwrap(), Some(rec));
        assert_eq!(store.tag(&b, "1.0").unwrap(), None);
        assert_eq!(store.tags_of(&a).unwrap(), vec!["1.0", "2.0"]);
        store.remove_tag(&a, "1.0").unwrap();
        assert_eq!(store.tags_of(&a).unwrap(), vec!["2.0"]);
    }

    #[test]
    fn missing_file_drops_index_entry() {
        let (_dir, store) = store();
        let d = Digest::of(b"gone");
        store.put_bytes(&d, None, b"gone").unwrap();
        std::fs::remove_file(store.files.path(&d)).unwrap();
        assert!(store.open_blob(&d).unwrap().is_none());
        assert!(store.blob_meta(&d).unwrap().is_none());
    }
}
