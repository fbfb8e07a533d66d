//! Content-addressed blob files: `<data>/blobs/sha256/<2 hex>/<64 hex>`.
//! New content is written to `<data>/tmp/`, hashed as it is written, and
//! renamed into place only once the digest matched and the file was fsynced,
//! so a partial or corrupt download is never visible under its digest.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use super::direct::Appender;
use super::error::{Error, Result};
use crate::reference::Digest;

/// The on-disk layout of blob and temp files.
#[derive(Debug)]
pub struct BlobFiles {
    blobs: PathBuf,
    tmp: PathBuf,
    next_temp: AtomicU64,
    /// Temp files not yet committed or deleted.
    open_temps: Arc<AtomicUsize>,
}

impl BlobFiles {
    /// Creates the folders and removes temp files a previous run left behind
    /// (a crash mid-download leaves only those, never a visible blob).
    pub fn open(root: &Path) -> Result<BlobFiles> {
        let blobs = root.join("blobs").join("sha256");
        let tmp = root.join("tmp");
        fs::create_dir_all(&blobs).map_err(|e| Error::io(&blobs, e))?;
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(BlobFiles {
            blobs,
            tmp,
            next_temp: AtomicU64::new(0),
            open_temps: Arc::default(),
        })
    }

    /// Temp files still being written (or waiting for their writer to drop).
    pub fn open_temps(&self) -> usize {
        self.open_temps.load(Ordering::SeqCst)
    }

    /// Where the verified blob with this digest lives.
    pub fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.blobs.join(&hex[..2]).join(hex)
    }

    /// Opens a committed blob for reading, `None` if its file is missing.
    pub fn open_blob(&self, digest: &Digest) -> Result<Option<File>> {
        let path = self.path(digest);
        match File::open(&path) {
            Ok(file) => Ok(Some(file)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    /// Deletes a committed blob file; a reader that has it open keeps
    /// reading (the inode lives until closed). Blocking.
    pub fn remove(&self, digest: &Digest) -> Result<()> {
        let path = self.path(digest);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    /// Moves a blob that failed verification aside, out of the served tree.
    pub fn quarantine(&self, digest: &Digest, root: &Path) -> Result<PathBuf> {
        let dir = root.join("quarantine");
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let dest = dir.join(digest.hex());
        fs::rename(self.path(digest), &dest).map_err(|e| Error::io(&dest, e))?;
        Ok(dest)
    }

    /// Every file in the blob tree: its digest (from the name) and size.
    /// Files whose names are not digests are returned as `Err(path)`.
    pub fn list(&self) -> Result<Vec<std::result::Result<(Digest, u64), PathBuf>>> {
        let mut out = Vec::new();
        let prefixes = fs::read_dir(&self.blobs).map_err(|e| Error::io(&self.blobs, e))?;
        for prefix in prefixes {
            let prefix = prefix.map_err(|e| Error::io(&self.blobs, e))?;
            let dir = prefix.path();
            if !dir.is_dir() {
                out.push(Err(dir));
                continue;
            }
            for file in fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
                let file = file.map_err(|e| Error::io(&dir, e))?;
                let name = file.file_name();
                let digest = Digest::parse(&format!("sha256:{}", name.to_string_lossy())).ok();
                let size = file.metadata().map(|m| m.len()).unwrap_or(0);
                match digest {
                    Some(d) if file.path() == self.path(&d) => out.push(Ok((d, size))),
                    _ => out.push(Err(file.path())),
                }
            }
        }
        Ok(out)
    }

    /// Hashes a committed blob file again. Blocking.
    pub fn rehash(&self, digest: &Digest) -> Result<(Digest, u64)> {
        let path = self.path(digest);
        let mut file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let mut hasher = Sha256::new();
        let size = std::io::copy(&mut file, &mut hasher).map_err(|e| Error::io(&path, e))?;
        Ok((Digest::from_hasher(hasher), size))
    }

    /// Starts a new temp file in the same file system as the blobs, so the
    /// final rename is atomic. With `direct`, writes bypass the page cache
    /// where the file system allows (large downloads: see `direct`).
    pub fn create_temp(&self, direct: bool) -> Result<BlobWriter> {
        let n = self.next_temp.fetch_add(1, Ordering::Relaxed);
        let path = self.tmp.join(format!("{}-{n}", std::process::id()));
        let appender = Appender::create(&path, direct).map_err(|e| Error::io(&path, e))?;
        // Readers get their own buffered handle: direct I/O would make their
        // unaligned reads fail.
        let reader = File::open(&path).map_err(|e| Error::io(&path, e))?;
        self.open_temps.fetch_add(1, Ordering::SeqCst);
        Ok(BlobWriter {
            open_temps: self.open_temps.clone(),
            temp: Some(path),
            appender,
            reader: Arc::new(reader),
            hasher: Sha256::new(),
            written: 0,
        })
    }

    /// Makes verified content durable and visible: fsync, rename into place,
    /// fsync the directory. Blocking: call from a blocking thread.
    pub fn commit(&self, verified: VerifiedBlob) -> Result<u64> {
        let VerifiedBlob { mut writer, digest } = verified;
        let temp = writer.temp.take().expect("temp path present until commit");
        let dest = self.path(&digest);
        let result = (|| {
            writer
                .appender
                .finish()
                .and_then(|()| writer.appender.file().sync_all())
                .map_err(|e| Error::io(&temp, e))?;
            let dir = dest.parent().expect("blob path has a parent");
            fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            fs::rename(&temp, &dest).map_err(|e| Error::io(&dest, e))?;
            // Make the rename itself durable.
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io(dir, e))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result.map(|()| writer.written)
    }
}

/// A temp file being filled. Dropping it without a commit deletes the file.
#[derive(Debug)]
pub struct BlobWriter {
    open_temps: Arc<AtomicUsize>,
    temp: Option<PathBuf>,
    appender: Appender,
    reader: Arc<File>,
    hasher: Sha256,
    /// Bytes appended (some may still be staged, not yet in the file).
    written: u64,
}

impl BlobWriter {
    /// Hashes and appends a chunk. Blocking.
    pub fn write(&mut self, chunk: &[u8]) -> Result<()> {
        self.hasher.update(chunk);
        self.append(chunk)
    }

    /// Appends a chunk the caller hashes itself (see `verify_hashed`).
    /// Blocking.
    pub fn append(&mut self, chunk: &[u8]) -> Result<()> {
        self.appender
            .append(chunk)
            .map_err(|e| Error::io(self.temp.as_deref().unwrap_or(Path::new("?")), e))?;
        self.written += chunk.len() as u64;
        Ok(())
    }

    /// Writes out anything still staged, so the file holds every byte
    /// appended. Blocking.
    pub fn finish(&mut self) -> Result<()> {
        self.appender
            .finish()
            .map_err(|e| Error::io(self.temp.as_deref().unwrap_or(Path::new("?")), e))
    }

    /// Bytes in the file so far: readers following it may read this far.
    pub fn in_file(&self) -> u64 {
        self.appender.flushed()
    }

    /// Checks the content against `expected`. Only verified content can be
    /// committed; a mismatch drops (deletes) the temp file.
    pub fn verify(mut self, expected: &Digest) -> Result<VerifiedBlob> {
        let hasher = std::mem::take(&mut self.hasher);
        self.verify_hashed(hasher, expected)
    }

    /// `verify` for content appended with `append`: `hasher` has seen exactly
    /// the appended bytes, hashed by the caller on another thread so hashing
    /// and disk writes run side by side.
    pub fn verify_hashed(self, hasher: Sha256, expected: &Digest) -> Result<VerifiedBlob> {
        let actual = Digest::from_hasher(hasher);
        if &actual != expected {
            return Err(Error::DigestMismatch {
                expected: expected.clone(),
                actual,
                size: self.written,
            });
        }
        Ok(VerifiedBlob {
            writer: self,
            digest: actual,
        })
    }

    /// Bytes appended so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// A handle readers use (`read_at`) to follow the file while it fills;
    /// it stays valid across the rename.
    pub fn file(&self) -> Arc<File> {
        self.reader.clone()
    }
}

/// A temp file whose content matched its digest, not yet in place.
/// Dropping it deletes the file.
#[derive(Debug)]
pub struct VerifiedBlob {
    writer: BlobWriter,
    digest: Digest,
}

impl VerifiedBlob {
    /// The digest the content matched.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.writer.written
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if let Some(temp) = self.temp.take() {
            let _ = fs::remove_file(temp);
        }
        self.open_temps.fetch_sub(1, Ordering::SeqCst);
    }
}
