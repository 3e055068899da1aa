//! Pose refinement (Algorithm 1, line 8): per image an se(3) correction and a log focal-length
//! offset, optimised together for all images in one batch with Adam on the IoU loss between the
//! rendered opacity and the input mask (`lambda_zeta = 0`, `lambda_IoU = 1`).
//!
//! The correction is left-multiplied as in BARF, but pivoted at the object's origin instead of the
//! camera centre: `camera_from_object = P exp(xi) P^-1 initial` with `P` the translation to the
//! initial object position `t0`, i.e. `R = exp(w) R0`, `t = t0 + V(w) v`, and `v` is measured in
//! units of the camera distance `|t0|`. About the camera centre, orbiting the object (the main
//! correction after the candidate grid) needs rotation and translation to move together by a factor
//! of the camera distance, which Adam's per-parameter steps follow very slowly; about the object it
//! is the rotation alone, and image-plane shift, scale and orientation decouple.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use nalgebra::{Isometry3, Matrix3, Point3, Translation3, UnitQuaternion, Vector3};

use crate::collection::SquareCrop;
use crate::congeal::coord_maps::FeatureGrid;
use crate::error::{Error, Result};
use crate::field::canonical::CanonicalField;
use crate::field::render::{render_rays, CameraBatch, RenderWhat};
use crate::geometry::Intrinsics;

/// Below this rotation angle (rad) the se(3) coefficients use their Taylor series.
const SMALL_ANGLE: f64 = 1e-2;

/// What is compared for one image: the mask resampled on a square window of rays.
#[derive(Clone, Debug)]
pub struct RefineTarget {
    /// Window around the input mask (image pixels); its raster size is the ray grid.
    pub crop: SquareCrop,
    /// Input mask on that raster, in [0, 1].
    pub mask: Vec<f32>,
    /// Fraction of each raster pixel inside the image ([`SquareCrop::resample_inside`]): the IoU
    /// counts rendered opacity only there, so an object cut by the frame is fitted with the same cut.
    pub inside: Vec<f32>,
    /// Optional semantic term: what the image's features should show where object points project.
    pub features: Option<FeatureTarget>,
}

impl RefineTarget {
    /// The target of an image's `mask` on `window`.
    pub fn new(window: SquareCrop, mask: &image::GrayImage) -> Self {
        Self {
            mask: window.resample_mask(mask),
            inside: window.resample_inside(mask.width(), mask.height()),
            crop: window,
            features: None,
        }
    }
}

/// A semantic term of pose refinement: object points, each with the cosine between the feature it
/// should carry and every token of the image's feature grid. The term is the weighted mean of
/// `1 - cos` at the points' projections (tokens interpolated bilinearly), so the pose moves each part
/// of the shape onto image tokens that look like it.
#[derive(Clone, Debug)]
pub struct FeatureTarget {
    /// Object-frame points (normalised object frame).
    pub points_in_object: Vec<Point3<f64>>,
    /// Per point, `tokens²` cosines with the image's tokens (row-major).
    pub cosines: Vec<f32>,
    /// Tokens per side of the image's feature grid.
    pub tokens: usize,
    /// The window the feature grid covers (image pixels).
    pub window: SquareCrop,
    /// Weight of the term next to the IoU loss (1 - IoU).
    pub weight: f64,
}

impl FeatureTarget {
    /// The term for an image whose feature grid is `image` (over `window`): each token `t` of a view
    /// of the shape at the current pose that the shape covers (`covered[t]`), with surface points
    /// `points[t]` and an expected feature `expected[t]` (`channels` values; all zero = none),
    /// contributes the mean of its points. Border tokens count too: thin parts (chair legs, a
    /// backrest's frame) have no others. `None` when no token qualifies or the sizes disagree.
    pub fn from_tokens(
        points: &[Vec<Point3<f64>>],
        covered: &[bool],
        expected: &[f32],
        image: &FeatureGrid,
        window: SquareCrop,
        weight: f64,
    ) -> Option<Self> {
        let (t, c) = (image.width, image.channels);
        if image.height != t || points.len() != t * t || covered.len() != t * t || expected.len() != t * t * c {
            return None;
        }
        let (mut points_in_object, mut cosines) = (Vec::new(), Vec::new());
        for (k, pts) in points.iter().enumerate() {
            let feature = &expected[k * c..(k + 1) * c];
            if !covered[k] || pts.is_empty() || feature.iter().all(|v| *v == 0.0) {
                continue;
            }
            let mean = pts.iter().fold(Vector3::zeros(), |a, p| a + p.coords) / pts.len() as f64;
            points_in_object.push(Point3::from(mean));
            cosines.extend(image.data.chunks(c).map(|u| u.iter().zip(feature).map(|(a, b)| a * b).sum::<f32>()));
        }
        (!points_in_object.is_empty()).then_some(Self { points_in_object, cosines, tokens: t, window, weight })
    }

    /// Cosine at token-grid coordinates `(gx, gy)` (token centres at integers) for point `k`, and its
    /// derivatives along x and y; coordinates outside the grid are clamped (zero derivative there).
    /// All zero for a point without cosines.
    pub fn sample(&self, k: usize, gx: f64, gy: f64) -> (f64, f64, f64) {
        let t = self.tokens;
        let Some(map) = self.cosines.get(k * t * t..(k + 1) * t * t).filter(|m| !m.is_empty()) else {
            return (0.0, 0.0, 0.0);
        };
        if t == 1 {
            return (map[0] as f64, 0.0, 0.0);
        }
        let last = (t - 1) as f64;
        let (inside_x, inside_y) = ((0.0..=last).contains(&gx), (0.0..=last).contains(&gy));
        let (x, y) = (gx.clamp(0.0, last), gy.clamp(0.0, last));
        let (x0, y0) = ((x.floor() as usize).min(t - 2), (y.floor() as usize).min(t - 2));
        let (fx, fy) = (x - x0 as f64, y - y0 as f64);
        let at = |yy: usize, xx: usize| map[yy * t + xx] as f64;
        let (a, b, c, d) = (at(y0, x0), at(y0, x0 + 1), at(y0 + 1, x0), at(y0 + 1, x0 + 1));
        let value = (1.0 - fy) * ((1.0 - fx) * a + fx * b) + fy * ((1.0 - fx) * c + fx * d);
        let dx = if inside_x { (1.0 - fy) * (b - a) + fy * (d - c) } else { 0.0 };
        let dy = if inside_y { (1.0 - fx) * (c - a) + fx * (d - b) } else { 0.0 };
        (value, dx, dy)
    }

    /// The feature window as a raster of one pixel per token (token centres at integers).
    fn token_raster(&self) -> SquareCrop {
        SquareCrop { size: self.tokens.max(1) as u32, ..self.window }
    }

    /// Token-grid coordinates of an image pixel.
    pub fn grid_from_image(&self, x: f64, y: f64) -> (f64, f64) {
        let q = self.token_raster().crop_from_image(nalgebra::Point2::new(x, y));
        (q.x, q.y)
    }

    /// The term (weighted mean of `1 - cos`) for pixel positions `pixels` of the points.
    pub fn loss(&self, pixels: &[(f64, f64)]) -> f64 {
        let n = pixels.len().min(self.points_in_object.len()).max(1);
        pixels
            .iter()
            .enumerate()
            .map(|(k, &(x, y))| {
                let (gx, gy) = self.grid_from_image(x, y);
                1.0 - self.sample(k, gx, gy).0
            })
            .sum::<f64>()
            / n as f64
    }
}

/// Settings of one refinement run.
#[derive(Clone, Debug)]
pub struct RefineSettings {
    /// Adam iterations.
    pub iterations: usize,
    /// Learning rate of the se(3) parameters.
    pub lr: f64,
    /// Learning rate of the log focal length.
    pub focal_lr: f64,
    /// Samples per ray.
    pub samples_per_ray: usize,
}

/// Refined cameras.
#[derive(Clone, Debug)]
pub struct RefineResult {
    /// camera_from_object per image, normalised object frame.
    pub camera_from_object: Vec<Isometry3<f64>>,
    /// Intrinsics per image (focal possibly refined).
    pub intrinsics: Vec<Intrinsics>,
    /// Final IoU per image.
    pub iou: Vec<f32>,
    /// Loss (mean 1 - IoU) per iteration.
    pub loss_history: Vec<f32>,
}

/// Batched, differentiable se(3) exponential: `xi` `[N, 6]` (rotation first) -> (R `[N, 3, 3]`,
/// V `[N, 3, 3]`) with exp(xi) = [R | V v]. Works in the dtype of `xi` (use f64 for accuracy).
pub fn se3_exp_batch(xi: &Tensor) -> Result<(Tensor, Tensor)> {
    let (n, six) = xi.dims2()?;
    if six != 6 {
        return Err(Error::InvalidInput(format!("se(3) batch must be [N, 6], got {:?}", xi.dims())));
    }
    let w = xi.narrow(1, 0, 3)?;
    let theta2 = w.sqr()?.sum_keepdim(1)?; // [N, 1]
    let theta = (&theta2 + 1e-24)?.sqrt()?;
    let t2 = &theta2;
    let t4 = t2.sqr()?;
    // Taylor series (accurate below SMALL_ANGLE).
    let a_taylor = (t2.affine(-1.0 / 6.0, 1.0)? + t4.affine(1.0 / 120.0, 0.0)?)?;
    let b_taylor = (t2.affine(-1.0 / 24.0, 0.5)? + t4.affine(1.0 / 720.0, 0.0)?)?;
    let c_taylor = (t2.affine(-1.0 / 120.0, 1.0 / 6.0)? + t4.affine(1.0 / 5040.0, 0.0)?)?;
    // Closed forms, evaluated on an angle kept away from zero (the branch is masked there anyway).
    let th = theta.maximum(SMALL_ANGLE)?;
    let (s, c) = (th.sin()?, th.cos()?);
    let a_exact = (&s / &th)?;
    let b_exact = (c.affine(-1.0, 1.0)? / th.sqr()?)?;
    let c_exact = ((&th - &s)? / th.powf(3.0)?)?;
    let small = theta.lt(SMALL_ANGLE)?;
    let a = small.where_cond(&a_taylor, &a_exact)?.reshape((n, 1, 1))?;
    let b = small.where_cond(&b_taylor, &b_exact)?.reshape((n, 1, 1))?;
    let cc = small.where_cond(&c_taylor, &c_exact)?.reshape((n, 1, 1))?;
    let k = skew_batch(&w)?; // [N, 3, 3]
    let k2 = k.matmul(&k)?;
    let eye = Tensor::eye(3, xi.dtype(), xi.device())?.unsqueeze(0)?.broadcast_as((n, 3, 3))?;
    let rot = ((&eye + k.broadcast_mul(&a)?)? + k2.broadcast_mul(&b)?)?;
    let v = ((&eye + k.broadcast_mul(&b)?)? + k2.broadcast_mul(&cc)?)?;
    Ok((rot, v))
}

/// `[N, 3]` -> `[N, 3, 3]` skew-symmetric matrices.
fn skew_batch(w: &Tensor) -> Result<Tensor> {
    let n = w.dims2()?.0;
    let x = w.narrow(1, 0, 1)?;
    let y = w.narrow(1, 1, 1)?;
    let z = w.narrow(1, 2, 1)?;
    let zero = x.zeros_like()?;
    let rows = [
        Tensor::cat(&[&zero, &z.neg()?, &y], 1)?,
        Tensor::cat(&[&z, &zero, &x.neg()?], 1)?,
        Tensor::cat(&[&y.neg()?, &x, &zero], 1)?,
    ];
    Ok(Tensor::stack(&rows, 1)?.reshape((n, 3, 3))?)
}

/// The cameras `P exp(xi) P^-1 initial` (pivot `P` at the object, `v` in units of the camera
/// distance) with focal `f0 * exp(log_focal * focal_mask)`, as a differentiable batch.
pub fn corrected_cameras(
    initial: &[Isometry3<f64>],
    intrinsics: &[Intrinsics],
    xi: &Tensor,
    log_focal: &Tensor,
    focal_mask: &Tensor,
) -> Result<CameraBatch> {
    let device = xi.device();
    let n = initial.len();
    let mut r0 = Vec::with_capacity(n * 9);
    let mut t0 = Vec::with_capacity(n * 3);
    let mut dist = Vec::with_capacity(n);
    for pose in initial {
        let r = pose.rotation.to_rotation_matrix();
        r0.extend((0..3).flat_map(|i| (0..3).map(move |j| r[(i, j)])));
        t0.extend(pose.translation.vector.iter().copied());
        dist.push(pose.translation.vector.norm().max(1e-6));
    }
    let r0 = Tensor::from_vec(r0, (n, 3, 3), device)?.to_dtype(xi.dtype())?;
    let t0 = Tensor::from_vec(t0, (n, 3), device)?.to_dtype(xi.dtype())?;
    let dist = Tensor::from_vec(dist, (n, 1), device)?.to_dtype(xi.dtype())?;
    let (dr, v) = se3_exp_batch(xi)?;
    let rotation = dr.matmul(&r0)?;
    let shift = v.matmul(&xi.narrow(1, 3, 3)?.unsqueeze(2)?)?.squeeze(2)?;
    let trans = (t0 + shift.broadcast_mul(&dist)?)?;
    let f0: Vec<f32> = intrinsics.iter().map(|k| (0.5 * (k.fx + k.fy)) as f32).collect();
    let f0 = Tensor::from_vec(f0, n, device)?;
    let focal = (f0 * (log_focal * focal_mask)?.exp()?)?;
    let principal: Vec<f32> = intrinsics.iter().flat_map(|k| [k.cx as f32, k.cy as f32]).collect();
    Ok(CameraBatch {
        rotation: rotation.to_dtype(DType::F32)?,
        translation: trans.to_dtype(DType::F32)?,
        focal,
        principal: Tensor::from_vec(principal, (n, 2), device)?,
    })
}

/// Per-image soft IoU `[N]` of rendered opacity `[N, M]` against masks `[N, M]`.
pub fn soft_iou_batch(opacity: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let inter = (opacity * mask)?.sum(1)?;
    let union = ((opacity.sum(1)? + mask.sum(1)?)? - &inter)?;
    Ok((inter / (union + 1e-6)?)?)
}

/// The pixel raster of every target as a `[N, M, 2]` tensor, the masks and the inside-the-image
/// weights as `[N, M]`.
fn target_tensors(targets: &[RefineTarget], device: &Device) -> Result<(Tensor, Tensor, Tensor)> {
    let n = targets.len();
    let m = targets.first().map(|t| t.mask.len()).unwrap_or(0);
    let mut pixels = Vec::with_capacity(n * m * 2);
    let mut masks = Vec::with_capacity(n * m);
    let mut inside = Vec::with_capacity(n * m);
    let unit = |v: &f32| if v.is_finite() { v.clamp(0.0, 1.0) } else { 0.0 };
    for t in targets {
        let pts = t.crop.sample_pixels();
        if pts.len() != m || t.mask.len() != m || t.inside.len() != m {
            return Err(Error::InvalidInput("refinement targets must share one raster size".into()));
        }
        pixels.extend(pts.iter().flat_map(|p| [p.x as f32, p.y as f32]));
        masks.extend(t.mask.iter().map(unit));
        inside.extend(t.inside.iter().map(unit));
    }
    Ok((
        Tensor::from_vec(pixels, (n, m, 2), device)?,
        Tensor::from_vec(masks, (n, m), device)?,
        Tensor::from_vec(inside, (n, m), device)?,
    ))
}

/// The semantic terms of a batch of targets, as a differentiable surrogate: its gradient with respect
/// to the cameras is the gradient of the terms (bilinear in the projections, linearised each step).
struct FeatureBatch<'a> {
    /// Per target, its term (or none).
    terms: Vec<Option<&'a FeatureTarget>>,
    /// `[N, K, 3]` object points (zero-padded).
    points: Tensor,
    /// Points per target side of the padding.
    k: usize,
}

impl<'a> FeatureBatch<'a> {
    /// `None` when no target has a term with weight > 0.
    fn new(targets: &'a [RefineTarget], device: &Device) -> Result<Option<Self>> {
        let terms: Vec<Option<&FeatureTarget>> =
            targets.iter().map(|t| t.features.as_ref().filter(|f| f.weight > 0.0 && !f.points_in_object.is_empty())).collect();
        let k = terms.iter().flatten().map(|f| f.points_in_object.len()).max().unwrap_or(0);
        if k == 0 {
            return Ok(None);
        }
        for f in terms.iter().flatten() {
            if f.tokens == 0 || f.cosines.len() != f.points_in_object.len() * f.tokens * f.tokens {
                return Err(Error::InvalidInput(format!(
                    "feature target: {} cosines for {} points on {} tokens per side",
                    f.cosines.len(),
                    f.points_in_object.len(),
                    f.tokens
                )));
            }
        }
        let mut flat = vec![0f32; terms.len() * k * 3];
        for (i, f) in terms.iter().enumerate() {
            for (j, p) in f.map(|f| f.points_in_object.as_slice()).unwrap_or(&[]).iter().enumerate() {
                let o = (i * k + j) * 3;
                flat[o..o + 3].copy_from_slice(&[p.x as f32, p.y as f32, p.z as f32]);
            }
        }
        Ok(Some(Self { terms, points: Tensor::from_vec(flat, (targets.len(), k, 3), device)?, k }))
    }

    /// Pixel positions `[N, K]` (x, y) of the points under `cams`, differentiable.
    fn project(&self, cams: &CameraBatch) -> Result<(Tensor, Tensor)> {
        let n = self.terms.len();
        let in_camera = self.points.matmul(&cams.rotation.transpose(1, 2)?)?.broadcast_add(&cams.translation.unsqueeze(1)?)?;
        let z = in_camera.narrow(2, 2, 1)?.squeeze(2)?.maximum(1e-3)?;
        let f = cams.focal.reshape((n, 1))?;
        let x =
            (in_camera.narrow(2, 0, 1)?.squeeze(2)? / &z)?.broadcast_mul(&f)?.broadcast_add(&cams.principal.narrow(1, 0, 1)?)?;
        let y =
            (in_camera.narrow(2, 1, 1)?.squeeze(2)? / &z)?.broadcast_mul(&f)?.broadcast_add(&cams.principal.narrow(1, 1, 1)?)?;
        Ok((x, y))
    }

    /// A scalar whose gradient is that of `mean over targets of weight x term`.
    fn surrogate(&self, cams: &CameraBatch) -> Result<Tensor> {
        let n = self.terms.len();
        let (x, y) = self.project(cams)?;
        let (hx, hy) = (x.to_vec2::<f32>()?, y.to_vec2::<f32>()?);
        let mut cx = vec![0f32; n * self.k];
        let mut cy = vec![0f32; n * self.k];
        for (i, term) in self.terms.iter().enumerate() {
            let Some(f) = term else { continue };
            let count = f.points_in_object.len();
            // Token-grid units per image pixel.
            let scale = 1.0 / f.token_raster().scale().max(1e-12);
            for k in 0..count {
                let (gx, gy) = f.grid_from_image(hx[i][k] as f64, hy[i][k] as f64);
                let (_, dx, dy) = f.sample(k, gx, gy);
                // d(1 - cos)/d pixel, weighted and averaged.
                let c = -f.weight / (count * n) as f64 * scale;
                cx[i * self.k + k] = (c * dx) as f32;
                cy[i * self.k + k] = (c * dy) as f32;
            }
        }
        let device = x.device();
        let cx = Tensor::from_vec(cx, (n, self.k), device)?;
        let cy = Tensor::from_vec(cy, (n, self.k), device)?;
        Ok(((x * cx)?.sum_all()? + (y * cy)?.sum_all()?)?)
    }
}

/// Refines all cameras together. `optimise_focal[i]` says whether image i's focal length is free.
/// `progress(iteration, loss)` is called every iteration. Targets may differ in raster size (whole
/// objects and truncated ones): each size is one batch, results come in the input order, and the
/// loss history is the first batch's.
pub fn refine_poses(
    field: &CanonicalField,
    initial: &[Isometry3<f64>],
    intrinsics: &[Intrinsics],
    targets: &[RefineTarget],
    optimise_focal: &[bool],
    settings: &RefineSettings,
    progress: &mut dyn FnMut(usize, f32),
) -> Result<RefineResult> {
    let n = initial.len();
    if intrinsics.len() != n || targets.len() != n || optimise_focal.len() != n {
        return refine_batch(field, initial, intrinsics, targets, optimise_focal, settings, progress);
    }
    let mut sizes: Vec<usize> = targets.iter().map(|t| t.mask.len()).collect();
    sizes.sort_unstable();
    sizes.dedup();
    if sizes.len() <= 1 {
        return refine_batch(field, initial, intrinsics, targets, optimise_focal, settings, progress);
    }
    let mut out = RefineResult {
        camera_from_object: initial.to_vec(),
        intrinsics: intrinsics.to_vec(),
        iou: vec![0.0; n],
        loss_history: Vec::new(),
    };
    for size in sizes {
        let idx: Vec<usize> = (0..n).filter(|&i| targets[i].mask.len() == size).collect();
        let r = refine_batch(
            field,
            &idx.iter().map(|&i| initial[i]).collect::<Vec<_>>(),
            &idx.iter().map(|&i| intrinsics[i]).collect::<Vec<_>>(),
            &idx.iter().map(|&i| targets[i].clone()).collect::<Vec<_>>(),
            &idx.iter().map(|&i| optimise_focal[i]).collect::<Vec<_>>(),
            settings,
            progress,
        )?;
        for (k, &i) in idx.iter().enumerate() {
            out.camera_from_object[i] = r.camera_from_object[k];
            out.intrinsics[i] = r.intrinsics[k];
            out.iou[i] = r.iou[k];
        }
        if out.loss_history.is_empty() {
            out.loss_history = r.loss_history;
        }
    }
    Ok(out)
}

/// [`refine_poses`] on targets of one raster size, as one batch.
fn refine_batch(
    field: &CanonicalField,
    initial: &[Isometry3<f64>],
    intrinsics: &[Intrinsics],
    targets: &[RefineTarget],
    optimise_focal: &[bool],
    settings: &RefineSettings,
    progress: &mut dyn FnMut(usize, f32),
) -> Result<RefineResult> {
    let n = initial.len();
    if n == 0 || intrinsics.len() != n || targets.len() != n || optimise_focal.len() != n {
        return Err(Error::InvalidInput(format!(
            "refinement needs matching non-empty inputs: {n} poses, {} intrinsics, {} targets, {} focal flags",
            intrinsics.len(),
            targets.len(),
            optimise_focal.len()
        )));
    }
    let device = field.device().clone();
    let (pixels, masks, inside) = target_tensors(targets, &device)?;
    let m = masks.dims2()?.1;
    let xi = Var::zeros((n, 6), DType::F64, &device)?;
    let log_focal = Var::zeros(n, DType::F32, &device)?;
    let focal_mask: Vec<f32> = optimise_focal.iter().map(|&b| if b { 1.0 } else { 0.0 }).collect();
    let focal_mask = Tensor::from_vec(focal_mask, n, &device)?;
    let adam = |lr: f64| ParamsAdamW { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
    let mut opt_pose = AdamW::new(vec![xi.clone()], adam(settings.lr))?;
    let mut opt_focal = AdamW::new(vec![log_focal.clone()], adam(settings.focal_lr))?;
    let what = RenderWhat::default();
    let feature_term = FeatureBatch::new(targets, &device)?;
    let mut history = Vec::with_capacity(settings.iterations);
    for it in 0..settings.iterations {
        let cams = corrected_cameras(initial, intrinsics, xi.as_tensor(), log_focal.as_tensor(), &focal_mask)?;
        let rays = cams.rays(&pixels)?;
        let opacity = (render_rays(field, &rays, settings.samples_per_ray, what)?.opacity.reshape((n, m))? * &inside)?;
        let mut loss = soft_iou_batch(&opacity, &masks)?.affine(-1.0, 1.0)?.mean_all()?;
        if let Some(term) = &feature_term {
            let surrogate = term.surrogate(&cams)?;
            // Same value (the IoU loss), plus the term's gradient.
            loss = (loss + (&surrogate - surrogate.detach())?)?;
        }
        let value = loss.to_scalar::<f32>()?;
        if !value.is_finite() {
            return Err(Error::Numerical(format!("pose refinement loss is {value} at iteration {it}")));
        }
        history.push(value);
        progress(it, value);
        let grads = loss.backward()?;
        opt_pose.step(&grads)?;
        opt_focal.step(&grads)?;
    }
    // Final poses and IoU.
    let cams = corrected_cameras(initial, intrinsics, xi.as_tensor(), log_focal.as_tensor(), &focal_mask)?;
    let rays = cams.rays(&pixels)?;
    let opacity = (render_rays(field, &rays, settings.samples_per_ray, what)?.opacity.reshape((n, m))? * &inside)?;
    let iou = soft_iou_batch(&opacity, &masks)?.to_vec1::<f32>()?;
    let rot = cams.rotation.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let trans = cams.translation.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let focal = cams.focal.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let mut poses = Vec::with_capacity(n);
    let mut out_intrinsics = Vec::with_capacity(n);
    for i in 0..n {
        let r = Matrix3::from_row_slice(&rot[i * 9..i * 9 + 9]);
        let q = UnitQuaternion::from_matrix(&r);
        let t = Vector3::new(trans[i * 3], trans[i * 3 + 1], trans[i * 3 + 2]);
        let pose = Isometry3::from_parts(Translation3::from(t), q);
        if !pose.to_homogeneous().iter().all(|v| v.is_finite()) || !focal[i].is_finite() {
            return Err(Error::Numerical(format!("refined camera {i} is not finite")));
        }
        poses.push(pose);
        let mut k = intrinsics[i];
        let ratio = focal[i] / (0.5 * (k.fx + k.fy));
        k.fx *= ratio;
        k.fy *= ratio;
        out_intrinsics.push(k);
    }
    Ok(RefineResult { camera_from_object: poses, intrinsics: out_intrinsics, iou, loss_history: history })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::Rng;

    fn target(points: usize, tokens: usize, seed: u64) -> FeatureTarget {
        let mut rng = Rng(seed);
        FeatureTarget {
            points_in_object: (0..points)
                .map(|_| Point3::new(rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3)))
                .collect(),
            cosines: (0..points * tokens * tokens).map(|_| rng.uniform(-1.0, 1.0) as f32).collect(),
            tokens,
            window: SquareCrop { centre_x: 52.0, centre_y: 47.0, side: 70.0, size: 1 },
            weight: 1.7,
        }
    }

    #[test]
    fn feature_term_derivatives_match_finite_differences() {
        let f = target(3, 5, 7);
        let mut rng = Rng(3);
        for k in 0..3 {
            for _ in 0..20 {
                let (x, y) = (rng.uniform(0.05, 3.95), rng.uniform(0.05, 3.95));
                let (_, dx, dy) = f.sample(k, x, y);
                let h = 1e-6;
                let fd_x = (f.sample(k, x + h, y).0 - f.sample(k, x - h, y).0) / (2.0 * h);
                let fd_y = (f.sample(k, x, y + h).0 - f.sample(k, x, y - h).0) / (2.0 * h);
                // Away from cell borders the bilinear map is smooth.
                if (x.fract() - 0.5).abs() < 0.49 && (y.fract() - 0.5).abs() < 0.49 {
                    assert!((dx - fd_x).abs() < 1e-6 && (dy - fd_y).abs() < 1e-6, "({x}, {y}): {dx} {dy} vs {fd_x} {fd_y}");
                }
            }
            // Token centres give the stored cosines; outside the grid the value is clamped and flat.
            assert!((f.sample(k, 2.0, 3.0).0 - f.cosines[k * 25 + 3 * 5 + 2] as f64).abs() < 1e-7);
            let (v, dx, dy) = f.sample(k, -3.0, 9.0);
            assert!((v - f.cosines[k * 25 + 4 * 5] as f64).abs() < 1e-7 && dx == 0.0 && dy == 0.0);
        }
    }

    /// The surrogate's gradient with respect to the se(3) correction and the focal length is the
    /// gradient of the term itself (central differences of `FeatureTarget::loss` over the projections).
    #[test]
    fn feature_surrogate_gradient_matches_finite_differences() {
        let device = Device::Cpu;
        let k = Intrinsics::from_fov_y(40.0, 100, 90).unwrap();
        let pose = Isometry3::from_parts(Translation3::new(0.05, -0.03, 2.2), UnitQuaternion::from_euler_angles(0.3, -0.5, 0.2));
        let mut targets = Vec::new();
        for seed in [11, 12] {
            let mut t = RefineTarget {
                crop: SquareCrop { centre_x: 50.0, centre_y: 45.0, side: 80.0, size: 4 },
                mask: vec![0.0; 16],
                inside: vec![1.0; 16],
                features: Some(target(6, 6, seed)),
            };
            if seed == 12 {
                t.features.as_mut().unwrap().weight = 0.4;
            }
            targets.push(t);
        }
        let batch = FeatureBatch::new(&targets, &device).unwrap().unwrap();
        let focal_mask = Tensor::from_vec(vec![1f32, 1.0], 2, &device).unwrap();
        let xi0 = vec![0.01, -0.02, 0.015, 0.01, 0.02, -0.01, -0.01, 0.02, 0.0, 0.0, -0.02, 0.01];
        let term = |xi: &[f64], lf: &[f32]| -> f64 {
            let xi = Tensor::from_vec(xi.to_vec(), (2, 6), &device).unwrap();
            let lf = Tensor::from_vec(lf.to_vec(), 2, &device).unwrap();
            let cams = corrected_cameras(&[pose, pose], &[k, k], &xi, &lf, &focal_mask).unwrap();
            let (x, y) = batch.project(&cams).unwrap();
            let (x, y) = (x.to_vec2::<f32>().unwrap(), y.to_vec2::<f32>().unwrap());
            targets
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let f = t.features.as_ref().unwrap();
                    let px: Vec<(f64, f64)> = (0..6).map(|j| (x[i][j] as f64, y[i][j] as f64)).collect();
                    f.weight * f.loss(&px) / 2.0
                })
                .sum()
        };
        let xi = Var::from_vec(xi0.clone(), (2, 6), &device).unwrap();
        let lf = Var::from_vec(vec![0.01f32, -0.02], 2, &device).unwrap();
        let cams = corrected_cameras(&[pose, pose], &[k, k], xi.as_tensor(), lf.as_tensor(), &focal_mask).unwrap();
        let grads = batch.surrogate(&cams).unwrap().backward().unwrap();
        let g_xi = grads.get(&xi).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let g_lf = grads.get(&lf).unwrap().to_vec1::<f32>().unwrap();
        let h = 1e-4;
        let mut worst = 0f64;
        for p in 0..12 {
            let (mut a, mut b) = (xi0.clone(), xi0.clone());
            a[p] += h;
            b[p] -= h;
            let fd = (term(&a, &[0.01, -0.02]) - term(&b, &[0.01, -0.02])) / (2.0 * h);
            worst = worst.max((fd - g_xi[p]).abs() / (fd.abs().max(g_xi[p].abs()).max(1e-2)));
        }
        for p in 0..2 {
            let (mut a, mut b) = (vec![0.01f32, -0.02], vec![0.01f32, -0.02]);
            a[p] += 1e-3;
            b[p] -= 1e-3;
            let fd = (term(&xi0, &a) - term(&xi0, &b)) / 2e-3;
            worst = worst.max((fd - g_lf[p] as f64).abs() / (fd.abs().max(g_lf[p].abs() as f64).max(1e-2)));
        }
        assert!(worst < 0.02, "worst relative gradient error {worst}");
    }
}
