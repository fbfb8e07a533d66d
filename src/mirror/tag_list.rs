//! Tag lists (`/v2/<name>/tags/list`): proxied from upstream with a short
//! cache, since tags move; from the index when upstream is unavailable, so a
//! client can still see what is cached; a 404 upstream is a 404 here.

use std::time::Duration;

use bytes::Bytes;
use tracing::warn;

use super::error::{Error, Result};
use super::shared::Shared;
use super::Outcome;
use crate::reference::Repository;
use crate::upstream;

/// How long a proxied tag list is reused.
const TTL: Duration = Duration::from_secs(30);

/// A tag list page.
#[derive(Debug, Clone)]
pub struct TagList {
    pub bytes: Bytes,
    pub content_type: String,
    /// Upstream's `Link` to the next page, if any.
    pub link: Option<String>,
}

/// Pages recently proxied, by `repository?query`.
pub(super) fn cache() -> moka::sync::Cache<String, TagList> {
    moka::sync::Cache::builder()
        .max_capacity(1024)
        .time_to_live(TTL)
        .build()
}

/// A tag list page of `repo` (`query` is the client's `n`/`last`).
pub(super) async fn lookup(
    shared: &Shared,
    repo: &Repository,
    query: &str,
) -> Result<(TagList, Outcome)> {
    let key = format!("{repo}?{query}");
    if let Some(list) = shared.tag_lists.get(&key) {
        return Ok((list, Outcome::Hit));
    }
    match shared.upstream.get_tags(repo, query).await {
        Ok(response) => {
            let list = TagList {
                bytes: response.bytes,
                content_type: response
                    .content_type
                    .unwrap_or_else(|| "application/json".into()),
                link: response.link,
            };
            shared.tag_lists.insert(key, list.clone());
            Ok((list, Outcome::Miss))
        }
        Err(upstream::Error::NotFound { .. }) => Err(Error::NameUnknown(repo.clone())),
        Err(e) if e.is_unavailable() => {
            let tags = shared.store.tags_of(repo)?;
            if tags.is_empty() {
                return Err(e.into());
            }
            warn!(repository = %repo, error = %e, "upstream unavailable, listing cached tags");
            let body = serde_json::json!({ "name": repo.name(), "tags": tags });
            let list = TagList {
                bytes: serde_json::to_vec(&body).expect("json").into(),
                content_type: "application/json".into(),
                link: None,
            };
            Ok((list, Outcome::Stale))
        }
        Err(e) => Err(e.into()),
    }
}
