//! Appending to a file around the page cache (`O_DIRECT`), for blob
//! downloads. Streaming a large blob through the page cache makes the kernel
//! find (and, in a VM, often fault in) a fresh page for every 4 KiB written;
//! measured here that cost ~0.6 s of CPU per 256 MiB, more than the whole
//! transfer. Direct writes go from one reused, aligned buffer to the device.
//! Where the file system refuses direct I/O the writer falls back to normal
//! writes, so this is only ever a speed-up.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Alignment of buffer address, length and file offset that `O_DIRECT`
/// needs: the largest logical block size in common use.
const ALIGN: usize = 4096;
/// Staged bytes per direct write. Each download holds its stage for its
/// whole run, so this is per-download memory: 1 MiB stages made 100
/// concurrent downloads hold 100 MiB of them (issue 16). Smaller direct
/// writes cost CPU, though: 256 KiB stages took ~8% more of hoard's CPU on
/// a cold pull than 1 MiB (perf/ticks, same sitting). So the first
/// `LARGE_STAGES` downloads at a time get `STAGE`, later ones `SMALL_STAGE`.
const STAGE: usize = 1 << 20;
/// The stage of a download that starts while `LARGE_STAGES` others hold
/// full-size ones.
const SMALL_STAGE: usize = 256 << 10;
/// Downloads at a time with a full-size stage (16 MiB at most).
const LARGE_STAGES: usize = 16;
/// Full-size stages held now.
static LARGE_HELD: AtomicUsize = AtomicUsize::new(0);

/// An append-only file, written directly when the file system allows.
#[derive(Debug)]
pub struct Appender {
    file: File,
    /// `stage + ALIGN` bytes; the staging area is the aligned `stage` inside.
    buf: Vec<u8>,
    offset: usize,
    /// `STAGE` or `SMALL_STAGE` (0 when not direct).
    stage: usize,
    staged: usize,
    direct: bool,
    /// Bytes in the file (excludes what is staged).
    flushed: u64,
}

impl Appender {
    /// Creates `path` (it must not exist) for appending; with `direct`,
    /// around the page cache if the file system supports it.
    pub fn create(path: &Path, direct: bool) -> io::Result<Appender> {
        let options = |direct: bool| {
            let mut options = OpenOptions::new();
            options.write(true).create_new(true);
            if direct {
                use std::os::unix::fs::OpenOptionsExt;
                options.custom_flags(libc::O_DIRECT);
            }
            options
        };
        let (file, direct) = match options(direct).open(path) {
            Ok(file) => (file, direct),
            // EINVAL: no direct I/O here (older tmpfs, some FUSE).
            Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                (options(false).open(path)?, false)
            }
            Err(e) => return Err(e),
        };
        let (buf, offset, stage) = if direct {
            let large = LARGE_HELD
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                    (held < LARGE_STAGES).then_some(held + 1)
                })
                .is_ok();
            let stage = if large { STAGE } else { SMALL_STAGE };
            let buf = vec![0u8; stage + ALIGN];
            let offset = buf.as_ptr().align_offset(ALIGN);
            (buf, offset, stage)
        } else {
            (Vec::new(), 0, 0)
        };
        Ok(Appender {
            file,
            buf,
            offset,
            stage,
            staged: 0,
            direct,
            flushed: 0,
        })
    }

    /// Bytes in the file so far (readers may read this far).
    pub fn flushed(&self) -> u64 {
        self.flushed
    }

    /// Appends `data`; it may stay staged until the buffer fills or `finish`.
    pub fn append(&mut self, mut data: &[u8]) -> io::Result<()> {
        if !self.direct {
            (&self.file).write_all(data)?;
            self.flushed += data.len() as u64;
            return Ok(());
        }
        while !data.is_empty() {
            let n = data.len().min(self.stage - self.staged);
            let at = self.offset + self.staged;
            self.buf[at..at + n].copy_from_slice(&data[..n]);
            self.staged += n;
            data = &data[n..];
            if self.staged == self.stage {
                self.write_staged()?;
            }
        }
        Ok(())
    }

    /// Writes out whatever is staged (the tail need not be aligned).
    pub fn finish(&mut self) -> io::Result<()> {
        if self.staged == 0 {
            return Ok(());
        }
        if !self.staged.is_multiple_of(ALIGN) {
            self.stop_direct()?;
        }
        self.write_staged()
    }

    /// The file, for `sync_all`.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn write_staged(&mut self) -> io::Result<()> {
        let staged = &self.buf[self.offset..self.offset + self.staged];
        match (&self.file).write_all(staged) {
            Ok(()) => {}
            // Refused at write time (a file system that accepts the flag
            // but not the I/O): go on buffered, nothing was written.
            Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                self.stop_direct()?;
                (&self.file).write_all(&self.buf[self.offset..self.offset + self.staged])?;
            }
            Err(e) => return Err(e),
        }
        self.flushed += self.staged as u64;
        self.staged = 0;
        Ok(())
    }

    /// Turns `O_DIRECT` off for the rest of the file.
    fn stop_direct(&mut self) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        // SAFETY: fcntl on a descriptor this struct owns, reading only its
        // status flags.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above, changing only the status flags read just now.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) } < 0 {
            return Err(io::Error::last_os_error());
        }
        self.direct = false;
        Ok(())
    }
}

impl Drop for Appender {
    fn drop(&mut self) {
        if self.stage == STAGE {
            LARGE_HELD.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_read_back_whatever_the_chunking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut appender = Appender::create(&path, true).unwrap();
        let data: Vec<u8> = (0..(3 * STAGE + 12345)).map(|i| (i % 251) as u8).collect();
        for chunk in data.chunks(7777) {
            appender.append(chunk).unwrap();
            assert!(appender.flushed() <= data.len() as u64);
        }
        appender.finish().unwrap();
        assert_eq!(appender.flushed(), data.len() as u64);
        assert_eq!(std::fs::read(&path).unwrap(), data);
    }

    #[test]
    fn issue_16_downloads_past_the_first_few_get_small_stages() {
        let dir = tempfile::tempdir().unwrap();
        let mut appenders: Vec<Appender> = (0..LARGE_STAGES + 2)
            .map(|i| Appender::create(&dir.path().join(i.to_string()), true).unwrap())
            .collect();
        if !appenders[0].direct {
            return; // no direct I/O on this file system: no stages at all
        }
        // Other tests may hold large stages too: at least two are small.
        let small = appenders.iter().filter(|a| a.stage == SMALL_STAGE).count();
        assert!(small >= 2, "{small} small stages");
        let data: Vec<u8> = (0..(2 * STAGE + 777)).map(|i| (i % 249) as u8).collect();
        let a = appenders
            .iter_mut()
            .rev()
            .find(|a| a.stage == SMALL_STAGE)
            .unwrap();
        a.append(&data).unwrap();
        a.finish().unwrap();
        assert_eq!(a.flushed(), data.len() as u64);
    }

    #[test]
    fn buffered_appends_are_visible_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut appender = Appender::create(&path, false).unwrap();
        appender.append(b"abc").unwrap();
        assert_eq!(appender.flushed(), 3);
        assert_eq!(std::fs::read(&path).unwrap(), b"abc");
    }

    #[test]
    fn an_aligned_tail_stays_direct() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut appender = Appender::create(&path, true).unwrap();
        appender.append(&vec![1u8; ALIGN * 3]).unwrap();
        appender.finish().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), vec![1u8; ALIGN * 3]);
    }
}
