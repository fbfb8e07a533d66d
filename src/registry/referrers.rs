//! The referrers route's answer (`GET /v2/<name>/referrers/<digest>`, OCI
//! distribution spec 1.1): one mirror call, then the headers the spec asks
//! for. No policy (that is `mirror::referrers`) and no I/O of its own.
//! Spec: <https://github.com/opencontainers/distribution-spec/blob/main/spec.md#listing-referrers>

use http::header;
use http::Response;

use super::app::App;
use super::body::Body;
use super::error::{failed, ApiError, Code};
use crate::mirror::Outcome;
use crate::reference::{Digest, Repository, OCI_INDEX};

/// Answers a referrers request; `head` sends the headers only.
pub(super) async fn referrers(
    app: &App,
    repo: &Repository,
    subject: &Digest,
    artifact_type: Option<&str>,
    head: bool,
) -> Result<(Response<Body>, Option<Outcome>), ApiError> {
    let (list, outcome) = app
        .mirror
        .referrers(repo, subject, artifact_type)
        .await
        .map_err(|e| failed(&e))?;
    // Spec: "The `Content-Type` header MUST be set to
    // `application/vnd.oci.image.index.v1+json`". The list is whole (hoard
    // merged upstream's pages), so no `Link` is sent.
    let mut response = Response::builder()
        .header(header::CONTENT_TYPE, OCI_INDEX)
        .header(header::CONTENT_LENGTH, list.bytes.len());
    if list.filtered {
        // Spec: "If filtering is requested and applied, the response MUST
        // include a header `OCI-Filters-Applied: artifactType`".
        response = response.header("oci-filters-applied", "artifactType");
    }
    let response = response
        .body(Body::unless_head(list.bytes, head))
        .map_err(|_| ApiError::new(Code::Unknown, "invalid referrers response"))?;
    Ok((response, Some(outcome)))
}
