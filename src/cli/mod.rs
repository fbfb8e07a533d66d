//! The `hoard` binary's commands, one module per kind: `serve` (the daemon,
//! and `config check`), `store` (verify and gc on a stopped store), `images`
//! (ls, pin and unpin, through the admin API or on a stopped store),
//! `client` (warm and health, over HTTP) and `human` (sizes and ages as
//! people read them). Only the binary compiles these.

pub mod client;
mod human;
pub mod images;
pub mod serve;
pub mod store;
