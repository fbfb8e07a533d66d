//! The fleet: the replicas sharing one bucket, and which of them fetches
//! each object from upstream. Every replica ranks the replicas for an
//! object's key with rendezvous hashing (`rendezvous`) and agrees, without
//! talking, on its owner: the owner fetches from upstream (once, with its
//! own single-flight) and copies to the bucket; the others stream the
//! object from the owner while it downloads. A replica that cannot be
//! reached within a second is skipped for a few seconds, and the next in
//! rank owns its objects meanwhile.
//!
//! Requests between replicas go to the replicas' own listeners, marked
//! with `x-hoard-peer` (a marked request is served, never forwarded again,
//! so a wrong peer list cannot loop) and carrying the client's own
//! `Authorization`: the owner checks it as any replica would, so the path
//! between replicas grants nothing a client does not have.

mod rendezvous;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderMap;
use parking_lot::{Mutex, RwLock};
use tracing::{debug, warn};

use crate::config::{ClusterConfig, Peers};

/// The header that marks a request from another replica; its value is the
/// sender's URL (for logs).
pub const PEER_HEADER: &str = "x-hoard-peer";
/// The header of a replica's answer to a tag: when upstream last confirmed
/// the tag (unix ms), so the asker's TTL runs from then.
pub const CHECKED_AT_HEADER: &str = "x-hoard-checked-at";
/// The status a replica answers a request it sent itself (two names for
/// one replica in the list): the sender skips that name like a replica
/// that is down.
pub const LOOP_STATUS: u16 = 508;
/// How long an owner may take to answer (it may be waiting on upstream).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// Time to connect to a replica before it counts as down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a replica that did not answer is skipped.
const DOWN_FOR: Duration = Duration::from_secs(5);
/// How often `peers_dns` is resolved again.
const DNS_REFRESH: Duration = Duration::from_secs(5);

/// Why a replica could not serve a forwarded request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// No connection within `CONNECT_TIMEOUT`, or no answer in time: the
    /// caller tries the next replica.
    #[error("replica {peer} is unreachable: {message}")]
    Unreachable { peer: String, message: String },
    /// The replica answered with an error status.
    #[error("replica {peer} answered {status}")]
    Status { peer: String, status: u16 },
    /// The body broke off.
    #[error("replica {peer}: {message}")]
    Body { peer: String, message: String },
}

/// Who fetches an object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// This replica.
    Me,
    /// Another replica, by URL (no trailing slash).
    Peer(String),
}

/// The replicas and the client that talks to them.
pub struct Cluster {
    /// This replica's URL, as in `members`.
    me: String,
    members: RwLock<Vec<String>>,
    /// Replicas that did not answer, until when they are skipped.
    down: Mutex<HashMap<String, Instant>>,
    client: reqwest::Client,
    forwards: prometheus::IntCounterVec,
}

impl Cluster {
    /// The fleet of `config`; `forwards` counts requests sent to replicas
    /// by result. With `peers_dns`, call `spawn_dns_refresh`.
    pub fn new(config: &ClusterConfig, forwards: prometheus::IntCounterVec) -> Cluster {
        let me = url_text(&config.advertise);
        let members = match &config.peers {
            Peers::Static(urls) => urls.iter().map(url_text).collect(),
            Peers::Dns { .. } => vec![me.clone()],
        };
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .http1_only()
            .build()
            .expect("a plain http client builds");
        Cluster {
            me,
            members: RwLock::new(members),
            down: Mutex::default(),
            client,
            forwards,
        }
    }

    /// Resolves `peers_dns` now and every few seconds while the cluster
    /// lives (a Kubernetes headless Service lists the ready pods).
    pub fn spawn_dns_refresh(self: &Arc<Self>, config: &ClusterConfig) {
        let Peers::Dns { name, port } = config.peers.clone() else {
            return;
        };
        let scheme = config.advertise.scheme().to_owned();
        let cluster = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(cluster) = cluster.upgrade() else {
                    return;
                };
                match tokio::net::lookup_host((name.as_str(), port)).await {
                    Ok(addrs) => {
                        let mut members: Vec<String> = addrs
                            .map(|addr| format!("{scheme}://{addr}"))
                            .chain([cluster.me.clone()])
                            .collect();
                        members.sort();
                        members.dedup();
                        let mut current = cluster.members.write();
                        if *current != members {
                            debug!(replicas = ?members, "replica list changed");
                            *current = members;
                        }
                    }
                    Err(e) => warn!(name, error = %e, "cannot resolve the replicas' name"),
                }
                drop(cluster);
                tokio::time::sleep(DNS_REFRESH).await;
            }
        });
    }

    /// This replica's URL.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// Who should fetch the object `key`: the replicas that outrank this
    /// one and are not known to be down, best first, then `Me`.
    pub fn owners(&self, key: &[u8]) -> Vec<Owner> {
        let members = self.members.read().clone();
        let now = Instant::now();
        let down = self.down.lock();
        let mut owners = Vec::new();
        for member in rendezvous::rank(&members, key) {
            if *member == self.me {
                break;
            }
            if down.get(member).is_some_and(|until| *until > now) {
                continue;
            }
            owners.push(Owner::Peer(member.clone()));
        }
        owners.push(Owner::Me);
        owners
    }

    /// `GET path` (with its query) from `peer`, marked as a replica's
    /// request, with the client's `Accept` and `Authorization` (`headers`).
    /// An unreachable replica is skipped for a few seconds from now on.
    pub async fn get(
        &self,
        peer: &str,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<reqwest::Response, Error> {
        let mut request = self
            .client
            .get(format!("{peer}{path}"))
            .header(PEER_HEADER, self.me.as_str());
        for name in [http::header::ACCEPT, http::header::AUTHORIZATION] {
            for value in headers.get_all(&name) {
                request = request.header(&name, value);
            }
        }
        let sent = tokio::time::timeout(ANSWER_TIMEOUT, request.send()).await;
        let response = match sent {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => return Err(self.unreachable(peer, with_causes(&e))),
            Err(_) => return Err(self.unreachable(peer, "no answer in time".into())),
        };
        let status = response.status();
        if status.is_success() {
            self.count("ok");
            return Ok(response);
        }
        if status.as_u16() == LOOP_STATUS {
            return Err(self.unreachable(peer, "it is this replica under another name".into()));
        }
        self.count("error");
        Err(Error::Status {
            peer: peer.to_owned(),
            status: status.as_u16(),
        })
    }

    fn unreachable(&self, peer: &str, message: String) -> Error {
        warn!(
            peer,
            message, "replica unreachable: skipped for a few seconds"
        );
        self.down
            .lock()
            .insert(peer.to_owned(), Instant::now() + DOWN_FOR);
        self.count("unreachable");
        Error::Unreachable {
            peer: peer.to_owned(),
            message,
        }
    }

    fn count(&self, result: &str) {
        self.forwards.with_label_values(&[result]).inc();
    }
}

/// The replica that sent a request (`PEER_HEADER`), if one did.
pub fn sender(headers: &HeaderMap) -> Option<String> {
    headers
        .get(PEER_HEADER)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// When upstream last confirmed the tag a replica's answer resolved.
pub fn checked_at(headers: &reqwest::header::HeaderMap) -> Option<u64> {
    headers
        .get(CHECKED_AT_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// A URL as the replicas compare it: no trailing slash.
fn url_text(url: &reqwest::Url) -> String {
    url.as_str().trim_end_matches('/').to_owned()
}

/// A client error with its causes (the cause says "connection refused").
fn with_causes(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(me: &str, peers: &[&str]) -> Cluster {
        let config = ClusterConfig {
            advertise: me.parse().unwrap(),
            peers: Peers::Static(peers.iter().map(|p| p.parse().unwrap()).collect()),
        };
        let forwards = prometheus::IntCounterVec::new(
            prometheus::Opts::new("forwards", "forwards"),
            &["result"],
        )
        .unwrap();
        Cluster::new(&config, forwards)
    }

    #[test]
    fn every_replica_names_the_same_owner_and_the_owner_fetches_itself() {
        let peers = [
            "http://127.0.0.1:1",
            "http://127.0.0.1:2",
            "http://127.0.0.1:3",
        ];
        let replicas: Vec<Cluster> = peers.iter().map(|me| cluster(me, &peers)).collect();
        for key in [b"a".as_slice(), b"b", b"c", b"d", b"e", b"f"] {
            let owners: Vec<String> = replicas
                .iter()
                .map(|r| match &r.owners(key)[0] {
                    Owner::Me => r.me().to_owned(),
                    Owner::Peer(p) => p.clone(),
                })
                .collect();
            assert!(owners.windows(2).all(|w| w[0] == w[1]), "{owners:?}");
            let owner = replicas.iter().find(|r| r.me() == owners[0]).unwrap();
            assert_eq!(owner.owners(key), vec![Owner::Me]);
        }
    }

    #[test]
    fn a_replica_marked_down_is_skipped() {
        let peers = ["http://127.0.0.1:1", "http://127.0.0.1:2"];
        let me = cluster(peers[0], &peers);
        let key = (0u32..)
            .map(|i| i.to_be_bytes())
            .find(|k| me.owners(k)[0] != Owner::Me)
            .unwrap();
        me.unreachable(peers[1], "refused".into());
        assert_eq!(me.owners(&key), vec![Owner::Me]);
    }
}
