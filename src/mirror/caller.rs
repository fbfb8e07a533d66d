//! Who asks for an object: a client, whose misses go to the replica that
//! owns the object (with the client's credentials, so the owner checks
//! them as this replica did), or another replica, which is served here and
//! never sent on (see `cluster`).

use http::HeaderValue;

use crate::cluster;

/// The header of a replica's answer to a tag: when upstream last confirmed
/// it (see `Mirror::tag_checked_at`).
pub use crate::cluster::CHECKED_AT_HEADER;

/// The asker of one lookup.
#[derive(Clone, Default)]
pub struct Caller {
    /// Another replica forwarded this request: serve it, never forward.
    pub from_peer: bool,
    /// That replica's URL, as it says.
    pub sender: Option<String>,
    /// The client's `Authorization`, passed to the owner of a miss.
    pub credentials: Option<HeaderValue>,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the credentials.
        f.debug_struct("Caller")
            .field("from_peer", &self.from_peer)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl Caller {
    /// The asker of a request with these headers: a replica if it is
    /// marked as one (`cluster::PEER_HEADER`), else a client with its
    /// `Authorization`.
    pub fn from_headers(headers: &http::HeaderMap) -> Caller {
        let sender = cluster::sender(headers);
        Caller {
            from_peer: sender.is_some(),
            sender,
            credentials: headers.get(http::header::AUTHORIZATION).cloned(),
        }
    }

    /// The headers a forwarded request carries for this caller.
    pub(super) fn headers(&self) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        if let Some(credentials) = &self.credentials {
            headers.insert(http::header::AUTHORIZATION, credentials.clone());
        }
        headers
    }
}
