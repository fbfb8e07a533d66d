//! The store: verified content in a backend (`backend`: the seam; `fs`
//! the filesystem one), the sled index that says what it is and who may see
//! it, the local temp area downloads are written to, the committed size
//! (with its gauge, kept here alone) and the data dir's lock. Knows nothing
//! of HTTP or upstreams; the `mirror` decides what goes in and when.

mod backend;
pub mod bucket;
pub mod buffers;
mod direct;
mod error;
mod fs;
mod index;
mod lock;
mod maintenance;
mod reader;
mod temp;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

pub use backend::{Backend, Listed};
pub use bucket::{Bucket, BucketBody, Upload};
pub use error::{Error, Result};
pub use index::{BlobMeta, TagRecord};
pub use maintenance::{Evicted, GcReport, Reconciled, VerifyReport};
pub use reader::BlobReader;
pub use temp::{BlobWriter, VerifiedBlob};

use index::Index;
use lock::DirLock;
use temp::TempFiles;

use crate::clock;
use crate::reference::{Digest, Repository};

/// How stale `last_access_ms` may get before a read rewrites it: at most
/// one index write per blob per second on the hot read path.
const ACCESS_GRANULARITY_MS: u64 = 1000;

/// A backend's committed content with its index, temp area and size.
pub struct Store {
    /// Held for as long as the store is open: nothing else may change the
    /// directory meanwhile.
    _lock: DirLock,
    root: PathBuf,
    temps: TempFiles,
    backend: Box<dyn Backend>,
    index: Index,
    size: Size,
}

/// The committed bytes, kept here and nowhere else, with the gauge that
/// shows them: every change goes through `add`/`sub`.
#[derive(Default)]
struct Size {
    bytes: AtomicU64,
    gauge: OnceLock<prometheus::IntGauge>,
}

impl Size {
    fn get(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn set(&self, bytes: u64) {
        self.bytes.store(bytes, Ordering::Relaxed);
        self.publish();
    }

    fn add(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.publish();
    }

    fn sub(&self, bytes: u64) {
        let _ = self
            .bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                Some(b.saturating_sub(bytes))
            });
        self.publish();
    }

    fn publish(&self) {
        if let Some(gauge) = self.gauge.get() {
            gauge.set(i64::try_from(self.get()).unwrap_or(i64::MAX));
        }
    }
}

/// A committed blob opened for reading.
#[derive(Debug)]
pub struct StoredBlob {
    pub reader: BlobReader,
    pub meta: BlobMeta,
}

impl Store {
    /// Opens the store under `root` on the filesystem backend. Takes the
    /// directory's lock first and touches nothing if another process holds
    /// it (`Error::Locked`); then removes leftovers of interrupted downloads
    /// and reconciles the index with the blob files (see `reconcile`).
    /// Blocking.
    pub fn open(root: &Path) -> Result<Store> {
        let (store, _) = Store::open_reconciled(root)?;
        Ok(store)
    }

    /// `open`, also saying what reconciling found.
    pub fn open_reconciled(root: &Path) -> Result<(Store, Reconciled)> {
        let lock = DirLock::acquire(root)?;
        let index = Index::open(&root.join("index"))?;
        let temps = TempFiles::open(root.join("tmp"))?;
        let backend = Box::new(fs::FsBackend::open(root)?);
        let store = Store {
            _lock: lock,
            root: root.to_owned(),
            temps,
            backend,
            index,
            size: Size::default(),
        };
        let reconciled = store.reconcile()?;
        store.size.set(store.index.total_size()?);
        Ok((store, reconciled))
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// This data dir's name for itself among replicas (random, made at its
    /// first start and kept in `<data>/replica-id`): what names its upload
    /// markers in a shared bucket, so after a crash it finds its own.
    /// Blocking.
    pub fn replica_id(&self) -> Result<String> {
        let path = self.root.join("replica-id");
        match std::fs::read_to_string(&path) {
            Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(path, e)),
        }
        let mut random = [0u8; 8];
        getrandom(&mut random);
        let id = hex::encode(random);
        let temp = self.root.join("replica-id.tmp");
        std::fs::write(&temp, &id)
            .and_then(|()| std::fs::rename(&temp, &path))
            .map_err(|e| Error::io(&path, e))?;
        Ok(id)
    }

    /// Shows the store's size in `gauge` from now on.
    pub fn report_size_to(&self, gauge: prometheus::IntGauge) {
        let _ = self.size.gauge.set(gauge);
        self.size.publish();
    }

    /// Total size of the committed blobs.
    pub fn size_bytes(&self) -> u64 {
        self.size.get()
    }

    /// Bytes the backend can still take.
    pub fn available_space(&self) -> Result<u64> {
        self.backend.available_space()
    }

    /// The index record of a committed blob.
    pub fn blob_meta(&self, digest: &Digest) -> Result<Option<BlobMeta>> {
        self.index.blob(digest)
    }

    /// Opens a committed blob and notes the access. An index entry whose
    /// content is gone (removed by hand) is dropped and reported as absent.
    pub fn open_blob(&self, digest: &Digest) -> Result<Option<StoredBlob>> {
        let Some(mut meta) = self.index.blob(digest)? else {
            return Ok(None);
        };
        let Some(reader) = self.backend.open(digest)? else {
            self.drop_entry(digest, &meta)?;
            return Ok(None);
        };
        let now = clock::unix_ms();
        if now.saturating_sub(meta.last_access_ms) >= ACCESS_GRANULARITY_MS {
            meta.last_access_ms = now;
            self.index.put_blob(digest, &meta)?;
        }
        Ok(Some(StoredBlob { reader, meta }))
    }

    /// Opens a committed blob without noting an access: for listings and
    /// walks (`hoard ls`, the status page), which must not make everything
    /// look just pulled to eviction's LRU.
    pub fn peek_blob(&self, digest: &Digest) -> Result<Option<StoredBlob>> {
        let Some(meta) = self.index.blob(digest)? else {
            return Ok(None);
        };
        Ok(self
            .backend
            .open(digest)?
            .map(|reader| StoredBlob { reader, meta }))
    }

    /// Takes a blob found damaged while serving it (its content shorter
    /// than recorded: changed behind hoard's back) out of the store, so
    /// the next request fetches it again. Blocking.
    pub fn quarantine_damaged(&self, digest: &Digest) -> Result<()> {
        let Some(meta) = self.index.blob(digest)? else {
            return Ok(());
        };
        self.drop_entry(digest, &meta)?;
        if let Err(e) = self.backend.quarantine(digest) {
            // Gone already, or unmovable: at least keep it from being served.
            self.backend.remove(digest).map_err(|_| e)?;
        }
        self.index.flush()
    }

    /// Starts a temp file for new content.
    pub fn create_temp(&self) -> Result<BlobWriter> {
        self.temps.create(false)
    }

    /// Temp files not yet committed or deleted.
    pub fn open_temps(&self) -> usize {
        self.temps.open_count()
    }

    /// A temp file for a large download, written around the page cache
    /// where the file system allows.
    pub fn create_download(&self) -> Result<BlobWriter> {
        self.temps.create(true)
    }

    /// Makes verified content durable and visible, then records it in the
    /// index (content first, so the index never points at missing content).
    /// Blocking.
    pub fn commit(&self, verified: VerifiedBlob, media_type: Option<String>) -> Result<BlobMeta> {
        let digest = verified.digest().clone();
        let size = self.backend.commit(verified)?;
        let meta = BlobMeta {
            size,
            media_type,
            last_access_ms: clock::unix_ms(),
        };
        let previous = self.index.blob(&digest)?;
        self.index.put_blob(&digest, &meta)?;
        self.index.flush()?;
        if previous.is_none() {
            self.size.add(size);
        }
        Ok(meta)
    }

    /// Writes a small in-memory object (a manifest) through the same
    /// verify-then-commit path. Blocking.
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

    /// Forgets a blob in the index and in the size; its content is the
    /// caller's to remove or move.
    fn drop_entry(&self, digest: &Digest, meta: &BlobMeta) -> Result<()> {
        self.index.remove_blob(digest)?;
        self.size.sub(meta.size);
        Ok(())
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

    /// What the referrers list of `subject` in `repo` was when upstream
    /// last sent it: the digest of the stored index, and when. One per
    /// subject: filters are applied to it when served.
    pub fn referrers(&self, repo: &Repository, subject: &Digest) -> Result<Option<TagRecord>> {
        self.index.referrers(repo, subject)
    }

    /// Records a referrers list; its index must already be stored
    /// (`put_bytes`), so a record never names content that is not there.
    pub fn put_referrers(
        &self,
        repo: &Repository,
        subject: &Digest,
        record: &TagRecord,
    ) -> Result<()> {
        self.index.put_referrers(repo, subject, record)
    }

    /// Forgets a referrers list upstream no longer serves.
    pub fn remove_referrers(&self, repo: &Repository, subject: &Digest) -> Result<()> {
        self.index.remove_referrers(repo, subject)
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

/// Random bytes from the kernel (identity, not secrets: `/dev/urandom`
/// is plenty).
fn getrandom(out: &mut [u8]) {
    use std::io::Read as _;
    let filled = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(out));
    if filled.is_err() {
        // No /dev/urandom (a bare chroot): time and pid are unique enough
        // for a name.
        let seed = (clock::unix_ms() as u128) << 32 | u128::from(std::process::id());
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = (seed >> ((i % 16) * 8)) as u8;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Where the filesystem backend keeps `digest` in `store`.
    pub(crate) fn fs_path(store: &Store, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        store.root().join("blobs/sha256").join(&hex[..2]).join(hex)
    }

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
        assert_eq!(blob.reader.read_all(blob.meta.size).unwrap(), &data[..]);
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
        assert!(!fs_path(&store, &claimed).exists());
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
            digest: d.clone(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            checked_at_ms: 1,
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
    fn issue_14_referrers_records_are_per_subject_and_never_tags() {
        let (_dir, store) = store();
        let a = Repository::new("docker.io", "a").unwrap();
        let (subject, other) = (Digest::of(b"image"), Digest::of(b"other"));
        let rec = |n: &[u8]| TagRecord {
            digest: Digest::of(n),
            media_type: "application/vnd.oci.image.index.v1+json".into(),
            checked_at_ms: 1,
        };
        store.put_referrers(&a, &subject, &rec(b"all")).unwrap();
        store.put_referrers(&a, &other, &rec(b"some")).unwrap();
        assert_eq!(store.referrers(&a, &subject).unwrap(), Some(rec(b"all")));
        assert_eq!(store.referrers(&a, &other).unwrap(), Some(rec(b"some")));
        // Tag listings, the catalog and eviction's tag sweep never see them.
        assert!(store.tags_of(&a).unwrap().is_empty());
        assert!(store.all_tags().unwrap().is_empty());
        store.remove_referrers(&a, &subject).unwrap();
        assert_eq!(store.referrers(&a, &subject).unwrap(), None);
        assert!(store.referrers(&a, &other).unwrap().is_some());
    }

    #[test]
    fn issue_12_a_second_open_is_refused_before_it_touches_a_download() {
        let (dir, store) = store();
        let data = b"half of a layer still downloading";
        let mut download = store.create_download().unwrap();
        download.write(&data[..10]).unwrap();
        download.finish().unwrap();
        match Store::open(dir.path()) {
            Err(Error::Locked { holder, .. }) => assert_eq!(holder, Some(std::process::id())),
            Err(e) => panic!("expected Locked, got {e}"),
            Ok(_) => panic!("a second open of a held store succeeded"),
        }
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            1,
            "the refused open removed the holder's temp file"
        );
        download.write(&data[10..]).unwrap();
        let digest = Digest::of(data);
        store
            .commit(download.verify(&digest).unwrap(), None)
            .expect("the download still commits");
        assert!(store.open_blob(&digest).unwrap().is_some());
    }

    #[test]
    fn issue_12_the_size_gauge_follows_every_change() {
        let (_dir, store) = store();
        let gauge = prometheus::IntGauge::new("size", "size").unwrap();
        let kept = Digest::of(b"kept layer");
        store.put_bytes(&kept, None, b"kept layer").unwrap();
        store.report_size_to(gauge.clone());
        assert_eq!(gauge.get(), 10);
        let rotten = Digest::of(b"will rot");
        store.put_bytes(&rotten, None, b"will rot").unwrap();
        assert_eq!(gauge.get(), 18);
        std::fs::write(fs_path(&store, &rotten), b"has rot!").unwrap();
        let report = store.verify(|_, _| {}).unwrap();
        assert_eq!(report.quarantined, vec![rotten]);
        assert_eq!((store.size_bytes(), gauge.get()), (10, 10));
        std::fs::remove_file(fs_path(&store, &kept)).unwrap();
        assert!(store.open_blob(&kept).unwrap().is_none());
        assert_eq!((store.size_bytes(), gauge.get()), (0, 0));
    }

    #[test]
    fn missing_file_drops_index_entry() {
        let (_dir, store) = store();
        let d = Digest::of(b"gone");
        store.put_bytes(&d, None, b"gone").unwrap();
        std::fs::remove_file(fs_path(&store, &d)).unwrap();
        assert!(store.open_blob(&d).unwrap().is_none());
        assert!(store.blob_meta(&d).unwrap().is_none());
    }
}
