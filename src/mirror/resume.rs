//! Resuming a cut upstream blob body. When a download's body breaks or
//! stalls, it is asked for again from the byte after the last one received
//! (`Range`, guarded by `If-Range` with upstream's strong `ETag` when it
//! gave one), up to `upstream.resume_attempts` times with a growing pause,
//! and the download goes on hashing across the seam: clients following it
//! see no cut, and the digest check at the end covers every byte. The
//! attempts count per cut: a cut after bytes arrived since the last one
//! starts a fresh count (a long download on a flaky link is not failed for
//! cuts it got past), so only a body that makes no progress fails.
//!
//! A registry may answer the resume with the whole blob (`200`: it ignores
//! ranges, or the `If-Range` validator no longer matches). Its first bytes
//! then repeat what already arrived; they are hashed on their own and
//! compared with the hash of what arrived, never written: equal, the
//! download goes on as if the body had not been cut; different, upstream
//! sent two versions, and the download fails rather than splice them.

use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use super::error::{Error, Result};
use super::shared::Shared;
use crate::reference::{Digest, Repository};
use crate::upstream::{self, BlobResponse};

/// Pause before resume attempt `n` (from 1): 250 ms, doubling, at most 4 s.
fn backoff(n: u32) -> Duration {
    Duration::from_millis(250 << n.saturating_sub(1).min(4))
}

/// Whether a failed resume request is worth another attempt: the registry
/// or the path to it failed, rather than saying no.
fn retryable(e: &upstream::Error) -> bool {
    match e {
        upstream::Error::Status { status, .. } => *status >= 500,
        upstream::Error::Timeout { .. }
        | upstream::Error::Connect { .. }
        | upstream::Error::Body { .. }
        | upstream::Error::BadResponse { .. } => true,
        _ => false,
    }
}

/// Bytes of a whole-blob answer that repeat what arrived before the cut.
struct Reread {
    /// Repeated bytes still to come.
    left: u64,
    hasher: Sha256,
    /// The hash of the bytes that arrived before the cut.
    expected: Vec<u8>,
}

/// The resumes of one download.
pub(super) struct Resumer<'a> {
    shared: &'a Shared,
    repo: &'a Repository,
    digest: &'a Digest,
    etag: Option<String>,
    /// Attempts since bytes last arrived.
    attempts: u32,
    /// Where the last cut happened.
    last_cut: u64,
    reread: Option<Reread>,
}

impl<'a> Resumer<'a> {
    /// For the download of `digest` whose first answer was `first`.
    pub(super) fn new(
        shared: &'a Shared,
        repo: &'a Repository,
        digest: &'a Digest,
        first: &BlobResponse,
    ) -> Resumer<'a> {
        Resumer {
            shared,
            repo,
            digest,
            etag: first.etag.clone(),
            attempts: 0,
            last_cut: 0,
            reread: None,
        }
    }

    /// The body to go on with after `cut` broke (`why`) with `received`
    /// bytes in, which `hasher` has seen; `len` is the blob's length if
    /// known. Fails with the last error once no attempt is left.
    pub(super) async fn reopen(
        &mut self,
        cut: BlobResponse,
        received: u64,
        hasher: &Sha256,
        len: Option<u64>,
        why: Error,
    ) -> Result<BlobResponse> {
        let count = |result: &str| {
            self.shared
                .metrics
                .upstream_resumes
                .with_label_values(&[result])
                .inc();
        };
        if received > self.last_cut {
            self.attempts = 0;
            self.last_cut = received;
        }
        // The cut body's connection goes; its download permit stays (and
        // stays across failed attempts), so a resume never queues behind
        // other downloads.
        let mut permit = cut.into_permit();
        let mut why = why;
        while self.attempts < self.shared.resume_attempts {
            self.attempts += 1;
            tokio::time::sleep(backoff(self.attempts)).await;
            let answer = self
                .shared
                .upstream
                .resume_blob(
                    self.repo,
                    self.digest,
                    received,
                    self.etag.as_deref(),
                    &mut permit,
                )
                .await;
            let body = match answer {
                Ok(body) => body,
                Err(e) if retryable(&e) => {
                    count("failed");
                    why = Error::Upstream(e);
                    continue;
                }
                Err(e) => {
                    count("failed");
                    return Err(Error::Upstream(e));
                }
            };
            let whole = body.offset == 0;
            let end = body.len.map(|n| body.offset + n);
            if let (Some(len), Some(end)) = (len, end) {
                if len != end {
                    count("changed");
                    return Err(self.changed());
                }
            }
            if whole {
                self.etag = body.etag.clone();
                // A whole answer repeats what arrived; compare it.
                self.reread = (received > 0).then(|| Reread {
                    left: received,
                    hasher: Sha256::new(),
                    expected: hasher.clone().finalize().to_vec(),
                });
            } else {
                // Goes on at `received`: nothing repeats (a whole answer
                // cut while being compared leaves nothing to compare).
                self.reread = None;
                count("resumed");
            }
            tracing::info!(
                repository = %self.repo,
                digest = %self.digest,
                from = received,
                attempt = self.attempts,
                whole,
                "resumed a cut upstream body"
            );
            return Ok(body);
        }
        Err(why)
    }

    fn changed(&self) -> Error {
        Error::UpstreamChanged {
            repo: self.repo.clone(),
            digest: self.digest.clone(),
        }
    }

    /// The part of `chunk` past what arrived before the cut: repeated bytes
    /// of a whole-blob answer are checked against them and dropped. Fails
    /// when they differ.
    pub(super) fn fresh(&mut self, chunk: Bytes) -> Result<Bytes> {
        let Some(reread) = self.reread.as_mut() else {
            return Ok(chunk);
        };
        let n = reread.left.min(chunk.len() as u64) as usize;
        reread.hasher.update(&chunk[..n]);
        reread.left -= n as u64;
        if reread.left == 0 {
            let reread = self.reread.take().expect("checked");
            let same = reread.hasher.finalize().as_slice() == reread.expected.as_slice();
            let result = if same { "reread" } else { "changed" };
            self.shared
                .metrics
                .upstream_resumes
                .with_label_values(&[result])
                .inc();
            if !same {
                return Err(Error::Upstream(upstream::Error::Body {
                    registry: self.repo.registry().to_owned(),
                    message: "upstream sent different bytes when asked again; nothing kept".into(),
                }));
            }
        }
        Ok(chunk.slice(n..))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let pauses: Vec<u64> = (1..=7).map(|n| backoff(n).as_millis() as u64).collect();
        assert_eq!(pauses, [250, 500, 1000, 2000, 4000, 4000, 4000]);
    }

    #[test]
    fn only_failures_of_the_path_are_retried() {
        let registry = "r".to_owned();
        assert!(retryable(&upstream::Error::Status {
            registry: registry.clone(),
            status: 503,
            envelope: None
        }));
        assert!(retryable(&upstream::Error::Connect {
            registry: registry.clone(),
            cause: upstream::Cause::Other,
            message: String::new()
        }));
        assert!(!retryable(&upstream::Error::NotFound {
            registry: registry.clone()
        }));
        assert!(!retryable(&upstream::Error::TooManyRequests {
            registry,
            retry_after: None
        }));
    }
}
