//! Shape sources (paper stage 2 is pluggable): every source yields a [`CanonicalField`]; later stages
//! never see where it came from.
//! - `template`: a mesh in the canonical frame (CAD model) voxelised into the field ([`template`]).
//! - `sds`: textual inversion + score distillation from a diffusion prior ([`sds`]); it learns from the
//!   input images ([`ShapeInputs::images`]).
//! - `model`: a canonical model saved by an earlier run ([`model`]; `congeal run` saves one in
//!   `RUN_DIR/model/`).

pub mod model;
pub mod sds;
pub mod template;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::Device;
use image::{GrayImage, RgbImage};

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

    /// Checks, before any expensive stage runs, what can be checked of the source without building
    /// it: `sds` needs its diffusion weights (or `sds.random_models`).
    pub fn check_available(&self, config: &Config) -> Result<()> {
        match self {
            ShapeSpec::Sds => sds::DiffusionModels::check_available(&config.sds, None),
            ShapeSpec::Template(_) | ShapeSpec::Model(_) => Ok(()),
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

/// What a shape source may learn from besides the configuration. Every source is built through
/// [`build_shape`] with these; each takes what it needs.
#[derive(Clone, Copy)]
pub struct ShapeInputs<'a> {
    /// The collection's template mesh, if any (`template` without a path uses it).
    pub default_template: Option<&'a Path>,
    /// The input images with their foreground masks (`sds` learns from them).
    pub images: &'a [(&'a RgbImage, &'a GrayImage)],
    /// The run's folder, where a source may keep its own files (`sds/`), if any.
    pub out_dir: Option<&'a Path>,
    /// Receives progress: sub-stage name and the fraction of it done (0..1).
    pub progress: &'a dyn Fn(&str, f32),
}

impl Default for ShapeInputs<'_> {
    /// No template, no images, no folder, no progress.
    fn default() -> Self {
        Self { default_template: None, images: &[], out_dir: None, progress: &ignore_progress }
    }
}

fn ignore_progress(_: &str, _: f32) {}

/// A canonical shape with the seconds its source spent in named sub-stages (e.g. `sds`'s
/// `textual_inversion` and `score_distillation`).
#[derive(Clone, Debug)]
pub struct BuiltShape {
    /// The shape.
    pub shape: CanonicalShape,
    /// Seconds per sub-stage, for the run's timings.
    pub timings_s: BTreeMap<String, f64>,
}

/// Builds the canonical shape for `spec` from `inputs`.
pub fn build_shape(spec: &ShapeSpec, inputs: &ShapeInputs, config: &Config, device: &Device) -> Result<BuiltShape> {
    let mut timings_s = BTreeMap::new();
    let shape = match spec {
        ShapeSpec::Template(path) => {
            let path = match (path, inputs.default_template) {
                (Some(p), _) => p.clone(),
                (None, Some(p)) => p.to_path_buf(),
                (None, None) => {
                    return Err(Error::Config(
                        "shape `template` needs a template mesh: the collection has no template.obj; pass --template PATH".into(),
                    ))
                }
            };
            let mesh = TriangleMesh::load(&path)?;
            template_shape(&mesh, config, device)?
        }
        ShapeSpec::Sds => {
            // Stages 1-2 learn from the masked inputs themselves.
            let out_dir = inputs.out_dir.map(|d| d.join("sds"));
            let (built, report) =
                sds::build_sds_shape(inputs.images, &config.sds, None, device, out_dir.as_deref(), inputs.progress)?;
            timings_s.insert("textual_inversion".to_string(), report.ti_seconds);
            timings_s.insert("score_distillation".to_string(), report.sds_seconds);
            built
        }
        ShapeSpec::Model(p) => model::load_model(p, device)?,
    };
    Ok(BuiltShape { shape, timings_s })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_goes_through_build_shape() {
        let mut config = Config::default();
        config.sds.weights_dir = None;
        config.sds.random_models = false;
        let err = ShapeSpec::Sds.check_available(&config).unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{err}");
        assert!(ShapeSpec::Template(None).check_available(&config).is_ok());
        // `sds` is built like the others: without images it reaches textual inversion, which needs one.
        config.sds.random_models = true;
        ShapeSpec::Sds.check_available(&config).unwrap();
        let err = build_shape(&ShapeSpec::Sds, &ShapeInputs::default(), &config, &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("at least one image"), "{err}");
        let err = build_shape(&ShapeSpec::Template(None), &ShapeInputs::default(), &config, &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("template mesh"), "{err}");
    }
}
