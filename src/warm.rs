//! `hoard warm`: pre-fetches images through a running mirror, the way a
//! client would pull them (manifest, the wanted platforms of an index,
//! configs, layers), so the first real pull is a hit. Talks HTTP only, so it
//! works against any hoard; the daemon uses it on itself for the `warm`
//! list in its config.

use std::collections::HashSet;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::Deserialize;

use crate::reference::MANIFEST_MEDIA_TYPES;
use crate::reference::{Digest, ImageRef};

/// Why warming an image failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("request to {url} failed: {message}")]
    Http { url: String, message: String },
    #[error("{url} answered {status}")]
    Status { url: String, status: u16 },
    #[error("manifest {digest} is not valid: {message}")]
    BadManifest { digest: String, message: String },
}

/// What a warm run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub manifests: usize,
    pub blobs: usize,
    /// Blobs the mirror already had.
    pub cached: usize,
    /// Bytes that came from upstream through the mirror.
    pub fetched_bytes: u64,
}

/// `linux/amd64`-style platform filters; empty means all platforms.
pub fn parse_platforms(list: &str) -> Vec<(String, String)> {
    list.split(',')
        .filter_map(|p| p.trim().split_once('/'))
        .map(|(os, arch)| (os.to_owned(), arch.to_owned()))
        .collect()
}

#[derive(Deserialize)]
struct Descriptor {
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    os: String,
    architecture: String,
}

#[derive(Deserialize)]
struct ManifestBody {
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

/// Pulls `image` through the mirror at `base` (e.g. `http://127.0.0.1:5000`).
pub async fn warm(
    client: &reqwest::Client,
    base: &str,
    image: &ImageRef,
    platforms: &[(String, String)],
    progress: Option<&MultiProgress>,
) -> Result<Report, Error> {
    let repo = format!(
        "{}/{}",
        image.repository.registry(),
        image.repository.name()
    );
    let prefix = format!("{}/v2/{repo}", base.trim_end_matches('/'));
    let mut report = Report::default();
    let mut manifests = vec![image.reference.to_string()];
    let mut blobs: Vec<String> = Vec::new();
    while let Some(reference) = manifests.pop() {
        let url = format!("{prefix}/manifests/{reference}");
        let response = send(
            client
                .get(&url)
                .header("accept", MANIFEST_MEDIA_TYPES.join(", ")),
            &url,
        )
        .await?;
        let digest = response
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let bytes = response.bytes().await.map_err(|e| http_error(&url, e))?;
        report.manifests += 1;
        let body: ManifestBody =
            serde_json::from_slice(&bytes).map_err(|e| Error::BadManifest {
                digest: digest.clone(),
                message: e.to_string(),
            })?;
        for child in body.manifests {
            let wanted = platforms.is_empty()
                || child.platform.as_ref().is_some_and(|p| {
                    platforms
                        .iter()
                        .any(|(os, arch)| *os == p.os && *arch == p.architecture)
                });
            if wanted {
                manifests.push(child.digest);
            }
        }
        blobs.extend(body.config.into_iter().chain(body.layers).map(|d| d.digest));
    }
    let mut seen = HashSet::new();
    for digest in blobs {
        if !seen.insert(digest.clone()) || Digest::parse(&digest).is_err() {
            continue;
        }
        let url = format!("{prefix}/blobs/{digest}");
        let mut response = send(client.get(&url), &url).await?;
        let hit = response
            .headers()
            .get("x-hoard-cache")
            .is_some_and(|v| v.as_bytes() == b"hit");
        let bar = progress.map(|p| {
            let bar = p.add(ProgressBar::new(response.content_length().unwrap_or(0)));
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg:24} {bar:30} {bytes:>10}/{total_bytes:10} {bytes_per_sec}",
                )
                .expect("valid template"),
            );
            bar.set_message(format!("{}…", &digest[..19.min(digest.len())]));
            bar
        });
        let mut bytes = 0u64;
        while let Some(chunk) = response.chunk().await.map_err(|e| http_error(&url, e))? {
            bytes += chunk.len() as u64;
            if let Some(bar) = &bar {
                bar.inc(chunk.len() as u64);
            }
        }
        if let Some(bar) = bar {
            bar.finish_with_message(format!(
                "{} {}",
                &digest[7..19.min(digest.len())],
                if hit { "cached" } else { "fetched" }
            ));
        }
        report.blobs += 1;
        if hit {
            report.cached += 1;
        } else {
            report.fetched_bytes += bytes;
        }
    }
    Ok(report)
}

async fn send(request: reqwest::RequestBuilder, url: &str) -> Result<reqwest::Response, Error> {
    let response = request.send().await.map_err(|e| http_error(url, e))?;
    if !response.status().is_success() {
        return Err(Error::Status {
            url: url.to_owned(),
            status: response.status().as_u16(),
        });
    }
    Ok(response)
}

fn http_error(url: &str, e: reqwest::Error) -> Error {
    Error::Http {
        url: url.to_owned(),
        // The whole chain ("connection refused", "dns error"), not only
        // reqwest's "error sending request".
        message: crate::upstream::describe_error(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_lists() {
        assert_eq!(
            parse_platforms("linux/amd64, linux/arm64"),
            vec![
                ("linux".into(), "amd64".into()),
                ("linux".into(), "arm64".into())
            ]
        );
        assert!(parse_platforms("").is_empty());
    }
}
