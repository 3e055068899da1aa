//! `/diagnostics` (diagnostic_msgs/DiagnosticArray) of the node at 1 Hz: input rates and drops,
//! tracking state and latency, job states.

use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use r2r::builtin_interfaces::msg::Time;
use r2r::diagnostic_msgs::msg::{DiagnosticArray, DiagnosticStatus, KeyValue};
use r2r::std_msgs::msg::Header;

use crate::eval::orbit::quantile;
use crate::ros::node::{lock, Shared};

/// Levels of `DiagnosticStatus.level` (the generated constants are bindgen integer types).
const OK: u8 = DiagnosticStatus::OK as u8;
const WARN: u8 = DiagnosticStatus::WARN as u8;
/// Hardware id of every status (the node).
const HARDWARE_ID: &str = "congeal";
/// A category with a model that has not been tracked for this long is reported as stale, seconds.
const STALE_S: f64 = 5.0;

/// Message counts at the previous report, for rates.
#[derive(Clone, Copy, Debug)]
pub struct RateState {
    at: Instant,
    images: u64,
    masks: u64,
    infos: u64,
    tracked: u64,
}

impl RateState {
    /// Counts as of now.
    pub(crate) fn now(shared: &Shared) -> Self {
        let s = &shared.live.stats;
        Self {
            at: Instant::now(),
            images: s.images.load(Ordering::Relaxed),
            masks: s.masks.load(Ordering::Relaxed),
            infos: s.infos.load(Ordering::Relaxed),
            tracked: s.tracked.load(Ordering::Relaxed),
        }
    }
}

fn kv(key: &str, value: impl ToString) -> KeyValue {
    KeyValue { key: key.to_string(), value: value.to_string() }
}

fn status(level: u8, name: &str, message: String, values: Vec<KeyValue>) -> DiagnosticStatus {
    DiagnosticStatus { level, name: format!("congeal: {name}"), message, hardware_id: HARDWARE_ID.into(), values }
}

/// The report since `previous` (which is updated).
pub(crate) fn report(shared: &Shared, previous: &mut RateState) -> DiagnosticArray {
    let now = RateState::now(shared);
    let dt = now.at.duration_since(previous.at).as_secs_f64().max(1e-3);
    let rate = |a: u64, b: u64| (a.saturating_sub(b)) as f64 / dt;
    let (image_hz, mask_hz, info_hz, track_hz) = (
        rate(now.images, previous.images),
        rate(now.masks, previous.masks),
        rate(now.infos, previous.infos),
        rate(now.tracked, previous.tracked),
    );
    *previous = now;

    // Inputs.
    let dropped = lock(&shared.sync).dropped();
    let disk_dropped = shared.to_disk.dropped();
    let skipped = shared.live.latest.replaced();
    let level = if image_hz == 0.0 { WARN } else { OK };
    let inputs = status(
        level,
        "inputs",
        if image_hz == 0.0 { "no images".into() } else { format!("images {image_hz:.1} Hz") },
        vec![
            kv("image_rate_hz", format!("{image_hz:.2}")),
            kv("mask_rate_hz", format!("{mask_hz:.2}")),
            kv("camera_info_rate_hz", format!("{info_hz:.2}")),
            kv("sync_dropped_images_queue_full", dropped.images_overflow),
            kv("sync_dropped_images_no_mask", dropped.images_unmatched),
            kv("sync_dropped_masks", dropped.masks),
            kv("sync_images_without_own_camera_info", dropped.infos_missing),
            kv("ingest_dropped_queue_full", disk_dropped),
            kv("ingest_pending", shared.to_disk.pending()),
            kv("collect_skipped_period", lock(&shared.thinning).skipped),
            kv("tracking_skipped_newest_wins", skipped),
        ],
    );

    // Tracking.
    let stats = &shared.live.stats;
    let latencies: Vec<f64> = lock(&stats.latency_s).iter().copied().collect();
    let last = lock(&stats.last).clone();
    let models: Vec<String> = lock(&shared.models).keys().cloned().collect();
    let (level, message) = if !shared.params.track {
        (OK, "off (parameter track is false)".to_string())
    } else if models.is_empty() {
        (OK, "waiting for a model (~/congeal or ~/load_model)".to_string())
    } else {
        match &last {
            None => (WARN, "model ready, no frame tracked yet".to_string()),
            Some(l) if l.at.elapsed().as_secs_f64() > STALE_S => {
                (WARN, format!("no frame for {:.0} s", l.at.elapsed().as_secs_f64()))
            }
            Some(l) if l.state.starts_with("lost") => (WARN, format!("`{}` {}", l.category, l.state)),
            Some(l) => (OK, format!("`{}` {}, fit {:.2}", l.category, l.state, l.score)),
        }
    };
    let tracking = status(
        level,
        "tracking",
        message,
        vec![
            kv("enabled", shared.params.track),
            kv("models", models.join(",")),
            kv("state", last.as_ref().map(|l| l.state.clone()).unwrap_or_default()),
            kv("score", last.as_ref().map(|l| format!("{:.3}", l.score)).unwrap_or_default()),
            kv("rate_hz", format!("{track_hz:.2}")),
            kv("latency_median_ms", format!("{:.1}", 1e3 * quantile(&latencies, 0.5))),
            kv("latency_p95_ms", format!("{:.1}", 1e3 * quantile(&latencies, 0.95))),
            kv("last_reinit_s", lock(&stats.last_reinit_s).map(|s| format!("{s:.2}")).unwrap_or_default()),
            kv("frames_tracked", stats.tracked.load(Ordering::Relaxed)),
            kv("frames_reinitialised", stats.reinitialised.load(Ordering::Relaxed)),
            kv("frames_without_pose", stats.failed.load(Ordering::Relaxed)),
        ],
    );

    // Jobs.
    let jobs: Vec<(String, crate::ros::node::JobState)> =
        lock(&shared.jobs).iter().map(|(c, j)| (c.clone(), j.clone())).collect();
    let running = jobs.iter().filter(|(_, j)| !j.done).count();
    let failed = jobs.iter().filter(|(_, j)| j.done && !j.ok).count();
    let mut values = vec![kv("running", running)];
    for (c, j) in &jobs {
        values.push(kv(&format!("job.{c}"), format!("{} {} {:.0}% {}", j.job_id, j.stage, 100.0 * j.progress, j.message)));
    }
    let level = if failed > 0 { WARN } else { OK };
    let message = match (running, failed) {
        (0, 0) => "idle".to_string(),
        (r, f) => format!("{r} running, {f} failed"),
    };
    let jobs = status(level, "jobs", message, values);

    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    DiagnosticArray {
        header: Header { stamp: Time { sec: t.as_secs() as i32, nanosec: t.subsec_nanos() }, frame_id: String::new() },
        status: vec![inputs, tracking, jobs],
    }
}
