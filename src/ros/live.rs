//! Live mode of the node: every synchronised frame of a category with a model gets a pose (warm-started
//! tracking, [`crate::congeal::track`]), published on `~/pose`, `~/detections` (vision_msgs), `/tf` and
//! optionally `~/nocs`; plus the counters that `/diagnostics` reports.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use nalgebra::{Isometry3, Point3, Translation3};
use r2r::geometry_msgs::msg::{PoseWithCovariance, Quaternion, Transform, TransformStamped, Vector3};
use r2r::sensor_msgs::msg::{CameraInfo, Image};
use r2r::std_msgs::msg::Header;
use r2r::tf2_msgs::msg::TFMessage;
use r2r::vision_msgs::msg::{BoundingBox3D, Detection3D, Detection3DArray, ObjectHypothesis, ObjectHypothesisWithPose};
use tracing::{info, warn};

use crate::congeal::track::{TrackOutcome, TrackedPose, Tracker};
use crate::field::render::{render_rays_host, CameraBatch, RenderWhat};
use crate::ingest::frames::{decode_mask, decode_rgb, intrinsics_from_camera_info};
use crate::ros::convert::{nocs_image, pose_stamped, raw_image};
use crate::ros::node::{catch_panic, lock, ModelSlot, Shared};

/// Latencies kept for the diagnostics' median.
const LATENCY_WINDOW: usize = 100;

/// One synchronised frame for the tracker.
pub struct LiveFrame {
    /// Category whose model poses it.
    pub category: String,
    /// The image.
    pub image: Image,
    /// Its mask from the mask topic, if any.
    pub mask: Option<Image>,
    /// Its camera info, if any.
    pub info: Option<CameraInfo>,
}

/// A one-slot mailbox: a new item replaces the waiting one (newest wins), so frames that arrive
/// faster than they are tracked are skipped, never queued.
pub struct Latest<T> {
    slot: Mutex<Option<T>>,
    ready: Condvar,
    replaced: AtomicU64,
}

impl<T> Latest<T> {
    /// An empty mailbox.
    pub fn new() -> Self {
        Self { slot: Mutex::new(None), ready: Condvar::new(), replaced: AtomicU64::new(0) }
    }

    /// Puts an item, replacing (and counting) one that was still waiting.
    pub fn put(&self, item: T) {
        let mut slot = lock(&self.slot);
        if slot.replace(item).is_some() {
            self.replaced.fetch_add(1, Ordering::Relaxed);
        }
        self.ready.notify_one();
    }

    /// Waits for an item.
    pub fn take(&self) -> T {
        let mut slot = lock(&self.slot);
        loop {
            if let Some(item) = slot.take() {
                return item;
            }
            slot = self.ready.wait(slot).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Items replaced before they were taken.
    pub fn replaced(&self) -> u64 {
        self.replaced.load(Ordering::Relaxed)
    }
}

impl<T> Default for Latest<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// What the last tracked frame gave.
#[derive(Clone, Debug)]
pub struct LastTrack {
    /// Category.
    pub category: String,
    /// `tracking`, `reinitialised (<why>)` or `lost (<why>)`.
    pub state: String,
    /// Fit of the last pose (NaN when lost).
    pub score: f32,
    /// When it was processed.
    pub at: Instant,
}

/// Counters and the tracking state that `/diagnostics` reports.
#[derive(Default)]
pub struct LiveStats {
    /// Messages received per input.
    pub images: AtomicU64,
    /// Mask messages received.
    pub masks: AtomicU64,
    /// Camera info messages received.
    pub infos: AtomicU64,
    /// Frames tracked (a pose was published).
    pub tracked: AtomicU64,
    /// Frames that needed the candidate search.
    pub reinitialised: AtomicU64,
    /// Frames that got no pose (bad input, empty mask, failure).
    pub failed: AtomicU64,
    /// Seconds per tracked frame (warm-started only), the last [`LATENCY_WINDOW`].
    pub latency_s: Mutex<VecDeque<f64>>,
    /// Seconds of the last re-initialisation.
    pub last_reinit_s: Mutex<Option<f64>>,
    /// The last frame's outcome.
    pub last: Mutex<Option<LastTrack>>,
}

/// The live-mode state of the node.
#[derive(Default)]
pub struct Live {
    /// The newest frame waiting for the tracker.
    pub latest: Latest<LiveFrame>,
    /// `~/reset` was called: re-initialise on the next frame.
    pub reset: AtomicBool,
    /// Counters.
    pub stats: LiveStats,
}

/// Tracks frames as they come (run on its own thread).
pub(crate) fn tracking_worker(shared: Arc<Shared>) {
    let mut trackers: HashMap<String, (Arc<ModelSlot>, Tracker)> = HashMap::new();
    let mut failures = 0u64;
    loop {
        let frame = shared.live.latest.take();
        if shared.live.reset.swap(false, Ordering::SeqCst) {
            for (_, t) in trackers.values_mut() {
                t.request_reset();
            }
            info!("tracking reset: the next frame is re-initialised");
        }
        let Some(slot) = lock(&shared.models).get(&frame.category).cloned() else { continue };
        let entry =
            trackers.entry(frame.category.clone()).or_insert_with(|| (slot.clone(), Tracker::new(shared.config.track.clone())));
        if !Arc::ptr_eq(&entry.0, &slot) {
            // A new model for the category: start over.
            *entry = (slot.clone(), Tracker::new(shared.config.track.clone()));
        }
        let stats = &shared.live.stats;
        let start = Instant::now();
        // A panic (a bug) costs this frame and the tracker's state, not live mode.
        let tracked = catch_panic(|| track_frame(&shared, &slot, &mut entry.1, &frame)).unwrap_or_else(|m| {
            entry.1 = Tracker::new(shared.config.track.clone());
            Err(crate::Error::InvalidInput(format!("tracking this frame panicked (a bug): {m}; the tracker starts over")))
        });
        match tracked {
            Ok(outcome) => {
                let seconds = start.elapsed().as_secs_f64();
                let state = match outcome.reinitialised {
                    Some(why) => {
                        stats.reinitialised.fetch_add(1, Ordering::Relaxed);
                        *lock(&stats.last_reinit_s) = Some(seconds);
                        info!(
                            "tracking `{}`: re-initialised ({}) in {seconds:.2} s, fit {:.3}",
                            frame.category,
                            why.as_str(),
                            outcome.pose.score
                        );
                        format!("reinitialised ({})", why.as_str())
                    }
                    None => {
                        let mut window = lock(&stats.latency_s);
                        if window.len() == LATENCY_WINDOW {
                            window.pop_front();
                        }
                        window.push_back(seconds);
                        "tracking".to_string()
                    }
                };
                stats.tracked.fetch_add(1, Ordering::Relaxed);
                *lock(&stats.last) =
                    Some(LastTrack { category: frame.category.clone(), state, score: outcome.pose.score, at: Instant::now() });
                publish_track(&shared, &slot, &frame, &outcome.pose);
            }
            Err(e) => {
                entry.1.lose();
                failures += 1;
                stats.failed.fetch_add(1, Ordering::Relaxed);
                *lock(&stats.last) = Some(LastTrack {
                    category: frame.category.clone(),
                    state: format!("lost ({e})"),
                    score: f32::NAN,
                    at: Instant::now(),
                });
                if failures <= 20 || failures.is_multiple_of(100) {
                    warn!("tracking `{}`: no pose for the frame ({failures} so far): {e}", frame.category);
                }
            }
        }
    }
}

/// Decodes a frame and poses it.
fn track_frame(shared: &Shared, slot: &ModelSlot, tracker: &mut Tracker, frame: &LiveFrame) -> crate::Result<TrackOutcome> {
    let (rgb, alpha) = decode_rgb(&raw_image(&frame.image))?;
    let mask = match (&frame.mask, alpha) {
        (Some(m), _) => decode_mask(&raw_image(m))?,
        (None, Some(a)) => a,
        (None, None) => shared.segmenter()?.mask(&rgb)?,
    };
    crate::collection::validate_mask(&mask, rgb.width(), rgb.height(), Path::new("<live mask>"))?;
    let known = frame.info.as_ref().and_then(|info| {
        let k = <[f64; 9]>::try_from(info.k.as_slice()).ok()?;
        intrinsics_from_camera_info(&k, (info.width, info.height), (rgb.width(), rgb.height())).ok().flatten()
    });
    let field = &slot.shape.field;
    let reinit_config = shared.config.track.reinit_config(&shared.config);
    let mut reinit = || -> crate::Result<TrackedPose> {
        let reg = shared.register_with_model(slot, &rgb, &mask, known, &reinit_config)?;
        match (reg.camera_from_object.first(), reg.intrinsics.first(), reg.iou.first()) {
            (Some(p), Some(k), Some(s)) => Ok(TrackedPose { camera_from_object: *p, intrinsics: *k, score: *s }),
            _ => Err(crate::Error::Numerical("registration returned no pose".into())),
        }
    };
    let stamp = &frame.image.header.stamp;
    let time_s = stamp.sec as f64 + stamp.nanosec as f64 * 1e-9;
    tracker.step(field, &mask, known, time_s, &mut reinit)
}

/// The pose in canonical units (the model's field is in a normalised frame).
pub(crate) fn canonical_pose(slot: &ModelSlot, pose: &TrackedPose) -> Isometry3<f64> {
    let t = pose.camera_from_object.translation.vector * slot.shape.field.units_per_normalised;
    Isometry3::from_parts(Translation3::from(t), pose.camera_from_object.rotation)
}

/// The TF child frame of a category's object (the frame of its mesh Marker).
pub fn object_frame(category: &str) -> String {
    format!("congeal/{category}")
}

/// One Detection3D (the object) in the camera frame of `header`.
pub fn detections(
    header: &Header,
    category: &str,
    camera_from_object: &Isometry3<f64>,
    score: f32,
    bbox: &([f64; 3], [f64; 3]),
) -> Detection3DArray {
    let pose = pose_stamped(header.clone(), camera_from_object).pose;
    let (lo, hi) = bbox;
    let centre_in_object = Point3::new(0.5 * (lo[0] + hi[0]), 0.5 * (lo[1] + hi[1]), 0.5 * (lo[2] + hi[2]));
    let centre_in_camera = camera_from_object * centre_in_object;
    let bbox_pose = r2r::geometry_msgs::msg::Pose {
        position: r2r::geometry_msgs::msg::Point { x: centre_in_camera.x, y: centre_in_camera.y, z: centre_in_camera.z },
        orientation: pose.orientation.clone(),
    };
    let detection = Detection3D {
        header: header.clone(),
        results: vec![ObjectHypothesisWithPose {
            hypothesis: ObjectHypothesis { class_id: category.to_string(), score: score as f64 },
            pose: PoseWithCovariance { pose, covariance: vec![0.0; 36] },
        }],
        bbox: BoundingBox3D { center: bbox_pose, size: Vector3 { x: hi[0] - lo[0], y: hi[1] - lo[1], z: hi[2] - lo[2] } },
        id: category.to_string(),
    };
    Detection3DArray { header: header.clone(), detections: vec![detection] }
}

/// The transform from the image's frame to `congeal/<category>`.
pub fn transform(header: &Header, category: &str, camera_from_object: &Isometry3<f64>) -> TFMessage {
    let t = camera_from_object.translation.vector;
    let q = camera_from_object.rotation;
    TFMessage {
        transforms: vec![TransformStamped {
            header: header.clone(),
            child_frame_id: object_frame(category),
            transform: Transform {
                translation: Vector3 { x: t.x, y: t.y, z: t.z },
                rotation: Quaternion { x: q.i, y: q.j, z: q.k, w: q.w },
            },
        }],
    }
}

/// Publishes a tracked frame's outputs, all with the frame's header.
fn publish_track(shared: &Shared, slot: &ModelSlot, frame: &LiveFrame, pose: &TrackedPose) {
    let header = frame.image.header.clone();
    let camera_from_object = canonical_pose(slot, pose);
    let pubs = lock(&shared.publishers).clone();
    if let Err(e) = pubs.pose.publish(&pose_stamped(header.clone(), &camera_from_object)) {
        warn!("publishing pose: {e}");
    }
    let dets = detections(&header, &frame.category, &camera_from_object, pose.score, &slot.shape.bbox);
    if let Err(e) = pubs.detections.publish(&dets) {
        warn!("publishing detections: {e}");
    }
    // tf2 refuses a transform without a parent frame: images with an empty frame_id get poses and
    // detections but no TF (and one warning).
    if header.frame_id.is_empty() {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| warn!("input images have an empty header.frame_id: no TF is published for them"));
    } else if let Err(e) = pubs.tf.publish(&transform(&header, &frame.category, &camera_from_object)) {
        warn!("publishing tf: {e}");
    }
    if shared.params.publish_nocs {
        match render_nocs(slot, pose) {
            Ok(nocs) => {
                let k = pose.intrinsics;
                if let Err(e) = pubs.nocs.publish(&nocs_image(header, k.width, k.height, &nocs.0, &nocs.1)) {
                    warn!("publishing nocs: {e}");
                }
            }
            Err(e) => warn!("rendering nocs: {e}"),
        }
    }
}

/// NOCS at the pose over the whole image, and where the shape covers it.
fn render_nocs(slot: &ModelSlot, pose: &TrackedPose) -> crate::Result<(Vec<[f32; 3]>, Vec<bool>)> {
    let field = &slot.shape.field;
    let k = pose.intrinsics;
    let cams = CameraBatch::from_poses(&[pose.camera_from_object], &[k], field.device())?;
    let pixels = crate::field::render::pixel_grid(k.width, k.height, field.device())?;
    let what = RenderWhat { nocs: true, ..Default::default() };
    let r = render_rays_host(field, &cams.rays(&pixels)?, 48, what, 1 << 16)?;
    let covered = r.opacity.iter().map(|a| *a >= 0.5).collect();
    Ok((r.nocs, covered))
}
