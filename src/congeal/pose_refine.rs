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
use nalgebra::{Isometry3, Matrix3, Translation3, UnitQuaternion, Vector3};

use crate::collection::SquareCrop;
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
}

impl RefineTarget {
    /// The target of an image's `mask` on `window`.
    pub fn new(window: SquareCrop, mask: &image::GrayImage) -> Self {
        Self { mask: window.resample_mask(mask), inside: window.resample_inside(mask.width(), mask.height()), crop: window }
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
    let mut history = Vec::with_capacity(settings.iterations);
    for it in 0..settings.iterations {
        let cams = corrected_cameras(initial, intrinsics, xi.as_tensor(), log_focal.as_tensor(), &focal_mask)?;
        let rays = cams.rays(&pixels)?;
        let opacity = (render_rays(field, &rays, settings.samples_per_ray, what)?.opacity.reshape((n, m))? * &inside)?;
        let loss = soft_iou_batch(&opacity, &masks)?.affine(-1.0, 1.0)?.mean_all()?;
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
