//! The status page for people: `GET /ui/` on the registry listener (plain
//! and TLS), a page whose HTML, CSS and script are embedded in the binary
//! (no build step, no CDN, works offline) and which renders
//! `/ui/api/status` every few seconds. `ui.enabled = false` turns it off.
//! With logins on, it asks for one and lists only what that user may pull;
//! who may see it at all is decided in `handlers::admit`, like every route.

mod history;
mod status;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Response, StatusCode};

use super::access::Who;
use super::app::App;
use super::body::Body;
use super::error::{response as error, ApiError, Code};
use crate::mirror::catalog::CachedImage;
use crate::reference::Repository;
use history::{History, Totals};
use status::{Image, Registry, Status, Window};

const PAGE: &str = include_str!("page.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("app.css");
/// The last-minutes window of the page's figures.
const RECENT: Duration = Duration::from_secs(300);
/// How long a listing of the cached images is reused: it walks the store.
const IMAGES_FOR: Duration = Duration::from_secs(10);

/// The page's state: the counters' history and the last image listing.
pub struct Ui {
    started: Instant,
    history: History,
    images: tokio::sync::Mutex<Option<(Instant, Arc<Vec<CachedImage>>)>>,
}

impl Ui {
    /// A page whose history starts with `metrics` as they are now, so the
    /// first minutes' figures and chart count from here.
    pub fn new(metrics: &crate::metrics::Metrics) -> Ui {
        let history = History::default();
        history.record(crate::clock::unix_ms(), Totals::read(metrics));
        Ui {
            started: Instant::now(),
            history,
            images: tokio::sync::Mutex::new(None),
        }
    }

    /// Samples the metrics every `history::EVERY` until `stop` resolves.
    pub async fn sample(
        self: Arc<Ui>,
        metrics: Arc<crate::metrics::Metrics>,
        stop: impl std::future::Future<Output = ()>,
    ) {
        let mut ticks = tokio::time::interval(history::EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let sampling = async {
            loop {
                ticks.tick().await;
                self.history
                    .record(crate::clock::unix_ms(), Totals::read(&metrics));
            }
        };
        tokio::select! {
            () = sampling => {}
            () = stop => {}
        }
    }

    /// The cached images, listed at most every `IMAGES_FOR`.
    async fn images(&self, app: &App) -> Result<Arc<Vec<CachedImage>>, ApiError> {
        let mut cached = self.images.lock().await;
        if let Some((at, images)) = cached.as_ref() {
            if at.elapsed() < IMAGES_FOR {
                return Ok(images.clone());
            }
        }
        let images = Arc::new(
            app.mirror
                .images(None)
                .await
                .map_err(|e| super::error::failed(&e))?,
        );
        *cached = Some((Instant::now(), images.clone()));
        Ok(images)
    }

    async fn status(&self, app: &App, who: &Who) -> Result<Status, ApiError> {
        let now = Totals::read(&app.metrics);
        let now_ms = crate::clock::unix_ms();
        let since_recent = now_ms.saturating_sub(RECENT.as_millis() as u64);
        let uptime = self.started.elapsed();
        // There is always a sample at most `EVERY` old (one is taken at start).
        let recent = self.history.from(since_recent).unwrap_or_default();
        let may_pull =
            |registry: &str, name: &str| match (&app.access, Repository::new(registry, name)) {
                (None, _) => true,
                (Some(access), Ok(repo)) => access.may_pull(who, &repo),
                (Some(_), Err(_)) => false,
            };
        let mut images: Vec<Image> = self
            .images(app)
            .await?
            .iter()
            .cloned()
            .filter_map(Image::new)
            .filter(|image| may_pull(&image.registry, &image.repository))
            .collect();
        // The largest first: what the store is spent on.
        images.sort_by(|a, b| {
            b.size
                .cmp(&a.size)
                .then_with(|| a.repository.cmp(&b.repository))
        });
        let downloads = app
            .mirror
            .downloads()
            .into_iter()
            .filter(|d| may_pull(&d.registry, &d.repository))
            .collect();
        Ok(Status {
            version: env!("CARGO_PKG_VERSION"),
            uptime_seconds: uptime.as_secs(),
            total: Window::new(uptime.as_secs(), now),
            recent: Window::new(uptime.min(RECENT).as_secs(), now.since(&recent)),
            history: self.history.points(now_ms, now),
            registries: app
                .mirror
                .registries()
                .into_iter()
                .map(|(name, health)| Registry::new(name, health))
                .collect(),
            downloads,
            images,
            store: status::Store {
                usage: app.mirror.store_usage().await,
                evicted_blobs: app.metrics.evicted_blobs.get(),
                evicted_bytes: app.metrics.evicted_bytes.get(),
            },
        })
    }
}

/// Answers a request for one of the page's paths.
pub async fn handle(app: &App, who: &Who, method: &Method, path: &str) -> Response<Body> {
    let Some(ui) = &app.ui else {
        return error(&ApiError::new(Code::NotFound, "no such endpoint"));
    };
    let head = *method == Method::HEAD;
    if *method != Method::GET && !head {
        return error(&ApiError::new(Code::Unsupported, "method not allowed"));
    }
    match path {
        "/ui" => {
            let mut response = Response::new(Body::empty());
            *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
            response
                .headers_mut()
                .insert(header::LOCATION, HeaderValue::from_static("/ui/"));
            response
        }
        "/ui/" => asset(PAGE, "text/html; charset=utf-8", head),
        "/ui/app.js" => asset(SCRIPT, "text/javascript; charset=utf-8", head),
        "/ui/app.css" => asset(STYLE, "text/css; charset=utf-8", head),
        "/ui/api/status" => match ui.status(app, who).await {
            Ok(status) => match serde_json::to_vec(&status) {
                Ok(json) => guarded(
                    Response::new(Body::unless_head(json, head)),
                    "application/json",
                ),
                Err(_) => error(&ApiError::new(Code::Unknown, "cannot encode the status")),
            },
            Err(e) => error(&e),
        },
        _ => error(&ApiError::new(Code::NotFound, "no such endpoint")),
    }
}

fn asset(text: &'static str, content_type: &'static str, head: bool) -> Response<Body> {
    guarded(
        Response::new(Body::unless_head(Bytes::from_static(text.as_bytes()), head)),
        content_type,
    )
}

/// The page's headers: its own scripts and styles only (no inline code, no
/// other origin), never framed, never cached (it shows live state), and no
/// referrer sent anywhere.
fn guarded(mut response: Response<Body>, content_type: &'static str) -> Response<Body> {
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
