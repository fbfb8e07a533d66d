//! A manifest as served: exact upstream bytes, media type, digest; and the
//! digests it references, which upstream thereby vouches its repository has.

use bytes::Bytes;
use serde::Deserialize;

use crate::reference::Digest;

/// A verified manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub digest: Digest,
    pub media_type: String,
    pub bytes: Bytes,
}

impl Manifest {
    /// Config, layer and child-manifest digests named by this manifest.
    /// Unparseable manifests reference nothing.
    pub fn references(&self) -> Vec<Digest> {
        #[derive(Deserialize)]
        struct Descriptor {
            digest: String,
        }
        #[derive(Deserialize)]
        struct Body {
            config: Option<Descriptor>,
            #[serde(default)]
            layers: Vec<Descriptor>,
            #[serde(default)]
            manifests: Vec<Descriptor>,
        }
        let Ok(body) = serde_json::from_slice::<Body>(&self.bytes) else {
            return Vec::new();
        };
        body.config
            .into_iter()
            .chain(body.layers)
            .chain(body.manifests)
            .filter_map(|d| Digest::parse(&d.digest).ok())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_cover_config_layers_and_children() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        let c = Digest::of(b"c");
        let json = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{a}"}},"layers":[{{"digest":"{b}"}},{{"digest":"bogus"}}],"manifests":[{{"digest":"{c}"}}]}}"#
        );
        let m = Manifest {
            digest: Digest::of(json.as_bytes()),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            bytes: json.into(),
        };
        assert_eq!(m.references(), vec![a, b, c]);
        let junk = Manifest {
            bytes: Bytes::from_static(b"not json"),
            ..m
        };
        assert!(junk.references().is_empty());
    }
}
