//! Tianwang's sans-IO core.
//!
//! The relay model of the design: a unit's broadcast has tracks; a track carries groups (a
//! GOP, starting at a keyframe) of frames. This crate holds the parts that decide things —
//! which frame goes to whom, what is dropped and why — with no sockets, no runtime and no
//! clock of its own: the I/O shells (the hub, the field agent) feed it frames and drain it,
//! and tests drive it directly.

pub mod alarms;
pub mod codec;
pub mod console;
pub mod frame;
pub mod keyframe;
pub mod reorder;
pub mod segmenter;
pub mod stats;
pub mod track;

pub use frame::Frame;
pub use keyframe::{KeyframeCoalescer, KeyframeDecision};
pub use stats::{RelayStats, SubscriberStats};
pub use track::{GroupWriter, Subscription, Track, TrackConfig};
