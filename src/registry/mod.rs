//! The HTTP face of hoard: the pull side of the Docker Registry HTTP API v2 /
//! OCI distribution spec, plus /metrics and /healthz. Parses requests into
//! typed values, calls the mirror, writes responses. All error answers are
//! made in `error`. The admin API (`admin`) is a second surface on its own
//! listener; `server` picks the surface for each listener.

mod access;
pub mod admin;
mod app;
mod body;
mod error;
mod handlers;
mod multipart;
mod referrers;
mod routes;
mod sendfile;
mod server;
mod tls;
pub mod ui;

pub use access::Access;
pub use app::{App, Surface};
pub use body::Body;
pub use error::{ApiError, Code};
pub use handlers::handle;
pub use routes::{route, Route, RouteError};
pub use server::{serve, Limits};
pub use tls::{Tls, TlsError};
