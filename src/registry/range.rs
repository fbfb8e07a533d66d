//! The `Range` request header, single byte ranges only (what registry
//! clients send to resume a layer download). RFC 9110 §14.1.2.

/// Why a `Range` header cannot be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeError {
    /// Not `bytes=a-b`, `bytes=a-` or `bytes=-n`, or several ranges.
    Malformed,
    /// Starts at or past the end of the blob.
    Unsatisfiable,
}

/// The half-open byte range `[start, end)` that `header` asks of a blob of
/// `len` bytes.
pub fn parse(header: &str, len: u64) -> Result<(u64, u64), RangeError> {
    let spec = header
        .trim()
        .strip_prefix("bytes=")
        .ok_or(RangeError::Malformed)?;
    if spec.contains(',') {
        return Err(RangeError::Malformed);
    }
    let (first, last) = spec.split_once('-').ok_or(RangeError::Malformed)?;
    let number = |s: &str| -> Result<u64, RangeError> {
        if s.is_empty() || s.len() > 20 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(RangeError::Malformed);
        }
        s.parse().map_err(|_| RangeError::Malformed)
    };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        let suffix = number(last)?;
        if suffix == 0 || len == 0 {
            return Err(RangeError::Unsatisfiable);
        }
        return Ok((len - suffix.min(len), len));
    }
    let start = number(first)?;
    let end = if last.is_empty() {
        len - 1.min(len)
    } else {
        number(last)?
    };
    if end < start && !last.is_empty() {
        return Err(RangeError::Malformed);
    }
    if start >= len {
        return Err(RangeError::Unsatisfiable);
    }
    Ok((start, end.min(len - 1) + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_ranges() {
        assert_eq!(parse("bytes=0-99", 1000), Ok((0, 100)));
        assert_eq!(parse("bytes=100-", 1000), Ok((100, 1000)));
        assert_eq!(parse("bytes=-10", 1000), Ok((990, 1000)));
        assert_eq!(parse("bytes=-5000", 1000), Ok((0, 1000)));
        assert_eq!(parse("bytes=900-5000", 1000), Ok((900, 1000)));
        assert_eq!(parse("bytes=999-999", 1000), Ok((999, 1000)));
    }

    #[test]
    fn bad_ranges() {
        for bad in [
            "bytes=",
            "bytes=a-b",
            "items=0-1",
            "bytes=5-1",
            "bytes=0-1,3-4",
            "bytes=--1",
            "bytes=-1-2",
            "bytes=99999999999999999999999-",
            "0-1",
        ] {
            assert_eq!(parse(bad, 1000), Err(RangeError::Malformed), "{bad}");
        }
        assert_eq!(parse("bytes=1000-", 1000), Err(RangeError::Unsatisfiable));
        assert_eq!(parse("bytes=-0", 1000), Err(RangeError::Unsatisfiable));
        assert_eq!(parse("bytes=0-", 0), Err(RangeError::Unsatisfiable));
    }
}
