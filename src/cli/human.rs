//! Sizes and times as people read them in a terminal, like `docker images`:
//! `3.0 MiB`, `5 min ago`.

/// `bytes` in binary units, one decimal past KiB.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{bytes} B"),
        _ => format!("{value:.1} {}", UNITS[unit]),
    }
}

/// How long before `now` the unix second `then` was; `never` for 0.
pub fn ago(then: u64, now: u64) -> String {
    if then == 0 {
        return "never".into();
    }
    let secs = now.saturating_sub(then);
    match secs {
        0..10 => "just now".into(),
        10..60 => format!("{secs} s ago"),
        60..3600 => format!("{} min ago", secs / 60),
        3600..86400 => format!("{} h ago", secs / 3600),
        _ => format!("{} days ago", secs / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ages_read_like_docker_images() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(1023), "1023 B");
        assert_eq!(size(3 * 1024 * 1024), "3.0 MiB");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(5 * (1 << 30) + (1 << 29)), "5.5 GiB");
        let now = 1_000_000;
        assert_eq!(ago(0, now), "never");
        assert_eq!(ago(now - 3, now), "just now");
        assert_eq!(ago(now - 42, now), "42 s ago");
        assert_eq!(ago(now - 300, now), "5 min ago");
        assert_eq!(ago(now - 7200, now), "2 h ago");
        assert_eq!(ago(now - 3 * 86400, now), "3 days ago");
        assert_eq!(ago(now + 5, now), "just now", "a clock a little ahead");
    }
}
