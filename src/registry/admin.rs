//! The admin API, on its own listener and only with the configured bearer
//! token: list cached images, pin and unpin, evict one image, run gc.
//!
//! - `GET /admin/images[?registry=HOST]`
//! - `GET /admin/pins`, `POST /admin/pins?image=NAME`, `DELETE /admin/pins?image=NAME`
//! - `POST /admin/evict?image=NAME`
//! - `POST /admin/gc`
//! - `POST /admin/verify`: re-hash everything, quarantine mismatches

use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use serde_json::json;

use super::body::{AccessLog, Body};
use super::error::{ApiError, Code};
use super::handlers::{error, App};
use crate::reference::ImageRef;

/// Answers one admin request.
pub async fn handle<B>(app: &App, request: Request<B>) -> Response<Body> {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let response = if authorized(app, request.headers()) {
        route(app, &method, &path, &query).await
    } else {
        let mut r = error(&ApiError::new(Code::Unauthorized, "admin token required"));
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"hoard-admin\""),
        );
        r
    };
    let log = AccessLog::new(
        method,
        path,
        query,
        response.status().as_u16(),
        "admin",
        started,
    );
    response.map(|body| body.logged(log))
}

/// Bearer token check, in time independent of where the first difference is.
fn authorized(app: &App, headers: &http::HeaderMap) -> bool {
    let Some(expected) = app.admin_token.as_deref() else {
        return false;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn route(app: &App, method: &Method, path: &str, query: &str) -> Response<Body> {
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| percent_decode(v))
    };
    let image = || -> Result<ImageRef, ApiError> {
        let name = param("image")
            .ok_or_else(|| ApiError::new(Code::NameInvalid, "image parameter required"))?;
        ImageRef::parse(&name).map_err(|e| ApiError::from(&e))
    };
    let result = match (method.as_str(), path) {
        ("GET", "/admin/images") => app
            .mirror
            .images(param("registry"))
            .await
            .map(|images| json!({ "images": images }))
            .map_err(|e| ApiError::from(&e)),
        ("GET", "/admin/pins") => Ok(json!({ "pins": app.mirror.pins() })),
        ("POST", "/admin/pins") => match image() {
            Ok(image) => app
                .mirror
                .pin(&image)
                .await
                .map(|added| json!({ "image": image.to_string(), "added": added }))
                .map_err(|e| ApiError::from(&e)),
            Err(e) => Err(e),
        },
        ("DELETE", "/admin/pins") => match image() {
            Ok(image) => app
                .mirror
                .unpin(&image)
                .await
                .map(|removed| json!({ "image": image.to_string(), "removed": removed }))
                .map_err(|e| ApiError::from(&e)),
            Err(e) => Err(e),
        },
        ("POST", "/admin/evict") => match image() {
            Ok(image) => app
                .mirror
                .evict_image(&image)
                .await
                .map(|e| json!({ "image": image.to_string(), "blobs": e.blobs, "bytes": e.bytes }))
                .map_err(|e| ApiError::from(&e)),
            Err(e) => Err(e),
        },
        ("POST", "/admin/gc") => app
            .mirror
            .gc()
            .await
            .map(|r| json!({ "blobs": r.blobs, "bytes": r.bytes }))
            .map_err(|e| ApiError::from(&e)),
        ("POST", "/admin/verify") => app
            .mirror
            .verify()
            .await
            .map(|r| {
                let corrupt: Vec<String> = r.quarantined.iter().map(ToString::to_string).collect();
                json!({ "checked": r.checked, "bytes": r.bytes, "quarantined": corrupt })
            })
            .map_err(|e| ApiError::from(&e)),
        _ => Err(ApiError::new(Code::NotFound, "no such admin endpoint")),
    };
    match result {
        Ok(value) => {
            let body = serde_json::to_vec(&value).expect("json");
            let mut r = Response::new(Body::full(body));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            *r.status_mut() = StatusCode::OK;
            r
        }
        Err(e) => error(&e),
    }
}

/// `%XX` escapes in a query value (image names carry `/`, `:` and `@`).
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            percent_decode("docker.io%2Flibrary%2Falpine%3A3"),
            "docker.io/library/alpine:3"
        );
        assert_eq!(percent_decode("alpine:3"), "alpine:3");
        assert_eq!(percent_decode("bad%zz%"), "bad%zz%");
    }
}
