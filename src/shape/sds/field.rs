//! The field score distillation optimises: a dense density/colour grid, frozen into a canonical shape at the end.

use candle_core::{DType, Device, Tensor, Var};
use tracing::info;

use crate::config::SdsConfig;
use crate::error::{Error, Result};
use crate::field::canonical::CanonicalField;
use crate::shape::CanonicalShape;

/// The trainable canonical field of score distillation.
pub struct SdsField {
    /// Raw density per cell `[V, 1]` (before the blob bias and softplus).
    pub raw_density: Var,
    /// Raw colour per cell `[V, 3]` (before the sigmoid).
    pub raw_colour: Var,
    blob: Tensor,
    dims: [usize; 3],
    density_scale: f64,
}

/// `softplus(x) = max(x, 0) + ln(1 + exp(-|x|))`, stable and differentiable.
pub(super) fn softplus(x: &Tensor) -> Result<Tensor> {
    Ok((x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}

/// Grid bbox of the SDS field (normalised units).
pub(super) const SDS_GRID_HALF: f32 = 0.5;

impl SdsField {
    /// A `grid^3` field with the Magic3D blob: bias `blob_density * (1 - |p| / blob_radius)`.
    pub fn new(cfg: &SdsConfig, device: &Device) -> Result<Self> {
        let g = cfg.grid;
        let cell = 2.0 * SDS_GRID_HALF / g as f32;
        let mut blob = Vec::with_capacity(g * g * g);
        for z in 0..g {
            for y in 0..g {
                for x in 0..g {
                    let p = [x, y, z].map(|i| -SDS_GRID_HALF + (i as f32 + 0.5) * cell);
                    let r = (p[0] * p[0] + p[1] * p[1] + p[2] * p[2]).sqrt() as f64;
                    blob.push((cfg.blob_density * (1.0 - r / cfg.blob_radius)) as f32);
                }
            }
        }
        let v = g * g * g;
        Ok(Self {
            raw_density: Var::zeros((v, 1), DType::F32, device)?,
            raw_colour: Var::zeros((v, 3), DType::F32, device)?,
            blob: Tensor::from_vec(blob, (v, 1), device)?,
            dims: [g; 3],
            density_scale: cfg.density_scale,
        })
    }

    fn density(&self) -> Result<Tensor> {
        Ok((softplus(&(self.raw_density.as_tensor() + &self.blob)?)? * self.density_scale)?)
    }

    /// The field as the renderer sees it (differentiable in both grids; no host copy).
    pub fn field(&self) -> Result<CanonicalField> {
        Ok(CanonicalField {
            dims: self.dims,
            grid_min: [-SDS_GRID_HALF; 3],
            grid_max: [SDS_GRID_HALF; 3],
            density: self.density()?,
            colour: candle_nn::ops::sigmoid(self.raw_colour.as_tensor())?,
            nocs_min: [-SDS_GRID_HALF; 3],
            nocs_max: [SDS_GRID_HALF; 3],
            units_per_normalised: 1.0,
            bounding_radius: SDS_GRID_HALF * 3f32.sqrt(),
            density_per_occupancy: SURFACE_DENSITY * 2.0,
            host: None,
        })
    }

    /// Freezes the field into a canonical shape: the occupied region (density above
    /// [`SURFACE_DENSITY`]) defines the canonical bbox, rescaled so its longest side is 1 as for
    /// templates; NOCS refers to that bbox.
    pub fn freeze(&self) -> Result<CanonicalShape> {
        let colour = candle_nn::ops::sigmoid(&self.raw_colour.as_tensor().detach())?;
        // Haze below HAZE_DENSITY is cleared: it would widen the silhouettes beyond the shape's
        // bounding sphere, which the later stages frame their cameras by.
        let mut host = self.density()?.detach().flatten_all()?.to_vec1::<f32>()?;
        for d in host.iter_mut() {
            if *d < HAZE_DENSITY {
                *d = 0.0;
            }
        }
        let g = self.dims[0];
        let cell = 2.0 * SDS_GRID_HALF / g as f32;
        let (mut lo, mut hi) = ([f32::MAX; 3], [f32::MIN; 3]);
        let mut radius = 0f32;
        let mut surface = false;
        for z in 0..g {
            for y in 0..g {
                for x in 0..g {
                    let d = host[(z * g + y) * g + x];
                    if d <= 0.0 {
                        continue;
                    }
                    let c = [x, y, z].map(|i| -SDS_GRID_HALF + (i as f32 + 0.5) * cell);
                    radius = radius.max((c[0] * c[0] + c[1] * c[1] + c[2] * c[2]).sqrt() + 0.87 * cell);
                    if d > SURFACE_DENSITY {
                        surface = true;
                        for k in 0..3 {
                            lo[k] = lo[k].min(c[k] - 0.5 * cell);
                            hi[k] = hi[k].max(c[k] + 0.5 * cell);
                        }
                    }
                }
            }
        }
        let density = Tensor::from_vec(host.clone(), (host.len(), 1), self.raw_density.as_tensor().device())?;
        if !surface {
            radius = 0.0;
        }
        if radius == 0.0 {
            return Err(Error::InvalidInput(format!(
                "score distillation left an empty field (no density above {SURFACE_DENSITY}); try more iterations or a larger blob"
            )));
        }
        let extent = (0..3).map(|k| hi[k] - lo[k]).fold(0f32, f32::max);
        let occupied = host.iter().filter(|d| **d > SURFACE_DENSITY).count();
        let max_density = host.iter().copied().fold(0f32, f32::max);
        info!(
            "sds field: {occupied} of {} cells above density {SURFACE_DENSITY} (max {max_density:.1}), bbox {lo:?}..{hi:?}",
            host.len()
        );
        let s = 1.0 / extent;
        let field = CanonicalField::from_parts(
            self.dims,
            ([-SDS_GRID_HALF * s; 3], [SDS_GRID_HALF * s; 3]),
            (density * extent as f64)?,
            colour,
            (lo.map(|v| v * s), hi.map(|v| v * s)),
            extent as f64,
            radius * s,
            SURFACE_DENSITY * 2.0 * extent,
        )?;
        Ok(CanonicalShape { field, bbox: (lo.map(f64::from), hi.map(f64::from)) })
    }
}

/// Density (1 / normalised units of the unit SDS grid) taken as the surface: iso-level 0.5 of the
/// mesh, and the threshold of the occupied bbox.
pub const SURFACE_DENSITY: f32 = 10.0;

/// Density below which the frozen field is cleared (haze that would only blur silhouettes).
pub const HAZE_DENSITY: f32 = 1.0;
