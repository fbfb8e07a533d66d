//! The admin API's client, for `hoard ls`, `pin` and `unpin` against a
//! running daemon. Errors name their cause (a refused connection, a wrong
//! token), never the token.

use serde::de::DeserializeOwned;

use super::{Images, Pinned, Unpinned, IMAGES, PINS};
use crate::mirror::catalog::CachedImage;
use crate::reference::ImageRef;

/// Why an admin call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the admin API at {base}: {cause}")]
    Unreachable { base: String, cause: String },
    #[error("the admin API at {base} answered {status}: {message}")]
    Refused {
        base: String,
        status: u16,
        message: String,
    },
    #[error("the admin API at {base} answered something other than its JSON: {cause}")]
    Garbled { base: String, cause: String },
}

/// A running daemon's admin API.
pub struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Client {
    /// The admin API at `base` (e.g. `http://127.0.0.1:5001`), with `token`.
    pub fn new(base: &str, token: &str) -> Client {
        Client {
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    /// Cached images, optionally of one registry.
    pub async fn images(&self, registry: Option<&str>) -> Result<Vec<CachedImage>, ClientError> {
        let path = match registry {
            Some(r) => format!("{IMAGES}{}", super::query("registry", r)),
            None => IMAGES.to_owned(),
        };
        let images: Images = self.call(reqwest::Method::GET, &path).await?;
        Ok(images.images)
    }

    /// Pins `image`; false if it was pinned already.
    pub async fn pin(&self, image: &ImageRef) -> Result<bool, ClientError> {
        let path = format!("{PINS}{}", super::query("image", &image.to_string()));
        let pinned: Pinned = self.call(reqwest::Method::POST, &path).await?;
        Ok(pinned.added)
    }

    /// Removes a run-time pin; false if there was none.
    pub async fn unpin(&self, image: &ImageRef) -> Result<bool, ClientError> {
        let path = format!("{PINS}{}", super::query("image", &image.to_string()));
        let unpinned: Unpinned = self.call(reqwest::Method::DELETE, &path).await?;
        Ok(unpinned.removed)
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> Result<T, ClientError> {
        let response = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| ClientError::Unreachable {
                base: self.base.clone(),
                cause: crate::mirror::describe_error(e),
            })?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| ClientError::Unreachable {
                base: self.base.clone(),
                cause: crate::mirror::describe_error(e),
            })?;
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["errors"][0]["message"].as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect());
            return Err(ClientError::Refused {
                base: self.base.clone(),
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&body).map_err(|e| ClientError::Garbled {
            base: self.base.clone(),
            cause: e.to_string(),
        })
    }
}
