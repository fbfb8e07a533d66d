//! The temp area, `<data>/tmp/`: new content is written here, hashed as it
//! is written, and leaves only verified (`VerifiedBlob`) for a backend to
//! commit. A writer dropped without a commit deletes its file; a crash
//! leaves files the next start removes (after taking the store's lock).

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use super::direct::Appender;
use super::error::{Error, Result};
use super::reader::BlobReader;
use crate::reference::Digest;

/// Where temp files are made, and how many are open.
#[derive(Debug)]
pub struct TempFiles {
    dir: PathBuf,
    next: AtomicU64,
    /// Temp files not yet committed or deleted.
    open: Arc<AtomicUsize>,
}

impl TempFiles {
    /// Empties (or creates) `dir`: whatever is there was left by a process
    /// that no longer runs, since the caller holds the store's lock.
    pub fn open(dir: PathBuf) -> Result<TempFiles> {
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        Ok(TempFiles {
            dir,
            next: AtomicU64::new(0),
            open: Arc::default(),
        })
    }

    /// Temp files still being written (or waiting for their writer to drop).
    pub fn open_count(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Starts a new temp file. With `direct`, writes bypass the page cache
    /// where the file system allows (large downloads: see `direct`).
    pub fn create(&self, direct: bool) -> Result<BlobWriter> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{}-{n}", std::process::id()));
        let appender = Appender::create(&path, direct).map_err(|e| Error::io(&path, e))?;
        // Readers get their own buffered handle: direct I/O would make their
        // unaligned reads fail.
        let reader = File::open(&path).map_err(|e| Error::io(&path, e))?;
        self.open.fetch_add(1, Ordering::SeqCst);
        Ok(BlobWriter {
            open: self.open.clone(),
            temp: Some(path),
            appender,
            reader: Arc::new(reader),
            hasher: Sha256::new(),
            written: 0,
        })
    }
}

/// A temp file being filled. Dropping it without a commit deletes the file.
#[derive(Debug)]
pub struct BlobWriter {
    open: Arc<AtomicUsize>,
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
            .map_err(|e| Error::io(self.path(), e))?;
        self.written += chunk.len() as u64;
        Ok(())
    }

    /// Writes out anything still staged, so the file holds every byte
    /// appended. Blocking.
    pub fn finish(&mut self) -> Result<()> {
        self.appender
            .finish()
            .map_err(|e| Error::io(self.path(), e))
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

    /// A reader that follows the file while it fills; it stays valid across
    /// the commit's rename.
    pub fn reader(&self) -> BlobReader {
        BlobReader::new(self.reader.clone())
    }

    fn path(&self) -> &Path {
        self.temp.as_deref().unwrap_or(Path::new("?"))
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if let Some(temp) = self.temp.take() {
            let _ = fs::remove_file(temp);
        }
        self.open.fetch_sub(1, Ordering::SeqCst);
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

    /// Makes the content durable and moves it to `dest` (on the same file
    /// system): fsync, rename, fsync the directory. On failure the temp
    /// file is deleted. Blocking.
    pub fn persist(self, dest: &Path) -> Result<u64> {
        let VerifiedBlob { mut writer, .. } = self;
        let temp = writer
            .temp
            .take()
            .expect("temp path present until persisted");
        let result = (|| {
            writer
                .appender
                .finish()
                .and_then(|()| writer.appender.file().sync_all())
                .map_err(|e| Error::io(&temp, e))?;
            let dir = dest.parent().expect("blob path has a parent");
            fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            fs::rename(&temp, dest).map_err(|e| Error::io(dest, e))?;
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
