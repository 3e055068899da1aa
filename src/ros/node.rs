//! `congeal_node`: topics, services, jobs.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use r2r::builtin_interfaces::msg::Time;
use r2r::congeal_msgs::msg::{CongealResult, ImagePose, Status};
use r2r::congeal_msgs::srv::{Congeal, GetPose, LoadModel, Register, SaveModel, SetCollecting, TransferKeypoints};
use r2r::diagnostic_msgs::msg::DiagnosticArray;
use r2r::geometry_msgs::msg::{Point, PoseStamped};
use r2r::sensor_msgs::msg::{CameraInfo, Image};
use r2r::std_msgs::msg::{ColorRGBA, Header};
use r2r::std_srvs::srv::Trigger;
use r2r::tf2_msgs::msg::TFMessage;
use r2r::vision_msgs::msg::Detection3DArray;
use r2r::visualization_msgs::msg::Marker;
use r2r::{ParameterValue, QosProfile};
use tracing::{error, info, warn};

use crate::collection::Collection;
use crate::config::Config;
use crate::congeal::pipeline;
use crate::congeal::pose_init::{self, CandidateSet};
use crate::field::render::{render_rays_host, CameraBatch, RenderWhat};
use crate::ingest::frames::{decode_mask, decode_rgb, intrinsics_from_camera_info};
use crate::ingest::store::{validate_category, CollectionStore};
use crate::ingest::sync::{ApproxTimeSync, Stamped, SyncConfig};
use crate::output::result::RunResult;
use crate::ros::convert::{nocs_image, pose_stamped, raw_image, stamp_ns};
use crate::ros::live::{Live, LiveFrame};
use crate::shape::model::{load_model, save_model};
use crate::shape::{CanonicalShape, ShapeSpec};

/// Node parameters (see `config/congeal_node.yaml` for their documentation).
#[derive(Clone, Debug)]
pub struct Params {
    /// Category collected from start-up.
    pub category: String,
    /// Where collections (and runs) are kept.
    pub data_dir: PathBuf,
    /// Template mesh for `shape = template` when the request gives none.
    pub template_path: String,
    /// Pipeline config file (empty = built-in defaults).
    pub config: String,
    /// Approximate-time slop, seconds.
    pub slop_s: f64,
    /// Queue size of each synchroniser input.
    pub queue_size: usize,
    /// Wait for a mask for every image.
    pub use_mask: bool,
    /// Frames waiting to be written to disk (oldest dropped beyond this).
    pub ingest_queue: usize,
    /// Collect from start-up.
    pub collect: bool,
    /// Store at most one frame per this many seconds of image stamps (0 = every synchronised frame).
    pub collect_period_s: f64,
    /// Input QoS reliability: `best_effort` (sensor data, default) or `reliable`.
    pub input_reliability: String,
    /// Built-in pipeline profile when `config` is empty: `auto` (fast on a CPU, the paper's on a GPU),
    /// `fast`, `fast_224`, `default`/`paper`, `tiny`.
    pub profile: String,
    /// Live mode: pose every synchronised frame of a category that has a model.
    pub track: bool,
    /// Publish `~/nocs` for every tracked frame (a full-image render: expensive).
    pub publish_nocs: bool,
}

/// A parameter's value: `default` when it is not set; an error naming the parameter, the expected and
/// the given type when it is set with the wrong type (a YAML `slop: 1` is an integer, not a double).
fn param<T>(node: &r2r::Node, name: &str, default: T) -> anyhow::Result<T>
where
    T: std::fmt::Debug,
    ParameterValue: TryInto<T, Error = r2r::WrongParameterType>,
{
    let value = lock(&node.params).get(name).map(|p| p.value.clone()).unwrap_or(ParameterValue::NotSet);
    if matches!(value, ParameterValue::NotSet) {
        return Ok(default);
    }
    let shown = match &value {
        ParameterValue::Bool(v) => v.to_string(),
        ParameterValue::Integer(v) => v.to_string(),
        ParameterValue::Double(v) => v.to_string(),
        ParameterValue::String(v) => format!("`{v}`"),
        other => format!("{other:?}"),
    };
    value.try_into().map_err(|e: r2r::WrongParameterType| {
        anyhow::anyhow!(
            "parameter `{name}` must be of type {} (default {default:?}), got {} {shown}{}",
            e.expected_type_name,
            e.actual_type_name,
            if e.expected_type_name.contains("f64") || e.expected_type_name.contains("double") {
                " (write a decimal point: 1.0, not 1)"
            } else {
                ""
            }
        )
    })
}

/// How long a shutdown waits for queued frames to reach the disk.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(10);

/// Resolves on SIGINT or SIGTERM, naming it.
async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    // A signal that cannot be listened for never resolves (the process keeps its default action).
    let listen = |kind: SignalKind, name: &'static str| async move {
        match signal(kind) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                warn!("cannot listen for {name} ({e}); it will not shut down cleanly");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = listen(SignalKind::interrupt(), "SIGINT") => "SIGINT",
        _ = listen(SignalKind::terminate(), "SIGTERM") => "SIGTERM",
    }
}

/// Largest `queue_size` / `ingest_queue` accepted.
const MAX_QUEUE: i64 = 10_000;
/// Largest `slop` accepted (s): image, mask and camera_info further apart are not one frame.
const MAX_SLOP_S: f64 = 60.0;
/// Largest `collect_period` accepted (s).
const MAX_COLLECT_PERIOD_S: f64 = 3600.0;

impl Params {
    fn from_node(node: &r2r::Node) -> anyhow::Result<Self> {
        // Queue depths: at least one message, at most what a node could hold in memory.
        let positive = |name: &str, v: i64| -> anyhow::Result<usize> {
            if !(1..=MAX_QUEUE).contains(&v) {
                anyhow::bail!("parameter `{name}` must be between 1 and {MAX_QUEUE}, got {v}");
            }
            Ok(v as usize)
        };
        // Durations: finite seconds from 0 to a bound.
        let seconds = |name: &str, default: f64, max: f64| -> anyhow::Result<f64> {
            let v: f64 = param(node, name, default)?;
            if !(v.is_finite() && (0.0..=max).contains(&v)) {
                anyhow::bail!("parameter `{name}` must be a number of seconds between 0 and {max}, got {v}");
            }
            Ok(v)
        };
        let slop_s = seconds("slop", 0.05, MAX_SLOP_S)?;
        let collect_period_s = seconds("collect_period", 0.0, MAX_COLLECT_PERIOD_S)?;
        let category: String = param(node, "category", "object".to_string())?;
        validate_category(&category).map_err(|e| anyhow::anyhow!("parameter `category`: {e}"))?;
        Ok(Self {
            category,
            data_dir: PathBuf::from(param(node, "data_dir", "congeal_data".to_string())?),
            template_path: param(node, "template_path", String::new())?,
            config: param(node, "config", String::new())?,
            slop_s,
            queue_size: positive("queue_size", param(node, "queue_size", 10i64)?)?,
            use_mask: param(node, "use_mask", true)?,
            ingest_queue: positive("ingest_queue", param(node, "ingest_queue", 30i64)?)?,
            collect: param(node, "collect", true)?,
            collect_period_s,
            input_reliability: param(node, "input_reliability", "best_effort".to_string())?,
            profile: param(node, "profile", "auto".to_string())?,
            track: param(node, "track", true)?,
            publish_nocs: param(node, "publish_nocs", false)?,
        })
    }

    /// The pipeline configuration: the `config` file, else the built-in `profile` (`auto`: the paper's
    /// settings when a CUDA device is present, the fast CPU profile otherwise).
    fn pipeline_config(&self) -> anyhow::Result<Config> {
        if !self.config.is_empty() {
            return Ok(Config::from_yaml_file(Path::new(&self.config))?);
        }
        let config = match self.profile.as_str() {
            "auto" if candle_core::Device::new_cuda(0).is_ok() => {
                let mut c = Config::builtin("default")?;
                c.device = "cuda".into();
                c
            }
            "auto" => Config::builtin("fast")?,
            name => Config::builtin(name)?,
        };
        Ok(config)
    }
}

/// One synchronised frame on its way to disk.
pub(crate) struct Frame {
    category: String,
    image: Image,
    mask: Option<Image>,
    info: Option<CameraInfo>,
}

/// A bounded queue that drops its oldest entry when full (and counts it). Its consumer marks each
/// entry it took as [`DropOldest::finished`], so [`DropOldest::drain`] can wait for the last one.
pub(crate) struct DropOldest<T> {
    /// Entries, how many were dropped, how many were taken and are not finished.
    items: Mutex<(VecDeque<T>, u64, usize)>,
    ready: Condvar,
    capacity: usize,
}

impl<T> DropOldest<T> {
    fn new(capacity: usize) -> Self {
        Self { items: Mutex::new((VecDeque::new(), 0, 0)), ready: Condvar::new(), capacity }
    }

    /// The oldest entry, waiting for one at most `timeout` (`None` when none came).
    fn pop_timeout(&self, timeout: Duration) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut g = lock(&self.items);
        loop {
            if let Some(item) = g.0.pop_front() {
                g.2 += 1;
                return Some(item);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            g = self.ready.wait_timeout(g, deadline - now).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// The consumer is done with an entry it popped.
    fn finished(&self) {
        let mut g = lock(&self.items);
        g.2 = g.2.saturating_sub(1);
        self.ready.notify_all();
    }

    /// Waits until every entry has been taken and finished, at most `timeout`; returns how many
    /// were left (queued or in progress).
    fn drain(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut g = lock(&self.items);
        loop {
            let left = g.0.len() + g.2; // as `pending`, under the lock already held
            let now = Instant::now();
            if left == 0 || now >= deadline {
                return left;
            }
            g = self.ready.wait_timeout(g, deadline - now).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
    }

    fn push(&self, item: T) -> Option<u64> {
        let mut g = self.items.lock().unwrap_or_else(|p| p.into_inner());
        let mut dropped = None;
        if g.0.len() >= self.capacity {
            g.0.pop_front();
            g.1 += 1;
            dropped = Some(g.1);
        }
        g.0.push_back(item);
        self.ready.notify_all();
        dropped
    }

    /// Entries dropped so far.
    pub(crate) fn dropped(&self) -> u64 {
        lock(&self.items).1
    }

    /// Entries waiting or being handled now.
    pub(crate) fn pending(&self) -> usize {
        let g = lock(&self.items);
        g.0.len() + g.2
    }
}

/// State of a job, shown on `~/status`.
#[derive(Clone, Debug)]
pub(crate) struct JobState {
    pub(crate) job_id: String,
    pub(crate) stage: String,
    pub(crate) progress: f32,
    pub(crate) done: bool,
    pub(crate) ok: bool,
    pub(crate) message: String,
}

/// A model ready for `~/register` and tracking, with its candidate renders cached.
pub(crate) struct ModelSlot {
    pub(crate) shape: Arc<CanonicalShape>,
    /// Candidate renders (and, for semantic scoring, the features of the FoV groups used so far).
    candidates: Mutex<Option<CandidateSet>>,
}

impl ModelSlot {
    fn new(shape: CanonicalShape) -> Arc<Self> {
        Arc::new(Self { shape: Arc::new(shape), candidates: Mutex::new(None) })
    }
}

/// Everything the callbacks share.
pub(crate) struct Shared {
    pub(crate) params: Params,
    pub(crate) config: Config,
    collecting: Mutex<Option<String>>,
    /// Thins collection to `collect_period`: per category, the stamp of the last frame kept.
    pub(crate) thinning: Mutex<crate::ingest::period::PeriodGate>,
    pub(crate) sync: Mutex<ApproxTimeSync<Image, Image, CameraInfo>>,
    pub(crate) to_disk: DropOldest<Frame>,
    stores: Mutex<HashMap<String, Arc<Mutex<CollectionStore>>>>,
    pub(crate) jobs: Mutex<HashMap<String, JobState>>,
    results: Mutex<HashMap<String, (RunResult, PathBuf)>>,
    pub(crate) models: Mutex<HashMap<String, Arc<ModelSlot>>>,
    /// Live mode: the frame waiting for the tracker, reset requests, counters.
    pub(crate) live: Live,
    /// DINOv2, loaded on first use (semantic pose scoring in ~/register).
    features: Mutex<Option<Arc<crate::congeal::features::FeatureExtractor>>>,
    /// U^2-Net-p, loaded on first use (~/register requests without a mask).
    segmenter: Mutex<Option<Arc<crate::collection::segment::Segmenter>>>,
    /// r2r publishers are `Send` but not `Sync`: shared behind a mutex.
    pub(crate) publishers: Mutex<Publishers>,
}

#[derive(Clone)]
pub(crate) struct Publishers {
    status: r2r::Publisher<Status>,
    result: r2r::Publisher<CongealResult>,
    pub(crate) pose: r2r::Publisher<PoseStamped>,
    pub(crate) nocs: r2r::Publisher<Image>,
    mesh: r2r::Publisher<Marker>,
    pub(crate) detections: r2r::Publisher<Detection3DArray>,
    pub(crate) tf: r2r::Publisher<TFMessage>,
    diagnostics: r2r::Publisher<DiagnosticArray>,
}

impl Publishers {
    /// Every publisher of the node (names are the DESIGN.md contract).
    fn create(node: &mut r2r::Node) -> anyhow::Result<Self> {
        // Latched per category: a late subscriber gets the last result and mesh of each (up to 16).
        let latched = QosProfile::default().transient_local().keep_last(16);
        Ok(Self {
            status: node.create_publisher::<Status>("~/status", QosProfile::default())?,
            result: node.create_publisher::<CongealResult>("~/result", latched.clone())?,
            pose: node.create_publisher::<PoseStamped>("~/pose", QosProfile::default().keep_last(100))?,
            nocs: node.create_publisher::<Image>("~/nocs", QosProfile::default().keep_last(10))?,
            mesh: node.create_publisher::<Marker>("~/canonical_mesh", latched)?,
            detections: node.create_publisher::<Detection3DArray>("~/detections", QosProfile::default().keep_last(10))?,
            // tf2's own QoS for /tf: reliable, volatile, depth 100.
            tf: node.create_publisher::<TFMessage>("/tf", QosProfile::default().keep_last(100))?,
            diagnostics: node.create_publisher::<DiagnosticArray>("/diagnostics", QosProfile::default().keep_last(10))?,
        })
    }
}

impl Shared {
    /// DINOv2, loaded on first use.
    fn features(&self) -> crate::Result<Arc<crate::congeal::features::FeatureExtractor>> {
        let mut slot = lock(&self.features);
        if let Some(f) = slot.as_ref() {
            return Ok(f.clone());
        }
        let f = Arc::new(crate::congeal::features::FeatureExtractor::load(&self.config.features, &self.config.device()?)?);
        *slot = Some(f.clone());
        Ok(f)
    }

    /// U^2-Net-p, loaded on first use.
    pub(crate) fn segmenter(&self) -> crate::Result<Arc<crate::collection::segment::Segmenter>> {
        let mut slot = lock(&self.segmenter);
        if let Some(s) = slot.as_ref() {
            return Ok(s.clone());
        }
        let path = crate::config::resolve_weights(&self.config.masks.weights)?;
        let s = Arc::new(crate::collection::segment::Segmenter::load(&path, &self.config.device()?)?);
        *slot = Some(s.clone());
        Ok(s)
    }
}

/// Locks a mutex, recovering the data of a poisoned one (a panicked holder must not stop the node).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Folds every open store's journal into its `collection.json` (see [`CollectionStore::flush`]).
    fn flush_stores(&self) {
        let stores: Vec<(String, Arc<Mutex<CollectionStore>>)> =
            lock(&self.stores).iter().map(|(c, s)| (c.clone(), s.clone())).collect();
        for (category, store) in stores {
            if let Err(e) = lock(&store).flush() {
                warn!("{category}: rewriting the collection index (the frames stay in its journal): {e}");
            }
        }
    }

    fn store(&self, category: &str) -> crate::Result<Arc<Mutex<CollectionStore>>> {
        let mut stores = lock(&self.stores);
        if let Some(s) = stores.get(category) {
            return Ok(s.clone());
        }
        let s = Arc::new(Mutex::new(CollectionStore::open(&self.params.data_dir, category)?));
        stores.insert(category.to_string(), s.clone());
        Ok(s)
    }

    /// Installs a category's model (tracking and `~/register` use it from now on) and warms its
    /// candidate cache in the background ([`warm_up`]), so the first re-initialisation of tracking
    /// does not pay for the candidate renders and their DINOv2 features.
    fn install_model(&self, category: &str, shape: CanonicalShape) {
        let slot = ModelSlot::new(shape);
        lock(&self.models).insert(category.to_string(), slot.clone());
        let extractor = if self.config.pose_init.score.is_semantic() {
            match self.features() {
                Ok(f) => Some(f),
                Err(e) => {
                    warn!("model of `{category}`: no candidate features in advance: {e}");
                    return;
                }
            }
        } else {
            None
        };
        let (config, category) = (self.config.clone(), category.to_string());
        std::thread::spawn(move || {
            let t = std::time::Instant::now();
            match warm_up(&slot, &config, extractor.as_deref()) {
                Ok(n) => info!("model of `{category}`: {n} candidates ready in {:.1} s", t.elapsed().as_secs_f64()),
                Err(e) => warn!("model of `{category}`: warming the candidate cache: {e}"),
            }
        });
    }

    /// Registers one image against a model with the candidate search (candidates rendered once per
    /// model and kept; DINOv2 loaded on first use for semantic scoring) under `config` (the node's, or
    /// its re-initialisation variant; both share the candidate settings). Blocking.
    pub(crate) fn register_with_model(
        &self,
        slot: &ModelSlot,
        rgb: &image::RgbImage,
        mask: &image::GrayImage,
        known: Option<crate::geometry::Intrinsics>,
        config: &Config,
    ) -> crate::Result<pipeline::Registration> {
        let field = &slot.shape.field;
        let extractor = if config.pose_init.score.is_semantic() { Some(self.features()?) } else { None };
        let mut cache = lock(&slot.candidates);
        if cache.is_none() {
            *cache = Some(pose_init::render_candidates(field, &config.pose_init, config.render.chunk_rays)?);
        }
        let set = cache.as_mut().ok_or_else(|| crate::Error::InvalidInput("candidate cache is empty".into()))?;
        pipeline::register_frame(field, set, rgb, mask, known, config, extractor.as_deref())
    }

    /// The tensor device of the configuration (models are loaded onto it).
    fn device(&self) -> candle_core::Device {
        self.config.device().unwrap_or(candle_core::Device::Cpu)
    }

    fn category_or_default(&self, category: &str) -> String {
        if category.is_empty() {
            lock(&self.collecting).clone().unwrap_or_else(|| self.params.category.clone())
        } else {
            category.to_string()
        }
    }

    fn publish_status(&self, category: &str, s: &JobState) {
        let msg = Status {
            category: category.to_string(),
            job_id: s.job_id.clone(),
            stage: s.stage.clone(),
            progress: s.progress,
            done: s.done,
            ok: s.ok,
            message: s.message.clone(),
        };
        if let Err(e) = lock(&self.publishers).status.publish(&msg) {
            warn!("publishing status: {e}");
        }
    }
}

/// Renders a model's candidates and, for semantic scoring, their DINOv2 features for every FoV
/// group (what a registration would compute on first use). The cache lock is taken per group, so a
/// registration arriving meanwhile computes the one group it needs (which the warm-up then skips)
/// instead of waiting for all of them. Returns the number of candidates.
fn warm_up(
    slot: &ModelSlot,
    config: &Config,
    extractor: Option<&crate::congeal::features::FeatureExtractor>,
) -> crate::Result<usize> {
    let field = &slot.shape.field;
    let count = {
        let mut cache = lock(&slot.candidates);
        if cache.is_none() {
            *cache = Some(pose_init::render_candidates(field, &config.pose_init, config.render.chunk_rays)?);
        }
        cache.as_ref().map_or(0, |set| set.candidates.len())
    };
    if let Some(ex) = extractor {
        for group in 0..config.pose_init.fovs_deg.len() {
            let mut cache = lock(&slot.candidates);
            if let Some(set) = cache.as_mut() {
                pipeline::attach_candidate_features(set, field, ex, config, Some(&[group]))?;
            }
        }
    }
    Ok(count)
}

/// After this long without a frame to write, the disk writer folds each store's journal into its
/// `collection.json`, so a reader of that file alone sees every stored frame.
const IDLE_FOLD: Duration = Duration::from_millis(500);

/// Writes synchronised frames to disk, off the executor (at most one per `collect_period`).
fn disk_writer(shared: Arc<Shared>) {
    let mut errors = 0u64;
    loop {
        let Some(frame) = shared.to_disk.pop_timeout(IDLE_FOLD) else {
            shared.flush_stores();
            continue;
        };
        let t = stamp_ns(&frame.image.header.stamp);
        if !lock(&shared.thinning).due(&frame.category, t) {
            shared.to_disk.finished();
            continue;
        }
        // A panic (a bug) costs this frame, not the writer: collection goes on.
        let result = catch_panic(|| -> crate::Result<usize> {
            let (rgb, alpha) = decode_rgb(&raw_image(&frame.image))?;
            let mask = match &frame.mask {
                Some(m) => Some(decode_mask(&raw_image(m))?),
                None => alpha,
            };
            if let Some(m) = &mask {
                // Empty, full or mis-sized masks carry no object: refuse the frame, say why.
                crate::collection::validate_mask(m, rgb.width(), rgb.height(), Path::new("<mask topic>"))?;
            }
            // A bad camera_info (NaN, zero focal, wrong size) costs the frame its intrinsics, not the
            // frame: the FoV is then estimated like for an uncalibrated camera.
            let intrinsics = frame.info.as_ref().and_then(|info| {
                let checked = <[f64; 9]>::try_from(info.k.as_slice())
                    .map_err(|_| crate::Error::InvalidInput(format!("camera_info K has {} values, expected 9", info.k.len())))
                    .and_then(|k| intrinsics_from_camera_info(&k, (info.width, info.height), (rgb.width(), rgb.height())));
                checked.unwrap_or_else(|e| {
                    warn!(
                        "ignoring camera_info for the frame at {}.{:09}: {e}",
                        info.header.stamp.sec, info.header.stamp.nanosec
                    );
                    None
                })
            });
            let store = shared.store(&frame.category)?;
            let mut store = lock(&store);
            let stamp = &frame.image.header.stamp;
            store.append(&rgb, mask.as_ref(), intrinsics.as_ref(), (stamp.sec, stamp.nanosec), &frame.image.header.frame_id)
        })
        .unwrap_or_else(|m| Err(crate::Error::InvalidInput(format!("writing this frame panicked (a bug): {m}"))));
        shared.to_disk.finished();
        if result.is_ok() {
            lock(&shared.thinning).kept(&frame.category, t);
        }
        if let Err(e) = result {
            errors += 1;
            if errors <= 20 || errors.is_multiple_of(100) {
                warn!("dropping a frame ({errors} so far): {e}");
            }
        }
    }
}

fn job_id() -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("{}-{:03}", t.as_secs(), t.subsec_millis())
}

/// Starts a congealing job; returns (accepted, job id, message).
fn start_job(shared: &Arc<Shared>, req: &Congeal::Request) -> (bool, String, String) {
    let category = shared.category_or_default(&req.category);
    if let Err(e) = validate_category(&category) {
        return (false, String::new(), e.to_string());
    }
    let spec = match req.shape.as_str() {
        "" | "template" => {
            let path =
                if !req.template_path.is_empty() { req.template_path.clone() } else { shared.params.template_path.clone() };
            ShapeSpec::Template((!path.is_empty()).then(|| PathBuf::from(path)))
        }
        "sds" => ShapeSpec::Sds,
        "model" => {
            let dir = shared.params.data_dir.join(&category).join("model");
            ShapeSpec::Model(if req.template_path.is_empty() { dir } else { PathBuf::from(&req.template_path) })
        }
        other => return (false, String::new(), format!("unknown shape `{other}` (template, sds or model)")),
    };
    {
        let jobs = lock(&shared.jobs);
        if let Some(j) = jobs.get(&category) {
            if !j.done {
                return (false, String::new(), format!("a job ({}) is already running for `{category}`", j.job_id));
            }
        }
    }
    let root = shared.params.data_dir.join(&category);
    if !root.join("collection.json").exists() {
        return (false, String::new(), format!("no images collected for `{category}` yet ({})", root.display()));
    }
    let id = job_id();
    let state =
        JobState { job_id: id.clone(), stage: "queued".into(), progress: 0.0, done: false, ok: false, message: String::new() };
    lock(&shared.jobs).insert(category.clone(), state);
    let sh = shared.clone();
    let job = id.clone();
    let spawned = std::thread::Builder::new().name(format!("congeal-{category}")).spawn(move || run_job(sh, category, spec, job));
    match spawned {
        Ok(_) => (true, id, "started".into()),
        Err(e) => (false, String::new(), format!("cannot start a worker thread: {e}")),
    }
}

/// The share of a job (start, end) that each pipeline stage takes, roughly as measured with the
/// fast profile on a CPU.
fn stage_weight(stage: &str) -> (f32, f32) {
    match stage {
        "load" => (0.0, 0.05),
        "features" => (0.05, 0.1),
        "shape" => (0.1, 0.15),
        "pose_init" => (0.15, 0.3),
        "pose_refine" => (0.3, 0.6),
        "category" => (0.6, 0.7),
        "coord_maps" => (0.7, 0.95),
        _ => (0.95, 1.0),
    }
}

/// `~/status.message` while a job runs: stage, images done (per-image stages) or the stage's share,
/// elapsed time and an ETA from the overall progress.
fn progress_message(stage: &str, fraction: f32, images: usize, overall: f32, elapsed_s: f64) -> String {
    let what = match stage {
        "load" | "outputs" => format!("{stage}: {}/{images} images", (fraction * images as f32).round() as usize),
        _ => format!("{stage}: {:.0}% of the stage ({images} images)", 100.0 * fraction),
    };
    let eta = if overall > 0.02 {
        format!("ETA ~{:.0} s", elapsed_s * (1.0 - overall as f64) / overall as f64)
    } else {
        "ETA unknown".into()
    };
    format!("{what}; job {:.0}% after {elapsed_s:.0} s, {eta}", 100.0 * overall)
}

fn run_job(shared: Arc<Shared>, category: String, spec: ShapeSpec, job: String) {
    let run_dir = shared.params.data_dir.join(&category).join("runs").join(&job);
    let started = Instant::now();
    let images = std::sync::atomic::AtomicUsize::new(0);
    let progress = |stage: &str, fraction: f32| {
        let (a, b) = stage_weight(stage);
        let fraction = fraction.clamp(0.0, 1.0);
        if let Some(j) = lock(&shared.jobs).get_mut(&category) {
            j.stage = stage.to_string();
            j.progress = j.progress.max(a + (b - a) * fraction);
            let n = images.load(std::sync::atomic::Ordering::Relaxed);
            j.message = progress_message(stage, fraction, n, j.progress, started.elapsed().as_secs_f64());
        }
    };
    let attempt = catch_panic(|| -> crate::Result<RunResult> {
        // Snapshot the collection as it is now (frames keep arriving while the job runs).
        let collection = Collection::load(&shared.params.data_dir.join(&category))?;
        images.store(collection.images.len(), std::sync::atomic::Ordering::Relaxed);
        pipeline::run(&collection, &spec, &shared.config, &run_dir, &progress)
    });
    // A panic (a bug, not bad input) fails this job; the category can be congealed again.
    let outcome: std::result::Result<RunResult, String> = match attempt {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(m) => Err(format!("the job panicked (a bug, please report it): {m}")),
    };
    let mut jobs = lock(&shared.jobs);
    let Some(state) = jobs.get_mut(&category) else { return };
    state.done = true;
    state.progress = 1.0;
    match outcome {
        Ok(result) => {
            state.ok = true;
            state.stage = "done".into();
            state.message = format!("posed {} images ({} skipped)", result.images.len(), result.skipped.len());
            let snapshot = state.clone();
            drop(jobs);
            info!("job {job} on `{category}`: {}", snapshot.message);
            let model = run_dir.join("model");
            match load_model(&model, &shared.device()) {
                Ok(shape) => shared.install_model(&category, shape),
                Err(e) => warn!("model of job {job}: {e}"),
            }
            // Make the result queryable before announcing it: a client that reacts to ~/pose or
            // ~/status by calling ~/get_pose must find it.
            lock(&shared.results).insert(category.clone(), (result.clone(), run_dir.clone()));
            publish_result(&shared, &category, &job, &result, &run_dir, true);
            shared.publish_status(&category, &snapshot);
        }
        Err(e) => {
            state.ok = false;
            state.stage = "failed".into();
            state.message = e.to_string();
            let snapshot = state.clone();
            drop(jobs);
            error!("job {job} on `{category}` failed: {e}");
            shared.publish_status(&category, &snapshot);
        }
    }
}

/// Runs `f`, turning a panic (a bug, not bad input) into `Err` with the message it carried, so one
/// failure costs one job, frame or bag record instead of the thread that handles them.
pub(crate) fn catch_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|panic| {
        panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown payload".into())
    })
}

fn header_for(store: &CollectionStore, file: &str) -> Option<Header> {
    store
        .frames()
        .iter()
        .find(|f| f.rgb == file)
        .map(|f| Header { stamp: Time { sec: f.stamp_sec, nanosec: f.stamp_nanosec }, frame_id: f.frame_id.clone() })
}

/// Publishes a finished run: `~/result` and `~/canonical_mesh` (latched), and with `per_image` each
/// image's `~/pose` and `~/nocs`.
fn publish_result(shared: &Shared, category: &str, job: &str, result: &RunResult, run_dir: &Path, per_image: bool) {
    let store = match shared.store(category) {
        Ok(s) => s,
        Err(e) => return warn!("{e}"),
    };
    // The frames' headers, copied out so the store's lock is not held while NOCS maps are read and
    // published (the disk writer needs it for the frames still arriving).
    let headers: Vec<Header> = {
        let store = lock(&store);
        result.images.iter().map(|im| header_for(&store, &im.file).unwrap_or_default()).collect()
    };
    let mut images = Vec::new();
    for (im, header) in result.images.iter().zip(headers) {
        let Ok(pose) = im.pose() else { continue };
        let msg = pose_stamped(header.clone(), &pose);
        if per_image {
            if let Err(e) = lock(&shared.publishers).pose.publish(&msg) {
                warn!("publishing pose: {e}");
            }
        }
        if let Some(nocs_file) = im.nocs.as_ref().filter(|_| per_image) {
            if let Ok((w, h, values)) = crate::output::read_nocs_png(&run_dir.join(nocs_file)) {
                let mask: Vec<bool> = values.iter().map(|v| v.iter().any(|c| *c > 0.0)).collect();
                if let Err(e) = lock(&shared.publishers).nocs.publish(&nocs_image(header.clone(), w, h, &values, &mask)) {
                    warn!("publishing nocs: {e}");
                }
            }
        }
        images.push(ImagePose {
            pose: msg,
            fov_deg: im.fov_deg,
            k: im.k.iter().flatten().copied().collect(),
            score: im.score,
            file: im.file.clone(),
        });
    }
    let frame = format!("congeal/{category}");
    let [x0, y0, z0] = result.canonical.bbox_min;
    let [x1, y1, z1] = result.canonical.bbox_max;
    let msg = CongealResult {
        header: Header { stamp: Time::default(), frame_id: frame.clone() },
        category: category.to_string(),
        job_id: job.to_string(),
        shape_source: result.shape_source.clone(),
        run_dir: run_dir.display().to_string(),
        bbox_min: Point { x: x0, y: y0, z: z0 },
        bbox_max: Point { x: x1, y: y1, z: z1 },
        images,
    };
    if let Err(e) = lock(&shared.publishers).result.publish(&msg) {
        warn!("publishing result: {e}");
    }
    match crate::field::mesh::TriangleMesh::load(run_dir.join(&result.canonical.mesh)) {
        Ok(mesh) => publish_mesh(shared, category, &mesh),
        Err(e) => warn!("canonical mesh: {e}"),
    }
}

/// Publishes a category's canonical mesh on `~/canonical_mesh` (latched; frame and namespace
/// `congeal/<category>`).
fn publish_mesh(shared: &Shared, category: &str, mesh: &crate::field::mesh::TriangleMesh) {
    let frame = format!("congeal/{category}");
    let mut points = Vec::with_capacity(mesh.triangles.len() * 3);
    let mut colors = Vec::with_capacity(mesh.triangles.len() * 3);
    for t in &mesh.triangles {
        for &v in t {
            let Some(p) = mesh.positions.get(v as usize) else { continue };
            points.push(Point { x: p[0] as f64, y: p[1] as f64, z: p[2] as f64 });
            let c = mesh.vertex_colors.as_ref().and_then(|c| c.get(v as usize).copied()).unwrap_or([0.7; 3]);
            colors.push(ColorRGBA { r: c[0], g: c[1], b: c[2], a: 1.0 });
        }
    }
    let marker = Marker {
        header: Header { stamp: Time::default(), frame_id: frame.clone() },
        // One marker per category on the shared topic (RViz keeps each namespace's).
        ns: frame,
        id: 0,
        type_: Marker::TRIANGLE_LIST as i32,
        action: Marker::ADD as i32,
        pose: r2r::geometry_msgs::msg::Pose {
            orientation: r2r::geometry_msgs::msg::Quaternion { w: 1.0, ..Default::default() },
            ..Default::default()
        },
        scale: r2r::geometry_msgs::msg::Vector3 { x: 1.0, y: 1.0, z: 1.0 },
        color: ColorRGBA { r: 0.7, g: 0.7, b: 0.7, a: 1.0 },
        points,
        colors,
        ..Default::default()
    };
    if let Err(e) = lock(&shared.publishers).mesh.publish(&marker) {
        warn!("publishing mesh: {e}");
    }
}

/// Restores the latest finished run of every category on disk (so a restart keeps results).
fn restore(shared: &Shared) {
    let Ok(entries) = std::fs::read_dir(&shared.params.data_dir) else { return };
    for e in entries.flatten() {
        let category = e.file_name().to_string_lossy().to_string();
        let runs = e.path().join("runs");
        let Ok(list) = std::fs::read_dir(&runs) else { continue };
        let mut dirs: Vec<PathBuf> = list.flatten().map(|d| d.path()).filter(|p| p.join("result.json").exists()).collect();
        dirs.sort();
        if let Some(last) = dirs.pop() {
            if let Ok(result) = RunResult::load(&last) {
                info!("restored run {} for `{category}`", last.display());
                if let Ok(shape) = load_model(&last.join("model"), &shared.device()) {
                    shared.install_model(&category, shape);
                }
                // Latch the restored result and mesh again (not the per-image poses: they were
                // published when the run finished).
                let job = last.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
                publish_result(shared, &category, &job, &result, &last, false);
                lock(&shared.results).insert(category, (result, last));
            }
        }
    }
}

fn get_pose(shared: &Shared, req: &GetPose::Request) -> GetPose::Response {
    let category = shared.category_or_default(&req.category);
    let fail = |message: String| GetPose::Response { found: false, message, ..Default::default() };
    let results = lock(&shared.results);
    let Some((result, _)) = results.get(&category) else {
        return fail(format!("no result for `{category}` yet: call ~/congeal first"));
    };
    let store = match shared.store(&category) {
        Ok(s) => s,
        Err(e) => return fail(e.to_string()),
    };
    let store = lock(&store);
    let Some(frame) = store.frame_at((req.stamp.sec, req.stamp.nanosec), 1_000_000) else {
        return fail(format!("no collected image of `{category}` has stamp {}.{:09}", req.stamp.sec, req.stamp.nanosec));
    };
    let Some(image) = result.images.iter().find(|i| i.file == frame.rgb) else {
        return fail(format!("image {} was collected after the last job (or skipped): run ~/congeal again", frame.rgb));
    };
    match image.pose() {
        Ok(pose) => GetPose::Response {
            found: true,
            pose: pose_stamped(Header { stamp: req.stamp.clone(), frame_id: frame.frame_id.clone() }, &pose),
            fov_deg: image.fov_deg,
            message: String::new(),
        },
        Err(e) => fail(e.to_string()),
    }
}

/// Transfers pixels between two collected images (by stamp) with the request's method (default:
/// the joint cost of features and canonical coordinates, as `congeal transfer`).
fn transfer_keypoints(shared: &Shared, req: &TransferKeypoints::Request) -> TransferKeypoints::Response {
    use crate::congeal::transfer::{transfer, Method, Transfer2d};
    let fail = |message: String| TransferKeypoints::Response { ok: false, message, ..Default::default() };
    let method = match Method::parse(&req.method) {
        Ok(m) => m,
        Err(e) => return fail(e.to_string()),
    };
    let category = shared.category_or_default(&req.category);
    if !req.points.len().is_multiple_of(2) {
        return fail(format!("points must be x, y pairs; got {} numbers", req.points.len()));
    }
    let Some((result, run_dir)) = lock(&shared.results).get(&category).cloned() else {
        return fail(format!("no result for `{category}` yet: call ~/congeal first"));
    };
    let store = match shared.store(&category) {
        Ok(s) => s,
        Err(e) => return fail(e.to_string()),
    };
    let (src, dst) = {
        let store = lock(&store);
        let file = |t: &Time| store.frame_at((t.sec, t.nanosec), 1_000_000).map(|f| f.rgb.clone());
        match (file(&req.src_stamp), file(&req.dst_stamp)) {
            (Some(a), Some(b)) => (a, b),
            _ => return fail("no collected image has one of the given stamps".into()),
        }
    };
    let points: Vec<[f64; 2]> = req.points.chunks_exact(2).map(|c| [c[0], c[1]]).collect();
    let outcome = (|| -> crate::Result<Vec<Option<[f64; 2]>>> {
        if method == Method::Canonical {
            return transfer(&run_dir, &result, &src, &dst, &points);
        }
        let collection = Collection::load(Path::new(&result.collection))?;
        let extractor = if method.needs_features() { Some(shared.features()?) } else { None };
        let config = &shared.config;
        Transfer2d::for_run(
            &collection,
            extractor.as_deref(),
            &result,
            &run_dir,
            config.pose_init.crop_margin,
            method,
            config.transfer.nocs_weight,
        )?
        .transfer_by_method(&src, &dst, &points)
    })();
    match outcome {
        Ok(pred) => TransferKeypoints::Response {
            ok: true,
            points: pred.iter().flat_map(|p| p.map(|q| [q[0], q[1]]).unwrap_or([f64::NAN; 2])).collect(),
            valid: pred.iter().map(Option::is_some).collect(),
            message: String::new(),
        },
        Err(e) => fail(e.to_string()),
    }
}

/// Registers one new image against a category's model (blocking: call off the executor).
fn register(shared: &Shared, req: &Register::Request) -> Register::Response {
    let fail = |message: String| Register::Response { ok: false, message, ..Default::default() };
    let category = shared.category_or_default(&req.category);
    let Some(slot) = lock(&shared.models).get(&category).cloned() else {
        return fail(format!("no canonical model for `{category}`: run ~/congeal or ~/load_model first"));
    };
    let outcome = (|| -> crate::Result<Register::Response> {
        let (rgb, alpha) = decode_rgb(&raw_image(&req.image))?;
        let mask = if !req.mask.data.is_empty() {
            decode_mask(&raw_image(&req.mask))?
        } else {
            match alpha {
                Some(a) => a,
                None => shared.segmenter()?.mask(&rgb)?,
            }
        };
        crate::collection::validate_mask(&mask, rgb.width(), rgb.height(), Path::new("<register mask>"))?;
        let info = &req.camera_info;
        let known = match <[f64; 9]>::try_from(info.k.as_slice()) {
            Ok(k) => intrinsics_from_camera_info(&k, (info.width, info.height), (rgb.width(), rgb.height()))?,
            Err(_) => None,
        };
        let reg = shared.register_with_model(&slot, &rgb, &mask, known, &shared.config)?;
        let field = &slot.shape.field;
        let (Some(&pose_n), Some(&k), Some(&score)) = (reg.camera_from_object.first(), reg.intrinsics.first(), reg.iou.first())
        else {
            return Err(crate::Error::Numerical("registration returned no pose".into()));
        };
        // NOCS at the estimated pose, masked by the input mask.
        let cams = CameraBatch::from_poses(&[pose_n], &[k], field.device())?;
        let pixels = crate::field::render::pixel_grid(k.width, k.height, field.device())?;
        let what = RenderWhat { nocs: true, ..Default::default() };
        let r = render_rays_host(
            field,
            &cams.rays(&pixels)?,
            shared.config.render.samples_per_ray,
            what,
            shared.config.render.chunk_rays,
        )?;
        let m: Vec<bool> = mask.pixels().map(|p| p.0[0] >= 128).collect();
        let pose = nalgebra::Isometry3::from_parts(
            nalgebra::Translation3::from(pose_n.translation.vector * field.units_per_normalised),
            pose_n.rotation,
        );
        let header = req.image.header.clone();
        Ok(Register::Response {
            ok: true,
            pose: pose_stamped(header.clone(), &pose),
            fov_deg: k.fov_y_deg(),
            score,
            nocs: nocs_image(header, k.width, k.height, &r.nocs, &m),
            message: String::new(),
        })
    })();
    outcome.unwrap_or_else(|e| fail(e.to_string()))
}

/// Answers a service request, logging a failed answer (the client went away).
fn respond<T: r2r::WrappedServiceTypeSupport + 'static>(req: r2r::ServiceRequest<T>, resp: T::Response, service: &str) {
    if let Err(e) = req.respond(resp) {
        warn!("responding to {service}: {e}");
    }
}

/// Serves a service whose handler is quick (runs on the executor's tokio workers).
fn serve<T, F>(requests: impl futures::Stream<Item = r2r::ServiceRequest<T>> + Send + 'static, service: &'static str, handler: F)
where
    T: r2r::WrappedServiceTypeSupport + 'static,
    F: Fn(&T::Request) -> T::Response + Send + 'static,
{
    tokio::spawn(requests.for_each(move |req| {
        let resp = handler(&req.message);
        respond(req, resp, service);
        futures::future::ready(())
    }));
}

/// Serves a service whose handler blocks (each request on a blocking thread).
fn serve_blocking<T, F>(
    requests: impl futures::Stream<Item = r2r::ServiceRequest<T>> + Send + 'static,
    service: &'static str,
    handler: F,
) where
    T: r2r::WrappedServiceTypeSupport + 'static,
    F: Fn(&T::Request) -> T::Response + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    tokio::spawn(requests.for_each(move |req| {
        let handler = handler.clone();
        tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            let resp = handler(&req.message);
            info!("{service} answered in {:.3}s", t.elapsed().as_secs_f64());
            respond(req, resp, service);
        });
        futures::future::ready(())
    }));
}

/// Hands matched frames on: to disk (when collecting) and to the tracker (newest wins).
fn forward(shared: &Shared, matched: Vec<crate::ingest::sync::Matched<Image, Image, CameraInfo>>) {
    let collecting = lock(&shared.collecting).clone();
    let live_category = collecting.clone().unwrap_or_else(|| shared.params.category.clone());
    let tracking = shared.params.track && lock(&shared.models).contains_key(&live_category);
    for m in matched {
        if tracking {
            shared.live.latest.put(LiveFrame {
                category: live_category.clone(),
                image: m.image.value.clone(),
                mask: m.mask.clone(),
                info: m.info.clone(),
            });
        }
        if let Some(category) = &collecting {
            let frame = Frame { category: category.clone(), image: m.image.value, mask: m.mask, info: m.info };
            if let Some(n) = shared.to_disk.push(frame) {
                if n <= 10 || n % 100 == 0 {
                    warn!("ingestion queue full: dropped the oldest frame ({n} so far)");
                }
            }
        }
    }
}

/// `~/set_collecting`.
fn set_collecting(shared: &Shared, req: &SetCollecting::Request) -> SetCollecting::Response {
    let cat = req.category.clone();
    match (req.collecting, validate_category(&cat)) {
        (true, Ok(())) => {
            *lock(&shared.collecting) = Some(cat.clone());
            SetCollecting::Response { ok: true, message: format!("collecting into `{cat}`") }
        }
        (true, Err(e)) => SetCollecting::Response { ok: false, message: e.to_string() },
        (false, _) => {
            *lock(&shared.collecting) = None;
            SetCollecting::Response { ok: true, message: "stopped collecting".into() }
        }
    }
}

/// `~/save_model`.
fn save_model_srv(shared: &Shared, req: &SaveModel::Request) -> SaveModel::Response {
    let category = shared.category_or_default(&req.category);
    let slot = lock(&shared.models).get(&category).cloned();
    match slot {
        None => SaveModel::Response { ok: false, message: format!("no model for `{category}`") },
        Some(slot) => match save_model(&slot.shape, Path::new(&req.path)) {
            Ok(()) => SaveModel::Response { ok: true, message: format!("saved to {}", req.path) },
            Err(e) => SaveModel::Response { ok: false, message: e.to_string() },
        },
    }
}

/// `~/load_model`.
fn load_model_srv(shared: &Shared, req: &LoadModel::Request) -> LoadModel::Response {
    let category = shared.category_or_default(&req.category);
    match (validate_category(&category), load_model(Path::new(&req.path), &shared.device())) {
        (Err(e), _) | (_, Err(e)) => LoadModel::Response { ok: false, message: e.to_string() },
        (Ok(()), Ok(shape)) => {
            // A model folder holds no mesh: extract the field's surface for ~/canonical_mesh, so live
            // mode shows the shape in RViz as after a job.
            match crate::field::field_mesh(&shape.field) {
                Ok(mesh) => publish_mesh(shared, &category, &mesh),
                Err(e) => warn!("mesh of the model for `{category}`: {e}"),
            }
            shared.install_model(&category, shape);
            LoadModel::Response { ok: true, message: format!("model for `{category}` loaded") }
        }
    }
}

/// `~/reset`: the next tracked frame runs the candidate search.
fn reset_srv(shared: &Shared) -> Trigger::Response {
    shared.live.reset.store(true, std::sync::atomic::Ordering::SeqCst);
    let message = if shared.params.track { "the next frame is re-initialised" } else { "tracking is off (parameter track)" };
    Trigger::Response { success: shared.params.track, message: message.into() }
}

/// Feeds the three input streams to the synchroniser (counting messages for `/diagnostics`) and
/// forwards what matches.
fn spawn_inputs(
    shared: &Arc<Shared>,
    images: impl futures::Stream<Item = Image> + Send + 'static,
    masks: impl futures::Stream<Item = Image> + Send + 'static,
    infos: impl futures::Stream<Item = CameraInfo> + Send + 'static,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let sh = shared.clone();
    tokio::spawn(images.for_each(move |msg| {
        sh.live.stats.images.fetch_add(1, Relaxed);
        let stamp = stamp_ns(&msg.header.stamp);
        let matched = lock(&sh.sync).push_image(Stamped { stamp_ns: stamp, value: msg });
        forward(&sh, matched);
        futures::future::ready(())
    }));
    let sh = shared.clone();
    tokio::spawn(masks.for_each(move |msg| {
        sh.live.stats.masks.fetch_add(1, Relaxed);
        let stamp = stamp_ns(&msg.header.stamp);
        let matched = lock(&sh.sync).push_mask(Stamped { stamp_ns: stamp, value: msg });
        forward(&sh, matched);
        futures::future::ready(())
    }));
    let sh = shared.clone();
    tokio::spawn(infos.for_each(move |msg| {
        sh.live.stats.infos.fetch_add(1, Relaxed);
        let stamp = stamp_ns(&msg.header.stamp);
        let matched = lock(&sh.sync).push_info(Stamped { stamp_ns: stamp, value: msg });
        forward(&sh, matched);
        futures::future::ready(())
    }));
}

/// Runs the node until it is killed.
pub fn run_node() -> anyhow::Result<()> {
    let ctx = r2r::Context::create()?;
    let mut node = r2r::Node::create(ctx, "congeal", "")?;
    let params = Params::from_node(&node)?;
    let config = params.pipeline_config()?;
    config.validate()?;
    std::fs::create_dir_all(&params.data_dir)?;
    info!(
        "congeal node: category `{}`, data in {}, pipeline {} on {}, tracking {}",
        params.category,
        params.data_dir.display(),
        if params.config.is_empty() { format!("profile `{}`", params.profile) } else { params.config.clone() },
        config.device,
        if params.track { "on" } else { "off" }
    );

    let publishers = Publishers::create(&mut node)?;
    let sync_cfg = SyncConfig { slop_ns: (params.slop_s * 1e9) as i64, queue: params.queue_size, wait_for_mask: params.use_mask };
    let shared = Arc::new(Shared {
        collecting: Mutex::new(params.collect.then(|| params.category.clone())),
        thinning: Mutex::new(crate::ingest::period::PeriodGate::new((params.collect_period_s * 1e9) as i64)),
        sync: Mutex::new(ApproxTimeSync::new(sync_cfg)),
        to_disk: DropOldest::new(params.ingest_queue),
        stores: Mutex::new(HashMap::new()),
        jobs: Mutex::new(HashMap::new()),
        results: Mutex::new(HashMap::new()),
        models: Mutex::new(HashMap::new()),
        live: Live::default(),
        features: Mutex::new(None),
        segmenter: Mutex::new(None),
        params: params.clone(),
        config,
        publishers: Mutex::new(publishers),
    });
    restore(&shared);
    {
        let sh = shared.clone();
        std::thread::Builder::new().name("congeal-disk".into()).spawn(move || disk_writer(sh))?;
        let sh = shared.clone();
        std::thread::Builder::new().name("congeal-track".into()).spawn(move || crate::ros::live::tracking_worker(sh))?;
    }

    let sensor = QosProfile::sensor_data().keep_last(params.queue_size.max(10));
    let sensor = match params.input_reliability.as_str() {
        "reliable" => sensor.reliable(),
        "best_effort" => sensor,
        other => anyhow::bail!("parameter input_reliability must be best_effort or reliable, got `{other}`"),
    };
    let images = node.subscribe::<Image>("image", sensor.clone())?;
    let masks = node.subscribe::<Image>("mask", sensor.clone())?;
    let infos = node.subscribe::<CameraInfo>("camera_info", sensor)?;
    let qos = QosProfile::default;
    let congeal_srv = node.create_service::<Congeal::Service>("~/congeal", qos())?;
    let get_pose_srv = node.create_service::<GetPose::Service>("~/get_pose", qos())?;
    let collect_srv = node.create_service::<SetCollecting::Service>("~/set_collecting", qos())?;
    let register_srv = node.create_service::<Register::Service>("~/register", qos())?;
    let save_srv = node.create_service::<SaveModel::Service>("~/save_model", qos())?;
    let load_srv = node.create_service::<LoadModel::Service>("~/load_model", qos())?;
    let transfer_srv = node.create_service::<TransferKeypoints::Service>("~/transfer_keypoints", qos())?;
    let reset_srv_stream = node.create_service::<Trigger::Service>("~/reset", qos())?;

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        spawn_inputs(&shared, images, masks, infos);
        let sh = shared.clone();
        serve(congeal_srv, "~/congeal", move |req: &Congeal::Request| {
            let (accepted, job_id, message) = start_job(&sh, req);
            Congeal::Response { accepted, job_id, message }
        });
        let sh = shared.clone();
        serve_blocking(get_pose_srv, "~/get_pose", move |req: &GetPose::Request| get_pose(&sh, req));
        let sh = shared.clone();
        serve(collect_srv, "~/set_collecting", move |req: &SetCollecting::Request| set_collecting(&sh, req));
        let sh = shared.clone();
        serve_blocking(register_srv, "~/register", move |req: &Register::Request| register(&sh, req));
        let sh = shared.clone();
        serve_blocking(save_srv, "~/save_model", move |req: &SaveModel::Request| save_model_srv(&sh, req));
        let sh = shared.clone();
        serve_blocking(load_srv, "~/load_model", move |req: &LoadModel::Request| load_model_srv(&sh, req));
        let sh = shared.clone();
        serve_blocking(transfer_srv, "~/transfer_keypoints", move |req: &TransferKeypoints::Request| {
            transfer_keypoints(&sh, req)
        });
        let sh = shared.clone();
        serve(reset_srv_stream, "~/reset", move |_: &Trigger::Request| reset_srv(&sh));
        // Status at 2 Hz while any job runs.
        let sh = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let running: Vec<(String, JobState)> =
                    lock(&sh.jobs).iter().filter(|(_, j)| !j.done).map(|(c, j)| (c.clone(), j.clone())).collect();
                for (c, j) in running {
                    sh.publish_status(&c, &j);
                }
            }
        });
        // Diagnostics at 1 Hz.
        let sh = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut rates = crate::ros::diagnostics::RateState::now(&sh);
            loop {
                tick.tick().await;
                let report = crate::ros::diagnostics::report(&sh, &mut rates);
                if let Err(e) = lock(&sh.publishers).diagnostics.publish(&report) {
                    warn!("publishing diagnostics: {e}");
                }
            }
        });
        // SIGINT / SIGTERM (Ctrl-C, ros2 launch): stop accepting frames, write those already queued
        // (at most SHUTDOWN_DRAIN), then stop spinning and return. A job still running is left as a
        // killed job is.
        let sh = shared.clone();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop_spin = stop.clone();
        tokio::spawn(async move {
            let which = shutdown_signal().await;
            *lock(&sh.collecting) = None;
            let drain = sh.clone();
            let left = tokio::task::spawn_blocking(move || drain.to_disk.drain(SHUTDOWN_DRAIN)).await.unwrap_or(usize::MAX);
            if left == 0 {
                info!("{which}: every queued frame is on disk; exiting");
            } else {
                warn!("{which}: {left} queued frame(s) not written within {} s; exiting", SHUTDOWN_DRAIN.as_secs());
            }
            // The frames are committed in each store's journal; folding them into collection.json
            // now leaves a tidy folder (a kill instead loses nothing either).
            sh.flush_stores();
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        // The executor spins on a blocking thread; callbacks above run on the tokio workers. It stops
        // on shutdown, so the node is dropped before the process exits.
        let spin = tokio::task::spawn_blocking(move || {
            while !stop_spin.load(std::sync::atomic::Ordering::SeqCst) {
                node.spin_once(Duration::from_millis(10));
            }
        });
        let _ = spin.await;
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// The shutdown's wait: `drain` returns only when every entry was taken *and* finished (a frame
    /// being written counts), or at the timeout with how many are left.
    #[test]
    fn drain_waits_for_queued_and_in_progress_entries() {
        let queue = Arc::new(DropOldest::new(10));
        for k in 0..5 {
            queue.push(k);
        }
        assert_eq!(queue.pending(), 5);
        assert_eq!(queue.drain(Duration::from_millis(20)), 5, "no consumer yet: all left at the timeout");
        let done = Arc::new(AtomicUsize::new(0));
        let (q, d) = (queue.clone(), done.clone());
        let consumer = std::thread::spawn(move || {
            for _ in 0..5 {
                let _ = q.pop_timeout(Duration::from_secs(10));
                std::thread::sleep(Duration::from_millis(30)); // "writing"
                d.fetch_add(1, Ordering::SeqCst);
                q.finished();
            }
        });
        assert_eq!(queue.drain(Duration::from_secs(10)), 0);
        assert_eq!(done.load(Ordering::SeqCst), 5, "drain returned before the last entry was finished");
        assert_eq!(queue.pending(), 0);
        consumer.join().unwrap();
    }
}
