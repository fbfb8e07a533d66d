//! One blob download in progress, shared by every client asking for it.
//! The download task keeps the most recent network chunks in a small window
//! in memory and appends everything to a temp file: a reader keeping up
//! with the download is handed the very chunks that arrived (no copy, no
//! disk read), and a reader that fell behind the window, or joined late,
//! reads the file with positioned reads. No blob is held whole in memory.
//! The last byte is held back until the digest is verified: a client of a
//! corrupt download gets a cut connection, never a complete bad body.
//!
//! The windows of all downloads share one budget (`WINDOWS_BUDGET`): with
//! many downloads running and their readers behind, each window keeps only
//! what its file does not hold yet, and those readers read the file. Before
//! the budget, 100 distinct cold 16 MiB downloads read slowly peaked at
//! 219 MiB RSS (issue 16).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;

use super::error::{Error, Result};
use crate::reference::Repository;
use crate::store::BlobReader;

/// Bytes of recent chunks kept in memory past what is already on disk.
/// Chunks the writer has not reached yet are always kept (the writer's
/// queue bounds those), so every byte is in the window or in the file.
const WINDOW: usize = 4 << 20;

/// Bytes of chunks already in their files that all downloads together may
/// keep in their windows. Past it a window keeps only the chunks its file
/// does not hold yet (at most the writer's queue), so download memory is
/// bounded by this plus a queue per download, however many run.
pub const WINDOWS_BUDGET: usize = 32 << 20;

/// Window memory shared by all downloads: what they hold, and the most
/// they may hold of chunks already on disk.
pub struct Budget {
    used: AtomicUsize,
    limit: usize,
}

/// The process's budget.
pub static BUDGET: Budget = Budget::new(WINDOWS_BUDGET);

impl Budget {
    /// A budget of `limit` bytes.
    pub const fn new(limit: usize) -> Budget {
        Budget {
            used: AtomicUsize::new(0),
            limit,
        }
    }

    /// Bytes all windows hold now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn over(&self) -> bool {
        self.used() > self.limit
    }

    fn add(&self, n: usize) {
        self.used.fetch_add(n, Ordering::Relaxed);
    }

    fn release(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }
}

/// Progress of a fill.
#[derive(Debug, Clone)]
pub enum FillState {
    /// Waiting for upstream's response head.
    Connecting,
    /// Receiving: `received` bytes arrived (in the window or the file).
    Streaming { len: Option<u64>, received: u64 },
    /// Verified; every byte is in the file (the commit may still be running).
    Complete { len: u64 },
    /// Failed; the temp file is gone or incomplete.
    Failed(Error),
}

/// Where a reader gets the bytes at its position.
pub enum Source {
    /// From memory: a chunk (or its tail) that just arrived.
    Memory(Bytes),
    /// From the file, up to (not including) this offset.
    File(u64),
}

/// The most recent chunks: `chunks` hold `start..end` contiguously, and
/// the file holds `..in_file` (never less than `start`).
#[derive(Default)]
struct Window {
    start: u64,
    end: u64,
    in_file: u64,
    chunks: VecDeque<Bytes>,
}

/// A blob download in progress.
pub struct Fill {
    repo: Repository,
    reader: BlobReader,
    /// When the download started, for its rate.
    created: std::time::Instant,
    state: watch::Sender<FillState>,
    window: Mutex<Window>,
    budget: &'static Budget,
}

impl Fill {
    /// A fill for `repo` whose temp file `reader` reads.
    pub fn new(repo: Repository, reader: BlobReader) -> Fill {
        Fill::with_budget(repo, reader, &BUDGET)
    }

    /// A fill whose window counts against `budget`.
    pub fn with_budget(repo: Repository, reader: BlobReader, budget: &'static Budget) -> Fill {
        Fill {
            repo,
            reader,
            created: std::time::Instant::now(),
            state: watch::Sender::new(FillState::Connecting),
            window: Mutex::default(),
            budget,
        }
    }

    /// The repository the download was asked for.
    pub fn repo(&self) -> &Repository {
        &self.repo
    }

    /// Reads the temp file being filled (still valid after it is renamed).
    pub fn reader(&self) -> BlobReader {
        self.reader.clone()
    }

    pub(super) fn set(&self, state: FillState) {
        // The state first: a reader that sees the window emptied then
        // finds the state that explains it.
        let finished = match &state {
            FillState::Complete { len } => Some(Some(*len)),
            FillState::Failed(_) => Some(None),
            _ => None,
        };
        self.state.send_replace(state);
        if let Some(complete_len) = finished {
            // Complete: all of it is in the file. Failed: nothing more to
            // read (a reader past `in_file` goes back to the state and sees
            // the failure).
            let mut window = self.window.lock();
            window.chunks.clear();
            self.budget.release((window.end - window.start) as usize);
            window.start = window.end;
            if let Some(len) = complete_len {
                window.in_file = len;
            }
        }
    }

    /// Adds a chunk that just arrived to the window, dropping the oldest
    /// chunks the writer already put on disk once the window is full or
    /// all windows together are over their budget.
    pub(super) fn push(&self, chunk: Bytes) {
        let mut window = self.window.lock();
        window.end += chunk.len() as u64;
        self.budget.add(chunk.len());
        window.chunks.push_back(chunk);
        self.trim(&mut window);
    }

    /// Drops the oldest chunks that are on disk while this window is over
    /// `WINDOW` or all windows are over the budget.
    fn trim(&self, window: &mut Window) {
        while let Some(front) = window.chunks.front() {
            let front_end = window.start + front.len() as u64;
            let full = window.end - window.start > WINDOW as u64 || self.budget.over();
            if !full || front_end > window.in_file {
                break;
            }
            self.budget.release(front.len());
            window.start = front_end;
            window.chunks.pop_front();
        }
    }

    /// Tells readers how much arrived.
    pub(super) fn received(&self, now: u64) {
        self.state.send_modify(|state| {
            if let FillState::Streaming { received, .. } = state {
                *received = now;
            }
        });
    }

    /// Records how much is in the file, so the window may drop what is
    /// there (readers need no wake-up for it).
    pub(super) fn on_disk(&self, now: u64) {
        let mut window = self.window.lock();
        window.in_file = window.in_file.max(now);
        // Over the budget, what just reached the disk leaves memory now
        // rather than at the next chunk.
        if self.budget.over() {
            self.trim(&mut window);
        }
    }

    /// Where to read `pos..limit` from: a chunk from the window, or the
    /// file up to where the window starts. `File(until)` with `until <= pos`
    /// means neither has the bytes (the fill just failed): ask the state.
    pub fn source(&self, pos: u64, limit: u64) -> Source {
        let window = self.window.lock();
        if pos < window.start || pos >= window.end {
            return Source::File(limit.min(window.start).min(window.in_file));
        }
        let mut at = window.start;
        for chunk in &window.chunks {
            let chunk_end = at + chunk.len() as u64;
            if pos < chunk_end {
                let from = (pos - at) as usize;
                let to = (limit.min(chunk_end) - at) as usize;
                return Source::Memory(chunk.slice(from..to));
            }
            at = chunk_end;
        }
        // Unreachable while `start..end` covers the chunks exactly; should
        // that ever break, reading the file is still correct.
        Source::File(limit.min(window.start).min(window.in_file))
    }

    /// Bytes of the download already in the temp file.
    pub(super) fn in_file(&self) -> u64 {
        self.window.lock().in_file
    }

    /// Whether the content is complete and verified (only the commit to the
    /// store may still be running).
    pub fn is_complete(&self) -> bool {
        matches!(*self.state.borrow(), FillState::Complete { .. })
    }

    /// The blob's length (when announced) and the bytes received so far,
    /// once upstream answered and until the fill fails.
    pub fn progress(&self) -> Option<(Option<u64>, u64)> {
        match *self.state.borrow() {
            FillState::Streaming { len, received } => Some((len, received)),
            FillState::Complete { len } => Some((Some(len), len)),
            FillState::Connecting | FillState::Failed(_) => None,
        }
    }

    /// Whether the bytes before `end` arrived or, at the rate they have
    /// been arriving since the download started, will within `within`.
    pub fn due_within(&self, end: u64, within: std::time::Duration) -> bool {
        let Some((_, received)) = self.progress() else {
            return false;
        };
        if end <= received {
            return true;
        }
        // Over at least a quarter second: the first chunks arrive in a
        // burst that says nothing of the link's rate.
        let elapsed = self
            .created
            .elapsed()
            .max(std::time::Duration::from_millis(250));
        let rate = received as f64 / elapsed.as_secs_f64();
        rate > 0.0 && (end - received) as f64 / rate <= within.as_secs_f64()
    }

    /// How long ago the download started.
    pub fn age(&self) -> std::time::Duration {
        self.created.elapsed()
    }

    /// Readers following the download now (the clients it serves, and the
    /// bucket's uploader where there is one).
    pub fn readers(&self) -> usize {
        self.state.receiver_count()
    }

    /// Whether the fill reached its end, good or bad.
    pub fn is_finished(&self) -> bool {
        matches!(
            *self.state.borrow(),
            FillState::Complete { .. } | FillState::Failed(_)
        )
    }

    /// A receiver readers pass to `readable`.
    pub fn subscribe(&self) -> watch::Receiver<FillState> {
        self.state.subscribe()
    }

    /// Waits for upstream's answer: the blob length if upstream sent one, or
    /// the error that ended the fill.
    pub async fn started(&self) -> Result<Option<u64>> {
        let mut rx = self.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                FillState::Connecting => {}
                FillState::Streaming { len, .. } => return Ok(*len),
                FillState::Complete { len } => return Ok(Some(*len)),
                FillState::Failed(e) => return Err(e.clone()),
            }
            if rx.changed().await.is_err() {
                return Err(Error::Internal("fill ended without a result".into()));
            }
        }
    }

    /// Waits until bytes past `pos` may be read and returns the end of what
    /// may be read; returns `pos` itself once the verified blob ends there.
    pub async fn readable(rx: &mut watch::Receiver<FillState>, pos: u64) -> Result<u64> {
        loop {
            match &*rx.borrow_and_update() {
                FillState::Connecting => {}
                FillState::Streaming { received, .. } => {
                    // Hold back the final byte until the digest is verified.
                    let limit = received.saturating_sub(1);
                    if limit > pos {
                        return Ok(limit);
                    }
                }
                FillState::Complete { len } => return Ok((*len).max(pos)),
                FillState::Failed(e) => return Err(e.clone()),
            }
            if rx.changed().await.is_err() {
                return Err(Error::Internal("fill ended without a result".into()));
            }
        }
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        let window = self.window.get_mut();
        self.budget.release((window.end - window.start) as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill() -> Fill {
        // Its own budget: tests run in parallel.
        fill_with(Box::leak(Box::new(Budget::new(WINDOWS_BUDGET))))
    }

    fn fill_with(budget: &'static Budget) -> Fill {
        let file = tempfile::tempfile().unwrap();
        let repo = Repository::new("docker.io", "library/x").unwrap();
        let fill = Fill::with_budget(repo, BlobReader::from_file(file), budget);
        fill.set(FillState::Streaming {
            len: None,
            received: 0,
        });
        fill
    }

    #[test]
    fn issue_16_windows_over_the_shared_budget_keep_only_what_is_not_on_disk() {
        let budget: &'static Budget = Box::leak(Box::new(Budget::new(8)));
        let (a, b) = (fill_with(budget), fill_with(budget));
        a.push(Bytes::from_static(b"abcd"));
        a.on_disk(4);
        b.push(Bytes::from_static(b"efgh"));
        // 8 bytes held: within the budget, A's written chunk stays.
        assert_eq!(memory(a.source(0, 4)), "abcd");
        // Over it: B's unwritten chunks stay whatever the budget says...
        b.push(Bytes::from_static(b"ijkl"));
        assert_eq!(memory(b.source(0, 8)), "efgh");
        // ...and what A has on disk leaves memory at its next write.
        a.on_disk(4);
        assert!(matches!(a.source(0, 4), Source::File(4)));
        assert_eq!(budget.used(), 8);
        // Written, B's chunks go too once the windows are over again; the
        // newest, unwritten, stays.
        b.on_disk(8);
        b.push(Bytes::from_static(b"m"));
        assert!(matches!(b.source(0, 4), Source::File(4)));
        assert_eq!(memory(b.source(8, 9)), "m");
        assert_eq!(budget.used(), 5);
        // A fill dropped mid-download gives its window back.
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    fn memory(source: Source) -> Bytes {
        match source {
            Source::Memory(b) => b,
            Source::File(until) => panic!("expected memory, got file until {until}"),
        }
    }

    #[test]
    fn readers_in_the_window_get_the_chunks_themselves() {
        let fill = fill();
        fill.push(Bytes::from_static(b"hello "));
        fill.push(Bytes::from_static(b"world"));
        assert_eq!(memory(fill.source(0, 11)), "hello ");
        assert_eq!(memory(fill.source(3, 11)), "lo ");
        assert_eq!(memory(fill.source(6, 10)), "worl");
        // Past what arrived (and nothing on disk yet): ask the state.
        assert!(matches!(fill.source(11, 11), Source::File(until) if until <= 11));
    }

    #[test]
    fn only_written_chunks_leave_the_window() {
        let fill = fill();
        let chunk = Bytes::from(vec![7u8; WINDOW / 2]);
        for _ in 0..4 {
            fill.push(chunk.clone());
        }
        // Nothing written yet: all four chunks stay.
        assert!(matches!(fill.source(0, 1), Source::Memory(_)));
        fill.on_disk(WINDOW as u64);
        fill.push(chunk.clone());
        // The first two went (written, and over the window); the third stays.
        let half = (WINDOW / 2) as u64;
        assert!(matches!(fill.source(0, 5 * half), Source::File(until) if until == 2 * half));
        assert!(matches!(fill.source(2 * half, 5 * half), Source::Memory(_)));
    }

    #[test]
    fn a_failed_fill_offers_nothing_past_the_file() {
        let fill = fill();
        fill.push(Bytes::from_static(b"abcdef"));
        fill.received(6);
        fill.on_disk(2);
        fill.set(FillState::Failed(Error::Internal("disk full".into())));
        assert!(matches!(fill.source(0, 5), Source::File(2)));
        assert!(matches!(fill.source(4, 5), Source::File(until) if until <= 4));
    }

    #[test]
    fn issue_12_a_panic_under_the_window_lock_poisons_nothing() {
        let fill = std::sync::Arc::new(fill());
        fill.push(Bytes::from_static(b"abc"));
        let holder = fill.clone();
        let panicked = std::thread::spawn(move || {
            let _window = holder.window.lock();
            panic!("a bug while holding the window");
        })
        .join();
        assert!(panicked.is_err());
        assert_eq!(memory(fill.source(0, 3)), "abc");
        fill.push(Bytes::from_static(b"def"));
        fill.set(FillState::Complete { len: 6 });
        assert!(matches!(fill.source(0, 6), Source::File(6)));
    }

    #[test]
    fn bytes_are_due_when_arrived_or_close_at_the_observed_rate() {
        use std::time::Duration;
        let fill = fill();
        assert!(!fill.due_within(1, Duration::from_secs(1)));
        fill.received(1000);
        assert!(fill.due_within(1000, Duration::ZERO));
        // 1000 bytes in a quarter second (or more): a few more are due
        // within a second, a terabyte is not.
        assert!(fill.due_within(1001, Duration::from_secs(1)));
        assert!(!fill.due_within(1 << 40, Duration::from_secs(1)));
        fill.set(FillState::Failed(Error::Internal("x".into())));
        assert!(!fill.due_within(10, Duration::from_secs(1)));
    }

    #[test]
    fn a_finished_fill_reads_from_the_file() {
        let fill = fill();
        fill.push(Bytes::from_static(b"abc"));
        fill.set(FillState::Complete { len: 3 });
        assert!(matches!(fill.source(0, 3), Source::File(3)));
    }
}
