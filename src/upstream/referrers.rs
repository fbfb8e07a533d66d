//! The OCI 1.1 referrers API upstream (`GET /v2/<name>/referrers/<digest>`):
//! one buffered answer per list, its `Link` pages followed and merged so
//! the mirror caches (and clients get) one whole index. Checks the shape of
//! what upstream sent, never what it means: caching is the mirror's.
//! Spec: <https://github.com/opencontainers/distribution-spec/blob/main/spec.md#listing-referrers>

use bytes::Bytes;
use http::{header, Method};
use serde_json::Value;
use tracing::warn;

use super::{header_string, read_bounded, Client, Error, ReadError, Result};
use crate::reference::{Digest, Repository, OCI_INDEX};

/// Pages followed for one list. A subject with more referrers than this
/// many pages hold is served with the first ones (and a warning): one
/// client request must not turn into an unbounded walk upstream.
const MAX_PAGES: usize = 16;

/// A referrers list from upstream: all its pages as one image index.
#[derive(Debug, Clone)]
pub struct ReferrersResponse {
    /// The index: upstream's bytes as sent for a single page, the first
    /// page with every page's `manifests` for several.
    pub bytes: Bytes,
}

impl Client {
    /// `GET` the referrers of `subject` in `repo`, unfiltered (the mirror
    /// filters one cached list for every client). Buffered: all pages together
    /// within the manifest size cap. An upstream 404 (a registry without
    /// the API) is `Error::NotFound`, as for any request.
    pub async fn get_referrers(
        &self,
        repo: &Repository,
        subject: &Digest,
    ) -> Result<ReferrersResponse> {
        let registry = repo.registry().to_owned();
        let bad = |message: String| Error::BadResponse {
            registry: registry.clone(),
            message,
        };
        let mut tail = format!("referrers/{subject}");
        let mut pages: Vec<Value> = Vec::new();
        let mut first: Option<Bytes> = None;
        let mut total = 0u64;
        loop {
            let response = self
                .send(repo, Method::GET, &tail, &[(header::ACCEPT, OCI_INDEX)])
                .await?;
            let link = header_string(response.headers(), header::LINK);
            let limit = self.max_manifest_bytes.saturating_sub(total);
            let bytes = read_bounded(response, limit, self.stall_timeout)
                .await
                .map_err(|e| match e {
                    ReadError::TooLarge => Error::ManifestTooLarge {
                        registry: registry.clone(),
                        limit: self.max_manifest_bytes,
                    },
                    ReadError::Stalled => Error::Timeout {
                        registry: registry.clone(),
                        what: "referrers list",
                    },
                    ReadError::Broken(message) => Error::Body {
                        registry: registry.clone(),
                        message,
                    },
                })?;
            total += bytes.len() as u64;
            let page = parse_index(&bytes).map_err(bad)?;
            pages.push(page);
            if first.is_none() {
                first = Some(bytes);
            }
            let Some(link) = link else { break };
            if pages.len() == MAX_PAGES {
                warn!(repository = %repo, %subject, pages = MAX_PAGES, "referrers list has more pages; serving the first ones");
                break;
            }
            tail = next_page(&link, repo, subject)
                .ok_or_else(|| bad("referrers Link outside the list's own path".to_owned()))?;
        }
        let first = first.expect("at least one page");
        if pages.len() == 1 {
            return Ok(ReferrersResponse { bytes: first });
        }
        Ok(ReferrersResponse {
            bytes: merge(pages).into(),
        })
    }
}

/// Checks a page is an image index whose `manifests` are descriptors with
/// a valid digest (what the mirror and the clients will read of it).
fn parse_index(bytes: &[u8]) -> std::result::Result<Value, String> {
    let page: Value =
        serde_json::from_slice(bytes).map_err(|e| format!("referrers list is not JSON: {e}"))?;
    let manifests = page
        .get("manifests")
        .and_then(Value::as_array)
        .ok_or("referrers list without a manifests array")?;
    for descriptor in manifests {
        let digest = descriptor.get("digest").and_then(Value::as_str);
        if digest.and_then(|d| Digest::parse(d).ok()).is_none() {
            return Err("referrers list names an invalid digest".into());
        }
    }
    Ok(page)
}

/// The first page, with every page's descriptors in its `manifests`.
fn merge(mut pages: Vec<Value>) -> Vec<u8> {
    let rest: Vec<Value> = pages
        .drain(1..)
        .flat_map(|page| match page {
            Value::Object(mut map) => match map.remove("manifests") {
                Some(Value::Array(list)) => list,
                _ => Vec::new(),
            },
            _ => Vec::new(),
        })
        .collect();
    let mut first = pages.pop().expect("the first page");
    if let Some(Value::Array(list)) = first.get_mut("manifests") {
        list.extend(rest);
    }
    serde_json::to_vec(&first).expect("json")
}

/// The request tail for a `Link: <...>; rel="next"` (RFC 5988, as the spec
/// says), if it stays on this list's path: a registry's link to anywhere
/// else is not followed with its credentials.
fn next_page(link: &str, repo: &Repository, subject: &Digest) -> Option<String> {
    let target = link
        .split(',')
        .find(|part| part.contains("rel=\"next\"") || part.contains("rel=next"))?
        .trim()
        .strip_prefix('<')?
        .split_once('>')?
        .0;
    // Absolute links keep only their path and query; the host is the
    // registry's (send() builds the URL from its base).
    let path_and_query = match target.split_once("://") {
        Some((_, rest)) => &rest[rest.find('/')?..],
        None => target,
    };
    let own = format!("/v2/{}/referrers/{subject}", repo.name());
    let query = path_and_query.strip_prefix(&own)?;
    if !(query.is_empty() || query.starts_with('?')) {
        return None;
    }
    Some(format!("referrers/{subject}{query}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_page_stays_on_the_list() {
        let repo = Repository::new("docker.io", "library/alpine").unwrap();
        let d = Digest::of(b"subject");
        let own = format!("/v2/library/alpine/referrers/{d}");
        assert_eq!(
            next_page(&format!("<{own}?last=x&n=2>; rel=\"next\""), &repo, &d),
            Some(format!("referrers/{d}?last=x&n=2"))
        );
        assert_eq!(
            next_page(
                &format!("<https://registry.example{own}?page=2>; rel=\"next\""),
                &repo,
                &d
            ),
            Some(format!("referrers/{d}?page=2"))
        );
        for foreign in [
            format!("</v2/library/other/referrers/{d}?n=1>; rel=\"next\""),
            format!("<{own}/../../x>; rel=\"next\""),
            format!("<{own}?n=1>; rel=\"prev\""),
            "garbage".to_owned(),
        ] {
            assert_eq!(next_page(&foreign, &repo, &d), None, "{foreign}");
        }
    }

    #[test]
    fn pages_merge_into_the_first() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        let page = |d: &Digest| {
            serde_json::json!({
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d.to_string(), "size": 1}]
            })
        };
        let merged: Value = serde_json::from_slice(&merge(vec![page(&a), page(&b)])).unwrap();
        let digests: Vec<&str> = merged["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["digest"].as_str().unwrap())
            .collect();
        assert_eq!(digests, [a.to_string(), b.to_string()]);
        assert_eq!(merged["mediaType"], OCI_INDEX);
    }

    #[test]
    fn only_indexes_of_valid_descriptors_pass() {
        let d = Digest::of(b"a");
        assert!(parse_index(br#"{"schemaVersion":2,"manifests":[]}"#).is_ok());
        assert!(parse_index(
            format!(r#"{{"manifests":[{{"digest":"{d}","size":1}}]}}"#).as_bytes()
        )
        .is_ok());
        for bad in [
            &b"<html>"[..],
            br#"{"schemaVersion":2}"#,
            br#"{"manifests":[{"digest":"sha256:zz"}]}"#,
            br#"{"manifests":[{"size":1}]}"#,
        ] {
            assert!(
                parse_index(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
