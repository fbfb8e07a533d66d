//! The admin API, on its own listener and only with the configured bearer
//! token: list cached images, pin and unpin, evict one image, run gc and
//! verify. This module is its protocol (paths and JSON bodies), shared by
//! the server (`server`) and the client `hoard ls`/`pin`/`unpin` use
//! (`client`), so the two cannot drift apart.
//!
//! - `GET /admin/images[?registry=HOST]`
//! - `GET /admin/pins`, `POST /admin/pins?image=NAME`, `DELETE /admin/pins?image=NAME`
//! - `POST /admin/evict?image=NAME`
//! - `POST /admin/gc`
//! - `POST /admin/verify`: re-hash everything, quarantine mismatches

mod client;
mod server;

pub use client::{Client, ClientError};
pub use server::handle;

use serde::{Deserialize, Serialize};

use crate::mirror::catalog::CachedImage;

/// `GET` the cached images.
pub const IMAGES: &str = "/admin/images";
/// `GET` the pins; `POST` or `DELETE` one (`?image=`).
pub const PINS: &str = "/admin/pins";
/// `POST` to remove one image (`?image=`).
pub const EVICT: &str = "/admin/evict";
/// `POST` to remove blobs no manifest names.
pub const GC: &str = "/admin/gc";
/// `POST` to re-hash everything stored.
pub const VERIFY: &str = "/admin/verify";

/// Answer of `GET /admin/images`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Images {
    pub images: Vec<CachedImage>,
}

/// Answer of `GET /admin/pins`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pins {
    pub pins: Vec<String>,
}

/// Answer of `POST /admin/pins`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Pinned {
    pub image: String,
    /// False if it was pinned already.
    pub added: bool,
}

/// Answer of `DELETE /admin/pins`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Unpinned {
    pub image: String,
    /// False if there was no such run-time pin.
    pub removed: bool,
}

/// Answer of `POST /admin/evict`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EvictedImage {
    pub image: String,
    pub blobs: usize,
    pub bytes: u64,
}

/// Answer of `POST /admin/gc`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Collected {
    pub blobs: usize,
    pub bytes: u64,
}

/// Answer of `POST /admin/verify`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Verified {
    pub checked: usize,
    pub bytes: u64,
    /// Digests of the blobs moved to quarantine.
    pub quarantined: Vec<String>,
}

/// `?name=value` with the value percent-encoded (image names carry `/`,
/// `:` and `@`).
fn query(name: &str, value: &str) -> String {
    let encoded: String = value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    format!("?{name}={encoded}")
}

/// A query value's `%XX` escapes decoded.
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_round_trip() {
        for value in ["docker.io/library/alpine:3", "ghcr.io/o/a@sha256:00", "ü é"] {
            let q = query("image", value);
            let encoded = q.strip_prefix("?image=").unwrap();
            assert!(encoded.is_ascii());
            assert_eq!(percent_decode(encoded), value);
        }
        assert_eq!(percent_decode("bad%zz%"), "bad%zz%");
    }
}
