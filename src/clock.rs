//! The one wall clock of hoard's records: Unix milliseconds, for a blob's
//! last access (the LRU order) and the last time upstream confirmed a tag.
//! Names of fields holding a time carry its unit (`_ms`, `_secs`).

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}
