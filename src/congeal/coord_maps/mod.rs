//! Stage 5, canonical coordinate maps (paper Eq. 10-16), in one place.
//!
//! For each image `x` with estimated pose, a 2D warp `u -> ũ` from the image to the rendering
//! `x̃ = R(π(x), θ)` aligns the input's DINOv2 features with the rendering's (Eq. 10, with the
//! smoothness terms of Eq. 14-16; [`warp`]). The forward map of a pixel is then the NOCS rendering at
//! `ũ` (Eq. 11; [`forward`]) and the reverse map inverts both steps by nearest neighbours (Eq. 12-13;
//! [`reverse`], [`ReverseMap`]).
//!
//! - [`warp`]: feature grids, the warp and its optimisation (Eq. 10, 14-16);
//! - [`forward`]: the warps of a run's images at their poses, the forward map and the rasters a run
//!   writes (Eq. 10-11);
//! - [`reverse`]: the reverse map of a run's image (Eq. 12-13).

pub mod forward;
pub mod reverse;
pub mod warp;

pub use forward::{forward_map, StoredWarp};
pub use reverse::{reverse_map, NocsMap, ReverseMap};
pub use warp::{optimise_warps, FeatureGrid, NeighbourGram, Warp, WarpProblem};
