//! Text to quantities: durations (`30s`, `5m`) and sizes (`4MiB`, `1GB`).
//! Errors say what is wrong with the text; the caller names the key.

use std::time::Duration;

use serde::Deserialize;

/// A size as the file writes it: a byte count or a string such as "4MiB".
/// Flags and variables always give text.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Size {
    Bytes(u64),
    Text(String),
}

impl Size {
    /// The size in bytes.
    pub fn bytes(&self) -> Result<u64, String> {
        match self {
            Size::Bytes(n) => Ok(*n),
            Size::Text(text) => parse_size(text),
        }
    }
}

/// Durations such as `30s`, `5m`, `1h 30m`, `250ms`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| format!("{text:?}: {e}"))
}

/// Sizes such as `4194304`, `4MiB`, `512KiB`, `1GB`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size"))?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => return Err(format!("unknown size unit {other:?}")),
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("123"), Ok(123));
        assert_eq!(parse_size("2 GB"), Ok(2_000_000_000));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
        assert_eq!(Size::Bytes(7).bytes(), Ok(7));
        assert_eq!(Size::Text("1KiB".into()).bytes(), Ok(1024));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration(" 250ms "), Ok(Duration::from_millis(250)));
        let e = parse_duration("soon").unwrap_err();
        assert!(e.starts_with("\"soon\": "), "{e}");
    }
}
