//! `multipart/byteranges` answers to a `Range` with several ranges
//! (RFC 9110 §14.6): each part carries its own `Content-Type` and
//! `Content-Range`, in the order the ranges were asked. The body is laid
//! out here as pieces (part headers, ranges of the blob) the mirror
//! streams, so its length is known before a byte is read.

use std::hash::{BuildHasher, Hasher};

use bytes::Bytes;

use crate::mirror::Piece;

/// A multipart body, ready to stream.
pub struct Byteranges {
    /// `multipart/byteranges; boundary=…`.
    pub content_type: String,
    /// The exact length of the body.
    pub len: u64,
    pub pieces: Vec<Piece>,
}

/// The answer for `parts` (`[start, end)`, as asked) of a blob of `len`
/// bytes whose own type is `part_type`.
pub fn byteranges(parts: &[(u64, u64)], len: u64, part_type: &str) -> Byteranges {
    let boundary = boundary();
    let mut pieces = Vec::with_capacity(parts.len() * 2 + 1);
    let mut body_len = 0;
    for (i, (start, end)) in parts.iter().enumerate() {
        // The CRLF before a delimiter belongs to it (RFC 2046 §5.1.1).
        let lead = if i == 0 { "" } else { "\r\n" };
        let head = format!(
            "{lead}--{boundary}\r\nContent-Type: {part_type}\r\nContent-Range: bytes {start}-{}/{len}\r\n\r\n",
            end - 1
        );
        body_len += head.len() as u64 + (end - start);
        pieces.push(Piece::Literal(Bytes::from(head)));
        pieces.push(Piece::Range(*start, Some(*end)));
    }
    let close = format!("\r\n--{boundary}--\r\n");
    body_len += close.len() as u64;
    pieces.push(Piece::Literal(Bytes::from(close)));
    Byteranges {
        content_type: format!("multipart/byteranges; boundary={boundary}"),
        len: body_len,
        pieces,
    }
}

/// A boundary no blob can be crafted to contain: 128 random bits (the
/// standard library's per-process random hash keys), fresh per answer.
fn boundary() -> String {
    let random = || std::collections::hash_map::RandomState::new().build_hasher();
    let (mut a, mut b) = (random(), random());
    a.write_u8(0);
    b.write_u8(1);
    format!("hoard-{:016x}{:016x}", a.finish(), b.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_length_is_the_sum_of_the_pieces() {
        let parts = [(500, 600), (0, 10)];
        let body = byteranges(&parts, 1000, "application/octet-stream");
        assert!(body
            .content_type
            .starts_with("multipart/byteranges; boundary=hoard-"));
        let mut len = 0;
        let mut ranges = Vec::new();
        for piece in &body.pieces {
            match piece {
                Piece::Literal(bytes) => len += bytes.len() as u64,
                Piece::Range(start, end) => {
                    len += end.unwrap() - start;
                    ranges.push((*start, end.unwrap()));
                }
            }
        }
        assert_eq!(len, body.len);
        assert_eq!(ranges, parts);
        let Piece::Literal(first) = &body.pieces[0] else {
            panic!("a part header first")
        };
        assert!(std::str::from_utf8(first)
            .unwrap()
            .ends_with("Content-Range: bytes 500-599/1000\r\n\r\n"));
    }

    #[test]
    fn boundaries_differ() {
        assert_ne!(boundary(), boundary());
        assert_eq!(boundary().len(), "hoard-".len() + 32);
    }
}
