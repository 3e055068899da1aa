//! Congealing proper: pose initialisation, pose refinement and the pipeline that chains the stages
//! (paper Algorithm 1).

pub mod category;
pub mod coord_maps;
pub mod features;
pub mod pipeline;
pub mod pose_init;
pub mod pose_refine;
pub mod track;
pub mod transfer;

pub use pipeline::{run, ProgressFn};
