//! Ingestion of live inputs (ROS messages, or any source of raw frames) into collections on disk:
//! raw-frame decoding with clear errors ([`frames`]), approximate-time matching of image, mask and
//! camera info by stamp ([`sync`]), thinning by stamp ([`period`]), and a crash-safe per-category collection
//! store ([`store`]).
//! Nothing here depends on ROS, so it is tested by plain `cargo test`.

pub mod frames;
pub mod period;
pub mod store;
pub mod sync;
