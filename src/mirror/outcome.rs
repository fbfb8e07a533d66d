//! How a lookup was answered; feeds log lines and metric labels.

/// The cache outcome of one manifest, blob, tag-list or referrers lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Served from the store without asking upstream.
    Hit,
    /// Fetched from upstream by this request.
    Miss,
    /// A tag past its TTL that upstream confirmed unchanged (`HEAD`), or a
    /// referrers list past its TTL that upstream sent again unchanged.
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

impl std::str::FromStr for Outcome {
    type Err = ();

    /// An `x-hoard-cache` value (another replica's answer).
    fn from_str(text: &str) -> Result<Outcome, ()> {
        [
            Outcome::Hit,
            Outcome::Miss,
            Outcome::Revalidated,
            Outcome::Stale,
            Outcome::Coalesced,
        ]
        .into_iter()
        .find(|o| o.as_str() == text)
        .ok_or(())
    }
}
