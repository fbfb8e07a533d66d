//! The data directory's owner: one exclusive `flock` on `<data>/lock`, taken
//! before anything in the directory is read or changed, held for as long as
//! the store is open. A second daemon, or `hoard ls`/`verify`/`gc` against a
//! running daemon's store, is refused before it can touch the daemon's temp
//! files (which a start-up removes as leftovers of a crash).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use super::error::{Error, Result};

/// Holds the lock until dropped (closing the file releases it, and so does
/// the process dying: a crash never leaves the store locked).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Locks `root` (created if missing) for this process, or says who has it.
    pub fn acquire(root: &Path) -> Result<DirLock> {
        std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
        let path = root.join("lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        // SAFETY: flock on a descriptor this function owns; no memory is
        // passed to the kernel.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(Error::Locked {
                    path: root.to_owned(),
                    holder: holder(&mut file),
                });
            }
            return Err(Error::io(&path, e));
        }
        // Who holds it, for the message a refused process prints.
        let noted = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()));
        noted.map_err(|e| Error::io(&path, e))?;
        Ok(DirLock { _file: file })
    }
}

/// The holder's pid as it wrote it, if readable.
fn holder(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_told_who_has_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path()).unwrap();
        match DirLock::acquire(dir.path()) {
            Err(Error::Locked { holder, .. }) => assert_eq!(holder, Some(std::process::id())),
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(first);
        DirLock::acquire(dir.path()).expect("free again once dropped");
    }
}
