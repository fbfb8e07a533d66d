//! How a lookup was answered; feeds log lines and metric labels.

/// The cache outcome of one manifest, blob or tag-list lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Served from the store without asking upstream.
    Hit,
    /// Fetched from upstream by this request.
    Miss,
    /// A tag past its TTL that upstream confirmed unchanged (`HEAD`).
    Revalidated,
    /// Served from the store because upstream failed (5xx, 429, timeout).
    Stale,
    /// Joined a fetch another request had already started.
    Coalesced,
}

impl Outcome {
    /// The label value: `hit`, `miss`, `revalidated`, `stale`, `coalesced`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Revalidated => "revalidated",
            Outcome::Stale => "stale",
            Outcome::Coalesced => "coalesced",
        }
    }
}
