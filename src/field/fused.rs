//! A fused CPU ray marcher for *frozen* fields (template and saved-model shapes): one pass per ray
//! over a host copy of the grid, parallel over rays, with an analytic backward pass for opacity with
//! respect to ray origins and directions. It computes exactly what the generic tensor renderer in
//! [`crate::field::render`] computes (same samples, same trilinear clamping, same detached
//! quantities), only without materialising `[rays, samples, 3]` tensors; the tests pin the two together.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::field::canonical::CanonicalField;
use crate::field::render::HostRendering;

/// Optical thickness after which a ray stops: its transmittance is below e^-30 (1e-13), so the
/// opacity is 1.0 in f32 either way and what lies behind weighs less than f32 resolves.
const OPAQUE: f32 = 30.0;

/// Cell bases per side of an occupancy block (empty-space skipping).
const BLOCK: usize = 4;

/// A sample's cell: lowest corner, fractions and per-axis "not clamped" flags.
type Cell = ([usize; 3], [f32; 3], [bool; 3]);

/// A ray in continuous grid-index units, `index = index_origin + t index_rate`, with its samples.
struct RayWalk {
    index_origin: [f32; 3],
    index_rate: [f32; 3],
    near: f32,
    span: f32,
    samples: usize,
    /// Ray-parameter margin worth 1/100 cell along the fastest axis.
    margin: f32,
}

/// Trilinear interpolation of corner values `c` (index bits: x = 1, y = 2, z = 4) at fractions `f`.
#[inline]
fn trilinear(c: &[f32; 8], [fx, fy, fz]: [f32; 3]) -> f32 {
    let (gx, gy, gz) = (1.0 - fx, 1.0 - fy, 1.0 - fz);
    gz * (gy * (gx * c[0] + fx * c[1]) + fy * (gx * c[2] + fx * c[3]))
        + fz * (gy * (gx * c[4] + fx * c[5]) + fy * (gx * c[6] + fx * c[7]))
}

/// Host copy of a field's grid.
#[derive(Clone, Debug)]
pub struct HostGrid {
    dims: [usize; 3],
    grid_min: [f32; 3],
    grid_max: [f32; 3],
    voxel: f32,
    density: Vec<f32>,
    /// Per cell (indexed like its lowest corner): whether any of its 8 corners has non-zero density.
    /// A sample in an empty cell has zero density and zero density gradient, so it is skipped
    /// without reading the corners (exact: adding zeros changes no sum).
    occupied: Vec<bool>,
    /// Per block of `BLOCK`³ cell bases: whether any of its cells is occupied. A ray in an empty
    /// block jumps to its first sample past the block.
    blocks_occupied: Vec<bool>,
    /// Blocks per axis.
    block_dims: [usize; 3],
    colour: Vec<[f32; 3]>,
    nocs_min: [f32; 3],
    nocs_extent: [f32; 3],
}

/// What one ray produced.
#[derive(Clone, Copy, Debug, Default)]
struct RaySample {
    opacity: f32,
    colour: [f32; 3],
    depth: f32,
    nocs: [f32; 3],
}

impl HostGrid {
    /// Copies a field's grid to the host.
    pub fn from_field(field: &CanonicalField) -> crate::error::Result<Self> {
        let mut grid = Self {
            dims: field.dims,
            grid_min: field.grid_min,
            grid_max: field.grid_max,
            voxel: field.voxel_size(),
            density: field.density_host()?,
            occupied: Vec::new(),
            blocks_occupied: Vec::new(),
            block_dims: [0; 3],
            colour: field.colour_host()?,
            nocs_min: field.nocs_min,
            nocs_extent: [0, 1, 2].map(|a| field.nocs_max[a] - field.nocs_min[a]),
        };
        grid.occupied = grid.cell_occupancy();
        grid.block_dims = grid.dims.map(|n| n.div_ceil(BLOCK).max(1));
        grid.blocks_occupied = grid.block_occupancy();
        Ok(grid)
    }

    /// [`HostGrid::blocks_occupied`] from the cell occupancy.
    fn block_occupancy(&self) -> Vec<bool> {
        let [bx, by, _] = self.block_dims;
        let [nx, ny, nz] = self.dims;
        let mut blocks = vec![false; self.block_dims.iter().product()];
        for z in 0..nz {
            for y in 0..ny {
                for x in 0..nx {
                    if self.occupied.get((z * ny + y) * nx + x).copied().unwrap_or(true) {
                        blocks[((z / BLOCK) * by + y / BLOCK) * bx + x / BLOCK] = true;
                    }
                }
            }
        }
        blocks
    }

    /// [`HostGrid::occupied`] for every cell base (NaN counts as occupied, so it still propagates).
    fn cell_occupancy(&self) -> Vec<bool> {
        let [nx, ny, nz] = self.dims;
        let mut occupied = vec![true; self.density.len()];
        if self.density.len() != nx * ny * nz {
            return occupied;
        }
        for z in 0..nz {
            for y in 0..ny {
                for x in 0..nx {
                    let corners = self.corner_indices([x, y, z]);
                    occupied[(z * ny + y) * nx + x] = corners.iter().any(|&i| self.density.get(i).is_none_or(|&v| v != 0.0));
                }
            }
        }
        occupied
    }

    /// Fraction of cells with any density (see [`HostGrid::occupied`]).
    pub fn occupied_fraction(&self) -> f64 {
        self.occupied.iter().filter(|&&o| o).count() as f64 / self.occupied.len().max(1) as f64
    }

    /// Corner base index, fractions and per-axis "not clamped" flags for a point (same rules as
    /// the tensor renderer: clamp the continuous index to [0, n-1], base = min(floor, n-2)).
    #[inline]
    fn cell(&self, p: [f32; 3]) -> Cell {
        let mut base = [0usize; 3];
        let mut frac = [0f32; 3];
        let mut free = [true; 3];
        for a in 0..3 {
            let n = self.dims[a];
            let g = (p[a] - self.grid_min[a]) / self.voxel - 0.5;
            let hi = n as f32 - 1.0;
            let gc = g.max(0.0).min(hi);
            free[a] = g > 0.0 && g < hi;
            // gc is finite and >= 0, so truncation is floor (and avoids a libm call per sample).
            let b = ((gc as usize) as f32).min((n as f32 - 2.0).max(0.0));
            base[a] = b as usize;
            frac[a] = gc - b;
        }
        (base, frac, free)
    }

    #[inline]
    fn corner_indices(&self, base: [usize; 3]) -> [usize; 8] {
        let [nx, ny, nz] = self.dims;
        let step = |b: usize, n: usize| usize::from(b + 1 < n);
        let (sx, sy, sz) = (step(base[0], nx), step(base[1], ny) * nx, step(base[2], nz) * nx * ny);
        let i0 = (base[2] * ny + base[1]) * nx + base[0];
        [i0, i0 + sx, i0 + sy, i0 + sy + sx, i0 + sz, i0 + sz + sx, i0 + sz + sy, i0 + sz + sy + sx]
    }

    /// Whether the cell with lowest corner `base` has any density.
    #[inline]
    fn cell_occupied(&self, base: [usize; 3]) -> bool {
        let [nx, ny, _] = self.dims;
        self.occupied[(base[2] * ny + base[1]) * nx + base[0]]
    }

    /// Trilinear density at a cell position and its gradient with respect to the point.
    #[inline]
    fn density_grad(&self, (base, f, free): Cell) -> (f32, [f32; 3]) {
        let c = self.corner_indices(base).map(|i| self.density[i]);
        let v = trilinear(&c, f);
        let [fx, fy, fz] = f;
        let (gx, gy, gz) = (1.0 - fx, 1.0 - fy, 1.0 - fz);
        let dx = gz * (gy * (c[1] - c[0]) + fy * (c[3] - c[2])) + fz * (gy * (c[5] - c[4]) + fy * (c[7] - c[6]));
        let dy = gz * (gx * (c[2] - c[0]) + fx * (c[3] - c[1])) + fz * (gx * (c[6] - c[4]) + fx * (c[7] - c[5]));
        let dz = gy * (gx * (c[4] - c[0]) + fx * (c[5] - c[1])) + fy * (gx * (c[6] - c[2]) + fx * (c[7] - c[3]));
        let s = 1.0 / self.voxel;
        let g = [dx * s * free[0] as u8 as f32, dy * s * free[1] as u8 as f32, dz * s * free[2] as u8 as f32];
        (v, g)
    }

    /// Trilinear density alone at a cell position (the value of [`HostGrid::density_grad`]).
    #[inline]
    fn density(&self, (base, f, _): Cell) -> f32 {
        trilinear(&self.corner_indices(base).map(|i| self.density[i]), f)
    }

    /// The sample after `k` on `ray` that can hold density, given that sample `k` lies in the empty
    /// cell `base`: `k + 1`, or past the whole block when the block is empty. Samples skipped lie on
    /// the segment from sample `k` to where the ray leaves the block (less a margin of 1/100 cell),
    /// which is inside the (convex) block, so their density and its gradient are exactly zero.
    #[inline]
    fn next_sample(&self, base: [usize; 3], ray: &RayWalk, k: usize) -> usize {
        let [bx, by, _] = self.block_dims;
        let block = base.map(|b| b / BLOCK);
        if self.blocks_occupied[(block[2] * by + block[1]) * bx + block[0]] {
            return k + 1;
        }
        // Leaving the block along each axis, in continuous-index units (the first and last blocks
        // extend to infinity: the clamped index keeps rays outside the grid in them).
        let mut t_exit = f32::INFINITY;
        for (a, &b) in block.iter().enumerate() {
            let lo = if b == 0 { f32::NEG_INFINITY } else { (b * BLOCK) as f32 };
            let last_base = self.dims[a].saturating_sub(2);
            let hi = if (b + 1) * BLOCK > last_base { f32::INFINITY } else { ((b + 1) * BLOCK) as f32 };
            let rate = ray.index_rate[a];
            let t = if rate > 0.0 {
                (hi - ray.index_origin[a]) / rate
            } else if rate < 0.0 {
                (lo - ray.index_origin[a]) / rate
            } else {
                f32::INFINITY
            };
            t_exit = t_exit.min(t);
        }
        let safe = t_exit - ray.margin;
        if !safe.is_finite() {
            return if safe > 0.0 { usize::MAX } else { k + 1 };
        }
        // Samples k' with t_k' <= safe are skipped: t_k' = near + span (k' + 0.5) / samples.
        let first_after = ((safe - ray.near) * ray.samples as f32 / ray.span - 0.5).floor() + 1.0;
        if first_after.is_finite() && first_after > (k + 1) as f32 {
            first_after.min(usize::MAX as f32) as usize
        } else {
            k + 1
        }
    }

    #[inline]
    fn colour(&self, (base, [fx, fy, fz], _): Cell) -> [f32; 3] {
        let idx = self.corner_indices(base);
        let w = [
            (1.0 - fx) * (1.0 - fy) * (1.0 - fz),
            fx * (1.0 - fy) * (1.0 - fz),
            (1.0 - fx) * fy * (1.0 - fz),
            fx * fy * (1.0 - fz),
            (1.0 - fx) * (1.0 - fy) * fz,
            fx * (1.0 - fy) * fz,
            (1.0 - fx) * fy * fz,
            fx * fy * fz,
        ];
        let mut out = [0.0; 3];
        for k in 0..8 {
            let c = self.colour[idx[k]];
            for a in 0..3 {
                out[a] += w[k] * c[a];
            }
        }
        out
    }

    /// Entry/exit parameters with the grid bbox (same as the tensor renderer).
    #[inline]
    fn interval(&self, o: [f32; 3], d: [f32; 3]) -> (f32, f32) {
        let mut t_enter = f32::NEG_INFINITY;
        let mut t_exit = f32::INFINITY;
        for a in 0..3 {
            let sign = if d[a] >= 0.0 { 1.0 } else { -1.0 };
            let inv = 1.0 / (d[a].abs().max(1e-9) * sign);
            let t1 = (self.grid_min[a] - o[a]) * inv;
            let t2 = (self.grid_max[a] - o[a]) * inv;
            t_enter = t_enter.max(t1.min(t2));
            t_exit = t_exit.min(t1.max(t2));
        }
        let t_enter = t_enter.max(0.0);
        (t_enter, t_exit.max(t_enter))
    }

    /// The continuous-index parametrisation of a ray (for block skipping).
    #[inline]
    fn walk(&self, o: [f32; 3], d: [f32; 3], near: f32, span: f32, samples: usize) -> RayWalk {
        let index_rate = [0, 1, 2].map(|a| d[a] / self.voxel);
        let fastest = index_rate.iter().fold(0f32, |m, r| m.max(r.abs()));
        RayWalk {
            index_origin: [0, 1, 2].map(|a| (o[a] - self.grid_min[a]) / self.voxel - 0.5),
            index_rate,
            near,
            span,
            samples,
            margin: if fastest > 0.0 { 0.01 / fastest } else { 0.0 },
        }
    }

    /// Marches one ray: opacity and, on request, colour/depth/NOCS (sums of weights, not normalised).
    fn march(&self, o: [f32; 3], d: [f32; 3], samples: usize, shade: bool) -> RaySample {
        let (near, far) = self.interval(o, d);
        let span = far - near;
        let len = (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt();
        let delta = span * len / samples as f32;
        let mut out = RaySample::default();
        let mut optical = 0.0f32;
        if span <= 0.0 {
            return out;
        }
        let ray = self.walk(o, d, near, span, samples);
        let mut k = 0;
        while k < samples {
            let t = near + span * (k as f32 + 0.5) / samples as f32;
            let p = [o[0] + t * d[0], o[1] + t * d[1], o[2] + t * d[2]];
            let cell = self.cell(p);
            if !self.cell_occupied(cell.0) {
                k = self.next_sample(cell.0, &ray, k);
                continue;
            }
            let tau = self.density(cell) * delta;
            if shade && tau > 0.0 {
                let w = (-optical).exp() * (1.0 - (-tau).exp());
                let c = self.colour(cell);
                for a in 0..3 {
                    out.colour[a] += w * c[a];
                    out.nocs[a] += w * (p[a] - self.nocs_min[a]) / self.nocs_extent[a];
                }
                out.depth += w * t;
            }
            optical += tau;
            if optical > OPAQUE {
                break;
            }
            k += 1;
        }
        out.opacity = 1.0 - (-optical).exp();
        out
    }

    /// Opacity of one ray and its gradient with respect to the origin and the direction (interval
    /// and step length held constant, as in the tensor renderer).
    fn opacity_grad(&self, o: [f32; 3], d: [f32; 3], samples: usize) -> (f32, [f32; 3], [f32; 3]) {
        let (near, far) = self.interval(o, d);
        let span = far - near;
        if span <= 0.0 {
            return (0.0, [0.0; 3], [0.0; 3]);
        }
        let len = (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt();
        let delta = span * len / samples as f32;
        let (mut optical, mut g_o, mut g_d) = (0.0f32, [0.0f32; 3], [0.0f32; 3]);
        let ray = self.walk(o, d, near, span, samples);
        let mut k = 0;
        while k < samples {
            let t = near + span * (k as f32 + 0.5) / samples as f32;
            let p = [o[0] + t * d[0], o[1] + t * d[1], o[2] + t * d[2]];
            let cell = self.cell(p);
            if !self.cell_occupied(cell.0) {
                k = self.next_sample(cell.0, &ray, k);
                continue;
            }
            let (sigma, grad) = self.density_grad(cell);
            optical += sigma * delta;
            if optical > OPAQUE {
                // The gradient is scaled by the final transmittance (< e^-30): nothing to carry.
                return (1.0 - (-optical).exp(), [0.0; 3], [0.0; 3]);
            }
            for a in 0..3 {
                g_o[a] += grad[a] * delta;
                g_d[a] += grad[a] * delta * t;
            }
            k += 1;
        }
        let transmittance = (-optical).exp();
        (1.0 - transmittance, g_o.map(|v| v * transmittance), g_d.map(|v| v * transmittance))
    }

    /// Renders many rays (flat `[R*3]` origins and directions) on the host, in parallel.
    pub fn render_host(&self, origins: &[f32], directions: &[f32], samples: usize, shade: bool) -> HostRendering {
        let rays: Vec<RaySample> = origins
            .par_chunks_exact(3)
            .zip(directions.par_chunks_exact(3))
            .map(|(o, d)| self.march([o[0], o[1], o[2]], [d[0], d[1], d[2]], samples, shade))
            .collect();
        let mut out = HostRendering { opacity: rays.iter().map(|r| r.opacity).collect(), ..Default::default() };
        if shade {
            out.colour = rays.iter().map(|r| r.colour).collect();
            out.depth = rays.iter().map(|r| if r.opacity > 1e-4 { r.depth / r.opacity } else { 0.0 }).collect();
            out.nocs = rays
                .iter()
                .map(|r| if r.opacity > 1e-4 { r.nocs.map(|v| (v / r.opacity).clamp(0.0, 1.0)) } else { [0.0; 3] })
                .collect();
        }
        out
    }
}

/// Differentiable opacity of rays `(origins [R, 3], directions [R, 3]) -> [R]` for a frozen grid.
pub struct FusedOpacity {
    /// The grid.
    pub grid: Arc<HostGrid>,
    /// Samples per ray.
    pub samples: usize,
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused renderer needs contiguous inputs"),
    }
}

impl CustomOp2 for FusedOpacity {
    fn name(&self) -> &'static str {
        "fused-opacity"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let o = contiguous_f32(s1, l1)?;
        let d = contiguous_f32(s2, l2)?;
        if o.len() != d.len() || o.len() % 3 != 0 {
            candle_core::bail!("fused renderer: origins {:?} vs directions {:?}", l1.shape(), l2.shape());
        }
        let out: Vec<f32> = o
            .par_chunks_exact(3)
            .zip(d.par_chunks_exact(3))
            .map(|(o, d)| self.grid.march([o[0], o[1], o[2]], [d[0], d[1], d[2]], self.samples, false).opacity)
            .collect();
        let n = out.len();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        arg1: &Tensor,
        arg2: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let o = arg1.flatten_all()?.to_vec1::<f32>()?;
        let d = arg2.flatten_all()?.to_vec1::<f32>()?;
        let g = grad_res.flatten_all()?.to_vec1::<f32>()?;
        let grads: Vec<([f32; 3], [f32; 3])> = o
            .par_chunks_exact(3)
            .zip(d.par_chunks_exact(3))
            .zip(g.par_iter())
            .map(|((o, d), g)| {
                let (_, go, gd) = self.grid.opacity_grad([o[0], o[1], o[2]], [d[0], d[1], d[2]], self.samples);
                (go.map(|v| v * g), gd.map(|v| v * g))
            })
            .collect();
        let n = grads.len();
        let go: Vec<f32> = grads.iter().flat_map(|(a, _)| *a).collect();
        let gd: Vec<f32> = grads.iter().flat_map(|(_, b)| *b).collect();
        let dev = arg1.device();
        Ok((Some(Tensor::from_vec(go, (n, 3), dev)?), Some(Tensor::from_vec(gd, (n, 3), dev)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::field::voxel::VoxelGrid;

    /// Every sample read from the corners, no occupancy: the reference for the skipping march.
    fn dense_march(grid: &HostGrid, o: [f32; 3], d: [f32; 3], samples: usize) -> (f32, [f32; 3], [f32; 3], [f32; 3]) {
        let (near, far) = grid.interval(o, d);
        let span = far - near;
        if span <= 0.0 {
            return (0.0, [0.0; 3], [0.0; 3], [0.0; 3]);
        }
        let len = (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt();
        let delta = span * len / samples as f32;
        let (mut optical, mut g_o, mut g_d, mut colour) = (0.0f32, [0.0f32; 3], [0.0f32; 3], [0.0f32; 3]);
        for k in 0..samples {
            let t = near + span * (k as f32 + 0.5) / samples as f32;
            let p = [o[0] + t * d[0], o[1] + t * d[1], o[2] + t * d[2]];
            let (sigma, grad) = grid.density_grad(grid.cell(p));
            let tau = sigma * delta;
            if tau > 0.0 {
                let w = (-optical).exp() * (1.0 - (-tau).exp());
                let c = grid.colour(grid.cell(p));
                for a in 0..3 {
                    colour[a] += w * c[a];
                }
            }
            optical += tau;
            for a in 0..3 {
                g_o[a] += grad[a] * delta;
                g_d[a] += grad[a] * delta * t;
            }
        }
        let tr = (-optical).exp();
        (1.0 - tr, g_o.map(|v| v * tr), g_d.map(|v| v * tr), colour)
    }

    #[test]
    fn skipping_empty_space_changes_nothing() {
        // A sparse grid: two small blobs in a 37 x 30 x 26 box (sizes not multiples of the block).
        let dims = [37usize, 30, 26];
        let mut occupancy = vec![0f32; dims.iter().product()];
        let mut colour = vec![[0f32; 3]; occupancy.len()];
        for z in 0..dims[2] {
            for y in 0..dims[1] {
                for x in 0..dims[0] {
                    let i = (z * dims[1] + y) * dims[0] + x;
                    let blob = |c: [f32; 3], r: f32| {
                        let q = [x as f32 - c[0], y as f32 - c[1], z as f32 - c[2]];
                        (r - (q[0] * q[0] + q[1] * q[1] + q[2] * q[2]).sqrt()).clamp(0.0, 1.0)
                    };
                    occupancy[i] = blob([8.0, 9.0, 7.0], 4.0).max(blob([29.0, 22.0, 20.0], 3.0)).max(blob([0.0, 0.0, 25.0], 1.5));
                    colour[i] = [x as f32 / 37.0, y as f32 / 30.0, z as f32 / 26.0];
                }
            }
        }
        // Cubic voxels of 0.05.
        let bbox_max = dims.map(|n| 0.025 * n as f32);
        let voxels = VoxelGrid { dims, bbox_min: bbox_max.map(|v| -v), bbox_max, occupancy, colors: colour };
        let field =
            CanonicalField::from_voxels(&voxels, (voxels.bbox_min, bbox_max), 10.0, &candle_core::Device::Cpu).expect("field");
        let grid = HostGrid::from_field(&field).expect("host grid");
        assert!(grid.occupied_fraction() < 0.2, "the grid should be mostly empty: {}", grid.occupied_fraction());
        let mut state = 12345u64;
        let mut rnd = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        let (mut hits, mut opaque, mut exact) = (0, 0, 0);
        for r in 0..3000 {
            // Origins outside and inside the box, directions of every kind, some axis-aligned.
            let o = [2.5 * rnd(), 2.5 * rnd(), 2.5 * rnd()];
            let target = [0.9 * rnd(), 0.7 * rnd(), 0.6 * rnd()];
            let mut d = [target[0] - o[0], target[1] - o[1], target[2] - o[2]];
            if r % 7 == 0 {
                d[r % 3] = 0.0;
            }
            for samples in [16usize, 96] {
                let (op, go, gd, col) = dense_march(&grid, o, d, samples);
                let fast = grid.march(o, d, samples, true);
                let (op2, go2, gd2) = grid.opacity_grad(o, d, samples);
                // Identical (no sample skipped that holds density) up to what an opaque ray leaves
                // behind its first e^30 of optical thickness.
                assert_eq!(fast.opacity.to_bits(), op.to_bits(), "ray {r}: opacity");
                assert_eq!(op2.to_bits(), op.to_bits(), "ray {r}: opacity (gradient pass)");
                for a in 0..3 {
                    assert!((fast.colour[a] - col[a]).abs() <= 1e-6, "ray {r}: colour {:?} vs {col:?}", fast.colour);
                    assert!((go2[a] - go[a]).abs() <= 1e-6 * (1.0 + go[a].abs()), "ray {r}: d/d origin {go2:?} vs {go:?}");
                    assert!((gd2[a] - gd[a]).abs() <= 1e-6 * (1.0 + gd[a].abs()), "ray {r}: d/d direction {gd2:?} vs {gd:?}");
                }
                opaque += usize::from(op == 1.0);
                exact += usize::from(fast.colour == col && go2 == go && gd2 == gd);
                hits += usize::from(op > 0.01);
            }
        }
        assert!(hits > 150, "too few rays hit the blobs: {hits}");
        assert!(opaque > 50, "too few opaque rays to exercise early termination: {opaque}");
        // Rays that never turn opaque are marched sample for sample the same: bit-identical.
        assert!(exact >= 6000 - opaque, "{exact} bit-identical rays of 6000 ({opaque} opaque)");
    }
}
