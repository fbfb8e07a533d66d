//! One blob download in progress, shared by every client asking for it.
//! The download task appends to a temp file and publishes how far it got;
//! readers follow the file with positioned reads, so the first byte reaches
//! every waiting client while the download runs and no blob is held in
//! memory. The last byte is held back until the digest is verified: a client
//! of a corrupt download gets a cut connection, never a complete bad body.

use std::fs::File;
use std::sync::Arc;

use tokio::sync::watch;

use super::error::{Error, Result};
use crate::reference::Repository;

/// Progress of a fill.
#[derive(Debug, Clone)]
pub enum FillState {
    /// Waiting for upstream's response head.
    Connecting,
    /// Receiving; `written` bytes are in the temp file.
    Streaming { len: Option<u64>, written: u64 },
    /// Verified and committed.
    Complete { len: u64 },
    /// Failed; the temp file is gone.
    Failed(Error),
}

/// A blob download in progress.
pub struct Fill {
    repo: Repository,
    file: Arc<File>,
    state: watch::Sender<FillState>,
}

impl Fill {
    /// A fill for `repo` writing to `file`.
    pub fn new(repo: Repository, file: Arc<File>) -> Fill {
        Fill {
            repo,
            file,
            state: watch::Sender::new(FillState::Connecting),
        }
    }

    /// The repository the download was asked for.
    pub fn repo(&self) -> &Repository {
        &self.repo
    }

    /// The temp file being filled (still valid after it is renamed).
    pub fn file(&self) -> Arc<File> {
        self.file.clone()
    }

    pub(super) fn set(&self, state: FillState) {
        self.state.send_replace(state);
    }

    pub(super) fn advance(&self, written_now: u64) {
        self.state.send_modify(|state| {
            if let FillState::Streaming { written, .. } = state {
                *written = written_now;
            }
        });
    }

    /// Whether the content is complete and verified (only the commit to the
    /// store may still be running).
    pub fn is_complete(&self) -> bool {
        matches!(*self.state.borrow(), FillState::Complete { .. })
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
                FillState::Streaming { written, .. } => {
                    // Hold back the final byte until the digest is verified.
                    let limit = written.saturating_sub(1);
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
