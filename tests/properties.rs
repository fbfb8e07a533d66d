//! Property tests of the parsers that face hostile input: reference and
//! name grammar, digests, request routing, `Range`, `WWW-Authenticate` and
//! the manifest reader. Arbitrary input must never panic, and whatever is
//! accepted must be safe to use as a path. `scripts/fuzz.sh` runs the same
//! properties with many more cases (PROPTEST_CASES).

use bytes::Bytes;
use hoard::mirror::Manifest;
use hoard::ranges::Ranges;
use hoard::reference::{Digest, Reference, Repository};
use hoard::registry::{route, Route};
use hoard::upstream::Challenge;
use proptest::prelude::*;

/// A repository name hoard accepted is safe as a path below the store:
/// no traversal, no encoded or odd characters, no empty segment.
fn safe_name(repo: &Repository) -> bool {
    let name = repo.name();
    !name.is_empty()
        && name.len() <= 255
        && name.split('/').all(|segment| {
            !segment.is_empty()
                && segment != "."
                && segment != ".."
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        })
}

/// Path-ish strings: mostly the characters that matter here.
fn pathish() -> impl Strategy<Value = String> {
    prop_oneof![
        ".*",
        "[a-z0-9./%_:@~\\\\-]{0,80}",
        "(/|\\.\\.|%2e|%2f|%00|sha256:|[a-f0-9]{8}|v2|manifests|blobs|tags|list|library){0,12}",
    ]
}

proptest! {
    #[test]
    fn digest_parse_never_panics_and_accepts_only_sha256_hex(s in ".*") {
        if let Ok(d) = Digest::parse(&s) {
            prop_assert_eq!(d.to_string(), s.clone());
            prop_assert!(d.hex().len() == 64 && d.hex().bytes().all(|b| b.is_ascii_hexdigit()));
        }
    }

    #[test]
    fn valid_digests_round_trip(hex in "[0-9a-f]{64}") {
        let text = format!("sha256:{hex}");
        prop_assert_eq!(Digest::parse(&text).unwrap().to_string(), text);
    }

    #[test]
    fn accepted_names_are_safe_paths(name in pathish(), registry in "[a-z0-9.:-]{0,20}") {
        if let Ok(repo) = Repository::new(&registry, &name) {
            prop_assert!(safe_name(&repo), "{:?}", repo);
        }
        let _ = Reference::parse(&name);
    }

    #[test]
    fn grammar_names_are_accepted(name in "[a-z0-9]{1,8}([._-][a-z0-9]{1,8}){0,2}(/[a-z0-9]{1,8}([._-][a-z0-9]{1,8}){0,2}){0,3}") {
        let repo = Repository::new("ghcr.io", &name).unwrap();
        prop_assert_eq!(repo.name(), name.as_str());
    }

    #[test]
    fn routing_never_panics_and_routed_names_are_safe(path in pathish(), query in proptest::option::of(".{0,40}")) {
        let path = format!("/v2/{path}");
        match route(&path, query.as_deref()) {
            Ok(Route::Manifest { repo, .. }) | Ok(Route::Blob { repo, .. }) | Ok(Route::Tags { repo, .. }) => {
                prop_assert!(safe_name(&repo), "{} -> {:?}", path, repo);
            }
            _ => {}
        }
    }

    #[test]
    fn ranges_never_panic_and_stay_inside_the_blob(header in "bytes=[0-9, -]{0,60}|.{0,60}", len in 0u64..u64::MAX) {
        if let Ok(Some(parts)) = Ranges::parse(&header).map(|r| r.map(|r| r.resolve(len))).map(|r| r.and_then(Result::ok)) {
            prop_assert!(!parts.is_empty() && parts.len() <= hoard::ranges::MAX_RANGES);
            for (start, end) in &parts {
                prop_assert!(start < end && *end <= len, "{} of {} -> {}..{}", header, len, start, end);
            }
            if parts.len() > 1 {
                prop_assert!(parts.iter().map(|(s, e)| u128::from(e - s)).sum::<u128>() <= u128::from(len));
            }
        }
    }

    #[test]
    fn well_formed_ranges_parse(len in 1u64..1 << 40, a in 0u64..1 << 40, b in 0u64..1 << 40) {
        let (first, last) = (a.min(b) % len, a.max(b));
        let header = format!("bytes={first}-{last}");
        let parts = Ranges::parse(&header).map(|r| r.expect("bytes").resolve(len));
        prop_assert_eq!(parts, Ok(Ok(vec![(first, last.min(len - 1) + 1)])));
    }

    #[test]
    fn www_authenticate_never_panics(header in ".{0,200}") {
        let _ = Challenge::parse(&header);
    }

    #[test]
    fn bearer_challenges_round_trip(realm in "https://[a-z]{1,10}\\.example/[a-z]{0,8}", service in "[a-z.]{1,20}", scope in "repository:[a-z/]{1,20}:pull") {
        let header = format!(r#"Bearer realm="{realm}",service="{service}",scope="{scope}""#);
        match Challenge::parse(&header) {
            Some(Challenge::Bearer { realm: r, service: s, scope: sc }) => {
                prop_assert_eq!(r, realm);
                prop_assert_eq!(s, Some(service));
                prop_assert_eq!(sc, Some(scope));
            }
            other => prop_assert!(false, "{:?}", other),
        }
    }

    #[test]
    fn the_manifest_reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512), json in "\\{\"(config|layers|manifests)\": ?(\\[|\\{)[^\\]]{0,80}(\\]|\\})\\}") {
        for body in [bytes, json.into_bytes()] {
            let manifest = Manifest {
                digest: Digest::parse(&format!("sha256:{}", "0".repeat(64))).unwrap(),
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                bytes: Bytes::from(body),
            };
            for digest in manifest.references() {
                prop_assert!(digest.hex().len() == 64);
            }
        }
    }
}
