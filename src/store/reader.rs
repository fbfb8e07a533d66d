//! Reading stored content and downloads in progress, chunk by chunk, without
//! blocking the runtime on the disk and without mapping files.
//!
//! Files are read, never `mmap`ed: a mapped blob that something outside
//! hoard truncates (an operator, a disk repair) raises SIGBUS in the whole
//! daemon on the next touch of a vanished page; a read of the same file
//! only comes back short, which costs that one request. Reads go first to
//! the page cache with `preadv2(RWF_NOWAIT)`, which copies what is cached
//! and refuses (EAGAIN) rather than wait for the disk; only then does the
//! read move to the blocking pool.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use bytes::Bytes;

use super::buffers::{self, POOL};

/// A readable blob: a committed file, or the temp file of a download (the
/// handle stays valid across the commit's rename and an eviction's unlink).
#[derive(Debug, Clone)]
pub struct BlobReader {
    file: Arc<File>,
}

impl BlobReader {
    pub(super) fn new(file: Arc<File>) -> BlobReader {
        BlobReader { file }
    }

    /// A reader of any open file (the mirror's tests).
    #[cfg(test)]
    pub(crate) fn from_file(file: File) -> BlobReader {
        BlobReader::new(Arc::new(file))
    }

    /// A reader of a temp file holding `data`, and the file (tests).
    #[cfg(test)]
    pub(crate) fn temp(data: &[u8]) -> (BlobReader, File) {
        let mut file = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut file, data).unwrap();
        let other = file.try_clone().unwrap();
        (BlobReader::new(Arc::new(file)), other)
    }

    /// Drops the file's pages from the page cache (tests); false where
    /// that cannot be done: on tmpfs the page cache is the file.
    #[cfg(test)]
    pub(crate) fn evict(&self) -> bool {
        // fdatasync first: DONTNEED keeps dirty pages.
        self.file.sync_data().unwrap();
        // SAFETY: plain advice on a file descriptor this reader holds.
        let r =
            unsafe { libc::posix_fadvise(self.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(r, 0);
        // SAFETY: an all-zero statfs is a valid value to overwrite.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: fstatfs writes one struct this frame owns.
        assert_eq!(unsafe { libc::fstatfs(self.file.as_raw_fd(), &mut fs) }, 0);
        fs.f_type != libc::TMPFS_MAGIC
    }

    /// Up to `n` bytes at `pos` (fewer when only part of them is cached, or
    /// when the read buffers are at their budget: see `buffers`).
    /// Reading at or past the end of the file is an `UnexpectedEof` error:
    /// callers only ask for bytes the index or the download says exist, so
    /// a short file means it was changed behind hoard's back.
    pub async fn read(&self, pos: u64, n: usize) -> io::Result<Bytes> {
        if n == 0 {
            return Ok(Bytes::new());
        }
        match read_cached(&self.file, pos, n) {
            Ok(Some(chunk)) => return Ok(chunk),
            Ok(None) => {}
            Err(e) => return Err(e),
        }
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || read_at(&file, pos, n, false))
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)))
    }

    /// Up to `n` bytes at `pos` if the page cache holds the first of them,
    /// without waiting for the disk (so callable on the runtime's threads);
    /// `None` when nothing is cached.
    pub fn read_cached(&self, pos: u64, n: usize) -> io::Result<Option<Bytes>> {
        if n == 0 {
            return Ok(Some(Bytes::new()));
        }
        read_cached(&self.file, pos, n)
    }

    /// The whole content (small objects: manifests). Blocking.
    pub fn read_all(&self, len: u64) -> io::Result<Bytes> {
        let n = usize::try_from(len).map_err(|_| io::Error::other("object too large"))?;
        read_at(&self.file, 0, n, true)
    }

    /// The file's length now.
    pub fn file_len(&self) -> io::Result<u64> {
        self.file.metadata().map(|m| m.len())
    }

    /// Whether every page of `pos..pos + n` is in the page cache now, so
    /// that `sendfile` of that range copies from memory instead of waiting
    /// for the disk on the runtime's thread. Asked with `cachestat(2)`
    /// (Linux 6.5) and, since that counts pages still being read in (say,
    /// by another reader's readahead), a one-byte `RWF_NOWAIT` read of the
    /// last page, which readahead fills last. Where the kernel has no
    /// `cachestat` (Linux 6.1 of Debian 12, say), the first and the last
    /// page only: a page evicted from between them makes that `sendfile`
    /// wait for the disk, as nginx's does unless it is given a thread pool.
    /// Never true past the end of the file: pages that do not exist are
    /// not cached.
    pub fn is_cached(&self, pos: u64, n: usize) -> bool {
        n > 0
            && page_cached(&self.file, pos, n as u64)
            && probe_cached(&self.file, pos + n as u64 - 1, 1)
    }

    /// Reads `pos..pos + n` into the page cache without copying it
    /// anywhere, for a caller that then sends it with `sendfile`: the
    /// first hit of a blob after its download, which was written around
    /// the page cache. A `sendfile` to `/dev/null` does it: the kernel
    /// reads the pages (with readahead, waiting until they are read) and
    /// drops its references at once. A first hit read with `pread` and
    /// written to the socket copied every byte twice through hoard; in A/B
    /// runs of a 256 MiB blob its CPU fell from ~2.0 to ~0.2 CPU-s/GiB
    /// (issue 16). Blocking. A file that ends first is an `UnexpectedEof`
    /// error; where this cannot work (no `/dev/null`, a file system that
    /// cannot splice), `can_load` turns false for the process.
    pub fn load(&self, pos: u64, n: u64) -> io::Result<()> {
        static NULL: std::sync::LazyLock<io::Result<File>> =
            std::sync::LazyLock::new(|| std::fs::OpenOptions::new().write(true).open("/dev/null"));
        let unable = |e: io::Error| {
            NO_LOAD.store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(error = %e, "loading blobs into the page cache is off");
            e
        };
        let null = NULL
            .as_ref()
            .map_err(|e| unable(io::Error::new(e.kind(), e.to_string())))?;
        let mut offset =
            libc::off_t::try_from(pos).map_err(|_| io::Error::other("offset out of range"))?;
        let end = offset
            .checked_add(libc::off_t::try_from(n).map_err(|_| io::Error::other("range too long"))?)
            .ok_or_else(|| io::Error::other("range too long"))?;
        while offset < end {
            let left = (end - offset) as usize;
            // SAFETY: both descriptors are open for the call; the kernel
            // advances `offset`, which this frame owns.
            let r = unsafe {
                libc::sendfile(null.as_raw_fd(), self.file.as_raw_fd(), &mut offset, left)
            };
            match r {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                r if r < 0 => {
                    let e = io::Error::last_os_error();
                    match e.raw_os_error() {
                        Some(libc::EINTR) => {}
                        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => {
                            return Err(unable(e))
                        }
                        _ => return Err(e),
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether `load` can work here (it has not said otherwise).
    pub fn can_load() -> bool {
        !NO_LOAD.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The open file, for sending it without reading it (`sendfile`).
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// `cachestat(2)`'s number in the unified syscall table (x86_64, aarch64,
/// riscv and most others), not yet in the `libc` crate for x86_64. Where it
/// is another call's number (MIPS numbers it apart) the kernel answers
/// ENOSYS or EINVAL, and `is_cached` falls back to the probe or says no.
const SYS_CACHESTAT: libc::c_long = 451;

/// Set once `load` found it cannot work on this system.
static NO_LOAD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Set once the kernel said it has no `cachestat`.
static NO_CACHESTAT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The kernel's page size.
static PAGE: std::sync::LazyLock<u64> = std::sync::LazyLock::new(|| {
    // SAFETY: sysconf only reads the system's configuration.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
});

/// See `BlobReader::is_cached`.
fn page_cached(file: &File, pos: u64, n: u64) -> bool {
    use std::sync::atomic::Ordering;
    if NO_CACHESTAT.load(Ordering::Relaxed) {
        return probe_cached(file, pos, n);
    }
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    let range = Range { off: pos, len: n };
    let mut stat = Stat::default();
    // SAFETY: cachestat reads `range` and writes one `Stat`, both live and
    // laid out as the kernel's `cachestat_range` (two u64s) and `cachestat`
    // (five u64s), repr(C); flags must be 0.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0,
        )
    };
    if r == 0 {
        let page = *PAGE;
        let pages = (pos + n - 1) / page - pos / page + 1;
        return stat.nr_cache >= pages;
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::ENOSYS) => {
            NO_CACHESTAT.store(true, Ordering::Relaxed);
            probe_cached(file, pos, n)
        }
        // Newer kernels refuse cachestat on a file the caller may not
        // write and does not own (hoard's own blobs are both).
        Some(libc::EPERM) => probe_cached(file, pos, n),
        _ => false,
    }
}

/// Whether the first and the last page of `pos..pos + n` are cached and
/// read in: one-byte `RWF_NOWAIT` reads, which refuse rather than wait.
/// Pages between them are not asked about.
fn probe_cached(file: &File, pos: u64, n: u64) -> bool {
    let mut byte = 0u8;
    [pos, pos + n - 1].iter().all(|&at| {
        let Ok(offset) = libc::off_t::try_from(at) else {
            return false;
        };
        let iov = libc::iovec {
            iov_base: (&mut byte as *mut u8).cast(),
            iov_len: 1,
        };
        // SAFETY: one iovec over one byte this frame owns.
        unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset, libc::RWF_NOWAIT) == 1 }
    })
}

/// What the page cache holds of `pos..pos + n`, from its start; `None` if
/// the first page is not cached (or the kernel cannot tell without waiting).
fn read_cached(file: &File, pos: u64, n: usize) -> io::Result<Option<Bytes>> {
    let (mut buf, n) = Buffer::new(n, false);
    let offset = libc::off_t::try_from(pos).map_err(|_| io::Error::other("offset out of range"))?;
    let spare = buf.0.spare_capacity_mut();
    let iov = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: n,
    };
    // SAFETY: one iovec over `n` bytes of spare capacity this buffer owns
    // (`Buffer::new` reserves at least `n`); the kernel writes at most `n`
    // bytes there, and `set_len` below covers only what it reports written.
    let read = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset, libc::RWF_NOWAIT) };
    match read {
        0 => Err(io::ErrorKind::UnexpectedEof.into()),
        r if r < 0 => {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // Not cached; or no RWF_NOWAIT on this kernel or file system.
                Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS) => Ok(None),
                Some(libc::EINTR) => Ok(None),
                _ => Err(e),
            }
        }
        r => {
            // SAFETY: the kernel initialized the first `r` (<= n) bytes.
            unsafe { buf.0.set_len(r as usize) };
            Ok(Some(buf.freeze()))
        }
    }
}

/// A buffer for one read: from the pool for chunk-sized reads (the flag),
/// else a plain allocation.
struct Buffer(Vec<u8>, bool);

impl Buffer {
    /// An empty buffer and how much to read into it: `n`, or `SHORT` when
    /// the pool is at its budget and `exact` is not asked (a stream takes
    /// what comes; a whole manifest does not).
    fn new(n: usize, exact: bool) -> (Buffer, usize) {
        if n <= buffers::MIN || n > buffers::SIZE {
            return (Buffer(Vec::with_capacity(n), false), n);
        }
        match POOL.take() {
            Some(buf) => (Buffer(buf, true), n),
            None if exact => (Buffer(Vec::with_capacity(n), false), n),
            None => {
                let n = n.min(buffers::SHORT);
                (Buffer(Vec::with_capacity(n), false), n)
            }
        }
    }

    fn freeze(mut self) -> Bytes {
        let buf = std::mem::take(&mut self.0);
        if std::mem::take(&mut self.1) {
            POOL.freeze(buf)
        } else {
            Bytes::from(buf)
        }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // Not frozen (nothing read, or an error): back to the pool.
        if self.1 {
            POOL.put(std::mem::take(&mut self.0));
        }
    }
}

/// Reads `n` bytes at `pos` (fewer only when not `exact` and the read
/// buffers are at their budget: see `Buffer::new`) without zeroing them
/// first: profiling 32 clients on a cached blob showed zeroing each chunk
/// (`BytesMut::zeroed`) cost more CPU than the read itself. Blocking.
fn read_at(file: &File, pos: u64, n: usize, exact: bool) -> io::Result<Bytes> {
    let (mut buf, n) = Buffer::new(n, exact);
    while buf.0.len() < n {
        let filled = buf.0.len();
        let spare = &mut buf.0.spare_capacity_mut()[..n - filled];
        let offset = libc::off_t::try_from(pos + filled as u64)
            .map_err(|_| io::Error::other("offset out of range"))?;
        // SAFETY: pread writes at most `spare.len()` bytes into memory this
        // buffer owns; `set_len` below covers only what it wrote.
        let read = unsafe {
            libc::pread(
                file.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                spare.len(),
                offset,
            )
        };
        match read {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            r if r < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            // SAFETY: the first `r` spare bytes were just initialized.
            r => unsafe { buf.0.set_len(filled + r as usize) },
        }
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn chunks_match_the_file_at_any_offset() {
        let data: Vec<u8> = (0..3 * 4096 + 100).map(|i| (i % 253) as u8).collect();
        let (reader, _) = BlobReader::temp(&data);
        for (pos, n) in [(0, data.len()), (1, 10), (4095, 4098), (3 * 4096, 100)] {
            let mut got = Vec::new();
            while got.len() < n {
                let chunk = reader
                    .read((pos + got.len()) as u64, n - got.len())
                    .await
                    .unwrap();
                assert!(!chunk.is_empty());
                got.extend_from_slice(&chunk);
            }
            assert_eq!(got, &data[pos..pos + n]);
        }
        assert_eq!(reader.read_all(data.len() as u64).unwrap(), data);
    }

    #[test]
    fn a_range_is_cached_only_when_the_page_cache_holds_all_of_it() {
        let data = vec![3u8; 8 * 4096];
        let (reader, _) = BlobReader::temp(&data);
        // Written through the page cache: all of it is there.
        assert!(reader.is_cached(0, data.len()));
        assert!(reader.is_cached(4095, 2));
        assert!(!reader.is_cached(0, 0));
        // Past the end nothing is cached.
        assert!(!reader.is_cached(data.len() as u64 - 1, 4097));
        assert!(!reader.is_cached(data.len() as u64, 1));
        // Dropped from the page cache: no longer (on tmpfs, where it
        // cannot be dropped, still).
        let evicted = reader.evict();
        assert_eq!(reader.is_cached(0, data.len()), !evicted);
    }

    #[test]
    fn load_puts_a_range_in_the_page_cache() {
        let data = vec![9u8; 64 * 4096];
        let (reader, _) = BlobReader::temp(&data);
        if reader.evict() {
            assert!(
                !reader.is_cached(4096, 16 * 4096),
                "dropped before the load"
            );
        }
        reader.load(4096, 16 * 4096).unwrap();
        assert!(reader.is_cached(4096, 16 * 4096));
        // Past the end: the file is shorter than asked.
        let e = reader.load(60 * 4096, 8 * 4096).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn the_probe_asks_the_first_and_the_last_page() {
        let data = vec![5u8; 4 * 4096];
        let (_reader, file) = BlobReader::temp(&data);
        assert!(probe_cached(&file, 0, data.len() as u64));
        assert!(probe_cached(&file, 4095, 2));
        // Past the end: nothing to read, so not cached.
        assert!(!probe_cached(&file, 0, data.len() as u64 + 1));
    }

    #[tokio::test]
    async fn a_file_cut_short_behind_our_back_is_an_error_not_a_crash() {
        let (reader, file) = BlobReader::temp(&vec![7u8; 1 << 20]);
        assert_eq!(reader.read(0, 10).await.unwrap().len(), 10);
        file.set_len(100).unwrap();
        let e = reader.read(4096, 4096).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let e = reader.read_all(1 << 20).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
