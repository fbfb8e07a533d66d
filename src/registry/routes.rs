//! Request paths to typed routes. Decides which upstream registry a request
//! means: containerd's `?ns=<host>`, else a host-like first path component
//! (`/v2/ghcr.io/owner/app/...`), else Docker Hub. Pure: no I/O.
//! Paths: <https://github.com/opencontainers/distribution-spec/blob/main/spec.md#endpoints>

use crate::reference::{
    looks_like_host, validate_media_type, validate_registry, Digest, Reference, ReferenceError,
    Repository, DOCKER_HUB,
};

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`: the API version check.
    Base,
    /// `/v2/<name>/manifests/<reference>`.
    Manifest {
        repo: Repository,
        reference: Reference,
    },
    /// `/v2/<name>/blobs/<digest>`.
    Blob { repo: Repository, digest: Digest },
    /// `/v2/<name>/tags/list`, with the sanitized `n`/`last` query.
    Tags { repo: Repository, query: String },
    /// `/v2/<name>/referrers/<digest>`, optionally `?artifactType=<media
    /// type>` (OCI distribution spec 1.1, "Listing Referrers", end-12a/b).
    Referrers {
        repo: Repository,
        digest: Digest,
        artifact_type: Option<String>,
    },
    /// Uploads and the catalog: not offered by a pull-through mirror.
    Unsupported,
    /// `/metrics`.
    Metrics,
    /// `/healthz`.
    Healthz,
    /// `/ui` and everything under `/ui/`: the status page.
    Ui,
}

/// Why a path was not routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// No such endpoint.
    NotFound,
    /// The name, tag or digest in it is invalid.
    Invalid(ReferenceError),
    /// The request target is longer than any valid one.
    TooLong,
}

impl From<ReferenceError> for RouteError {
    fn from(e: ReferenceError) -> RouteError {
        RouteError::Invalid(e)
    }
}

/// Longest request target accepted: a repository name is at most 255
/// characters, a digest 71, and the query carries `ns`, `n` and `last`.
const MAX_URI: usize = 2048;

/// Parses a request's path and query.
pub fn route(path: &str, query: Option<&str>) -> Result<Route, RouteError> {
    if path.len() + query.map_or(0, str::len) > MAX_URI {
        return Err(RouteError::TooLong);
    }
    match path {
        "/metrics" => return Ok(Route::Metrics),
        "/healthz" => return Ok(Route::Healthz),
        "/ui" => return Ok(Route::Ui),
        _ if path.starts_with("/ui/") => return Ok(Route::Ui),
        "/v2" | "/v2/" => return Ok(Route::Base),
        _ => {}
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return Err(RouteError::NotFound);
    };
    // Nothing in the grammar is ever percent-encoded: refusing `%` outright
    // closes every encoded-traversal trick (`%2e%2e`, `%2f`).
    let traversal = rest.split('/').any(|s| s == "." || s == "..");
    if traversal || rest.contains('%') || rest.contains('\\') {
        return Err(ReferenceError::InvalidName(rest.chars().take(80).collect()).into());
    }
    if rest == "_catalog" {
        return Ok(Route::Unsupported);
    }
    let segments: Vec<&str> = rest.split('/').collect();
    let n = segments.len();
    if n < 3 {
        return Err(RouteError::NotFound);
    }
    let params = Query::parse(query.unwrap_or(""));
    if let Some(i) = segments.windows(2).position(|w| w == ["blobs", "uploads"]) {
        if i > 0 {
            return Ok(Route::Unsupported);
        }
    }
    let (kind, last) = (segments[n - 2], segments[n - 1]);
    let name = &segments[..n - 2];
    match (kind, last) {
        ("manifests", reference) => Ok(Route::Manifest {
            repo: repository(name, params.ns)?,
            reference: Reference::parse(reference)?,
        }),
        ("blobs", digest) => Ok(Route::Blob {
            repo: repository(name, params.ns)?,
            digest: Digest::parse(digest)?,
        }),
        ("tags", "list") => Ok(Route::Tags {
            repo: repository(name, params.ns)?,
            query: params.tags_query()?,
        }),
        // Spec, "Listing Referrers": a `<digest>` with an invalid syntax is
        // a 400, like a blob's.
        ("referrers", digest) => Ok(Route::Referrers {
            repo: repository(name, params.ns)?,
            digest: Digest::parse(digest)?,
            artifact_type: params.artifact_type()?,
        }),
        _ => Err(RouteError::NotFound),
    }
}

/// Picks the registry and repository from the name's path components.
fn repository(segments: &[&str], ns: Option<&str>) -> Result<Repository, ReferenceError> {
    let (registry, name) = match ns {
        Some(ns) => {
            let ns = canonical_registry(ns);
            validate_registry(ns)?;
            // containerd's `override_path` form: `/v2/<host>/<name>` + `?ns=<host>`.
            match segments.split_first() {
                Some((first, rest)) if !rest.is_empty() && canonical_registry(first) == ns => {
                    (ns, rest)
                }
                _ => (ns, segments),
            }
        }
        None => match segments.split_first() {
            Some((first, rest)) if !rest.is_empty() && looks_like_host(first) => {
                let registry = canonical_registry(first);
                validate_registry(registry)?;
                (registry, rest)
            }
            _ => (DOCKER_HUB, segments),
        },
    };
    Repository::new(registry, &name.join("/"))
}

/// Docker Hub's other names all mean `docker.io`.
fn canonical_registry(host: &str) -> &str {
    match host {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => DOCKER_HUB,
        host => host,
    }
}

/// The query parameters hoard reads.
#[derive(Default)]
struct Query<'a> {
    ns: Option<&'a str>,
    n: Option<&'a str>,
    last: Option<&'a str>,
    artifact_type: Option<&'a str>,
}

impl<'a> Query<'a> {
    fn parse(query: &'a str) -> Query<'a> {
        let mut q = Query::default();
        for pair in query.split('&') {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "ns" => q.ns = Some(value),
                "n" => q.n = Some(value),
                "last" => q.last = Some(value),
                "artifactType" => q.artifact_type = Some(value),
                _ => {}
            }
        }
        q
    }

    /// `n` (digits) and `last` (a tag), re-encoded for upstream.
    fn tags_query(&self) -> Result<String, ReferenceError> {
        let mut parts = Vec::new();
        if let Some(n) = self.n.filter(|n| !n.is_empty()) {
            if n.len() > 6 || !n.bytes().all(|b| b.is_ascii_digit()) {
                return Err(ReferenceError::InvalidTag(n.chars().take(80).collect()));
            }
            parts.push(format!("n={n}"));
        }
        if let Some(last) = self.last.filter(|l| !l.is_empty()) {
            if let Reference::Digest(_) = Reference::parse(last)? {
                return Err(ReferenceError::InvalidTag(last.chars().take(80).collect()));
            }
            parts.push(format!("last={last}"));
        }
        Ok(parts.join("&"))
    }

    /// The referrers filter, percent-decoded (clients may encode its `/`
    /// and `+`) and checked as a media type; empty means no filter.
    fn artifact_type(&self) -> Result<Option<String>, ReferenceError> {
        let Some(raw) = self.artifact_type.filter(|v| !v.is_empty()) else {
            return Ok(None);
        };
        let invalid = || ReferenceError::InvalidMediaType(raw.chars().take(80).collect());
        let decoded = percent_decode(raw).ok_or_else(invalid)?;
        validate_media_type(&decoded).map_err(|_| invalid())?;
        Ok(Some(decoded))
    }
}

/// `%XX` escapes decoded; `None` for a broken escape or bytes that are not
/// UTF-8. A `+` stays a `+`: media types contain it (`...+json`), and
/// clients send it unencoded.
fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn manifest(path: &str, query: Option<&str>) -> (String, String, String) {
        match route(path, query).unwrap() {
            Route::Manifest { repo, reference } => (
                repo.registry().to_owned(),
                repo.name().to_owned(),
                reference.to_string(),
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn docker_hub_is_the_default_with_library_prefix() {
        let want = ("docker.io".into(), "library/alpine".into(), "3.19".into());
        assert_eq!(manifest("/v2/alpine/manifests/3.19", None), want);
        assert_eq!(manifest("/v2/library/alpine/manifests/3.19", None), want);
        assert_eq!(
            manifest("/v2/library/alpine/manifests/3.19", Some("ns=docker.io")),
            want
        );
        assert_eq!(
            manifest("/v2/docker.io/library/alpine/manifests/3.19", None),
            want
        );
        assert_eq!(
            manifest("/v2/index.docker.io/alpine/manifests/3.19", None),
            want
        );
    }

    #[test]
    fn ns_and_host_prefix_pick_the_registry() {
        let want = ("ghcr.io".into(), "owner/app".into(), "1.0".into());
        assert_eq!(
            manifest("/v2/owner/app/manifests/1.0", Some("ns=ghcr.io")),
            want
        );
        assert_eq!(manifest("/v2/ghcr.io/owner/app/manifests/1.0", None), want);
        assert_eq!(
            manifest("/v2/ghcr.io/owner/app/manifests/1.0", Some("ns=ghcr.io")),
            want
        );
        assert_eq!(
            manifest("/v2/quay.io/org/x/manifests/latest", None),
            ("quay.io".into(), "org/x".into(), "latest".into())
        );
        assert_eq!(
            manifest("/v2/localhost:5000/x/manifests/latest", None),
            ("localhost:5000".into(), "x".into(), "latest".into())
        );
        // A host-like name on its own is a repository name, not a registry.
        assert_eq!(
            manifest("/v2/ghcr.io/manifests/1", None),
            ("docker.io".into(), "library/ghcr.io".into(), "1".into())
        );
    }

    #[test]
    fn blobs_tags_and_the_rest() {
        match route(&format!("/v2/alpine/blobs/{D}"), None).unwrap() {
            Route::Blob { repo, digest } => {
                assert_eq!(repo.name(), "library/alpine");
                assert_eq!(digest.to_string(), D);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            route("/v2/a/b/tags/list", Some("n=10&last=v1&ns=quay.io")).unwrap(),
            Route::Tags {
                repo: Repository::new("quay.io", "a/b").unwrap(),
                query: "n=10&last=v1".into()
            }
        );
        assert_eq!(route("/v2/", None), Ok(Route::Base));
        assert_eq!(route("/v2", None), Ok(Route::Base));
        assert_eq!(route("/metrics", None), Ok(Route::Metrics));
        assert_eq!(route("/healthz", None), Ok(Route::Healthz));
        assert_eq!(route("/v2/_catalog", None), Ok(Route::Unsupported));
        assert_eq!(
            route("/v2/alpine/blobs/uploads/", None),
            Ok(Route::Unsupported)
        );
        assert_eq!(
            route("/v2/alpine/blobs/uploads/abc", None),
            Ok(Route::Unsupported)
        );
        assert_eq!(route("/v1/x", None), Err(RouteError::NotFound));
        assert_eq!(
            route("/v2/alpine/whatever/x", None),
            Err(RouteError::NotFound)
        );
    }

    #[test]
    fn referrers_take_a_digest_and_a_media_type_filter() {
        let repo = Repository::new("docker.io", "library/alpine").unwrap();
        let digest = Digest::parse(D).unwrap();
        assert_eq!(
            route(&format!("/v2/alpine/referrers/{D}"), None).unwrap(),
            Route::Referrers {
                repo: repo.clone(),
                digest: digest.clone(),
                artifact_type: None
            }
        );
        let sig = "application/vnd.dev.cosign.artifact.sig.v1+json";
        for query in [
            format!("artifactType={sig}"),
            "artifactType=application%2Fvnd.dev.cosign.artifact.sig.v1%2Bjson&ns=docker.io".into(),
        ] {
            assert_eq!(
                route(&format!("/v2/alpine/referrers/{D}"), Some(&query)).unwrap(),
                Route::Referrers {
                    repo: repo.clone(),
                    digest: digest.clone(),
                    artifact_type: Some(sig.into())
                },
                "{query}"
            );
        }
        for query in [
            "artifactType=nonsense",
            "artifactType=a/b;x=1",
            "artifactType=a%2",
            "artifactType=a%ff/b",
            "artifactType=a%2Fb%2Fc",
        ] {
            assert!(
                matches!(
                    route(&format!("/v2/alpine/referrers/{D}"), Some(query)),
                    Err(RouteError::Invalid(ReferenceError::InvalidMediaType(_)))
                ),
                "{query}"
            );
        }
        for bad in ["latest", "sha256:abc", "md5:abc", "sha256-abc"] {
            assert!(
                matches!(
                    route(&format!("/v2/alpine/referrers/{bad}"), None),
                    Err(RouteError::Invalid(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn hostile_paths_are_refused() {
        for path in [
            "/v2/../etc/manifests/latest",
            "/v2/%2e%2e/x/manifests/latest",
            "/v2/a/%2F/b/manifests/latest",
            "/v2/Alpine/manifests/latest",
            "/v2//etc/passwd/manifests/latest",
            "/v2/a/./b/manifests/latest",
            "/v2/a\\b/manifests/latest",
            "/v2/alpine/manifests/..",
            "/v2/alpine/manifests/",
            "/v2/alpine/blobs/sha256:abc",
            "/v2/alpine/blobs/md5:abc",
            "/v2/alpine/blobs/../../x",
        ] {
            assert!(
                matches!(route(path, None), Err(RouteError::Invalid(_))),
                "{path}"
            );
        }
        let long = format!("/v2/{}/manifests/latest", "a".repeat(300));
        assert_eq!(
            route(&long, None),
            Err(RouteError::Invalid(ReferenceError::NameTooLong))
        );
        assert!(route("/v2/a/manifests/x", Some("ns=Bad_Host")).is_err());
        assert!(route("/v2/a/tags/list", Some("n=abc")).is_err());
        assert!(route("/v2/a/tags/list", Some("last=../x")).is_err());
    }
}
