//! What every request handler shares, and which endpoints a listener
//! offers. Its own module so that the registry API (`handlers`) and the
//! admin API (`admin`) both depend on it and not on each other.

use std::sync::Arc;

use super::access::Access;
use crate::metrics::Metrics;
use crate::mirror::Mirror;

/// The state behind every listener.
pub struct App {
    pub mirror: Mirror,
    pub metrics: Arc<Metrics>,
    /// Bearer token of the admin API; without one it answers nothing.
    pub admin_token: Option<String>,
    /// Client logins and access rules; `None`: open to every client.
    pub access: Option<Access>,
    /// Longest a request waits for its response head (`limits.response_deadline`).
    pub response_deadline: std::time::Duration,
    /// The status page; `None` with `ui.enabled = false`.
    pub ui: Option<std::sync::Arc<super::ui::Ui>>,
}

/// Which endpoints a listener offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// The registry API plus /metrics and /healthz.
    Full,
    /// Only /metrics and /healthz (the `--metrics-listen` listener).
    MetricsOnly,
    /// Only /admin/* (the `--admin-listen` listener).
    Admin,
}
