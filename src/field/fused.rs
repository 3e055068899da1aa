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

/// Host copy of a field's grid.
#[derive(Clone, Debug)]
pub struct HostGrid {
    dims: [usize; 3],
    grid_min: [f32; 3],
    grid_max: [f32; 3],
    voxel: f32,
    density: Vec<f32>,
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
        Ok(Self {
            dims: field.dims,
            grid_min: field.grid_min,
            grid_max: field.grid_max,
            voxel: field.voxel_size(),
            density: field.density_host()?,
            colour: field.colour_host()?,
            nocs_min: field.nocs_min,
            nocs_extent: [0, 1, 2].map(|a| field.nocs_max[a] - field.nocs_min[a]),
        })
    }

    /// Corner base index, fractions and per-axis "not clamped" flags for a point (same rules as
    /// the tensor renderer: clamp the continuous index to [0, n-1], base = min(floor, n-2)).
    #[inline]
    fn cell(&self, p: [f32; 3]) -> ([usize; 3], [f32; 3], [bool; 3]) {
        let mut base = [0usize; 3];
        let mut frac = [0f32; 3];
        let mut free = [true; 3];
        for a in 0..3 {
            let n = self.dims[a];
            let g = (p[a] - self.grid_min[a]) / self.voxel - 0.5;
            let hi = n as f32 - 1.0;
            let gc = g.max(0.0).min(hi);
            free[a] = g > 0.0 && g < hi;
            let b = gc.floor().min((n as f32 - 2.0).max(0.0));
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

    /// Trilinear density and its gradient with respect to the point.
    #[inline]
    fn density_grad(&self, p: [f32; 3]) -> (f32, [f32; 3]) {
        let (base, f, free) = self.cell(p);
        let c = self.corner_indices(base).map(|i| self.density[i]);
        let [fx, fy, fz] = f;
        let (gx, gy, gz) = (1.0 - fx, 1.0 - fy, 1.0 - fz);
        // c index bits: x = 1, y = 2, z = 4.
        let v = gz * (gy * (gx * c[0] + fx * c[1]) + fy * (gx * c[2] + fx * c[3]))
            + fz * (gy * (gx * c[4] + fx * c[5]) + fy * (gx * c[6] + fx * c[7]));
        let dx = gz * (gy * (c[1] - c[0]) + fy * (c[3] - c[2])) + fz * (gy * (c[5] - c[4]) + fy * (c[7] - c[6]));
        let dy = gz * (gx * (c[2] - c[0]) + fx * (c[3] - c[1])) + fz * (gx * (c[6] - c[4]) + fx * (c[7] - c[5]));
        let dz = gy * (gx * (c[4] - c[0]) + fx * (c[5] - c[1])) + fy * (gx * (c[6] - c[2]) + fx * (c[7] - c[3]));
        let s = 1.0 / self.voxel;
        let g = [dx * s * free[0] as u8 as f32, dy * s * free[1] as u8 as f32, dz * s * free[2] as u8 as f32];
        (v, g)
    }

    #[inline]
    fn density(&self, p: [f32; 3]) -> f32 {
        self.density_grad(p).0
    }

    #[inline]
    fn colour(&self, p: [f32; 3]) -> [f32; 3] {
        let (base, [fx, fy, fz], _) = self.cell(p);
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
        for k in 0..samples {
            let t = near + span * (k as f32 + 0.5) / samples as f32;
            let p = [o[0] + t * d[0], o[1] + t * d[1], o[2] + t * d[2]];
            let tau = self.density(p) * delta;
            if shade && tau > 0.0 {
                let w = (-optical).exp() * (1.0 - (-tau).exp());
                let c = self.colour(p);
                for a in 0..3 {
                    out.colour[a] += w * c[a];
                    out.nocs[a] += w * (p[a] - self.nocs_min[a]) / self.nocs_extent[a];
                }
                out.depth += w * t;
            }
            optical += tau;
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
        for k in 0..samples {
            let t = near + span * (k as f32 + 0.5) / samples as f32;
            let p = [o[0] + t * d[0], o[1] + t * d[1], o[2] + t * d[2]];
            let (sigma, grad) = self.density_grad(p);
            optical += sigma * delta;
            for a in 0..3 {
                g_o[a] += grad[a] * delta;
                g_d[a] += grad[a] * delta * t;
            }
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
