//! Reused read buffers for the chunks a transfer reads from a file.
//!
//! Why: a chunk is 256 KiB, above glibc malloc's mmap threshold at first
//! and later served from the top of a heap that malloc trims back as soon
//! as the chunk is freed. Profiling 256 clients on a cached 1 MiB blob
//! showed ~15 page faults per request (119k in 4 s, each a freshly zeroed
//! page) and a stream of `brk`/`mprotect` calls: the kernel was handing
//! hoard new pages for every chunk. A buffer handed back here keeps its
//! pages, so a busy server reads into memory that is already mapped.
//!
//! This module only recycles memory: it never decides what is read. The
//! free list is bounded (`MAX_FREE`), so idle memory held here is at most
//! `MAX_FREE * SIZE`; buffers beyond that go back to the allocator.

use std::sync::LazyLock;

use bytes::Bytes;
use parking_lot::Mutex;

/// Capacity of a pooled buffer: one chunk of a transfer.
pub const SIZE: usize = 256 * 1024;
/// Reads smaller than this use a plain allocation: malloc serves them
/// from its bins without new pages (a 64 KiB blob caused ~20 faults in
/// 4 s of 256 clients, against 119k for 256 KiB chunks).
pub const MIN: usize = 128 * 1024;
/// Free buffers kept for reuse (16 MiB).
const MAX_FREE: usize = 64;

/// A free list of buffers of capacity `SIZE`.
pub struct Pool {
    free: Mutex<Vec<Vec<u8>>>,
}

/// The process's pool.
pub static POOL: LazyLock<Pool> = LazyLock::new(Pool::new);

impl Pool {
    fn new() -> Pool {
        Pool {
            free: Mutex::new(Vec::new()),
        }
    }

    /// An empty buffer of capacity `SIZE`, from the free list when one is
    /// there.
    pub fn take(&'static self) -> Vec<u8> {
        self.free
            .lock()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(SIZE))
    }

    /// Bytes over a filled buffer from `take`; the buffer returns to the
    /// pool when the last handle to them drops (after hyper wrote them).
    pub fn freeze(&'static self, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled { buf, pool: self })
    }
}

/// A buffer that goes back to its pool when dropped.
struct Pooled {
    buf: Vec<u8>,
    pool: &'static Pool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let mut buf = std::mem::take(&mut self.buf);
        if buf.capacity() != SIZE {
            return;
        }
        buf.clear();
        let mut free = self.pool.free.lock();
        if free.len() < MAX_FREE {
            free.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> &'static Pool {
        Box::leak(Box::new(Pool::new()))
    }

    #[test]
    fn a_buffer_comes_back_when_its_last_bytes_drop_and_keeps_its_memory() {
        let pool = pool();
        let mut buf = pool.take();
        let ptr = buf.as_ptr();
        buf.extend_from_slice(&[7u8; 1000]);
        let bytes = pool.freeze(buf);
        let slice = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(&slice[..], &[7u8; 10]);
        assert!(pool.free.lock().is_empty(), "still referenced");
        drop(slice);
        let again = pool.take();
        assert_eq!(again.as_ptr(), ptr);
        assert!(again.is_empty());
        assert_eq!(again.capacity(), SIZE);
    }

    #[test]
    fn the_free_list_is_bounded() {
        let pool = pool();
        let bufs: Vec<Bytes> = (0..MAX_FREE + 10)
            .map(|_| {
                let mut b = pool.take();
                b.push(1);
                pool.freeze(b)
            })
            .collect();
        drop(bufs);
        assert_eq!(pool.free.lock().len(), MAX_FREE);
    }
}
