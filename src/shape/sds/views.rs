//! What score distillation looks through: MVDream cameras, the views of a step, their renders and latents, bilinear resizing.

use candle_core::{DType, Device, Tensor};

use super::*;
use crate::config::SdsConfig;
use crate::error::{Error, Result};
use crate::field::canonical::CanonicalField;
use crate::field::render::{pixel_grid, render_rays_tensor, CameraBatch, RenderWhat};
use crate::geometry::se3::orbit_camera_from_object;
use crate::geometry::Intrinsics;

/// Bilinear resampling of `[B, C, H, W]` to `[B, C, out_h, out_w]` (half-pixel centres, no
/// antialiasing, as torch's `interpolate(mode="bilinear", align_corners=False)`), written as two
/// matrix products so that it is differentiable (candle's `upsample_bilinear2d` has no backward).
pub fn resize_bilinear(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if (h, w) == (out_h, out_w) {
        return Ok(x.clone());
    }
    let ah = Tensor::from_vec(bilinear_matrix(h, out_h), (out_h, h), x.device())?.to_dtype(x.dtype())?;
    let aw_t = Tensor::from_vec(bilinear_matrix(w, out_w), (out_w, w), x.device())?.to_dtype(x.dtype())?.t()?;
    Ok(ah.broadcast_matmul(x)?.broadcast_matmul(&aw_t)?)
}

/// Row-stochastic `[out, inp]` matrix of 1-D bilinear interpolation with half-pixel centres.
pub(super) fn bilinear_matrix(inp: usize, out: usize) -> Vec<f32> {
    let mut m = vec![0f32; out * inp];
    let scale = inp as f64 / out as f64;
    for i in 0..out {
        let src = ((i as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(inp - 1);
        let i1 = (i0 + 1).min(inp - 1);
        let f = (src - i0 as f64) as f32;
        m[i * inp + i0] += 1.0 - f;
        m[i * inp + i1] += f;
    }
    m
}

/// MVDream's camera condition for a view at (`azimuth_deg`, `elevation_deg`): the 4x4 camera-to-world
/// matrix of an OpenGL camera (x right, y up, looking down -z) on the unit sphere looking at the origin
/// in a y-up world, converted to Blender's z-up world (`[x, -z, y]`), flattened row-major. Azimuth 0
/// looks from +z and 90 from +x, as in [`orbit_camera_from_object`], so the object frame's +y is up.
pub fn mvdream_camera(azimuth_deg: f64, elevation_deg: f64) -> [f32; 16] {
    let (sa, ca) = azimuth_deg.to_radians().sin_cos();
    let (se, ce) = elevation_deg.to_radians().sin_cos();
    let pos = [ce * sa, se, ce * ca];
    let forward = [-pos[0], -pos[1], -pos[2]];
    // right = forward x up(0, 1, 0), normalised; up' = right x forward.
    let right = {
        let r = [-forward[2], 0.0, forward[0]];
        let n = (r[0] * r[0] + r[2] * r[2]).sqrt().max(1e-12);
        [r[0] / n, 0.0, r[2] / n]
    };
    let up = [
        right[1] * forward[2] - right[2] * forward[1],
        right[2] * forward[0] - right[0] * forward[2],
        right[0] * forward[1] - right[1] * forward[0],
    ];
    // Columns: right, up, -forward, position (OpenGL camera-to-world in a y-up world).
    let cols = [right, up, [-forward[0], -forward[1], -forward[2]], pos];
    let mut gl = [[0f64; 4]; 4];
    for (j, c) in cols.iter().enumerate() {
        for i in 0..3 {
            gl[i][j] = c[i];
        }
    }
    gl[3][3] = 1.0;
    // Blender world: rows (x, -z, y) of the y-up world.
    let rows = [gl[0], gl[2].map(|v| -v), gl[1], gl[3]];
    let mut out = [0f32; 16];
    for i in 0..4 {
        for j in 0..4 {
            out[i * 4 + j] = rows[i][j] as f32;
        }
    }
    out
}

/// The views of one score-distillation step: `cfg.views` cameras at azimuths `360 / views` degrees
/// apart around the object, sharing elevation, FoV and distance.
pub struct SdsViews {
    /// The cameras for the renderer.
    pub cameras: CameraBatch,
    /// MVDream camera conditions `[V, 16]` ([`mvdream_camera`]).
    pub mv_cameras: Tensor,
    /// Render side in pixels.
    pub res: u32,
}

impl SdsViews {
    /// Views starting at `azimuth0_deg`; `distance_scale` multiplies the distance at which the unit
    /// grid's half-side just fills the vertical FoV.
    pub fn new(
        views: usize,
        res: u32,
        azimuth0_deg: f64,
        elevation_deg: f64,
        fov_deg: f64,
        distance_scale: f64,
        device: &Device,
    ) -> Result<Self> {
        let dist = distance_scale * SDS_GRID_HALF as f64 / (0.5 * fov_deg.to_radians()).tan();
        let mut poses = Vec::with_capacity(views);
        let mut intr = Vec::with_capacity(views);
        let mut cams = Vec::with_capacity(views * 16);
        for k in 0..views {
            let az = azimuth0_deg + 360.0 * k as f64 / views as f64;
            poses.push(orbit_camera_from_object(az, elevation_deg, dist));
            intr.push(Intrinsics::from_fov_y(fov_deg, res, res)?);
            cams.extend(mvdream_camera(az, elevation_deg));
        }
        Ok(Self {
            cameras: CameraBatch::from_poses(&poses, &intr, device)?,
            mv_cameras: Tensor::from_vec(cams, (views, 16), device)?,
            res,
        })
    }
}

pub(super) fn sample_views(cfg: &SdsConfig, res: u32, rng: &mut Stream, device: &Device) -> Result<SdsViews> {
    let az0 = rng.range([-180.0, 180.0]);
    let el = rng.range(cfg.elevation_deg);
    let fov = rng.range(cfg.fov_deg);
    let dist = rng.range(cfg.distance_scale);
    SdsViews::new(cfg.views, res, az0, el, fov, dist, device)
}

/// Regularisation statistics of one step's renders (differentiable).
pub struct RenderStats {
    /// Mean rendered opacity over all pixels (the sparsity regulariser).
    pub mean_opacity: Tensor,
    /// Ref-NeRF orientation penalty summed over the rays and divided by the number of rays the
    /// object covers (opacity > 0.5), when asked for.
    pub orientation: Option<Tensor>,
}

/// Renders the views over `background` (`[3]` in [0, 1]): `[V, 3, res, res]` in [0, 1], and the
/// regulariser statistics.
pub(super) fn render_views(
    field: &CanonicalField,
    views: &SdsViews,
    background: &[f32; 3],
    samples: usize,
    orientation: bool,
) -> Result<(Tensor, RenderStats)> {
    let device = field.device();
    let n = views.cameras.len();
    let res = views.res as usize;
    let pixels = pixel_grid(views.res, views.res, device)?.broadcast_as((n, res * res, 2))?.contiguous()?;
    let rays = views.cameras.rays(&pixels)?;
    let r = render_rays_tensor(field, &rays, samples, RenderWhat { colour: true, orientation, ..Default::default() })?;
    let colour = r.colour.ok_or_else(|| Error::InvalidInput("renderer returned no colour".into()))?;
    let bg = Tensor::from_vec(background.to_vec(), (1, 3), device)?;
    let alpha = r.opacity.unsqueeze(1)?;
    let rgb = (colour + alpha.affine(-1.0, 1.0)?.broadcast_mul(&bg)?)?;
    let img = rgb.reshape((n, res, res, 3))?.permute((0, 3, 1, 2))?.contiguous()?;
    let orientation = match r.orientation {
        Some(o) => {
            let covered = r.opacity.detach().ge(0.5)?.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?.max(1.0);
            Some((o.sum_all()? / covered as f64)?)
        }
        None => None,
    };
    Ok((img, RenderStats { mean_opacity: r.opacity.mean_all()?, orientation }))
}

/// Renders `views` of `field` over `background`, resamples them to `guidance_resolution` and encodes
/// them: the scaled latent means `[V, C, h, w]` (differentiable in the field's grids) and the
/// regulariser statistics (the orientation penalty when `orientation`).
pub fn render_latents(
    models: &DiffusionModels,
    field: &CanonicalField,
    views: &SdsViews,
    background: &[f32; 3],
    samples_per_ray: usize,
    guidance_resolution: u32,
    orientation: bool,
) -> Result<(Tensor, RenderStats)> {
    let (img, stats) = render_views(field, views, background, samples_per_ray, orientation)?;
    let gr = guidance_resolution as usize;
    let img = resize_bilinear(&img, gr, gr)?.affine(2.0, -1.0)?.to_dtype(models.dtype())?;
    let (mean, _) = models.vae.encode(&img)?;
    Ok(((mean * models.vae.scaling_factor())?, stats))
}
