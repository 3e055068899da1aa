//! # congeal
//!
//! A Rust implementation of *3D Congealing: 3D-Aware Image Alignment in the Wild* (Zhang et al.,
//! ECCV 2024). Given a collection of images of one object category, it estimates a canonical shape
//! and, for every image, the camera pose `camera_from_object` and field of view in one shared
//! canonical frame, plus dense NOCS maps.
//!
//! Stages (paper Algorithm 1), one module each:
//! - [`collection`]: inputs (collection format, plain folders), masks and tight crops;
//! - [`shape`]: the canonical shape source (template mesh, score distillation, saved model) turned into a [`field`];
//! - [`field`]: the canonical field, its differentiable volume renderer, meshes, marching cubes;
//! - [`congeal`]: pose initialisation by candidate search, pose refinement, canonical coordinate maps,
//!   keypoint transfer, the pipeline ([`run`]);
//! - [`eval`]: pose, NOCS, keypoint and mask metrics against ground truth;
//! - [`output`]: result.json, NOCS PNGs, overlays and contact sheets.
//!
//! Beside them: [`models`] (DINOv2, U^2-Net-p, the diffusion prior), [`geometry`] (poses, cameras,
//! similarity alignment), [`config`], [`ingest`] (frames from a robot into a collection), [`bench`](mod@bench).
//!
//! ```no_run
//! use congeal::{collection::Collection, config::Config, shape::ShapeSpec};
//! let collection = Collection::load(std::path::Path::new("demo/duck"))?;
//! let config = Config::from_yaml_file(std::path::Path::new("config/fast.yaml"))?;
//! let result = congeal::run(&collection, &ShapeSpec::Template(None), &config,
//!     std::path::Path::new("runs/duck"), &congeal::no_progress)?;
//! println!("{} images posed", result.images.len());
//! # Ok::<(), congeal::error::Error>(())
//! ```

#![deny(missing_docs)]

pub mod bench;
pub mod collection;
pub mod config;
pub mod congeal;
pub mod error;
pub mod eval;
pub mod field;
pub mod geometry;
pub mod ingest;
pub mod models;
pub mod output;
#[cfg(feature = "ros")]
pub mod ros;
pub mod shape;

#[cfg(test)]
mod test_util;

pub use crate::congeal::pipeline::{no_progress, run, ProgressFn};
pub use error::{Error, Result};
