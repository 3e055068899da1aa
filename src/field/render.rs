//! Differentiable volume rendering (paper Eq. 9) of opacity (mask), colour, depth and NOCS (Eq. 11)
//! from a [`CanonicalField`], batched over many cameras at once.
//!
//! Everything is plain candle tensor algebra, so it runs on any device and gradients flow to the
//! camera pose, the focal length and (when they are `Var`s) the grid values. Ray/bbox intersection
//! and the sample spacing are treated as constants (detached); the sample *positions* are not, which
//! is what carries the gradient with respect to the camera.

use candle_core::{DType, Device, IndexOp, Tensor};
use nalgebra::Isometry3;

use crate::error::{Error, Result};
use crate::field::canonical::CanonicalField;
use crate::field::fused::FusedOpacity;
use crate::geometry::Intrinsics;

/// A batch of rays in the normalised object frame.
#[derive(Clone, Debug)]
pub struct Rays {
    /// Ray origins, `[R, 3]`.
    pub origins: Tensor,
    /// Ray directions (not necessarily unit length), `[R, 3]`.
    pub directions: Tensor,
}

/// A batch of `N` pinhole cameras as tensors (so they can carry gradients).
#[derive(Clone, Debug)]
pub struct CameraBatch {
    /// Rotation of camera_from_object, `[N, 3, 3]`.
    pub rotation: Tensor,
    /// Translation of camera_from_object (normalised units), `[N, 3]`.
    pub translation: Tensor,
    /// Focal length in pixels, `[N]` (square pixels).
    pub focal: Tensor,
    /// Principal point in pixels, `[N, 2]`.
    pub principal: Tensor,
}

impl CameraBatch {
    /// Constant cameras from poses (translation already in normalised units) and intrinsics.
    pub fn from_poses(camera_from_object: &[Isometry3<f64>], intrinsics: &[Intrinsics], device: &Device) -> Result<Self> {
        if camera_from_object.len() != intrinsics.len() || camera_from_object.is_empty() {
            return Err(Error::InvalidInput(format!("{} poses for {} intrinsics", camera_from_object.len(), intrinsics.len())));
        }
        let n = camera_from_object.len();
        let mut rot = Vec::with_capacity(n * 9);
        let mut trans = Vec::with_capacity(n * 3);
        for pose in camera_from_object {
            let r = pose.rotation.to_rotation_matrix();
            for i in 0..3 {
                for j in 0..3 {
                    rot.push(r[(i, j)] as f32);
                }
                trans.push(pose.translation.vector[i] as f32);
            }
        }
        let focal: Vec<f32> = intrinsics.iter().map(|k| (0.5 * (k.fx + k.fy)) as f32).collect();
        let principal: Vec<f32> = intrinsics.iter().flat_map(|k| [k.cx as f32, k.cy as f32]).collect();
        Ok(Self {
            rotation: Tensor::from_vec(rot, (n, 3, 3), device)?,
            translation: Tensor::from_vec(trans, (n, 3), device)?,
            focal: Tensor::from_vec(focal, n, device)?,
            principal: Tensor::from_vec(principal, (n, 2), device)?,
        })
    }

    /// Number of cameras.
    pub fn len(&self) -> usize {
        self.focal.dims().first().copied().unwrap_or(0)
    }

    /// True when the batch holds no camera.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rays through pixel positions `pixels` (`[N, M, 2]`, pixel coordinates of each camera's image),
    /// in the object frame; ray `n * M + m` belongs to camera `n`, pixel `m`.
    pub fn rays(&self, pixels: &Tensor) -> Result<Rays> {
        let (n, m, two) = pixels.dims3()?;
        if n != self.len() || two != 2 {
            return Err(Error::InvalidInput(format!("pixels {:?} for {} cameras", pixels.dims(), self.len())));
        }
        // Camera-frame directions d_cam = ((u - cx) / f, (v - cy) / f, 1).
        let centred = pixels.broadcast_sub(&self.principal.unsqueeze(1)?)?;
        let xy = centred.broadcast_div(&self.focal.reshape((n, 1, 1))?)?;
        let ones = Tensor::ones((n, m, 1), xy.dtype(), xy.device())?;
        let d_cam = Tensor::cat(&[&xy, &ones], 2)?; // [N, M, 3]
                                                    // Object frame: d_obj = R^T d_cam, i.e. row vectors d_obj^T = d_cam^T R.
        let d_obj = d_cam.matmul(&self.rotation)?; // [N, M, 3]
                                                   // Camera centre in the object frame: o = -R^T t.
        let origin = self.translation.unsqueeze(1)?.matmul(&self.rotation)?.neg()?; // [N, 1, 3]
        let origins = origin.broadcast_as((n, m, 3))?.reshape((n * m, 3))?;
        Ok(Rays { origins, directions: d_obj.reshape((n * m, 3))? })
    }
}

/// Which quantities to render besides opacity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenderWhat {
    /// Expected colour.
    pub colour: bool,
    /// Expected depth along the ray (ray-parameter units: z-depth for camera rays with z = 1).
    pub depth: bool,
    /// Expected NOCS (Eq. 11), normalised by opacity where the ray hits.
    pub nocs: bool,
    /// Ref-NeRF's orientation penalty per ray, `sum_i w_i max(0, n_i . d)^2` with the normals
    /// `n = -grad(density) / |grad(density)|` and the weights detached (as threestudio does).
    pub orientation: bool,
}

/// The rendered quantities for a batch of rays.
#[derive(Clone, Debug)]
pub struct Rendering {
    /// Opacity (accumulated alpha, the rendered mask), `[R]`.
    pub opacity: Tensor,
    /// Colour, `[R, 3]`, composited over black.
    pub colour: Option<Tensor>,
    /// Depth, `[R]`, not normalised (sum of weights x t).
    pub depth: Option<Tensor>,
    /// NOCS, `[R, 3]`, sum of weights x NOCS(p) (divide by opacity for the surface NOCS).
    pub nocs: Option<Tensor>,
    /// Orientation penalty per ray, `[R]` (see [`RenderWhat::orientation`]).
    pub orientation: Option<Tensor>,
}

/// Renders `rays` through `field` with `samples` samples per ray spread evenly over the part of
/// each ray inside the field's grid bbox.
pub fn render_rays(field: &CanonicalField, rays: &Rays, samples: usize, what: RenderWhat) -> Result<Rendering> {
    rays.origins.dims2()?;
    if samples < 2 {
        return Err(Error::InvalidInput("need at least 2 samples per ray".into()));
    }
    if let (Some(grid), false) = (&field.host, what.colour || what.depth || what.nocs || what.orientation) {
        let op = FusedOpacity { grid: grid.clone(), samples };
        let opacity = rays.origins.contiguous()?.apply_op2(&rays.directions.contiguous()?, op)?;
        return Ok(Rendering { opacity, colour: None, depth: None, nocs: None, orientation: None });
    }
    render_rays_tensor(field, rays, samples, what)
}

/// The generic tensor renderer behind [`render_rays`] (any device, gradients to everything).
pub fn render_rays_tensor(field: &CanonicalField, rays: &Rays, samples: usize, what: RenderWhat) -> Result<Rendering> {
    let r = rays.origins.dims2()?.0;
    let device = rays.origins.device();
    let (near, far) = ray_box_interval(&rays.origins.detach(), &rays.directions.detach(), field)?; // [R, 1]
    let steps: Vec<f32> = (0..samples).map(|k| (k as f32 + 0.5) / samples as f32).collect();
    let steps = Tensor::from_vec(steps, (1, samples), device)?;
    let span = (&far - &near)?; // [R, 1]
    let t = near.broadcast_add(&span.broadcast_mul(&steps)?)?; // [R, S], detached
    let points = rays.origins.unsqueeze(1)?.broadcast_add(&rays.directions.unsqueeze(1)?.broadcast_mul(&t.unsqueeze(2)?)?)?; // [R, S, 3]
    let points = points.reshape((r * samples, 3))?;
    let dir_len = rays.directions.detach().sqr()?.sum_keepdim(1)?.sqrt()?; // [R, 1]
    let delta = (span * &dir_len)?.affine(1.0 / samples as f64, 0.0)?; // [R, 1] metric step

    let lookup = GridLookup::new(field, &points)?;
    let sigma = lookup.sample(&field.density)?.reshape((r, samples))?;
    let tau = sigma.broadcast_mul(&delta)?; // optical thickness per sample [R, S]
    let total = tau.sum_keepdim(1)?;
    let opacity = total.neg()?.exp()?.affine(-1.0, 1.0)?.squeeze(1)?;
    if !(what.colour || what.depth || what.nocs || what.orientation) {
        return Ok(Rendering { opacity, colour: None, depth: None, nocs: None, orientation: None });
    }
    // w_i = T_i alpha_i with T_i = exp(-sum_{j<i} tau_j).
    let exclusive = (tau.cumsum(1)? - &tau)?;
    let weights = (exclusive.neg()?.exp()? * tau.neg()?.exp()?.affine(-1.0, 1.0)?)?; // [R, S]
    let colour = if what.colour {
        let c = lookup.sample(&field.colour)?.reshape((r, samples, 3))?;
        Some(c.broadcast_mul(&weights.unsqueeze(2)?)?.sum(1)?)
    } else {
        None
    };
    let depth = if what.depth { Some((&weights * &t)?.sum(1)?) } else { None };
    let nocs = if what.nocs {
        let lo = Tensor::from_vec(field.nocs_min.to_vec(), (1, 1, 3), device)?;
        let hi = Tensor::from_vec(field.nocs_max.to_vec(), (1, 1, 3), device)?;
        let p = points.reshape((r, samples, 3))?;
        let n = p.broadcast_sub(&lo)?.broadcast_div(&(hi - &lo)?)?;
        Some(n.broadcast_mul(&weights.unsqueeze(2)?)?.sum(1)?)
    } else {
        None
    };
    let orientation = if what.orientation {
        let normals = lookup.sample(&density_normals(field)?)?.reshape((r, samples, 3))?;
        let unit_dir = rays.directions.detach().broadcast_div(&dir_len)?.unsqueeze(1)?; // [R, 1, 3]
        let facing_away = normals.broadcast_mul(&unit_dir)?.sum(2)?.relu()?.sqr()?; // [R, S]
        Some((weights.detach() * facing_away)?.sum(1)?)
    } else {
        None
    };
    Ok(Rendering { opacity, colour, depth, nocs, orientation })
}

/// Outward unit normals of the density field per voxel, `[V, 3]`: `-grad / |grad|` with central
/// differences on the grid (one-sided at the faces), differentiable in the density.
pub fn density_normals(field: &CanonicalField) -> Result<Tensor> {
    let [nx, ny, nz] = field.dims;
    if nx < 2 || ny < 2 || nz < 2 {
        return Err(Error::InvalidInput(format!("normals need a grid of at least 2 cells per side, got {:?}", field.dims)));
    }
    let d = field.density.reshape((nz, ny, nx))?;
    let diff = |axis: usize, n: usize| -> Result<Tensor> {
        let next = Tensor::cat(&[d.narrow(axis, 1, n - 1)?, d.narrow(axis, n - 1, 1)?], axis)?;
        let prev = Tensor::cat(&[d.narrow(axis, 0, 1)?, d.narrow(axis, 0, n - 1)?], axis)?;
        Ok((next - prev)?)
    };
    let grad = Tensor::stack(&[diff(2, nx)?, diff(1, ny)?, diff(0, nz)?], 3)?.reshape((nx * ny * nz, 3))?;
    let norm = (grad.sqr()?.sum_keepdim(1)? + 1e-12)?.sqrt()?;
    Ok(grad.broadcast_div(&norm)?.neg()?)
}

/// Host copies of a rendering, one value (or triple) per ray.
#[derive(Clone, Debug, Default)]
pub struct HostRendering {
    /// Opacity per ray.
    pub opacity: Vec<f32>,
    /// Colour per ray (empty unless requested).
    pub colour: Vec<[f32; 3]>,
    /// Depth per ray, divided by opacity (empty unless requested).
    pub depth: Vec<f32>,
    /// Surface NOCS per ray, divided by opacity (empty unless requested).
    pub nocs: Vec<[f32; 3]>,
}

/// Renders without gradients in chunks of `chunk` rays (bounded memory) and copies to the host.
pub fn render_rays_host(
    field: &CanonicalField,
    rays: &Rays,
    samples: usize,
    what: RenderWhat,
    chunk: usize,
) -> Result<HostRendering> {
    let total = rays.origins.dims2()?.0;
    if let Some(grid) = &field.host {
        let o = rays.origins.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let d = rays.directions.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        return Ok(grid.render_host(&o, &d, samples, what.colour || what.depth || what.nocs));
    }
    let chunk = chunk.max(1);
    let mut out = HostRendering::default();
    let mut start = 0;
    while start < total {
        let len = chunk.min(total - start);
        let sub = Rays {
            origins: rays.origins.i(start..start + len)?.detach(),
            directions: rays.directions.i(start..start + len)?.detach(),
        };
        let rendering = render_rays(field, &sub, samples, what)?;
        let opacity = rendering.opacity.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        if let Some(c) = rendering.colour {
            out.colour.extend(to_triples(&c)?);
        }
        if let Some(d) = rendering.depth {
            let d = d.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            out.depth.extend(d.iter().zip(&opacity).map(|(d, a)| if *a > 1e-4 { d / a } else { 0.0 }));
        }
        if let Some(n) = rendering.nocs {
            let n = to_triples(&n)?;
            out.nocs.extend(n.iter().zip(&opacity).map(
                |(n, a)| {
                    if *a > 1e-4 {
                        n.map(|v| (v / a).clamp(0.0, 1.0))
                    } else {
                        [0.0; 3]
                    }
                },
            ));
        }
        out.opacity.extend(opacity);
        start += len;
    }
    Ok(out)
}

fn to_triples(t: &Tensor) -> Result<Vec<[f32; 3]>> {
    let flat = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(flat.chunks_exact(3).map(|c| [c[0], c[1], c[2]]).collect())
}

/// Entry and exit ray parameters `[R, 1]` of each ray with the field's grid bbox (clamped to t >= 0;
/// rays that miss get near = far).
fn ray_box_interval(origins: &Tensor, directions: &Tensor, field: &CanonicalField) -> Result<(Tensor, Tensor)> {
    let device = origins.device();
    let lo = Tensor::from_vec(field.grid_min.to_vec(), (1, 3), device)?;
    let hi = Tensor::from_vec(field.grid_max.to_vec(), (1, 3), device)?;
    // Keep |d| >= 1e-9 with its sign so the slabs are finite.
    let sign = directions.ge(0.0)?.to_dtype(DType::F32)?.affine(2.0, -1.0)?;
    let safe = directions.abs()?.maximum(1e-9)?.mul(&sign)?;
    let inv = safe.recip()?;
    let t1 = lo.broadcast_sub(origins)?.mul(&inv)?;
    let t2 = hi.broadcast_sub(origins)?.mul(&inv)?;
    let t_enter = t1.minimum(&t2)?.max_keepdim(1)?.maximum(0.0)?;
    let t_exit = t1.maximum(&t2)?.min_keepdim(1)?;
    let t_exit = t_exit.maximum(&t_enter)?;
    Ok((t_enter, t_exit))
}

/// Trilinear lookup positions shared by every channel sampled at the same points.
struct GridLookup {
    /// Flat voxel indices of the 8 corners, each `[P]` (u32).
    corners: Vec<Tensor>,
    /// Trilinear weights of the 8 corners, each `[P, 1]` (differentiable in the points).
    weights: Vec<Tensor>,
}

impl GridLookup {
    fn new(field: &CanonicalField, points: &Tensor) -> Result<Self> {
        let device = points.device();
        let [nx, ny, nz] = field.dims;
        let voxel = field.voxel_size();
        let lo = Tensor::from_vec(field.grid_min.to_vec(), (1, 3), device)?;
        // Continuous voxel index: voxel centres sit at integers.
        let g = points.broadcast_sub(&lo)?.affine(1.0 / voxel as f64, -0.5)?;
        let dims_m1 = Tensor::from_vec(vec![nx as f32 - 1.0, ny as f32 - 1.0, nz as f32 - 1.0], (1, 3), device)?;
        let dims_m2 = Tensor::from_vec(
            vec![(nx as f32 - 2.0).max(0.0), (ny as f32 - 2.0).max(0.0), (nz as f32 - 2.0).max(0.0)],
            (1, 3),
            device,
        )?;
        let g = g.maximum(0.0)?.broadcast_minimum(&dims_m1)?;
        let base = g.detach().floor()?.broadcast_minimum(&dims_m2)?;
        let frac = (&g - &base)?; // [P, 3], in [0, 1]
        let fx = frac.i((.., 0..1))?;
        let fy = frac.i((.., 1..2))?;
        let fz = frac.i((.., 2..3))?;
        let gx = fx.affine(-1.0, 1.0)?;
        let gy = fy.affine(-1.0, 1.0)?;
        let gz = fz.affine(-1.0, 1.0)?;
        let strides = Tensor::from_vec(vec![1f32, nx as f32, (nx * ny) as f32], (3, 1), device)?;
        let flat = base.matmul(&strides)?.squeeze(1)?; // [P], exact in f32 for grids < 2^24 voxels
        let mut corners = Vec::with_capacity(8);
        let mut weights = Vec::with_capacity(8);
        for dz in 0..2usize {
            for dy in 0..2usize {
                for dx in 0..2usize {
                    let offset = (dx + dy * nx + dz * nx * ny) as f64;
                    corners.push(flat.affine(1.0, offset)?.to_dtype(DType::U32)?);
                    let wx = if dx == 1 { &fx } else { &gx };
                    let wy = if dy == 1 { &fy } else { &gy };
                    let wz = if dz == 1 { &fz } else { &gz };
                    weights.push(((wx * wy)? * wz)?);
                }
            }
        }
        Ok(Self { corners, weights })
    }

    /// Samples a `[V, C]` grid tensor at the lookup's points: `[P, C]`.
    fn sample(&self, values: &Tensor) -> Result<Tensor> {
        let mut acc: Option<Tensor> = None;
        for (idx, w) in self.corners.iter().zip(&self.weights) {
            let v = values.index_select(idx, 0)?.broadcast_mul(w)?;
            acc = Some(match acc {
                None => v,
                Some(a) => (a + v)?,
            });
        }
        acc.ok_or_else(|| Error::InvalidInput("empty lookup".into()))
    }
}

/// Pixel centres of a `width` x `height` raster as a `[1, W*H, 2]` tensor (row-major).
pub fn pixel_grid(width: u32, height: u32, device: &Device) -> Result<Tensor> {
    let mut v = Vec::with_capacity((width * height * 2) as usize);
    for y in 0..height {
        for x in 0..width {
            v.push(x as f32);
            v.push(y as f32);
        }
    }
    Ok(Tensor::from_vec(v, (1, (width * height) as usize, 2), device)?)
}
