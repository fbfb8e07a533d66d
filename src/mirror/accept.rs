//! Manifest content negotiation: the media types a client accepts, from
//! every `Accept` header line it sent (dockerd sends six separate lines).

use crate::reference::MANIFEST_MEDIA_TYPES;

/// The media types a client accepts for manifests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Accept {
    types: Vec<String>,
    wildcard: bool,
}

impl Accept {
    /// Parses all header values: comma-separated types, parameters dropped.
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a str>) -> Accept {
        let mut accept = Accept::default();
        for value in values {
            for item in value.split(',') {
                let media_type = item.split(';').next().unwrap_or("").trim();
                if media_type.is_empty() {
                    continue;
                }
                if media_type == "*/*" {
                    accept.wildcard = true;
                }
                if !accept.types.iter().any(|t| t == media_type) {
                    accept.types.push(media_type.to_owned());
                }
            }
        }
        accept
    }

    /// Whether a manifest of `media_type` may be served to this client.
    pub fn allows(&self, media_type: &str) -> bool {
        self.types.is_empty() || self.wildcard || self.types.iter().any(|t| t == media_type)
    }

    /// Whether this client accepts every manifest type hoard knows, so that
    /// what upstream answers it is what any client would get (and may be
    /// recorded as what the tag points to).
    pub fn is_complete(&self) -> bool {
        self.types.is_empty() || MANIFEST_MEDIA_TYPES.iter().all(|t| self.allows(t))
    }

    /// The `Accept` value sent upstream: everything the client listed (one
    /// joined list, so no line is lost). A client that lists nothing or
    /// `*/*` gets every known manifest type named explicitly first:
    /// distribution answers 404 for an OCI manifest unless its type is named.
    pub fn upstream_header(&self) -> String {
        let mut types: Vec<&str> = Vec::new();
        if self.types.is_empty() || self.wildcard {
            types.extend(MANIFEST_MEDIA_TYPES);
        }
        for t in &self.types {
            if !types.contains(&t.as_str()) {
                types.push(t);
            }
        }
        types.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_header_line_counts() {
        let a = Accept::parse([
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.index.v1+json",
            "application/vnd.oci.image.manifest.v1+json; q=0.5",
        ]);
        assert!(a.is_complete());
        assert_eq!(a.upstream_header().matches(", ").count(), 3);
        assert!(a.allows("application/vnd.oci.image.manifest.v1+json"));
        assert!(!a.allows("application/vnd.docker.distribution.manifest.v1+prettyjws"));
    }

    #[test]
    fn empty_and_wildcard_accept_everything() {
        let empty = Accept::parse([]);
        assert!(empty.is_complete() && empty.allows("x/y"));
        assert_eq!(empty.upstream_header(), MANIFEST_MEDIA_TYPES.join(", "));
        let star = Accept::parse(["application/vnd.oci.image.manifest.v1+json, */*"]);
        assert!(star.is_complete() && star.allows("x/y"));
        let header = star.upstream_header();
        assert!(
            MANIFEST_MEDIA_TYPES.iter().all(|t| header.contains(t)),
            "{header}"
        );
        assert!(header.ends_with("*/*"));
    }

    #[test]
    fn partial_accept_is_not_complete() {
        let a = Accept::parse(["application/vnd.docker.distribution.manifest.v2+json"]);
        assert!(!a.is_complete());
        assert!(!a.allows("application/vnd.oci.image.index.v1+json"));
    }
}
