//! The canonical field: a dense voxel grid of density and colour in the *normalised* object frame,
//! plus the canonical bbox (p_min, p_max) that defines NOCS (paper Eq. 11).
//!
//! Representation: a single dense grid, sampled trilinearly. For the template and saved-model shape
//! sources the field is frozen, and a dense grid is the cheapest representation to render (8 lookups
//! per sample, no MLP), which is what the pose search (hundreds of candidate renders) needs. The grid
//! tensors may be `Var`s, so a shape source can optimise them with candle's autograd.
//!
//! Frames: `normalised = canonical / units_per_normalised`; the template's longest bbox side is 1.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::field::fused::HostGrid;
use crate::field::voxel::VoxelGrid;
use std::sync::Arc;

/// Density, colour and NOCS bbox of the canonical shape, as tensors on a device.
#[derive(Clone, Debug)]
pub struct CanonicalField {
    /// Grid size (nx, ny, nz); flat index = (z * ny + y) * nx + x.
    pub dims: [usize; 3],
    /// Grid bbox, normalised frame (voxel centres at min + (i + 0.5) * size).
    pub grid_min: [f32; 3],
    /// Grid bbox max corner, normalised frame.
    pub grid_max: [f32; 3],
    /// Volume density per voxel, `[V, 1]`, in 1 / normalised units.
    pub density: Tensor,
    /// Colour per voxel in [0, 1], `[V, 3]`.
    pub colour: Tensor,
    /// Canonical bbox p_min (normalised frame): NOCS = (p - p_min) / (p_max - p_min).
    pub nocs_min: [f32; 3],
    /// Canonical bbox p_max (normalised frame).
    pub nocs_max: [f32; 3],
    /// Canonical frame units (e.g. metres) per normalised unit.
    pub units_per_normalised: f64,
    /// Radius of a sphere about the origin holding the shape, normalised units.
    pub bounding_radius: f32,
    /// Density of a fully occupied voxel (occupancy = density / this).
    pub density_per_occupancy: f32,
    /// Host copy of a frozen grid on the CPU device: enables the fused ray marcher. `None` for
    /// trainable grids and other devices (the generic tensor renderer is used then).
    pub host: Option<Arc<HostGrid>>,
}

impl CanonicalField {
    /// Builds a field from a voxel grid given in canonical units. `nocs_bbox` is the canonical bbox
    /// (canonical units) that NOCS refers to; `opacity_per_voxel` sets density = occupancy * that / voxel size.
    pub fn from_voxels(
        grid: &VoxelGrid,
        nocs_bbox: ([f32; 3], [f32; 3]),
        opacity_per_voxel: f32,
        device: &Device,
    ) -> Result<Self> {
        let [nx, ny, nz] = grid.dims;
        let n = nx * ny * nz;
        if n == 0 || grid.occupancy.len() != n || grid.colors.len() != n {
            return Err(Error::InvalidInput(format!(
                "voxel grid {nx}x{ny}x{nz} has {} occupancy and {} colour values",
                grid.occupancy.len(),
                grid.colors.len()
            )));
        }
        if grid.occupancy.iter().any(|v| !v.is_finite()) || grid.colors.iter().flatten().any(|v| !v.is_finite()) {
            return Err(Error::InvalidInput("voxel grid holds NaN or inf".into()));
        }
        let (lo, hi) = nocs_bbox;
        let extent = (0..3).map(|i| hi[i] - lo[i]).fold(0.0f32, f32::max);
        if !(extent.is_finite() && extent > 0.0) {
            return Err(Error::InvalidInput(format!("canonical bbox {lo:?}..{hi:?} is empty")));
        }
        let scale = 1.0 / extent;
        let norm = |v: [f32; 3]| [v[0] * scale, v[1] * scale, v[2] * scale];
        let grid_min = norm(grid.bbox_min);
        let grid_max = norm(grid.bbox_max);
        let voxel = (grid_max[0] - grid_min[0]) / nx as f32;
        let density_scale = opacity_per_voxel / voxel;
        let density: Vec<f32> = grid.occupancy.iter().map(|o| o.clamp(0.0, 1.0) * density_scale).collect();
        let colour: Vec<f32> = grid.colors.iter().flat_map(|c| c.map(|v| v.clamp(0.0, 1.0))).collect();
        // Bounding radius: farthest occupied voxel centre plus half a voxel diagonal.
        let mut radius = 0.0f32;
        for z in 0..nz {
            for y in 0..ny {
                for x in 0..nx {
                    if grid.occupancy[(z * ny + y) * nx + x] > 0.01 {
                        let c = [
                            grid_min[0] + (x as f32 + 0.5) * voxel,
                            grid_min[1] + (y as f32 + 0.5) * voxel,
                            grid_min[2] + (z as f32 + 0.5) * voxel,
                        ];
                        radius = radius.max((c[0] * c[0] + c[1] * c[1] + c[2] * c[2]).sqrt());
                    }
                }
            }
        }
        if radius == 0.0 {
            return Err(Error::InvalidInput("voxel grid is empty (no occupied voxel)".into()));
        }
        Self {
            dims: grid.dims,
            grid_min,
            grid_max,
            density: Tensor::from_vec(density, (n, 1), device)?,
            colour: Tensor::from_vec(colour, (n, 3), device)?,
            nocs_min: norm(lo),
            nocs_max: norm(hi),
            units_per_normalised: extent as f64,
            bounding_radius: radius + voxel * 0.87,
            density_per_occupancy: density_scale,
            host: None,
        }
        .with_host_copy()
    }

    /// Assembles a field from its parts (e.g. a saved model). Tensors: density `[V, 1]`, colour `[V, 3]`
    /// with `V` = the product of `dims`; grid and NOCS bboxes in the normalised frame.
    #[allow(clippy::too_many_arguments)]
    pub fn from_parts(
        dims: [usize; 3],
        grid: ([f32; 3], [f32; 3]),
        density: Tensor,
        colour: Tensor,
        nocs: ([f32; 3], [f32; 3]),
        units_per_normalised: f64,
        bounding_radius: f32,
        density_per_occupancy: f32,
    ) -> Result<Self> {
        let n: usize = dims.iter().product();
        if density.dims() != [n, 1] || colour.dims() != [n, 3] {
            return Err(Error::InvalidInput(format!(
                "field tensors {:?} and {:?} do not fit a {dims:?} grid",
                density.dims(),
                colour.dims()
            )));
        }
        Self {
            dims,
            grid_min: grid.0,
            grid_max: grid.1,
            density,
            colour,
            nocs_min: nocs.0,
            nocs_max: nocs.1,
            units_per_normalised,
            bounding_radius,
            density_per_occupancy,
            host: None,
        }
        .with_host_copy()
    }

    /// Attaches the host copy used by the fused CPU renderer when the field lives on the CPU.
    fn with_host_copy(mut self) -> Result<Self> {
        if self.device().is_cpu() {
            self.host = Some(Arc::new(HostGrid::from_field(&self)?));
        }
        Ok(self)
    }

    /// Size of one (cubic) voxel, normalised units.
    pub fn voxel_size(&self) -> f32 {
        (self.grid_max[0] - self.grid_min[0]) / self.dims[0] as f32
    }

    /// The device the field's tensors live on.
    pub fn device(&self) -> &Device {
        self.density.device()
    }

    /// Copies the density to the host as occupancy-like values (density * voxel size).
    pub fn density_host(&self) -> Result<Vec<f32>> {
        Ok(self.density.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    }

    /// Copies the colours to the host.
    pub fn colour_host(&self) -> Result<Vec<[f32; 3]>> {
        let flat = self.colour.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(flat.chunks_exact(3).map(|c| [c[0], c[1], c[2]]).collect())
    }
}
