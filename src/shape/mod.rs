//! Shape sources (paper stage 2 is pluggable): every source yields a [`CanonicalField`]; later stages
//! never see where it came from.
//! - `template`: a mesh in the canonical frame (CAD model) voxelised into the field ([`template`]).
//! - `sds`: textual inversion + score distillation from a diffusion prior ([`sds`]); it learns from the
//!   input images, so `congeal::pipeline::run` builds it.
//! - `model`: a canonical model saved by an earlier run ([`model`]; `congeal run` saves one in
//!   `RUN_DIR/model/`).

pub mod model;
pub mod sds;
pub mod template;

use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::Device;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::field::canonical::CanonicalField;
use crate::field::mesh::TriangleMesh;

/// Which shape source to use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShapeSpec {
    /// A template mesh; `None` = the collection's `template.obj`.
    Template(Option<PathBuf>),
    /// Score distillation from a diffusion prior.
    Sds,
    /// A saved canonical model.
    Model(PathBuf),
}

impl FromStr for ShapeSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "template" => Ok(ShapeSpec::Template(None)),
            "sds" => Ok(ShapeSpec::Sds),
            _ => match s.strip_prefix("model:") {
                Some(p) if !p.is_empty() => Ok(ShapeSpec::Model(PathBuf::from(p))),
                _ => match s.strip_prefix("template:") {
                    Some(p) if !p.is_empty() => Ok(ShapeSpec::Template(Some(PathBuf::from(p)))),
                    _ => Err(Error::Config(format!(
                        "unknown shape source `{s}` (expected template, template:PATH, sds or model:PATH)"
                    ))),
                },
            },
        }
    }
}

impl ShapeSpec {
    /// The name written to result.json (`template`, `sds`, `model`).
    pub fn kind(&self) -> &'static str {
        match self {
            ShapeSpec::Template(_) => "template",
            ShapeSpec::Sds => "sds",
            ShapeSpec::Model(_) => "model",
        }
    }
}

/// A canonical shape ready for the later stages.
#[derive(Clone, Debug)]
pub struct CanonicalShape {
    /// The field the renderer reads.
    pub field: CanonicalField,
    /// Canonical bbox (canonical units): p_min, p_max.
    pub bbox: ([f64; 3], [f64; 3]),
}

/// Builds the canonical shape for `spec`; `default_template` is the collection's template, if any.
pub fn build_shape(spec: &ShapeSpec, default_template: Option<&Path>, config: &Config, device: &Device) -> Result<CanonicalShape> {
    match spec {
        ShapeSpec::Template(path) => {
            let path = match (path, default_template) {
                (Some(p), _) => p.clone(),
                (None, Some(p)) => p.to_path_buf(),
                (None, None) => {
                    return Err(Error::Config(
                        "shape `template` needs a template mesh: the collection has no template.obj; pass --template PATH".into(),
                    ))
                }
            };
            let mesh = TriangleMesh::load(&path)?;
            template_shape(&mesh, config, device)
        }
        ShapeSpec::Sds => Err(Error::Config(
            "shape source `sds` learns from the input images: build it with congeal::pipeline::run (or shape::sds::build_sds_shape)".into(),
        )),
        ShapeSpec::Model(p) => model::load_model(p, device),
    }
}

/// Voxelises a template mesh (canonical frame and units) into a field.
pub fn template_shape(mesh: &TriangleMesh, config: &Config, device: &Device) -> Result<CanonicalShape> {
    let opts = template::TemplateOptions {
        resolution: config.template.resolution,
        padding_voxels: config.template.padding_voxels,
        smoothing: config.template.smoothing,
    };
    let grid = template::voxelize(mesh, &opts)?;
    let (lo, hi) = mesh.bbox()?;
    let field = CanonicalField::from_voxels(&grid, (lo, hi), config.template.opacity_per_voxel, device)?;
    Ok(CanonicalShape { field, bbox: (lo.map(f64::from), hi.map(f64::from)) })
}
