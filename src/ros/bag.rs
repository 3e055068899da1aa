//! Rosbag (MCAP, ROS 2 CDR) tools: `congeal bag extract` turns recorded camera topics into a
//! collection folder; `congeal bag write` turns a run into the node's output topics as a bag.
//!
//! Extract: images (`sensor_msgs/Image`), masks (`mono8`), `CameraInfo` and ground-truth
//! `PoseStamped` are matched to each image by nearest header stamp within `slop_ns`. The collection is
//! written directly into `out` (kind `plain`, the same layout as the node's
//! [`CollectionStore`](crate::ingest::store::CollectionStore): `rgb/NNN.png`, `mask/NNN.png`, `K`,
//! `stamp_sec`/`stamp_nanosec`/`frame_id` per image). When ground-truth poses are present, each image
//! also gets `camera_from_object` (4x4 row-major) and the collection gets a `canonical_frame` with
//! `bbox_min`/`bbox_max` (from [`ExtractOptions::bbox`], or a placeholder unit box marked
//! `bbox_placeholder: true`): with K, pose and bbox the collection loader builds ground truth even
//! for kind `plain`, so `congeal eval COLLECTION RUN` works. The bbox only normalises ground-truth
//! NOCS maps, which an extracted collection never has, so the placeholder does not affect eval.
//!
//! Write: `/congeal/pose` (`geometry_msgs/PoseStamped`) and `/congeal/nocs` (`sensor_msgs/Image`,
//! 32FC3, NaN off the object) per posed image, stamped with the collection's stored stamps (else
//! `index` seconds, frame `camera`). Schemas are `ros2msg` with dependencies appended in the ROS 2
//! convention, read from the `.msg` files under `$AMENT_PREFIX_PATH/*/share`.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::{GrayImage, RgbImage};
use nalgebra::Isometry3;
use r2r::builtin_interfaces::msg::Time;
use r2r::geometry_msgs::msg::PoseStamped;
use r2r::sensor_msgs::msg::{CameraInfo, Image};
use r2r::std_msgs::msg::Header;
use r2r::WrappedTypesupport;
use serde::Serialize;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::geometry::Intrinsics;
use crate::ingest::frames::{decode_mask, decode_rgb, intrinsics_from_camera_info};
use crate::ros::convert::{isometry, nocs_image, pose_stamped, raw_image, stamp_ns};

/// Pose topic written by [`write`].
pub const POSE_TOPIC: &str = "/congeal/pose";
/// NOCS topic written by [`write`].
pub const NOCS_TOPIC: &str = "/congeal/nocs";
/// At most this many individual problems are listed in a report (the rest are summarised).
const MAX_LISTED: usize = 200;

/// What to extract from a bag.
#[derive(Clone, Debug)]
pub struct ExtractOptions {
    /// `sensor_msgs/Image` topic of the colour images.
    pub image_topic: String,
    /// `sensor_msgs/Image` (mono8) topic of the masks.
    pub mask_topic: Option<String>,
    /// `sensor_msgs/CameraInfo` topic.
    pub camera_info_topic: Option<String>,
    /// `geometry_msgs/PoseStamped` ground truth (camera_from_object) topic.
    pub pose_topic: Option<String>,
    /// Category written to collection.json.
    pub category: String,
    /// Largest stamp difference for a match, nanoseconds.
    pub slop_ns: i64,
    /// Canonical bbox (min, max) written with ground-truth poses (a placeholder box if absent).
    pub bbox: Option<([f64; 3], [f64; 3])>,
}

/// What [`extract`] wrote.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ExtractReport {
    /// Images written.
    pub images: usize,
    /// Of those, with a mask.
    pub with_mask: usize,
    /// Of those, with intrinsics from camera info.
    pub with_camera_info: usize,
    /// Of those, with a ground-truth pose.
    pub with_pose: usize,
    /// Messages that were not used, and why.
    pub skipped: Vec<String>,
}

/// What [`write`] wrote.
#[derive(Clone, Debug, Default, Serialize)]
pub struct WriteReport {
    /// The bag.
    pub bag: String,
    /// PoseStamped messages on `/congeal/pose`.
    pub poses: usize,
    /// Image messages on `/congeal/nocs`.
    pub nocs_images: usize,
    /// Images of the run that could not be written, and why.
    pub skipped: Vec<String>,
}

struct Skips {
    list: Vec<String>,
    more: usize,
}

impl Skips {
    fn new() -> Self {
        Self { list: Vec::new(), more: 0 }
    }
    fn push(&mut self, s: String) {
        if self.list.len() < MAX_LISTED {
            self.list.push(s);
        } else {
            self.more += 1;
        }
    }
    fn finish(mut self) -> Vec<String> {
        if self.more > 0 {
            self.list.push(format!("... and {} more", self.more));
        }
        self.list
    }
}

fn bag_err(path: &Path, message: impl std::fmt::Display) -> Error {
    Error::InvalidInput(format!("bag {}: {message}", path.display()))
}

/// Index of the element of `stamps` (sorted) nearest to `t` within `slop`.
fn nearest(stamps: &[i64], t: i64, slop: i64) -> Option<usize> {
    let i = stamps.partition_point(|s| *s < t);
    [i.checked_sub(1), Some(i)]
        .into_iter()
        .flatten()
        .filter(|&j| j < stamps.len())
        .map(|j| (j, (stamps[j] - t).abs()))
        .filter(|(_, d)| *d <= slop)
        .min_by_key(|(_, d)| *d)
        .map(|(j, _)| j)
}

fn decode<T: WrappedTypesupport>(data: &[u8]) -> std::result::Result<T, String> {
    T::from_serialized_bytes(data).map_err(|e| e.to_string())
}

fn save_png<I: SaveAs>(img: &I, path: &Path) -> Result<()> {
    img.save_as(path).map_err(|e| Error::Image { path: path.to_path_buf(), message: e.to_string() })
}

trait SaveAs {
    fn save_as(&self, path: &Path) -> image::ImageResult<()>;
}
impl SaveAs for RgbImage {
    fn save_as(&self, path: &Path) -> image::ImageResult<()> {
        self.save_with_format(path, image::ImageFormat::Png)
    }
}
impl SaveAs for GrayImage {
    fn save_as(&self, path: &Path) -> image::ImageResult<()> {
        self.save_with_format(path, image::ImageFormat::Png)
    }
}

fn row_major(iso: &Isometry3<f64>) -> [[f64; 4]; 4] {
    let m = iso.to_homogeneous();
    let mut out = [[0.0; 4]; 4];
    for (r, row) in out.iter_mut().enumerate() {
        for (c, v) in row.iter_mut().enumerate() {
            *v = m[(r, c)];
        }
    }
    out
}

/// Extracts a collection folder `out` from the MCAP bag `bag`.
pub fn extract(bag: &Path, opts: &ExtractOptions, out: &Path) -> Result<ExtractReport> {
    crate::ingest::store::validate_category(&opts.category)?;
    if opts.slop_ns < 0 {
        return Err(Error::InvalidInput(format!("slop must be non-negative, got {} ns", opts.slop_ns)));
    }
    if out.join("collection.json").exists() {
        return Err(Error::InvalidInput(format!("{} already holds a collection; choose a new --out folder", out.display())));
    }
    let buf = std::fs::read(bag).map_err(|e| Error::io(bag, e))?;
    let mut skips = Skips::new();
    let topics = Topics::read(bag, &buf, opts, &mut skips)?;
    for sub in ["rgb", "mask"] {
        std::fs::create_dir_all(out.join(sub)).map_err(|e| Error::io(out.join(sub), e))?;
    }
    let mut report = ExtractReport::default();
    let mut entries = Vec::new();
    for (t, img) in &topics.images {
        let label = format!("image at {}.{:09}", img.header.stamp.sec, img.header.stamp.nanosec);
        let (rgb, alpha) = match decode_rgb(&raw_image(img)) {
            Ok(x) => x,
            Err(e) => {
                skips.push(format!("{label}: {e}"));
                continue;
            }
        };
        let size = rgb.dimensions();
        let mask = match topics.mask_for(*t, size, opts) {
            Ok(Some(m)) => Some(m),
            Ok(None) => alpha,
            Err(e) => {
                skips.push(format!("{label}: {e}; image dropped"));
                continue;
            }
        };
        let intrinsics = topics.intrinsics_for(*t, size, opts, &label, &mut skips);
        let pose = topics.pose_for(*t, opts, &label, &mut skips);
        let frame = ExtractedFrame { header: &img.header, rgb: &rgb, mask: mask.as_ref(), intrinsics, pose };
        entries.push(write_frame(out, entries.len(), &frame, &mut report)?);
    }
    report.images = entries.len();
    if entries.is_empty() {
        return Err(bag_err(bag, format!("no usable image: {}", skips.finish().join("; "))));
    }
    write_collection_index(bag, out, opts, entries, &report, &mut skips)?;
    report.skipped = skips.finish();
    Ok(report)
}

/// The messages of the image, mask, camera-info and pose topics of a bag, each sorted by stamp.
struct Topics {
    images: Vec<(i64, Image)>,
    masks: Vec<(i64, Image)>,
    infos: Vec<(i64, CameraInfo)>,
    poses: Vec<(i64, PoseStamped)>,
    mask_t: Vec<i64>,
    info_t: Vec<i64>,
    pose_t: Vec<i64>,
}

impl Topics {
    /// Decodes the messages of the configured topics; what is skipped (other topics, undecodable
    /// messages, a truncated bag) goes into `skips`.
    fn read(bag: &Path, buf: &[u8], opts: &ExtractOptions, skips: &mut Skips) -> Result<Self> {
        // A bag whose recording was cut off (no footer, end magic missing) is read up to the cut;
        // the first undecodable record stops the read below, with a skip saying so.
        let options = mcap::read::Options::IgnoreEndMagic.into();
        let mut stream = mcap::MessageStream::new_with_options(buf, options).map_err(|e| bag_err(bag, e))?;
        let mut other_topics: BTreeMap<String, u64> = BTreeMap::new();
        let mut bad: BTreeMap<String, u64> = BTreeMap::new();
        let mut images: Vec<(i64, Image)> = Vec::new();
        let mut masks: Vec<(i64, Image)> = Vec::new();
        let mut infos: Vec<(i64, CameraInfo)> = Vec::new();
        let mut poses: Vec<(i64, PoseStamped)> = Vec::new();
        for n in 0.. {
            // The mcap reader can panic on some corrupted records (not on truncation): that ends the
            // read like an error does, keeping what was read.
            let next = crate::ros::node::catch_panic(|| stream.next());
            let msg = match next {
                Ok(None) => break,
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => {
                    skips.push(format!("bag read stopped after {n} messages: {e}"));
                    break;
                }
                Err(m) => {
                    skips.push(format!("bag read stopped after {n} messages: a corrupted record ({m})"));
                    break;
                }
            };
            let topic = msg.channel.topic.as_str();
            let role = if topic == opts.image_topic {
                0
            } else if opts.mask_topic.as_deref() == Some(topic) {
                1
            } else if opts.camera_info_topic.as_deref() == Some(topic) {
                2
            } else if opts.pose_topic.as_deref() == Some(topic) {
                3
            } else {
                *other_topics.entry(topic.to_string()).or_default() += 1;
                continue;
            };
            if msg.channel.message_encoding != "cdr" {
                *bad.entry(format!("{topic}: message encoding `{}` is not cdr", msg.channel.message_encoding)).or_default() += 1;
                continue;
            }
            let data: &[u8] = &msg.data;
            let res = match role {
                0 => decode::<Image>(data).map(|m| images.push((stamp_ns(&m.header.stamp), m))),
                1 => decode::<Image>(data).map(|m| masks.push((stamp_ns(&m.header.stamp), m))),
                2 => decode::<CameraInfo>(data).map(|m| infos.push((stamp_ns(&m.header.stamp), m))),
                _ => decode::<PoseStamped>(data).map(|m| poses.push((stamp_ns(&m.header.stamp), m))),
            };
            if let Err(e) = res {
                let schema = msg.channel.schema.as_ref().map(|s| s.name.clone()).unwrap_or_default();
                *bad.entry(format!("{topic}: cannot decode ({schema}): {e}")).or_default() += 1;
            }
        }
        for (what, count) in &bad {
            skips.push(format!("{count} message(s) on {what}"));
        }
        for (topic, count) in &other_topics {
            skips.push(format!("{count} message(s) on unused topic {topic}"));
        }
        if images.is_empty() {
            return Err(bag_err(bag, format!("no decodable sensor_msgs/Image on topic {}", opts.image_topic)));
        }
        images.sort_by_key(|(t, _)| *t);
        masks.sort_by_key(|(t, _)| *t);
        infos.sort_by_key(|(t, _)| *t);
        poses.sort_by_key(|(t, _)| *t);
        let mask_t = masks.iter().map(|(t, _)| *t).collect();
        let info_t = infos.iter().map(|(t, _)| *t).collect();
        let pose_t = poses.iter().map(|(t, _)| *t).collect();
        Ok(Self { images, masks, infos, poses, mask_t, info_t, pose_t })
    }

    /// The mask of the image at `t` (`None` without a mask topic; an error drops the image).
    fn mask_for(&self, t: i64, size: (u32, u32), opts: &ExtractOptions) -> Result<Option<GrayImage>> {
        if opts.mask_topic.is_none() {
            return Ok(None);
        }
        let Some(j) = nearest(&self.mask_t, t, opts.slop_ns) else {
            return Err(Error::InvalidInput(format!("no mask within {} ns", opts.slop_ns)));
        };
        let m = decode_mask(&raw_image(&self.masks[j].1))?;
        if m.dimensions() != size {
            return Err(Error::InvalidInput(format!(
                "mask is {}x{} but the image is {}x{}",
                m.width(),
                m.height(),
                size.0,
                size.1
            )));
        }
        Ok(Some(m))
    }

    /// Intrinsics of the image at `t`: camera info nearest within slop, else the latest before the
    /// image (intrinsics rarely change); a bad one is reported and ignored.
    fn intrinsics_for(
        &self,
        t: i64,
        size: (u32, u32),
        opts: &ExtractOptions,
        label: &str,
        skips: &mut Skips,
    ) -> Option<Intrinsics> {
        let j = nearest(&self.info_t, t, opts.slop_ns).or_else(|| self.info_t.partition_point(|s| *s <= t).checked_sub(1))?;
        let ci = &self.infos[j].1;
        let k: Option<[f64; 9]> = ci.k.as_slice().try_into().ok();
        match k.map(|k| intrinsics_from_camera_info(&k, (ci.width, ci.height), size)) {
            Some(Ok(k)) => k,
            Some(Err(e)) => {
                skips.push(format!("{label}: camera info ignored: {e}"));
                None
            }
            None => {
                skips.push(format!("{label}: camera info ignored: K has {} values", ci.k.len()));
                None
            }
        }
    }

    /// The ground-truth pose of the image at `t` (with a pose topic), nearest within slop.
    fn pose_for(&self, t: i64, opts: &ExtractOptions, label: &str, skips: &mut Skips) -> Option<Isometry3<f64>> {
        opts.pose_topic.as_ref()?;
        let Some(j) = nearest(&self.pose_t, t, opts.slop_ns) else {
            skips.push(format!("{label}: no ground-truth pose within {} ns", opts.slop_ns));
            return None;
        };
        let p = isometry(&self.poses[j].1.pose);
        if p.is_none() {
            skips.push(format!("{label}: ground-truth pose is not finite or has a zero quaternion"));
        }
        p
    }
}

/// One image of the bag with what was matched to it.
struct ExtractedFrame<'a> {
    header: &'a Header,
    rgb: &'a RgbImage,
    mask: Option<&'a GrayImage>,
    intrinsics: Option<Intrinsics>,
    pose: Option<Isometry3<f64>>,
}

/// Writes one frame's files and returns its collection.json entry.
fn write_frame(out: &Path, index: usize, frame: &ExtractedFrame, report: &mut ExtractReport) -> Result<Value> {
    let rgb_rel = format!("rgb/{index:03}.png");
    save_png(frame.rgb, &out.join(&rgb_rel))?;
    let mut e = json!({
        "index": index,
        "rgb": rgb_rel,
        "width": frame.rgb.width(),
        "height": frame.rgb.height(),
        "stamp_sec": frame.header.stamp.sec,
        "stamp_nanosec": frame.header.stamp.nanosec,
        "frame_id": frame.header.frame_id,
    });
    if let Some(m) = frame.mask {
        let rel = format!("mask/{index:03}.png");
        save_png(m, &out.join(&rel))?;
        e["mask"] = json!(rel);
        report.with_mask += 1;
    }
    if let Some(k) = &frame.intrinsics {
        e["K"] = json!([[k.fx, 0.0, k.cx], [0.0, k.fy, k.cy], [0.0, 0.0, 1.0]]);
        report.with_camera_info += 1;
    }
    if let Some(p) = &frame.pose {
        e["camera_from_object"] = json!(row_major(p));
        report.with_pose += 1;
    }
    Ok(e)
}

/// Writes collection.json for the extracted entries.
fn write_collection_index(
    bag: &Path,
    out: &Path,
    opts: &ExtractOptions,
    entries: Vec<Value>,
    report: &ExtractReport,
    skips: &mut Skips,
) -> Result<()> {
    let name = out.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| opts.category.clone());
    let mut doc = json!({
        "format_version": "1.0",
        "name": name,
        "category": opts.category,
        "kind": "plain",
        "description": format!("extracted from {} by congeal bag extract", bag.display()),
        "images": entries,
    });
    if report.with_pose > 0 {
        let (min, max, placeholder) = match opts.bbox {
            Some((min, max)) => (min, max, false),
            None => ([-0.5; 3], [0.5; 3], true),
        };
        doc["canonical_frame"] = json!({ "bbox_min": min, "bbox_max": max, "bbox_placeholder": placeholder });
        if report.with_camera_info < report.with_pose {
            skips.push("some images with a ground-truth pose have no K: eval needs both".into());
        }
    }
    let path = out.join("collection.json");
    let text =
        serde_json::to_string_pretty(&doc).map_err(|e| Error::Collection { path: path.clone(), message: e.to_string() })?;
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
}

// ---------------------------------------------------------------------------------------------
// Schemas

const PRIMITIVES: [&str; 16] = [
    "bool", "byte", "char", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
    "string", "wstring", "time",
];

fn find_msg_file(pkg: &str, name: &str) -> Option<PathBuf> {
    let prefixes = std::env::var("AMENT_PREFIX_PATH").unwrap_or_default();
    prefixes
        .split(':')
        .filter(|p| !p.is_empty())
        .map(|p| Path::new(p).join("share").join(pkg).join("msg").join(format!("{name}.msg")))
        .find(|p| p.is_file())
}

/// The field types of a .msg text that are messages, as `pkg/Name`.
fn msg_dependencies(text: &str, own_pkg: &str) -> Vec<String> {
    let mut deps = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(ty) = line.split_whitespace().next() else { continue };
        // Strip array and bound suffixes: `T[]`, `T[3]`, `T[<=3]`, `string<=10`.
        let base = ty.split('[').next().unwrap_or(ty);
        let base = base.split("<=").next().unwrap_or(base);
        if PRIMITIVES.contains(&base) {
            continue;
        }
        let full = match base {
            "Header" => "std_msgs/Header".to_string(),
            b if b.contains('/') => b.replace("/msg/", "/"),
            b => format!("{own_pkg}/{b}"),
        };
        deps.push(full);
    }
    deps
}

/// The `ros2msg` schema text of `pkg/msg/Name`: its definition, then each dependency once as
/// `"\n" + "=" * 80 + "\nMSG: pkg/Name\n" + definition`.
pub fn schema_text(type_name: &str) -> Result<String> {
    let parts: Vec<&str> = type_name.split('/').filter(|s| *s != "msg").collect();
    let [pkg, name] = parts[..] else {
        return Err(Error::InvalidInput(format!("message type `{type_name}` is not pkg/msg/Name")));
    };
    let read = |pkg: &str, name: &str| -> Result<String> {
        let path = find_msg_file(pkg, name).ok_or_else(|| {
            Error::InvalidInput(format!(
                "no {pkg}/msg/{name}.msg under the share folders of $AMENT_PREFIX_PATH (source .ros/env.sh)"
            ))
        })?;
        std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))
    };
    let root = read(pkg, name)?;
    let mut out = root.trim_end().to_string();
    out.push('\n');
    let mut seen: HashSet<String> = HashSet::new();
    let mut queue: VecDeque<String> = msg_dependencies(&root, pkg).into();
    while let Some(dep) = queue.pop_front() {
        if !seen.insert(dep.clone()) {
            continue;
        }
        let (dp, dn) = dep.split_once('/').unwrap_or(("", &dep));
        let text = read(dp, dn)?;
        out.push_str(&"=".repeat(80));
        out.push_str(&format!("\nMSG: {dep}\n"));
        out.push_str(text.trim_end());
        out.push('\n');
        queue.extend(msg_dependencies(&text, dp));
    }
    Ok(out)
}

fn channel(topic: &str, type_name: &str) -> Result<Arc<mcap::Channel<'static>>> {
    let schema = mcap::Schema {
        name: type_name.to_string(),
        encoding: "ros2msg".into(),
        data: Cow::Owned(schema_text(type_name)?.into_bytes()),
    };
    Ok(Arc::new(mcap::Channel {
        topic: topic.to_string(),
        schema: Some(Arc::new(schema)),
        message_encoding: "cdr".into(),
        metadata: BTreeMap::new(),
    }))
}

/// Writes the run in `run_dir` (posed against `collection_dir`) as an MCAP bag `out`.
pub fn write(run_dir: &Path, collection_dir: &Path, out: &Path) -> Result<WriteReport> {
    let result = crate::output::result::RunResult::load(run_dir)?;
    let json_path = collection_dir.join("collection.json");
    let doc: Value = if json_path.is_file() {
        let text = std::fs::read_to_string(&json_path).map_err(|e| Error::io(&json_path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::Collection { path: json_path.clone(), message: e.to_string() })?
    } else if collection_dir.is_dir() {
        json!({ "images": [] })
    } else {
        return Err(Error::Collection { path: collection_dir.to_path_buf(), message: "folder not found".into() });
    };
    let entries: Vec<Value> = doc.get("images").and_then(Value::as_array).cloned().unwrap_or_default();

    let pose_ch = channel(POSE_TOPIC, "geometry_msgs/msg/PoseStamped")?;
    let nocs_ch = channel(NOCS_TOPIC, "sensor_msgs/msg/Image")?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let file = std::fs::File::create(out).map_err(|e| Error::io(out, e))?;
    let mcap_err = |e: mcap::McapError| Error::InvalidInput(format!("writing {}: {e}", out.display()));
    let mut writer =
        mcap::WriteOptions::new().compression(None).profile("ros2").create(BufWriter::new(file)).map_err(mcap_err)?;
    let mut report = WriteReport { bag: out.display().to_string(), ..Default::default() };
    let mut skips = Skips::new();
    let mut seq = 0u32;
    for (pos, im) in result.images.iter().enumerate() {
        let entry = entries.iter().find(|e| e.get("rgb").and_then(Value::as_str) == Some(im.file.as_str()));
        let index = entry.and_then(|e| e.get("index")).and_then(Value::as_u64).unwrap_or(pos as u64);
        let sec = entry.and_then(|e| e.get("stamp_sec")).and_then(Value::as_i64);
        let nanosec = entry.and_then(|e| e.get("stamp_nanosec")).and_then(Value::as_u64);
        let header = match (sec, nanosec) {
            (Some(s), Some(ns)) if i32::try_from(s).is_ok() && ns < 1_000_000_000 => Header {
                stamp: Time { sec: s as i32, nanosec: ns as u32 },
                frame_id: entry.and_then(|e| e.get("frame_id")).and_then(Value::as_str).unwrap_or("camera").to_string(),
            },
            _ => Header { stamp: Time { sec: index as i32, nanosec: 0 }, frame_id: "camera".into() },
        };
        let t = stamp_ns(&header.stamp).max(0) as u64;
        let pose = match im.pose() {
            Ok(p) => p,
            Err(e) => {
                skips.push(format!("{}: pose: {e}", im.file));
                continue;
            }
        };
        let data = pose_stamped(header.clone(), &pose)
            .to_serialized_bytes()
            .map_err(|e| Error::InvalidInput(format!("serialising PoseStamped: {e}")))?;
        writer
            .write(&mcap::Message {
                channel: pose_ch.clone(),
                sequence: seq,
                log_time: t,
                publish_time: t,
                data: Cow::Owned(data),
            })
            .map_err(mcap_err)?;
        seq += 1;
        report.poses += 1;
        let Some(nocs_file) = &im.nocs else {
            skips.push(format!("{}: the run has no NOCS map", im.file));
            continue;
        };
        match crate::output::read_nocs_png(&run_dir.join(nocs_file)) {
            Ok((w, h, values)) => {
                let mask: Vec<bool> = values.iter().map(|v| v.iter().any(|c| *c > 0.0)).collect();
                let data = nocs_image(header, w, h, &values, &mask)
                    .to_serialized_bytes()
                    .map_err(|e| Error::InvalidInput(format!("serialising Image: {e}")))?;
                writer
                    .write(&mcap::Message {
                        channel: nocs_ch.clone(),
                        sequence: seq,
                        log_time: t,
                        publish_time: t,
                        data: Cow::Owned(data),
                    })
                    .map_err(mcap_err)?;
                seq += 1;
                report.nocs_images += 1;
            }
            Err(e) => skips.push(format!("{}: {e}", im.file)),
        }
    }
    writer.finish().map_err(mcap_err)?;
    report.skipped = skips.finish();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_respects_slop() {
        let s = [10, 20, 30];
        assert_eq!(nearest(&s, 21, 5), Some(1));
        assert_eq!(nearest(&s, 26, 5), Some(2));
        assert_eq!(nearest(&s, 100, 5), None);
        assert_eq!(nearest(&[], 1, 5), None);
    }

    #[test]
    fn dependencies_of_msg_text() {
        let text = "# c\nstd_msgs/Header header\nPoint[] pts  # x\nfloat64[9] k\nstring<=5 s\nuint8 A=1\n";
        assert_eq!(msg_dependencies(text, "geometry_msgs"), vec!["std_msgs/Header", "geometry_msgs/Point"]);
    }
}
