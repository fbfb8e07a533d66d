//! The `Range` request header on blobs (RFC 9110 §14.1.2, §14.2): one byte
//! range (what clients send to resume a layer download) or several (what
//! lazy pullers such as stargz-snapshotter send for scattered chunks).
//! Grammar only, shared by the HTTP layer (which answers) and the mirror
//! (which decides where the bytes come from): no I/O.

/// Most ranges one request may ask for. RFC 9110 §14.2 lets a server
/// refuse many small or overlapping ranges (they amplify a request into
/// many reads); 64 covers what lazy pullers send.
pub const MAX_RANGES: usize = 64;

/// Why a `Range` header cannot be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeError {
    /// Not `bytes=` followed by `a-b`, `a-` or `-n` ranges.
    Malformed,
    /// No range starts before the end of the blob.
    Unsatisfiable,
    /// More than `MAX_RANGES` ranges, or ranges that together ask for more
    /// bytes than the blob has (overlap).
    TooMany,
}

/// One range as written, before the blob's length is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spec {
    /// `a-b` (`b` inclusive) or `a-`.
    From(u64, Option<u64>),
    /// `-n`: the last `n` bytes.
    Suffix(u64),
}

/// The ranges of a `Range: bytes=…` header, in the order asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ranges(Vec<Spec>);

impl Ranges {
    /// Parses the header: syntax and the count cap only (the length is
    /// needed for the rest, see `resolve`). `None` for another unit than
    /// bytes, which a server must ignore (RFC 9110 §14.2); the unit is
    /// case-insensitive (§14.1) and empty list elements are skipped (§5.6.1).
    pub fn parse(header: &str) -> Result<Option<Ranges>, RangeError> {
        let (unit, specs) = header.trim().split_once('=').ok_or(RangeError::Malformed)?;
        if !unit.trim().eq_ignore_ascii_case("bytes") {
            return if unit.trim().is_empty() || unit.bytes().any(|b| !b.is_ascii_alphanumeric()) {
                Err(RangeError::Malformed)
            } else {
                Ok(None)
            };
        }
        let mut ranges = Vec::new();
        for spec in specs.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if ranges.len() == MAX_RANGES {
                return Err(RangeError::TooMany);
            }
            ranges.push(parse_spec(spec)?);
        }
        if ranges.is_empty() {
            return Err(RangeError::Malformed);
        }
        Ok(Some(Ranges(ranges)))
    }

    /// Whether one range was asked.
    pub fn is_single(&self) -> bool {
        self.0.len() == 1
    }

    /// The half-open ranges `[start, end)` of a blob of `len` bytes, in the
    /// order asked. Ranges starting past the end are dropped, as RFC 9110
    /// §14.2 allows when others remain; none left is `Unsatisfiable`.
    pub fn resolve(&self, len: u64) -> Result<Vec<(u64, u64)>, RangeError> {
        let resolved: Vec<(u64, u64)> = self
            .0
            .iter()
            .filter_map(|spec| match *spec {
                Spec::Suffix(n) if n > 0 && len > 0 => Some((len - n.min(len), len)),
                Spec::Suffix(_) => None,
                Spec::From(start, _) if start >= len => None,
                Spec::From(start, last) => Some((start, last.map_or(len, |l| l.min(len - 1) + 1))),
            })
            .collect();
        if resolved.is_empty() {
            return Err(RangeError::Unsatisfiable);
        }
        // u128: 64 ranges of a huge length would overflow a u64.
        let total: u128 = resolved
            .iter()
            .map(|(start, end)| u128::from(end - start))
            .sum();
        if resolved.len() > 1 && total > u128::from(len) {
            return Err(RangeError::TooMany);
        }
        Ok(resolved)
    }

    /// How far a download must have come before these ranges can be sent
    /// from it: the first byte of a single range (the rest streams along
    /// with the download), the last byte of several (sent whole, in the
    /// order asked); `Some(0)` for ranges the length makes unsatisfiable
    /// (answered at once). `None` when that needs the unknown length.
    pub fn needed(&self, len: Option<u64>) -> Option<u64> {
        match (len, self.0.as_slice()) {
            (Some(len), _) => match self.resolve(len) {
                Ok(parts) if parts.len() == 1 => Some(parts[0].0 + 1),
                Ok(parts) => parts.iter().map(|(_, end)| *end).max(),
                Err(_) => Some(0),
            },
            (None, [Spec::From(start, _)]) => Some(start.saturating_add(1)),
            (None, specs) => specs.iter().try_fold(0, |end, spec| match *spec {
                Spec::From(_, Some(last)) => Some(end.max(last.saturating_add(1))),
                _ => None,
            }),
        }
    }
}

fn parse_spec(spec: &str) -> Result<Spec, RangeError> {
    let (first, last) = spec.split_once('-').ok_or(RangeError::Malformed)?;
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        return Ok(Spec::Suffix(number(last)?));
    }
    let start = number(first)?;
    if last.is_empty() {
        return Ok(Spec::From(start, None));
    }
    let last = number(last)?;
    if last < start {
        return Err(RangeError::Malformed);
    }
    Ok(Spec::From(start, Some(last)))
}

fn number(s: &str) -> Result<u64, RangeError> {
    decimal(s).ok_or(RangeError::Malformed)
}

/// A byte position as HTTP writes it: ASCII digits only (no sign, no
/// space), fitting a u64. Also what `Content-Range` answers hold.
pub(crate) fn decimal(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(header: &str, len: u64) -> Result<Vec<(u64, u64)>, RangeError> {
        Ranges::parse(header)?.expect("a bytes range").resolve(len)
    }

    #[test]
    fn single_ranges() {
        assert_eq!(resolve("bytes=0-99", 1000), Ok(vec![(0, 100)]));
        assert_eq!(resolve("bytes=100-", 1000), Ok(vec![(100, 1000)]));
        assert_eq!(resolve("bytes=-10", 1000), Ok(vec![(990, 1000)]));
        assert_eq!(resolve("bytes=-5000", 1000), Ok(vec![(0, 1000)]));
        assert_eq!(resolve("bytes=900-5000", 1000), Ok(vec![(900, 1000)]));
        assert_eq!(resolve("bytes=999-999", 1000), Ok(vec![(999, 1000)]));
    }

    #[test]
    fn several_ranges_keep_their_order_and_drop_unsatisfiable_ones() {
        assert_eq!(
            resolve("bytes=500-599, 0-9", 1000),
            Ok(vec![(500, 600), (0, 10)])
        );
        assert_eq!(
            resolve("bytes=0-1,5000-6000,-2", 1000),
            Ok(vec![(0, 2), (998, 1000)])
        );
        assert_eq!(resolve("bytes=0-9,5-14", 1000), Ok(vec![(0, 10), (5, 15)]));
    }

    #[test]
    fn other_units_are_ignored_and_the_unit_is_case_insensitive() {
        assert_eq!(Ranges::parse("items=0-1"), Ok(None));
        assert_eq!(resolve("Bytes=0-1", 10), Ok(vec![(0, 2)]));
        assert_eq!(resolve("bytes=0-1,,3-4,", 10), Ok(vec![(0, 2), (3, 5)]));
        assert_eq!(Ranges::parse("=0-1"), Err(RangeError::Malformed));
        assert_eq!(Ranges::parse("by tes=0-1"), Err(RangeError::Malformed));
    }

    #[test]
    fn bad_ranges() {
        for bad in [
            "bytes=",
            "bytes= , ",
            "bytes=a-b",
            "bytes=5-1",
            "bytes=--1",
            "bytes=-1-2",
            "bytes=99999999999999999999999-",
            "0-1",
        ] {
            assert_eq!(resolve(bad, 1000), Err(RangeError::Malformed), "{bad}");
        }
        assert_eq!(resolve("bytes=1000-", 1000), Err(RangeError::Unsatisfiable));
        assert_eq!(resolve("bytes=-0", 1000), Err(RangeError::Unsatisfiable));
        assert_eq!(resolve("bytes=0-", 0), Err(RangeError::Unsatisfiable));
        assert_eq!(
            resolve("bytes=1000-1001,2000-2003", 1000),
            Err(RangeError::Unsatisfiable)
        );
    }

    #[test]
    fn too_many_or_too_much_overlap_is_refused() {
        let many = (0..=MAX_RANGES)
            .map(|i| format!("{i}-{i}"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(
            Ranges::parse(&format!("bytes={many}")),
            Err(RangeError::TooMany)
        );
        let most = (0..MAX_RANGES)
            .map(|i| format!("{i}-{i}"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(resolve(&format!("bytes={most}"), 1000).unwrap().len(), 64);
        // The same bytes asked twice over: more than the blob.
        assert_eq!(resolve("bytes=0-999,0-999", 1000), Err(RangeError::TooMany));
        // One range for all of it is fine.
        assert_eq!(resolve("bytes=0-999", 1000), Ok(vec![(0, 1000)]));
        // Found by scripts/fuzz.sh: a huge length no longer overflows the sum.
        assert_eq!(
            resolve("bytes=0-,1-,2-", u64::MAX),
            Err(RangeError::TooMany)
        );
    }

    #[test]
    fn needed_is_how_far_a_download_must_come() {
        let needed = |h: &str, len| Ranges::parse(h).unwrap().unwrap().needed(len);
        // One range streams along: its first byte.
        assert_eq!(needed("bytes=100-", Some(1000)), Some(101));
        assert_eq!(needed("bytes=100-", None), Some(101));
        assert_eq!(needed("bytes=-10", Some(1000)), Some(991));
        assert_eq!(needed("bytes=-10", None), None);
        // Several are sent whole: the last byte of all.
        assert_eq!(needed("bytes=500-599,0-99", Some(1000)), Some(600));
        assert_eq!(needed("bytes=500-599,0-99", None), Some(600));
        assert_eq!(needed("bytes=0-99,500-", None), None);
        // Clamped to the blob; unsatisfiable needs nothing.
        assert_eq!(needed("bytes=0-1,10-99999", Some(1000)), Some(1000));
        assert_eq!(needed("bytes=5000-", Some(1000)), Some(0));
    }
}
