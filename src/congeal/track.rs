//! Live tracking against a canonical model: each new frame's pose is refined from the previous
//! frame's pose for a few Adam steps on a small silhouette raster (the IoU loss of pose refinement);
//! the candidate search (a full registration) runs again when there is no previous pose, on request,
//! when the image size changes, or when the fit after refinement drops below a threshold.
//!
//! The tracker holds no model and does no search itself: the caller passes the field and a
//! re-initialisation closure (the ROS node uses its cached candidate set), so the same code serves
//! the node, the benchmark and the tests.

use image::GrayImage;
use nalgebra::Isometry3;

use crate::collection::{mask_bbox, SquareCrop};
use crate::config::TrackConfig;
use crate::congeal::pose_refine::{refine_poses, RefineSettings, RefineTarget};
use crate::error::{Error, Result};
use crate::field::canonical::CanonicalField;
use crate::geometry::Intrinsics;

/// A pose of the object in one frame.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrackedPose {
    /// camera_from_object, normalised object frame.
    pub camera_from_object: Isometry3<f64>,
    /// Intrinsics of the frame.
    pub intrinsics: Intrinsics,
    /// Fit: silhouette IoU of the rendering at this pose against the frame's mask.
    pub score: f32,
}

/// Why the candidate search ran for a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReinitReason {
    /// No previous pose (first frame, or the object was lost).
    NoPrevious,
    /// Requested (`~/reset`).
    Requested,
    /// The frame's size differs from the previous frame's.
    ImageSizeChanged,
    /// The warm-started fit was below `min_score`.
    LowScore,
    /// The predicted pose fitted the frame worse than `min_initial_score` (a jump).
    Jump,
}

impl ReinitReason {
    /// A short name for logs and diagnostics.
    pub fn as_str(self) -> &'static str {
        match self {
            ReinitReason::NoPrevious => "no previous pose",
            ReinitReason::Requested => "reset requested",
            ReinitReason::ImageSizeChanged => "image size changed",
            ReinitReason::LowScore => "fit below min_score",
            ReinitReason::Jump => "predicted pose far off (jump)",
        }
    }
}

/// The outcome of one tracked frame.
#[derive(Clone, Copy, Debug)]
pub struct TrackOutcome {
    /// The pose reported for the frame.
    pub pose: TrackedPose,
    /// `Some` when the candidate search ran (and why).
    pub reinitialised: Option<ReinitReason>,
    /// Fit of the predicted pose before refinement (NaN when there was none).
    pub initial_score: f32,
}

/// Tracking state of one category.
#[derive(Clone, Debug)]
pub struct Tracker {
    config: TrackConfig,
    previous: Option<TrackedPose>,
    /// Motion `camera_from_object_t * camera_from_object_{t-1}^-1` between the last two tracked
    /// frames and the time between them, seconds (none right after a re-initialisation).
    motion: Option<(Isometry3<f64>, f64)>,
    /// Time of the previous frame, seconds.
    previous_time: Option<f64>,
    reset_requested: bool,
}

impl Tracker {
    /// A tracker with no previous pose.
    pub fn new(config: TrackConfig) -> Self {
        Self { config, previous: None, motion: None, previous_time: None, reset_requested: false }
    }

    /// The last pose, if the object is being tracked.
    pub fn previous(&self) -> Option<&TrackedPose> {
        self.previous.as_ref()
    }

    /// Forces the candidate search on the next frame.
    pub fn request_reset(&mut self) {
        self.reset_requested = true;
    }

    /// Forgets the previous pose (the object left the view): the next frame is re-initialised.
    pub fn lose(&mut self) {
        self.previous = None;
        self.motion = None;
    }

    /// Poses one frame taken at `time_s` (seconds, any epoch: the header stamp). `known` are the
    /// frame's intrinsics from its camera_info (or `None`: the previous frame's are kept). `reinit`
    /// runs the candidate search on this frame.
    pub fn step(
        &mut self,
        field: &CanonicalField,
        mask: &GrayImage,
        known: Option<Intrinsics>,
        time_s: f64,
        reinit: &mut dyn FnMut() -> Result<TrackedPose>,
    ) -> Result<TrackOutcome> {
        let outcome = self.step_inner(field, mask, known, time_s, reinit);
        self.previous_time = outcome.as_ref().ok().map(|_| time_s);
        outcome
    }

    fn step_inner(
        &mut self,
        field: &CanonicalField,
        mask: &GrayImage,
        known: Option<Intrinsics>,
        time_s: f64,
        reinit: &mut dyn FnMut() -> Result<TrackedPose>,
    ) -> Result<TrackOutcome> {
        let reason = match &self.previous {
            _ if self.reset_requested => Some(ReinitReason::Requested),
            None => Some(ReinitReason::NoPrevious),
            Some(p) if (p.intrinsics.width, p.intrinsics.height) != mask.dimensions() => Some(ReinitReason::ImageSizeChanged),
            Some(_) => None,
        };
        if let Some(reason) = reason {
            return self.reinitialise(reason, reinit);
        }
        let Some(previous) = self.previous else {
            return self.reinitialise(ReinitReason::NoPrevious, reinit);
        };
        let intrinsics = known.unwrap_or(previous.intrinsics);
        // Constant velocity: the last motion, scaled to the time since the previous frame (frames may
        // have been skipped), damped by `velocity`.
        let dt = self.previous_time.map(|t| time_s - t).filter(|dt| dt.is_finite() && *dt > 0.0);
        let predicted = match (&self.motion, dt) {
            (Some((m, m_dt)), Some(dt)) => {
                let fraction = (self.config.velocity * dt / m_dt).clamp(0.0, MAX_EXTRAPOLATION);
                scaled_motion(m, fraction) * previous.camera_from_object
            }
            _ => previous.camera_from_object,
        };
        let (refined, initial_score) = refine_from(field, mask, predicted, intrinsics, &self.config)?;
        let dropped = initial_score < previous.score - self.config.max_drop;
        let reason = if initial_score < self.config.min_initial_score || dropped {
            Some(ReinitReason::Jump)
        } else if refined.score < self.config.min_score {
            Some(ReinitReason::LowScore)
        } else {
            None
        };
        if let Some(reason) = reason {
            let outcome = self.reinitialise(reason, reinit)?;
            // Keep whichever fits better (a search can also do worse on a hard frame).
            if outcome.pose.score < refined.score {
                self.previous = Some(refined);
                return Ok(TrackOutcome { pose: refined, reinitialised: outcome.reinitialised, initial_score });
            }
            return Ok(TrackOutcome { initial_score, ..outcome });
        }
        self.motion = dt.map(|dt| (refined.camera_from_object * previous.camera_from_object.inverse(), dt));
        self.previous = Some(refined);
        Ok(TrackOutcome { pose: refined, reinitialised: None, initial_score })
    }

    fn reinitialise(&mut self, reason: ReinitReason, reinit: &mut dyn FnMut() -> Result<TrackedPose>) -> Result<TrackOutcome> {
        self.reset_requested = false;
        self.motion = None;
        let pose = reinit()?;
        self.previous = Some(pose);
        Ok(TrackOutcome { pose, reinitialised: Some(reason), initial_score: f32::NAN })
    }
}

/// The most frame-to-frame motions the prediction extrapolates over (after skipped frames).
const MAX_EXTRAPOLATION: f64 = 3.0;

/// `fraction` (may exceed 1) of a rigid motion: rotation angle and translation scaled along the
/// rotation's axis (a screw-free approximation, fine for the small motions between frames).
fn scaled_motion(motion: &Isometry3<f64>, fraction: f64) -> Isometry3<f64> {
    let rotation = nalgebra::UnitQuaternion::from_scaled_axis(motion.rotation.scaled_axis() * fraction);
    Isometry3::from_parts(nalgebra::Translation3::from(motion.translation.vector * fraction), rotation)
}

/// A few Adam steps of silhouette refinement from `initial` (focal length fixed); returns the refined
/// pose and the fit of `initial` itself.
pub fn refine_from(
    field: &CanonicalField,
    mask: &GrayImage,
    initial: Isometry3<f64>,
    intrinsics: Intrinsics,
    config: &TrackConfig,
) -> Result<(TrackedPose, f32)> {
    let bbox = mask_bbox(mask).ok_or_else(|| Error::InvalidInput("the frame's mask is empty".into()))?;
    let crop = SquareCrop::around(&bbox, config.crop_margin, config.ray_grid)?;
    let target = RefineTarget::new(crop, mask);
    let settings =
        RefineSettings { iterations: config.iterations, lr: config.lr, focal_lr: 0.0, samples_per_ray: config.samples_per_ray };
    let result = refine_poses(field, &[initial], &[intrinsics], &[target], &[false], &settings, &mut |_, _| {})?;
    let (Some(pose), Some(k), Some(score)) = (result.camera_from_object.first(), result.intrinsics.first(), result.iou.first())
    else {
        return Err(Error::Numerical("refinement returned no pose".into()));
    };
    // The first loss is 1 - IoU at the initial pose (NaN-free: refine_poses rejects non-finite losses).
    let initial_score = result.loss_history.first().map(|l| 1.0 - l).unwrap_or(*score);
    Ok((TrackedPose { camera_from_object: *pose, intrinsics: *k, score: *score }, initial_score))
}
