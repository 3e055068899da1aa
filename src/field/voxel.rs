//! A plain CPU voxel grid (occupancy + colour), the bridge from meshes to the renderer's field.
//!
//! Layout: `index = (z * ny + y) * nx + x`. Voxel `(x, y, z)` covers
//! `bbox_min + [i, i + 1) * voxel_size` per axis; its centre, where its values are sampled, is
//! `bbox_min + (i + 0.5) * voxel_size` with `voxel_size = (bbox_max - bbox_min) / dims`.

use crate::error::{Error, Result};

/// A dense grid of occupancy values in `[0, 1]` and RGB colours in `[0, 1]`, sampled at voxel centres.
#[derive(Clone, Debug)]
pub struct VoxelGrid {
    /// Number of voxels along x, y, z.
    pub dims: [usize; 3],
    /// Lower corner of the grid (not the first voxel centre).
    pub bbox_min: [f32; 3],
    /// Upper corner of the grid.
    pub bbox_max: [f32; 3],
    /// Occupancy per voxel, in `[0, 1]`.
    pub occupancy: Vec<f32>,
    /// Colour per voxel, RGB in `[0, 1]`.
    pub colors: Vec<[f32; 3]>,
}

impl VoxelGrid {
    /// An empty grid (occupancy 0, mid-grey colour). Errors for a zero dimension, a non-finite or
    /// inverted box, or more than 2^31 voxels.
    pub fn new(dims: [usize; 3], bbox_min: [f32; 3], bbox_max: [f32; 3]) -> Result<Self> {
        if dims.contains(&0) {
            return Err(Error::InvalidInput(format!("voxel grid dims {dims:?} have a zero")));
        }
        let n = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).filter(|&n| n <= 1 << 31);
        let Some(n) = n else {
            return Err(Error::InvalidInput(format!("voxel grid dims {dims:?} are too large")));
        };
        if (0..3).any(|a| !(bbox_min[a].is_finite() && bbox_max[a].is_finite() && bbox_max[a] > bbox_min[a])) {
            return Err(Error::InvalidInput(format!("voxel grid box {bbox_min:?}..{bbox_max:?} is empty or not finite")));
        }
        Ok(Self { dims, bbox_min, bbox_max, occupancy: vec![0.0; n], colors: vec![[0.5; 3]; n] })
    }

    /// Number of voxels.
    pub fn len(&self) -> usize {
        self.dims[0] * self.dims[1] * self.dims[2]
    }

    /// Whether the grid has no voxels (never true for a grid made by [`VoxelGrid::new`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Linear index of voxel `(x, y, z)`.
    #[inline]
    pub fn index(&self, x: usize, y: usize, z: usize) -> usize {
        debug_assert!(x < self.dims[0] && y < self.dims[1] && z < self.dims[2]);
        (z * self.dims[1] + y) * self.dims[0] + x
    }

    /// Edge lengths of one voxel.
    pub fn voxel_size(&self) -> [f32; 3] {
        [0, 1, 2].map(|a| (self.bbox_max[a] - self.bbox_min[a]) / self.dims[a] as f32)
    }

    /// Volume of one voxel.
    pub fn voxel_volume(&self) -> f32 {
        let s = self.voxel_size();
        s[0] * s[1] * s[2]
    }

    /// Centre of voxel `(x, y, z)`.
    pub fn centre(&self, x: usize, y: usize, z: usize) -> [f32; 3] {
        let s = self.voxel_size();
        let i = [x, y, z];
        [0, 1, 2].map(|a| self.bbox_min[a] + (i[a] as f32 + 0.5) * s[a])
    }

    /// Sum of occupancy times voxel volume.
    pub fn occupied_volume(&self) -> f64 {
        self.occupancy.iter().map(|&o| o as f64).sum::<f64>() * self.voxel_volume() as f64
    }

    /// Lower corner (voxel indices, may be -1 or dims-1) and fractions of the trilinear stencil at `p`.
    fn stencil(&self, p: [f32; 3]) -> Option<([i64; 3], [f32; 3])> {
        let s = self.voxel_size();
        let mut base = [0i64; 3];
        let mut frac = [0f32; 3];
        for a in 0..3 {
            let g = (p[a] - self.bbox_min[a]) / s[a] - 0.5;
            if !g.is_finite() {
                return None;
            }
            let f = g.floor();
            base[a] = f as i64;
            frac[a] = g - f;
        }
        Some((base, frac))
    }

    /// Trilinear interpolation of occupancy between voxel centres, with occupancy 0 outside the grid.
    pub fn trilinear(&self, p: [f32; 3]) -> f32 {
        let Some((b, f)) = self.stencil(p) else { return 0.0 };
        let d = self.dims.map(|d| d as i64);
        let mut acc = 0.0f32;
        for corner in 0..8 {
            let o = [corner & 1, (corner >> 1) & 1, (corner >> 2) & 1];
            let i = [b[0] + o[0] as i64, b[1] + o[1] as i64, b[2] + o[2] as i64];
            if (0..3).any(|a| i[a] < 0 || i[a] >= d[a]) {
                continue;
            }
            let w: f32 = (0..3).map(|a| if o[a] == 1 { f[a] } else { 1.0 - f[a] }).product();
            acc += w * self.occupancy[self.index(i[0] as usize, i[1] as usize, i[2] as usize)];
        }
        acc
    }

    /// Trilinear interpolation of colour between voxel centres, clamping to the grid's edge voxels outside.
    pub fn trilinear_color(&self, p: [f32; 3]) -> [f32; 3] {
        let Some((b, f)) = self.stencil(p) else { return [0.5; 3] };
        let d = self.dims.map(|d| d as i64);
        let mut acc = [0.0f32; 3];
        for corner in 0..8 {
            let o = [corner & 1, (corner >> 1) & 1, (corner >> 2) & 1];
            let i = [0, 1, 2].map(|a| (b[a] + o[a] as i64).clamp(0, d[a] - 1) as usize);
            let w: f32 = (0..3).map(|a| if o[a] == 1 { f[a] } else { 1.0 - f[a] }).product();
            let c = self.colors[self.index(i[0], i[1], i[2])];
            for ch in 0..3 {
                acc[ch] += w * c[ch];
            }
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_centres_and_trilinear() {
        let mut g = VoxelGrid::new([4, 3, 2], [0.0, 0.0, 0.0], [4.0, 6.0, 2.0]).unwrap();
        assert_eq!(g.len(), 24);
        assert_eq!(g.index(1, 2, 1), (3 + 2) * 4 + 1);
        assert_eq!(g.voxel_size(), [1.0, 2.0, 1.0]);
        assert_eq!(g.centre(1, 2, 1), [1.5, 5.0, 1.5]);
        let i = g.index(1, 1, 0);
        g.occupancy[i] = 1.0;
        g.colors[i] = [1.0, 0.0, 0.0];
        // exactly at the centre
        assert!((g.trilinear(g.centre(1, 1, 0)) - 1.0).abs() < 1e-6);
        // halfway to the neighbouring centre along x
        assert!((g.trilinear([2.0, 3.0, 0.5]) - 0.5).abs() < 1e-6);
        // outside the grid: 0; half a voxel beyond the last centre, zero-padded
        assert_eq!(g.trilinear([-5.0, 3.0, 0.5]), 0.0);
        g.occupancy.iter_mut().for_each(|o| *o = 1.0);
        assert!((g.trilinear([0.0, 3.0, 0.5]) - 0.5).abs() < 1e-6);
        assert!((g.trilinear([2.0, 3.0, 1.0]) - 1.0).abs() < 1e-6);
        assert!((g.occupied_volume() - 48.0).abs() < 1e-4);
        // colour clamps to the edge
        let c = g.trilinear_color([1.5, 3.0, -10.0]);
        assert!((c[0] - 1.0).abs() < 1e-6 && c[1].abs() < 1e-6);
    }

    #[test]
    fn rejects_bad_grids() {
        assert!(VoxelGrid::new([0, 1, 1], [0.0; 3], [1.0; 3]).is_err());
        assert!(VoxelGrid::new([1, 1, 1], [0.0; 3], [1.0, 0.0, 1.0]).is_err());
        assert!(VoxelGrid::new([1, 1, 1], [f32::NAN; 3], [1.0; 3]).is_err());
    }
}
