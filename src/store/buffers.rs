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
//! The pool is also the budget for read buffers in flight: at most
//! `MAX_OUT` pooled buffers exist at once (32 MiB). Past that, `take`
//! says no and readers use `SHORT` plain buffers, so a thousand clients,
//! or a hundred slow ones, cost a thousand small chunks rather than a
//! thousand large ones, and nobody waits for a buffer (a slow client
//! holding buffers must not stall the others).
//!
//! This module only recycles memory: it never decides what is read. The
//! free list is bounded (`MAX_FREE`), so idle memory held here is at most
//! `MAX_FREE * SIZE`; buffers beyond that go back to the allocator.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::LazyLock;

use bytes::Bytes;
use parking_lot::Mutex;

/// Capacity of a pooled buffer: one chunk of a transfer.
pub const SIZE: usize = 256 * 1024;
/// Reads smaller than this use a plain allocation: malloc serves them
/// from its bins without new pages (a 64 KiB blob caused ~20 faults in
/// 4 s of 256 clients, against 119k for 256 KiB chunks).
pub const MIN: usize = 128 * 1024;
/// The read size once `MAX_OUT` buffers are in flight.
pub const SHORT: usize = 64 * 1024;
/// Free buffers kept for reuse (16 MiB).
const MAX_FREE: usize = 64;
/// Pooled buffers in flight or free at most (32 MiB).
const MAX_OUT: usize = 128;

/// A free list of buffers of capacity `SIZE`.
pub struct Pool {
    free: Mutex<Vec<Vec<u8>>>,
    /// Buffers that exist now (in flight or free).
    out: AtomicUsize,
}

/// The process's pool.
pub static POOL: LazyLock<Pool> = LazyLock::new(Pool::new);

impl Pool {
    fn new() -> Pool {
        Pool {
            free: Mutex::new(Vec::new()),
            out: AtomicUsize::new(0),
        }
    }

    /// An empty buffer of capacity `SIZE`, from the free list when one is
    /// there; `None` when `MAX_OUT` buffers are in flight.
    pub fn take(&'static self) -> Option<Vec<u8>> {
        if let Some(buf) = self.free.lock().pop() {
            return Some(buf);
        }
        let claimed = self
            .out
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |out| {
                (out < MAX_OUT).then_some(out + 1)
            });
        claimed.ok().map(|_| Vec::with_capacity(SIZE))
    }

    /// Gives back a buffer from `take` that was not frozen (a read that
    /// failed or found nothing).
    pub fn put(&'static self, mut buf: Vec<u8>) {
        if buf.capacity() != SIZE {
            return;
        }
        buf.clear();
        let mut free = self.free.lock();
        if free.len() < MAX_FREE {
            free.push(buf);
        } else {
            drop(free);
            self.out.fetch_sub(1, Ordering::AcqRel);
        }
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
        self.pool.put(std::mem::take(&mut self.buf));
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
        let mut buf = pool.take().unwrap();
        let ptr = buf.as_ptr();
        buf.extend_from_slice(&[7u8; 1000]);
        let bytes = pool.freeze(buf);
        let slice = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(&slice[..], &[7u8; 10]);
        assert!(pool.free.lock().is_empty(), "still referenced");
        drop(slice);
        let again = pool.take().unwrap();
        assert_eq!(again.as_ptr(), ptr);
        assert!(again.is_empty());
        assert_eq!(again.capacity(), SIZE);
    }

    #[test]
    fn buffers_in_flight_and_free_are_bounded() {
        let pool = pool();
        let bufs: Vec<Bytes> = (0..MAX_OUT)
            .map(|_| {
                let mut b = pool.take().expect("within the budget");
                b.push(1);
                pool.freeze(b)
            })
            .collect();
        assert!(pool.take().is_none(), "over the budget");
        drop(bufs);
        assert_eq!(pool.free.lock().len(), MAX_FREE);
        assert_eq!(pool.out.load(Ordering::Relaxed), MAX_FREE);
        // Free ones are handed out again, then new ones up to the budget.
        let again: Vec<Vec<u8>> = (0..MAX_OUT).map(|_| pool.take().unwrap()).collect();
        assert!(pool.take().is_none());
        // Given back unused (a read that found nothing): counted back.
        for buf in again {
            pool.put(buf);
        }
        assert_eq!(pool.out.load(Ordering::Relaxed), MAX_FREE);
    }
}
