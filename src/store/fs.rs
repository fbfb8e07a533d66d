//! The filesystem backend: verified content in
//! `<data>/blobs/sha256/<2 hex>/<64 hex>`, moved there from the temp area
//! by an atomic rename only once its digest matched and it was fsynced, so a
//! partial or corrupt download is never visible under its digest. Content
//! that fails a later check goes to `<data>/quarantine/`.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest as _, Sha256};

use super::backend::{Backend, Listed};
use super::error::{Error, Result};
use super::reader::BlobReader;
use super::temp::VerifiedBlob;
use crate::reference::Digest;

/// Blob files under one data directory.
#[derive(Debug)]
pub struct FsBackend {
    blobs: PathBuf,
    quarantine: PathBuf,
}

impl FsBackend {
    /// The blob tree under `root` (created if missing).
    pub fn open(root: &Path) -> Result<FsBackend> {
        let blobs = root.join("blobs").join("sha256");
        fs::create_dir_all(&blobs).map_err(|e| Error::io(&blobs, e))?;
        Ok(FsBackend {
            blobs,
            quarantine: root.join("quarantine"),
        })
    }

    /// Where the verified blob with this digest lives.
    pub fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.blobs.join(&hex[..2]).join(hex)
    }
}

impl Backend for FsBackend {
    fn open(&self, digest: &Digest) -> Result<Option<BlobReader>> {
        let path = self.path(digest);
        match File::open(&path) {
            Ok(file) => Ok(Some(BlobReader::new(Arc::new(file)))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    fn commit(&self, verified: VerifiedBlob) -> Result<u64> {
        let dest = self.path(verified.digest());
        verified.persist(&dest)
    }

    fn remove(&self, digest: &Digest) -> Result<()> {
        let path = self.path(digest);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    fn quarantine(&self, digest: &Digest) -> Result<PathBuf> {
        fs::create_dir_all(&self.quarantine).map_err(|e| Error::io(&self.quarantine, e))?;
        let dest = self.quarantine.join(digest.hex());
        fs::rename(self.path(digest), &dest).map_err(|e| Error::io(&dest, e))?;
        Ok(dest)
    }

    fn list(&self) -> Result<Vec<Listed>> {
        let mut out = Vec::new();
        let prefixes = fs::read_dir(&self.blobs).map_err(|e| Error::io(&self.blobs, e))?;
        for prefix in prefixes {
            let prefix = prefix.map_err(|e| Error::io(&self.blobs, e))?;
            let dir = prefix.path();
            if !dir.is_dir() {
                out.push(Listed::Stray(dir));
                continue;
            }
            for file in fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
                let file = file.map_err(|e| Error::io(&dir, e))?;
                let name = file.file_name();
                let digest = Digest::parse(&format!("sha256:{}", name.to_string_lossy())).ok();
                let size = file.metadata().map(|m| m.len()).unwrap_or(0);
                match digest {
                    Some(d) if file.path() == self.path(&d) => out.push(Listed::Blob(d, size)),
                    _ => out.push(Listed::Stray(file.path())),
                }
            }
        }
        Ok(out)
    }

    fn remove_stray(&self, stray: &Path) -> Result<()> {
        // Only ever inside the blob tree.
        if !stray.starts_with(&self.blobs) {
            return Ok(());
        }
        match fs::remove_file(stray) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(stray, e)),
        }
    }

    fn rehash(&self, digest: &Digest) -> Result<(Digest, u64)> {
        let path = self.path(digest);
        let mut file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let mut hasher = Sha256::new();
        let size = std::io::copy(&mut file, &mut hasher).map_err(|e| Error::io(&path, e))?;
        Ok((Digest::from_hasher(hasher), size))
    }

    fn available_space(&self) -> Result<u64> {
        available_space(&self.blobs).map_err(|e| Error::io(&self.blobs, e))
    }
}

/// Bytes available to unprivileged users on the file system holding `path`.
pub fn available_space(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is a valid NUL-terminated string and `stat` points to
    // writable memory of the right type for the duration of the call.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled in the whole struct.
    let stat = unsafe { stat.assume_init() };
    // The field types differ between platforms (u32 on some).
    #[allow(clippy::unnecessary_cast)]
    Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
}
