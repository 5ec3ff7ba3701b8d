//! The Tianwang hub: one per court. It takes QUIC streams from field units, relays them to
//! subscribers through the sans-IO relay core (`tianwang-core`), records them as signed
//! evidence, and serves the console and metrics.
//! `docs/ARCHITECTURE.md` maps the modules.

pub mod auth;
pub mod backfill;
pub mod cascade;
pub mod config;
pub mod console;
pub mod demo;
pub mod directives;
pub mod evidence;
pub mod field;
pub mod files;
pub mod http;
pub mod metrics;
pub mod publisher;
pub mod registry;
pub mod revocation;
pub mod server;
pub mod session;
pub mod subscriber;
pub mod talkback;
pub mod unit_ws;
pub mod watch;
pub mod whip;

pub use config::Config;
pub use server::RunningHub;
