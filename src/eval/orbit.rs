//! Synthetic camera paths for tracking: a smooth orbit around the canonical shape with small steps,
//! optionally with teleports (a deliberate jump of the camera), rendered from the canonical field
//! (colour over a plain background, and the exact silhouette as the mask).

use std::time::Instant;

use image::{GrayImage, Luma, Rgb, RgbImage};
use nalgebra::{Isometry3, Translation3, Vector3};

use crate::config::Config;
use crate::congeal::features::FeatureExtractor;
use crate::congeal::pipeline::register_frame;
use crate::congeal::pose_init::{candidate_radius, CandidateSet};
use crate::congeal::track::{TrackedPose, Tracker};
use crate::error::{Error, Result};
use crate::field::canonical::CanonicalField;
use crate::field::render::{pixel_grid, render_rays_host, CameraBatch, RenderWhat};
use crate::geometry::metrics::rotation_error_deg;
use crate::geometry::se3::orbit_camera_from_object;
use crate::geometry::Intrinsics;

/// Frame rate of a rendered path, Hz (the time stamps the tracker sees).
pub const FRAME_RATE_HZ: f64 = 30.0;
/// Opacity above which a rendered pixel is object in the mask.
const MASK_OPACITY: f32 = 0.5;

/// A camera path around the object.
#[derive(Clone, Debug, PartialEq)]
pub struct OrbitSpec {
    /// Number of frames.
    pub frames: usize,
    /// Image width, pixels.
    pub width: u32,
    /// Image height, pixels.
    pub height: u32,
    /// Vertical field of view, degrees.
    pub fov_deg: f64,
    /// Azimuth step between frames, degrees.
    pub step_deg: f64,
    /// Mean elevation, degrees (it oscillates by `elevation_swing_deg` along the path).
    pub elevation_deg: f64,
    /// Amplitude of the elevation oscillation, degrees.
    pub elevation_swing_deg: f64,
    /// Frames at which the camera teleports (the azimuth jumps by `jump_deg`).
    pub jumps: Vec<usize>,
    /// Size of a teleport, degrees of azimuth.
    pub jump_deg: f64,
    /// Samples per ray when rendering.
    pub samples_per_ray: usize,
}

impl Default for OrbitSpec {
    fn default() -> Self {
        Self {
            frames: 60,
            width: 640,
            height: 480,
            fov_deg: 40.0,
            step_deg: 3.0,
            elevation_deg: 20.0,
            elevation_swing_deg: 10.0,
            jumps: Vec::new(),
            jump_deg: 120.0,
            samples_per_ray: 64,
        }
    }
}

/// One frame of a path: the ground-truth camera and the rendered image and mask.
#[derive(Clone, Debug)]
pub struct OrbitFrame {
    /// camera_from_object, normalised object frame (multiply the translation by the field's
    /// `units_per_normalised` for canonical units).
    pub camera_from_object: Isometry3<f64>,
    /// Intrinsics.
    pub intrinsics: Intrinsics,
    /// Whether the camera teleported just before this frame.
    pub jump: bool,
}

/// The cameras of the path (normalised object frame). The object fills about half the image height
/// and drifts a little off the image centre.
pub fn orbit_cameras(field: &CanonicalField, spec: &OrbitSpec) -> Result<Vec<OrbitFrame>> {
    if spec.frames == 0 || spec.width < 8 || spec.height < 8 {
        return Err(Error::InvalidInput("an orbit needs >= 1 frame of at least 8 x 8 pixels".into()));
    }
    let intrinsics = Intrinsics::from_fov_y(spec.fov_deg, spec.width, spec.height)?;
    let radius = 1.6 * candidate_radius(field.bounding_radius as f64, spec.fov_deg);
    let mut azimuth = 0.0;
    let mut frames = Vec::with_capacity(spec.frames);
    for i in 0..spec.frames {
        let jump = spec.jumps.contains(&i);
        if jump {
            azimuth += spec.jump_deg;
        } else if i > 0 {
            azimuth += spec.step_deg;
        }
        let phase = i as f64 / 25.0;
        let elevation = spec.elevation_deg + spec.elevation_swing_deg * phase.sin();
        let orbit = orbit_camera_from_object(azimuth, elevation, radius);
        // A slow lateral drift of the object in the image (hand-held camera).
        let drift = Vector3::new(0.08 * (phase * 0.7).sin(), 0.05 * (phase * 1.1).cos(), 0.0) * radius;
        let camera_from_object = Translation3::from(drift) * orbit;
        frames.push(OrbitFrame { camera_from_object, intrinsics, jump });
    }
    Ok(frames)
}

/// Renders one frame: colour over a grey gradient background, and the silhouette mask.
pub fn render_frame(field: &CanonicalField, frame: &OrbitFrame, samples_per_ray: usize) -> Result<(RgbImage, GrayImage)> {
    let k = frame.intrinsics;
    let cams = CameraBatch::from_poses(&[frame.camera_from_object], &[k], field.device())?;
    let pixels = pixel_grid(k.width, k.height, field.device())?;
    let what = RenderWhat { colour: true, ..Default::default() };
    let r = render_rays_host(field, &cams.rays(&pixels)?, samples_per_ray, what, 1 << 16)?;
    let expected = (k.width * k.height) as usize;
    if r.opacity.len() != expected || r.colour.len() != expected {
        return Err(Error::Numerical("the rendering has the wrong number of pixels".into()));
    }
    let mut rgb = RgbImage::new(k.width, k.height);
    let mut mask = GrayImage::new(k.width, k.height);
    for (i, (a, c)) in r.opacity.iter().zip(&r.colour).enumerate() {
        let (x, y) = (i as u32 % k.width, i as u32 / k.width);
        let background = 0.35 + 0.3 * y as f32 / k.height as f32;
        // Colour is composited over black: add the background behind the remaining transparency.
        let px = c.map(|v| ((v + (1.0 - a) * background).clamp(0.0, 1.0) * 255.0).round() as u8);
        rgb.put_pixel(x, y, Rgb(px));
        mask.put_pixel(x, y, Luma([if *a >= MASK_OPACITY { 255 } else { 0 }]));
    }
    Ok((rgb, mask))
}

/// One tracked frame of [`track_orbit`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct TrackedFrame {
    /// Frame index.
    pub index: usize,
    /// Whether the camera teleported just before this frame.
    pub jump: bool,
    /// Rotation error against the ground truth, degrees (the model is the ground-truth shape, so no
    /// alignment is needed).
    pub rotation_error_deg: f64,
    /// Translation error relative to the camera distance.
    pub translation_error_rel: f64,
    /// Fit (silhouette IoU).
    pub score: f32,
    /// Fit of the predicted pose before refinement.
    pub initial_score: f32,
    /// Why the candidate search ran, if it did.
    pub reinitialised: Option<String>,
    /// Seconds to pose the frame (mask in, pose out).
    pub latency_s: f64,
}

/// Tracks every frame of `frames` (rendered on the fly, rendering not timed) with a [`Tracker`],
/// re-initialising by [`register_frame`] against `set` (candidates of the same field).
pub fn track_orbit(
    field: &CanonicalField,
    frames: &[OrbitFrame],
    set: &mut CandidateSet,
    config: &Config,
    extractor: Option<&FeatureExtractor>,
    samples_per_ray: usize,
) -> Result<Vec<TrackedFrame>> {
    let mut tracker = Tracker::new(config.track.clone());
    let reinit_config = config.track.reinit_config(config);
    let mut out = Vec::with_capacity(frames.len());
    for (index, frame) in frames.iter().enumerate() {
        let (rgb, mask) = render_frame(field, frame, samples_per_ray)?;
        let known = Some(frame.intrinsics);
        let start = Instant::now();
        let mut reinit = || -> Result<TrackedPose> {
            let reg = register_frame(field, set, &rgb, &mask, known, &reinit_config, extractor)?;
            match (reg.camera_from_object.first(), reg.intrinsics.first(), reg.iou.first()) {
                (Some(p), Some(k), Some(s)) => Ok(TrackedPose { camera_from_object: *p, intrinsics: *k, score: *s }),
                _ => Err(Error::Numerical("registration returned no pose".into())),
            }
        };
        let outcome = tracker.step(field, &mask, known, index as f64 / FRAME_RATE_HZ, &mut reinit)?;
        let latency_s = start.elapsed().as_secs_f64();
        let truth = &frame.camera_from_object;
        let estimate = &outcome.pose.camera_from_object;
        let rotation_error_deg =
            rotation_error_deg(&estimate.rotation.to_rotation_matrix(), &truth.rotation.to_rotation_matrix());
        let translation_error_rel =
            (estimate.translation.vector - truth.translation.vector).norm() / truth.translation.vector.norm().max(1e-9);
        out.push(TrackedFrame {
            index,
            jump: frame.jump,
            rotation_error_deg,
            translation_error_rel,
            score: outcome.pose.score,
            initial_score: outcome.initial_score,
            reinitialised: outcome.reinitialised.map(|r| r.as_str().to_string()),
            latency_s,
        });
    }
    Ok(out)
}

/// The `q` quantile (0..1) of `values` (nearest rank); NaN when empty.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}
