//! The admin API's server: checks the bearer token, runs one mirror
//! operation, answers with the protocol's JSON. Failures go through
//! `registry::error` like the registry API's, so they are logged the same
//! way.

use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response};
use serde::Serialize;

use super::{
    percent_decode, Collected, EvictedImage, Images, Pinned, Pins, Unpinned, Verified, EVICT, GC,
    IMAGES, PINS, VERIFY,
};
use crate::reference::ImageRef;
use crate::registry::app::App;
use crate::registry::body::{json_response, AccessLog, Body};
use crate::registry::error::{failed, response as error, ApiError, Code};

/// Answers one admin request.
pub async fn handle<B>(app: &App, request: Request<B>) -> Response<Body> {
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let response = if authorized(app, request.headers()) {
        route(app, &method, &path, &query)
            .await
            .unwrap_or_else(|e| error(&e))
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
        None,
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

async fn route(
    app: &App,
    method: &Method,
    path: &str,
    query: &str,
) -> Result<Response<Body>, ApiError> {
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
    let mirror = &app.mirror;
    match (method.as_str(), path) {
        ("GET", IMAGES) => {
            let images = mirror.images(param("registry")).await;
            json(&Images {
                images: images.map_err(|e| failed(&e))?,
            })
        }
        ("GET", PINS) => json(&Pins {
            pins: mirror.pins(),
        }),
        ("POST", PINS) => {
            let image = image()?;
            let added = mirror.pin(&image).await.map_err(|e| failed(&e))?;
            json(&Pinned {
                image: image.to_string(),
                added,
            })
        }
        ("DELETE", PINS) => {
            let image = image()?;
            let removed = mirror.unpin(&image).await.map_err(|e| failed(&e))?;
            json(&Unpinned {
                image: image.to_string(),
                removed,
            })
        }
        ("POST", EVICT) => {
            let image = image()?;
            let evicted = mirror.evict_image(&image).await.map_err(|e| failed(&e))?;
            json(&EvictedImage {
                image: image.to_string(),
                blobs: evicted.blobs,
                bytes: evicted.bytes,
            })
        }
        ("POST", GC) => {
            let report = mirror.gc().await.map_err(|e| failed(&e))?;
            json(&Collected {
                blobs: report.blobs,
                bytes: report.bytes,
            })
        }
        ("POST", VERIFY) => {
            let report = mirror.verify().await.map_err(|e| failed(&e))?;
            json(&Verified {
                checked: report.checked,
                bytes: report.bytes,
                quarantined: report.quarantined.iter().map(ToString::to_string).collect(),
            })
        }
        _ => Err(ApiError::new(Code::NotFound, "no such admin endpoint")),
    }
}

fn json(value: &impl Serialize) -> Result<Response<Body>, ApiError> {
    let body = serde_json::to_vec(value)
        .map_err(|_| ApiError::new(Code::Unknown, "cannot encode the answer"))?;
    Ok(json_response(body, false))
}
