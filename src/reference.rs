//! The distribution spec's names: repositories, tags and digests, parsed and
//! validated before anything else sees them. Owns the grammar only; which
//! registry a request goes to is decided by `registry::routes`.
//!
//! Grammar: <https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pulling-manifests>

use std::fmt;

use sha2::{Digest as _, Sha256};

/// Longest repository name distribution accepts (`NameTotalLengthMax`).
pub const NAME_MAX: usize = 255;
/// Longest tag the spec allows (`[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`).
pub const TAG_MAX: usize = 128;
/// The registry Docker Hub images default to.
pub const DOCKER_HUB: &str = "docker.io";

/// The OCI image index: a multi-platform image, and the form of every
/// referrers list (spec, "Listing Referrers").
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// Every manifest media type hoard understands: what it names in an
/// upstream `Accept` and what counts as a complete client `Accept`.
/// Spec: <https://github.com/opencontainers/distribution-spec/blob/main/spec.md#pulling-manifests>
pub const MANIFEST_MEDIA_TYPES: &[&str] = &[
    OCI_INDEX,
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// Why a name, tag or digest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("invalid repository name {0:?}")]
    InvalidName(String),
    #[error("repository name longer than {NAME_MAX} characters")]
    NameTooLong,
    #[error("invalid registry host {0:?}")]
    InvalidRegistry(String),
    #[error("invalid tag {0:?}")]
    InvalidTag(String),
    #[error("invalid digest {0:?}")]
    InvalidDigest(String),
    #[error("unsupported digest algorithm {0:?}")]
    UnsupportedAlgorithm(String),
    #[error("invalid media type {0:?}")]
    InvalidMediaType(String),
}

/// A sha256 content digest, the only algorithm hoard stores.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    bytes: [u8; 32],
}

impl Digest {
    /// Parses `sha256:<64 lowercase hex>`.
    pub fn parse(s: &str) -> Result<Digest, ReferenceError> {
        let Some((algorithm, encoded)) = s.split_once(':') else {
            return Err(ReferenceError::InvalidDigest(truncate(s)));
        };
        // Spec: algorithm `[a-z0-9]+([+._-][a-z0-9]+)*`; we only store sha256.
        if algorithm != "sha256" {
            let known = !algorithm.is_empty()
                && algorithm
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b));
            return Err(if known {
                ReferenceError::UnsupportedAlgorithm(truncate(algorithm))
            } else {
                ReferenceError::InvalidDigest(truncate(s))
            });
        }
        let valid_hex = encoded.len() == 64
            && encoded
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !valid_hex {
            return Err(ReferenceError::InvalidDigest(truncate(s)));
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(encoded, &mut bytes)
            .map_err(|_| ReferenceError::InvalidDigest(truncate(s)))?;
        Ok(Digest { bytes })
    }

    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest::from_hasher(Sha256::new_with_prefix(data))
    }

    /// Finishes a running hash into a digest.
    pub fn from_hasher(hasher: Sha256) -> Digest {
        Digest {
            bytes: hasher.finalize().into(),
        }
    }

    /// The raw 32 bytes, used as the sled key.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.bytes
    }

    /// Rebuilds a digest from a sled key.
    pub fn from_bytes(raw: &[u8]) -> Option<Digest> {
        Some(Digest {
            bytes: raw.try_into().ok()?,
        })
    }

    /// The 64 hex characters without the algorithm.
    pub fn hex(&self) -> String {
        // Into a buffer, not `hex::encode`: that builds the string a char
        // at a time, ~1% of the CPU on a cached 64 KiB blob (perf, issue 16:
        // every blob request names its file by this).
        let mut out = [0u8; 64];
        hex::encode_to_slice(self.bytes, &mut out).expect("64 bytes for 32");
        String::from_utf8(out.to_vec()).expect("hex is ASCII")
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

/// As its `sha256:<hex>` text, in index records and admin JSON.
impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// Parsed (and so validated) on the way in.
impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Digest, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Digest::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A tag or a digest, the `<reference>` of a manifest URL.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

impl Reference {
    /// A reference with a `:` is a digest; anything else must be a valid tag.
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        if s.contains(':') {
            return Digest::parse(s).map(Reference::Digest);
        }
        validate_tag(s)?;
        Ok(Reference::Tag(s.to_owned()))
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(tag) => f.write_str(tag),
            Reference::Digest(digest) => digest.fmt(f),
        }
    }
}

/// A repository on a given upstream registry, e.g. `docker.io` +
/// `library/alpine`. Docker Hub's implicit `library/` is added here so that
/// `/v2/alpine` and `/v2/library/alpine` share one cache entry.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Repository {
    registry: String,
    name: String,
}

impl Repository {
    /// Validates `name` against the spec grammar and normalizes Docker Hub's
    /// official images.
    pub fn new(registry: &str, name: &str) -> Result<Repository, ReferenceError> {
        validate_registry(registry)?;
        validate_name(name)?;
        let name = if registry == DOCKER_HUB && !name.contains('/') {
            format!("library/{name}")
        } else {
            name.to_owned()
        };
        if name.len() > NAME_MAX {
            return Err(ReferenceError::NameTooLong);
        }
        Ok(Repository {
            registry: registry.to_owned(),
            name,
        })
    }

    /// The registry host this repository lives on (`docker.io`, `ghcr.io`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The repository path on that registry (`library/alpine`).
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.name)
    }
}

/// A full image name as users write it: `alpine:3.19`,
/// `docker.io/library/alpine@sha256:...`, `ghcr.io/owner/app:1.0`. Without a
/// registry it is Docker Hub; without a tag or digest, `latest`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    pub repository: Repository,
    pub reference: Reference,
}

impl ImageRef {
    /// Parses an image name, Docker's way.
    pub fn parse(s: &str) -> Result<ImageRef, ReferenceError> {
        let (name, reference) = match s.split_once('@') {
            Some((name, digest)) => (name, Reference::Digest(Digest::parse(digest)?)),
            None => match s.rsplit_once(':') {
                // A ':' after the last '/' is a tag; before it, a port.
                Some((name, tag)) if !tag.contains('/') => (name, Reference::parse(tag)?),
                _ => (s, Reference::Tag("latest".into())),
            },
        };
        let (registry, path) = match name.split_once('/') {
            Some((first, rest)) if looks_like_host(first) => (first, rest),
            _ => (DOCKER_HUB, name),
        };
        Ok(ImageRef {
            repository: Repository::new(registry, path)?,
            reference,
        })
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reference {
            Reference::Tag(tag) => write!(f, "{}:{tag}", self.repository),
            Reference::Digest(digest) => write!(f, "{}@{digest}", self.repository),
        }
    }
}

/// Spec: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
pub fn validate_name(name: &str) -> Result<(), ReferenceError> {
    if name.len() > NAME_MAX {
        return Err(ReferenceError::NameTooLong);
    }
    let valid = !name.is_empty() && name.split('/').all(valid_component);
    if valid {
        Ok(())
    } else {
        Err(ReferenceError::InvalidName(truncate(name)))
    }
}

fn valid_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    // Between alphanumeric runs: exactly `.`, `_`, `__`, or one or more `-`.
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &component[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// A registry host as it appears in an image name: lowercase DNS labels, an
/// optional port. `localhost` counts.
pub fn validate_registry(host: &str) -> Result<(), ReferenceError> {
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    };
    let port_ok =
        port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if host.len() <= 253 && port_ok && name.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(ReferenceError::InvalidRegistry(truncate(host)))
    }
}

/// Docker's rule for "is the first path component a registry host": it has a
/// `.` or a `:`, or it is `localhost`.
pub fn looks_like_host(component: &str) -> bool {
    component.contains('.') || component.contains(':') || component == "localhost"
}

fn validate_tag(tag: &str) -> Result<(), ReferenceError> {
    let bytes = tag.as_bytes();
    let first_ok = bytes
        .first()
        .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_');
    let rest_ok = bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(b));
    if first_ok && rest_ok && bytes.len() <= TAG_MAX {
        Ok(())
    } else {
        Err(ReferenceError::InvalidTag(truncate(tag)))
    }
}

/// Longest media type accepted: RFC 6838 allows 127 characters on each
/// side of the `/`.
pub const MEDIA_TYPE_MAX: usize = 255;

/// Checks a media type (`type/subtype`, no parameters), as a referrers
/// `artifactType` filter names one. Grammar: RFC 6838 section 4.2
/// (`restricted-name`), the one the image spec's descriptors point to:
/// <https://github.com/opencontainers/image-spec/blob/main/descriptor.md#properties>
pub fn validate_media_type(media_type: &str) -> Result<(), ReferenceError> {
    // restricted-name = first alnum, then up to 126 of alnum and
    // `!#$&-^_.+`.
    let restricted_name = |part: &str| {
        let mut bytes = part.bytes();
        part.len() <= 127
            && bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
            && bytes.all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    let valid = media_type.len() <= MEDIA_TYPE_MAX
        && media_type
            .split_once('/')
            .is_some_and(|(kind, sub)| restricted_name(kind) && restricted_name(sub));
    if valid {
        Ok(())
    } else {
        Err(ReferenceError::InvalidMediaType(truncate(media_type)))
    }
}

/// Error messages echo the input, bounded so a hostile request cannot
/// inflate logs.
fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn digest_round_trips_and_matches_sha256() {
        let d = Digest::parse(&format!("sha256:{HEX}")).unwrap();
        assert_eq!(d.to_string(), format!("sha256:{HEX}"));
        assert_eq!(Digest::of(b""), d);
        assert_eq!(Digest::from_bytes(d.as_bytes()), Some(d));
    }

    #[test]
    fn media_types_follow_rfc_6838() {
        for good in [
            "application/vnd.dev.cosign.artifact.sig.v1+json",
            "application/spdx+json",
            "application/vnd.cncf.notary.signature",
            "text/plain",
        ] {
            assert_eq!(validate_media_type(good), Ok(()), "{good}");
        }
        let long = format!("application/{}", "a".repeat(128));
        for bad in [
            "",
            "application",
            "application/",
            "/json",
            "a/b/c",
            "application/json; charset=utf-8",
            "application/j son",
            "application/<script>",
            "-x/y",
            long.as_str(),
        ] {
            assert!(validate_media_type(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn digest_rejects_bad_forms() {
        for bad in [
            "",
            "sha256",
            "sha256:",
            "sha256:abc",
            &format!("sha256:{}", HEX.to_uppercase()),
            &format!("sha256:{HEX}0"),
            &format!("sha256:{}g", &HEX[..63]),
            &format!("SHA256:{HEX}"),
            "../../etc/passwd",
        ] {
            assert!(
                matches!(Digest::parse(bad), Err(ReferenceError::InvalidDigest(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            Digest::parse(&format!("sha512:{HEX}{HEX}")),
            Err(ReferenceError::UnsupportedAlgorithm(_))
        ));
    }

    #[test]
    fn names_follow_the_spec_grammar() {
        for good in [
            "alpine",
            "library/alpine",
            "a/b/c",
            "my-app",
            "a__b",
            "a.b",
            "a---b",
            "0",
        ] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in [
            "", "Alpine", "/alpine", "alpine/", "a//b", "..", "a/../b", "a/./b", "-a", "a-",
            "a___b", "a..b", "%2e%2e", "a b", "a\0b", "é",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        let long = "a".repeat(NAME_MAX + 1);
        assert_eq!(validate_name(&long), Err(ReferenceError::NameTooLong));
    }

    #[test]
    fn docker_hub_official_images_get_library_prefix() {
        let short = Repository::new("docker.io", "alpine").unwrap();
        let long = Repository::new("docker.io", "library/alpine").unwrap();
        assert_eq!(short, long);
        assert_eq!(short.to_string(), "docker.io/library/alpine");
        let ghcr = Repository::new("ghcr.io", "alpine").unwrap();
        assert_eq!(ghcr.name(), "alpine");
    }

    #[test]
    fn references_parse_as_tag_or_digest() {
        assert_eq!(
            Reference::parse("3.19").unwrap(),
            Reference::Tag("3.19".into())
        );
        assert_eq!(Reference::parse("_x").unwrap(), Reference::Tag("_x".into()));
        assert!(matches!(
            Reference::parse(&format!("sha256:{HEX}")).unwrap(),
            Reference::Digest(_)
        ));
        for bad in ["", ".x", "-x", "a/b", &"t".repeat(TAG_MAX + 1), "a:b"] {
            assert!(Reference::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn image_names_parse_the_docker_way() {
        let cases = [
            ("alpine", "docker.io/library/alpine:latest"),
            ("alpine:3.19", "docker.io/library/alpine:3.19"),
            ("ghcr.io/owner/app:1.0", "ghcr.io/owner/app:1.0"),
            ("localhost:5000/app", "localhost:5000/app:latest"),
            ("localhost:5000/app:v2", "localhost:5000/app:v2"),
            (
                &format!("quay.io/a/b@sha256:{HEX}"),
                &format!("quay.io/a/b@sha256:{HEX}"),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(ImageRef::parse(input).unwrap().to_string(), want, "{input}");
        }
        assert!(ImageRef::parse("Alpine").is_err());
        assert!(ImageRef::parse("alpine@md5:x").is_err());
    }

    #[test]
    fn registry_hosts() {
        for good in [
            "docker.io",
            "ghcr.io",
            "localhost",
            "127.0.0.1:5000",
            "registry-1.docker.io",
        ] {
            assert!(validate_registry(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Docker.io",
            "a..b",
            "host:",
            "host:123456",
            "-a.io",
            "a_b.io",
        ] {
            assert!(validate_registry(bad).is_err(), "{bad:?}");
        }
        assert!(
            looks_like_host("ghcr.io")
                && looks_like_host("localhost")
                && !looks_like_host("library")
        );
    }
}
