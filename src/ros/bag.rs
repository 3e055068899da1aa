//! Rosbag (MCAP, ROS 2 CDR) tools: `congeal bag extract` turns recorded camera topics into a
//! collection folder; `congeal bag write` turns a run into the node's output topics as a bag.
//!
//! Extract: images (`sensor_msgs/Image`, or `sensor_msgs/CompressedImage` with JPEG or PNG data, as
//! `image_transport`'s compressed topics record them), masks (`mono8`, or compressed), `CameraInfo` and ground-truth
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

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use image::{GrayImage, RgbImage};
use nalgebra::Isometry3;
use r2r::builtin_interfaces::msg::Time;
use r2r::geometry_msgs::msg::PoseStamped;
use r2r::sensor_msgs::msg::{CameraInfo, CompressedImage, Image};
use r2r::std_msgs::msg::Header;
use r2r::WrappedTypesupport;
use serde::Serialize;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::geometry::Intrinsics;
use crate::ingest::frames::{decode_rgb, intrinsics_from_camera_info};
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
    /// Keep at most one image per this many nanoseconds of stamps (0 = every image).
    pub period_ns: i64,
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
///
/// The bag is read twice, as a stream: first the stamps of the images and masks and the small camera
/// info and pose messages, then each image again, written as soon as its mask (if any) has been read.
/// Memory stays at a few frames plus the largest chunk, not the bag's size, as long as each mask is
/// recorded near its image (an image whose mask comes later in the file waits for it in memory).
pub fn extract(bag: &Path, opts: &ExtractOptions, out: &Path) -> Result<ExtractReport> {
    crate::ingest::store::validate_category(&opts.category)?;
    if opts.slop_ns < 0 {
        return Err(Error::InvalidInput(format!("slop must be non-negative, got {} ns", opts.slop_ns)));
    }
    if out.join("collection.json").exists() {
        return Err(Error::InvalidInput(format!("{} already holds a collection; choose a new --out folder", out.display())));
    }
    let mut skips = Skips::new();
    let topics = Topics::read(bag, opts, &mut skips)?;
    for sub in ["rgb", "mask"] {
        std::fs::create_dir_all(out.join(sub)).map_err(|e| Error::io(out.join(sub), e))?;
    }
    let mut report = ExtractReport::default();
    // Each image's slot (its place by stamp) and the mask it takes, by message ordinal.
    let slot_of: BTreeMap<usize, usize> = topics.images.iter().enumerate().map(|(slot, (_, n))| (*n, slot)).collect();
    let mask_of: Vec<std::result::Result<Option<usize>, String>> = topics
        .images
        .iter()
        .map(|(t, _)| match opts.mask_topic {
            None => Ok(None),
            Some(_) => nearest(&topics.mask_t, *t, opts.slop_ns)
                .map(|j| Some(topics.masks[j]))
                .ok_or_else(|| format!("no mask within {} ns", opts.slop_ns)),
        })
        .collect();
    let mut mask_uses: BTreeMap<usize, usize> = BTreeMap::new();
    for m in mask_of.iter().flatten().flatten() {
        *mask_uses.entry(*m).or_default() += 1;
    }
    let mut masks_read: BTreeMap<usize, std::result::Result<GrayImage, String>> = BTreeMap::new();
    let mut waiting: BTreeMap<usize, Vec<(usize, BagImage)>> = BTreeMap::new();
    let mut entries: Vec<Option<Value>> = vec![None; topics.images.len()];
    let mut frame_done = |slot: usize,
                          img: &BagImage,
                          mask: Option<&std::result::Result<GrayImage, String>>,
                          skips: &mut Skips,
                          report: &mut ExtractReport|
     -> Result<()> {
        let t = topics.images[slot].0;
        let label = img.label();
        let (rgb, alpha) = match img.rgb() {
            Ok(x) => x,
            Err(e) => {
                skips.push(format!("{label}: {e}"));
                return Ok(());
            }
        };
        let size = rgb.dimensions();
        let mask = match mask {
            None => alpha,
            Some(Err(e)) => {
                skips.push(format!("{label}: {e}; image dropped"));
                return Ok(());
            }
            Some(Ok(m)) if m.dimensions() != size => {
                let (w, h) = m.dimensions();
                skips.push(format!("{label}: mask is {w}x{h} but the image is {}x{}; image dropped", size.0, size.1));
                return Ok(());
            }
            Some(Ok(m)) => Some(m.clone()),
        };
        let intrinsics = topics.intrinsics_for(t, size, opts, &label, skips);
        let pose = topics.pose_for(t, opts, &label, skips);
        let frame = ExtractedFrame { header: img.header(), rgb: &rgb, mask: mask.as_ref(), intrinsics, pose };
        entries[slot] = Some(write_frame(out, slot, &frame, report)?);
        Ok(())
    };
    for_each_message(bag, opts, topics.read, None, |n, role, schema, data| {
        match role {
            Role::Mask if mask_uses.contains_key(&n) => {
                let mask = BagImage::decode(data, schema).and_then(|m| m.mask().map_err(|e| e.to_string()));
                for (slot, img) in waiting.remove(&n).unwrap_or_default() {
                    frame_done(slot, &img, Some(&mask), &mut skips, &mut report)?;
                    release(&mut mask_uses, n);
                }
                if mask_uses.contains_key(&n) {
                    masks_read.insert(n, mask);
                }
            }
            Role::Image => {
                let Some(&slot) = slot_of.get(&n) else { return Ok(()) };
                let img = BagImage::decode(data, schema)
                    .map_err(|e| bag_err(bag, format!("message {n} changed while reading: {e}")))?;
                match &mask_of[slot] {
                    Ok(None) => frame_done(slot, &img, None, &mut skips, &mut report)?,
                    Err(e) => skips.push(format!("{}: {e}; image dropped", img.label())),
                    Ok(Some(m)) => match masks_read.get(m) {
                        Some(mask) => {
                            frame_done(slot, &img, Some(mask), &mut skips, &mut report)?;
                            if release(&mut mask_uses, *m) {
                                masks_read.remove(m);
                            }
                        }
                        None => waiting.entry(*m).or_default().push((slot, img)),
                    },
                }
            }
            _ => {}
        }
        Ok(())
    })?;
    for (_, img) in waiting.into_values().flatten() {
        skips.push(format!("{}: its mask could not be read; image dropped", img.label()));
    }
    // Written under their slots; renumbered to 0.. in stamp order (a slot is never below its number).
    let mut written = Vec::new();
    for (slot, entry) in entries.into_iter().enumerate() {
        if let Some(entry) = entry {
            written.push(renumber(out, entry, slot, written.len())?);
        }
    }
    report.images = written.len();
    if written.is_empty() {
        return Err(bag_err(bag, format!("no usable image: {}", skips.finish().join("; "))));
    }
    write_collection_index(bag, out, opts, written, &report, &mut skips)?;
    report.skipped = skips.finish();
    Ok(report)
}

/// The stamp-sorted `images` thinned to at most one per `period_ns` (each kept image is at least the
/// period after the previous kept one); all of them when `period_ns` is 0.
fn thin(images: Vec<(i64, usize)>, period_ns: i64) -> Vec<(i64, usize)> {
    let mut gate = crate::ingest::period::PeriodGate::new(period_ns);
    images
        .into_iter()
        .filter(|(t, _)| {
            let due = gate.due("", *t);
            if due {
                gate.kept("", *t);
            }
            due
        })
        .collect()
}

/// One use of mask `n` is done; true when it has no uses left.
fn release(uses: &mut BTreeMap<usize, usize>, n: usize) -> bool {
    match uses.get_mut(&n) {
        Some(k) if *k > 1 => {
            *k -= 1;
            false
        }
        _ => {
            uses.remove(&n);
            true
        }
    }
}

/// Moves a frame written as number `from` to number `to` (its files and its entry's fields).
fn renumber(out: &Path, mut entry: Value, from: usize, to: usize) -> Result<Value> {
    if from == to {
        return Ok(entry);
    }
    for dir in ["rgb", "mask"] {
        if entry.get(dir).is_some() {
            let rel = format!("{dir}/{to:03}.png");
            let old = out.join(format!("{dir}/{from:03}.png"));
            std::fs::rename(&old, out.join(&rel)).map_err(|e| Error::io(&old, e))?;
            entry[dir] = json!(rel);
        }
    }
    entry["index"] = json!(to);
    Ok(entry)
}

/// The schema name of compressed image topics.
const COMPRESSED_IMAGE: &str = "sensor_msgs/msg/CompressedImage";

/// An image message of a bag: raw, or compressed (JPEG or PNG bytes, told apart by the channel's
/// schema name).
enum BagImage {
    Raw(Image),
    Compressed(CompressedImage),
}

impl BagImage {
    /// Decodes the CDR message `data` of a channel whose schema is `schema`.
    fn decode(data: &[u8], schema: &str) -> std::result::Result<Self, String> {
        if schema == COMPRESSED_IMAGE {
            decode::<CompressedImage>(data).map(Self::Compressed)
        } else {
            decode::<Image>(data).map(Self::Raw)
        }
    }

    fn header(&self) -> &Header {
        match self {
            Self::Raw(m) => &m.header,
            Self::Compressed(m) => &m.header,
        }
    }

    /// "image at SEC.NANOSEC", for reports.
    fn label(&self) -> String {
        let stamp = &self.header().stamp;
        format!("image at {}.{:09}", stamp.sec, stamp.nanosec)
    }

    /// The compressed image's pixels.
    fn pixels(m: &CompressedImage) -> Result<image::DynamicImage> {
        image::load_from_memory(&m.data)
            .map_err(|e| Error::InvalidInput(format!("cannot decode the compressed image (format `{}`): {e}", m.format)))
    }

    /// Colour pixels and, from an alpha channel that marks the object, a mask.
    fn rgb(&self) -> Result<(RgbImage, Option<GrayImage>)> {
        match self {
            Self::Raw(m) => decode_rgb(&raw_image(m)),
            Self::Compressed(m) => {
                let img = Self::pixels(m)?;
                Ok((img.to_rgb8(), crate::collection::mask_from_alpha(&img)))
            }
        }
    }

    /// The image as a binary mask (values >= 128 are object).
    fn mask(&self) -> Result<GrayImage> {
        match self {
            Self::Raw(m) => crate::ingest::frames::decode_mask(&raw_image(m)),
            Self::Compressed(m) => Ok(crate::collection::decode_mask(&Self::pixels(m)?)),
        }
    }
}

/// What a message of the configured topics is.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Role {
    Image,
    Mask,
    CameraInfo,
    Pose,
}

/// Reads the bag from the file in order and hands each message of the configured topics, with its
/// ordinal among all messages and its role, to `f`; returns how many messages were read. Reads at
/// most `limit` messages. With `skips`, the read's own problems are reported there (other topics,
/// encodings that are not CDR, a truncated or corrupted bag, which ends the read keeping what was read).
fn for_each_message(
    bag: &Path,
    opts: &ExtractOptions,
    limit: usize,
    mut skips: Option<&mut Skips>,
    mut f: impl FnMut(usize, Role, &str, &[u8]) -> Result<()>,
) -> Result<usize> {
    let file = std::fs::File::open(bag).map_err(|e| Error::io(bag, e))?;
    let mut reader = mcap::io::MessageReader::new(std::io::BufReader::new(file));
    let mut other_topics: BTreeMap<String, u64> = BTreeMap::new();
    let mut not_cdr: BTreeMap<String, u64> = BTreeMap::new();
    let mut n = 0;
    while n < limit {
        // The mcap reader could panic on some corrupted records (0.9 did): that ends the read like
        // an error does, keeping what was read.
        let next = crate::ros::node::catch_panic(|| reader.next());
        let msg = match next {
            Ok(None) => break,
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => {
                if n == 0 {
                    return Err(bag_err(bag, e));
                }
                if let Some(s) = skips.as_deref_mut() {
                    s.push(format!("bag read stopped after {n} messages: {e}"));
                }
                break;
            }
            Err(m) => {
                if let Some(s) = skips.as_deref_mut() {
                    s.push(format!("bag read stopped after {n} messages: a corrupted record ({m})"));
                }
                break;
            }
        };
        let ordinal = n;
        n += 1;
        let topic = msg.channel.topic.as_str();
        let role = if topic == opts.image_topic {
            Role::Image
        } else if opts.mask_topic.as_deref() == Some(topic) {
            Role::Mask
        } else if opts.camera_info_topic.as_deref() == Some(topic) {
            Role::CameraInfo
        } else if opts.pose_topic.as_deref() == Some(topic) {
            Role::Pose
        } else {
            *other_topics.entry(topic.to_string()).or_default() += 1;
            continue;
        };
        if msg.channel.message_encoding != "cdr" {
            *not_cdr.entry(format!("{topic}: message encoding `{}` is not cdr", msg.channel.message_encoding)).or_default() += 1;
            continue;
        }
        let schema = msg.channel.schema.as_ref().map_or("", |s| s.name.as_str());
        f(ordinal, role, schema, &msg.data)?;
    }
    if let Some(skips) = skips {
        for (what, count) in &not_cdr {
            skips.push(format!("{count} message(s) on {what}"));
        }
        for (topic, count) in &other_topics {
            skips.push(format!("{count} message(s) on unused topic {topic}"));
        }
    }
    Ok(n)
}

/// The first pass over a bag: the stamps of its images and masks (with their message ordinals), its
/// camera info and pose messages, each sorted by stamp, and how many messages could be read.
struct Topics {
    /// (stamp, ordinal) of each decodable image.
    images: Vec<(i64, usize)>,
    /// Ordinal of each decodable mask, in the order of `mask_t`.
    masks: Vec<usize>,
    infos: Vec<(i64, CameraInfo)>,
    poses: Vec<(i64, PoseStamped)>,
    mask_t: Vec<i64>,
    info_t: Vec<i64>,
    pose_t: Vec<i64>,
    /// Messages read before the end or the first unreadable record.
    read: usize,
}

impl Topics {
    /// Decodes the messages of the configured topics, keeping only the stamps of images and masks;
    /// what is skipped (other topics, undecodable messages, a truncated bag) goes into `skips`.
    fn read(bag: &Path, opts: &ExtractOptions, skips: &mut Skips) -> Result<Self> {
        let mut bad: BTreeMap<String, u64> = BTreeMap::new();
        let mut images: Vec<(i64, usize)> = Vec::new();
        let mut masks: Vec<(i64, usize)> = Vec::new();
        let mut infos: Vec<(i64, CameraInfo)> = Vec::new();
        let mut poses: Vec<(i64, PoseStamped)> = Vec::new();
        let read = for_each_message(bag, opts, usize::MAX, Some(skips), |n, role, schema, data| {
            let res = match role {
                Role::Image => BagImage::decode(data, schema).map(|m| images.push((stamp_ns(&m.header().stamp), n))),
                Role::Mask => BagImage::decode(data, schema).map(|m| masks.push((stamp_ns(&m.header().stamp), n))),
                Role::CameraInfo => decode::<CameraInfo>(data).map(|m| infos.push((stamp_ns(&m.header.stamp), m))),
                Role::Pose => decode::<PoseStamped>(data).map(|m| poses.push((stamp_ns(&m.header.stamp), m))),
            };
            if let Err(e) = res {
                let topic = match role {
                    Role::Image => opts.image_topic.as_str(),
                    Role::Mask => opts.mask_topic.as_deref().unwrap_or_default(),
                    Role::CameraInfo => opts.camera_info_topic.as_deref().unwrap_or_default(),
                    Role::Pose => opts.pose_topic.as_deref().unwrap_or_default(),
                };
                *bad.entry(format!("{topic}: cannot decode ({schema}): {e}")).or_default() += 1;
            }
            Ok(())
        })?;
        for (what, count) in &bad {
            skips.push(format!("{count} message(s) on {what}"));
        }
        if images.is_empty() {
            return Err(bag_err(bag, format!("no decodable sensor_msgs/Image or CompressedImage on topic {}", opts.image_topic)));
        }
        images.sort_by_key(|(t, _)| *t);
        let decodable = images.len();
        images = thin(images, opts.period_ns);
        if images.len() < decodable {
            skips.push(format!("{} image(s) within --period of the image kept before them", decodable - images.len()));
        }
        masks.sort_by_key(|(t, _)| *t);
        infos.sort_by_key(|(t, _)| *t);
        poses.sort_by_key(|(t, _)| *t);
        let mask_t = masks.iter().map(|(t, _)| *t).collect();
        let info_t = infos.iter().map(|(t, _)| *t).collect();
        let pose_t = poses.iter().map(|(t, _)| *t).collect();
        let masks = masks.into_iter().map(|(_, n)| n).collect();
        Ok(Self { images, masks, infos, poses, mask_t, info_t, pose_t, read })
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

/// Adds `type_name`'s schema (`ros2msg`) and a CDR channel on `topic` to `writer`; returns the channel id.
fn add_channel<W: std::io::Write + std::io::Seek>(writer: &mut mcap::Writer<W>, topic: &str, type_name: &str) -> Result<u16> {
    let mcap_err = |e: mcap::McapError| Error::InvalidInput(format!("adding channel {topic}: {e}"));
    let schema = writer.add_schema(type_name, "ros2msg", schema_text(type_name)?.as_bytes()).map_err(mcap_err)?;
    writer.add_channel(schema, topic, "cdr", &BTreeMap::new()).map_err(mcap_err)
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

    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let file = std::fs::File::create(out).map_err(|e| Error::io(out, e))?;
    let mcap_err = |e: mcap::McapError| Error::InvalidInput(format!("writing {}: {e}", out.display()));
    let mut writer =
        mcap::WriteOptions::new().compression(None).profile("ros2").create(BufWriter::new(file)).map_err(mcap_err)?;
    let pose_ch = add_channel(&mut writer, POSE_TOPIC, "geometry_msgs/msg/PoseStamped")?;
    let nocs_ch = add_channel(&mut writer, NOCS_TOPIC, "sensor_msgs/msg/Image")?;
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
            .write_to_known_channel(
                &mcap::records::MessageHeader { channel_id: pose_ch, sequence: seq, log_time: t, publish_time: t },
                &data,
            )
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
                    .write_to_known_channel(
                        &mcap::records::MessageHeader { channel_id: nocs_ch, sequence: seq, log_time: t, publish_time: t },
                        &data,
                    )
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

    /// A test bag with an image and a mask channel of type `type_name`, written message by message.
    struct TestBag {
        writer: mcap::Writer<BufWriter<std::fs::File>>,
        image: u16,
        mask: u16,
        seq: u32,
    }

    impl TestBag {
        fn create(path: &Path, type_name: &str, image_topic: &str, mask_topic: &str) -> Self {
            let file = std::fs::File::create(path).expect("create bag");
            let mut writer = mcap::WriteOptions::new().profile("ros2").create(BufWriter::new(file)).expect("writer");
            let image = add_channel(&mut writer, image_topic, type_name).expect("image channel");
            let mask = add_channel(&mut writer, mask_topic, type_name).expect("mask channel");
            Self { writer, image, mask, seq: 0 }
        }

        fn put(&mut self, mask: bool, data: Vec<u8>) {
            let channel_id = if mask { self.mask } else { self.image };
            let header =
                mcap::records::MessageHeader { channel_id, sequence: self.seq, log_time: self.seq as u64, publish_time: 0 };
            self.seq += 1;
            self.writer.write_to_known_channel(&header, &data).expect("write message");
        }

        fn finish(mut self) {
            self.writer.finish().expect("finish bag");
        }
    }

    /// Extraction of `image_topic` with masks from `mask_topic`, nothing else.
    fn options(image_topic: &str, mask_topic: &str, slop_ns: i64) -> ExtractOptions {
        ExtractOptions {
            image_topic: image_topic.into(),
            mask_topic: Some(mask_topic.into()),
            camera_info_topic: None,
            pose_topic: None,
            category: "toy".into(),
            slop_ns,
            bbox: None,
            period_ns: 0,
        }
    }

    /// `sensor_msgs/CompressedImage` bytes of `img` encoded as `format` (`jpeg` or `png`).
    fn compressed_msg(sec: i32, img: image::DynamicImage, format: image::ImageFormat, name: &str) -> Vec<u8> {
        let mut data = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut data), format).expect("encode a test image");
        let msg = CompressedImage {
            header: Header { stamp: Time { sec, nanosec: 0 }, frame_id: "cam".into() },
            format: name.into(),
            data,
        };
        msg.to_serialized_bytes().expect("serialise a test image")
    }

    /// Compressed topics (what `image_transport` records as `.../compressed`): JPEG colour images and
    /// PNG masks are decoded; a corrupt one is reported and dropped, the rest are kept.
    #[test]
    fn extract_decodes_compressed_images_and_masks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bag = dir.path().join("compressed.mcap");
        let mut writer = TestBag::create(&bag, COMPRESSED_IMAGE, "/img/compressed", "/mask/compressed");
        let mask =
            GrayImage::from_fn(16, 12, |x, y| image::Luma([if (4..12).contains(&x) && (3..9).contains(&y) { 255 } else { 0 }]));
        for sec in 1..=3 {
            let v = 60 * sec as u8;
            let rgb = image::DynamicImage::ImageRgb8(RgbImage::from_pixel(16, 12, image::Rgb([v, 255 - v, 100])));
            writer.put(false, compressed_msg(sec, rgb, image::ImageFormat::Jpeg, "rgb8; jpeg compressed bgr8"));
            let m = image::DynamicImage::ImageLuma8(mask.clone());
            writer.put(true, compressed_msg(sec, m, image::ImageFormat::Png, "mono8; png compressed"));
        }
        let corrupt = CompressedImage {
            header: Header { stamp: Time { sec: 4, nanosec: 0 }, frame_id: "cam".into() },
            format: "jpeg".into(),
            data: vec![0xff, 0xd8, 0xff, 0x00, 1, 2, 3],
        };
        writer.put(false, corrupt.to_serialized_bytes().expect("serialise"));
        writer.put(true, compressed_msg(4, image::DynamicImage::ImageLuma8(mask.clone()), image::ImageFormat::Png, "png"));
        writer.finish();
        let opts = options("/img/compressed", "/mask/compressed", 1_000_000);
        let out = dir.path().join("out");
        let report = extract(&bag, &opts, &out).expect("extract");
        assert_eq!((report.images, report.with_mask), (3, 3), "{report:?}");
        assert!(
            report.skipped.iter().any(|s| s.contains("image at 4.") && s.contains("compressed image")),
            "{:?}",
            report.skipped
        );
        for k in 0..3u32 {
            let rgb = image::open(out.join(format!("rgb/{k:03}.png"))).expect("rgb png").to_rgb8();
            let want = [60 * (k + 1), 255 - 60 * (k + 1), 100];
            let got = rgb.get_pixel(8, 6).0;
            assert!(got.iter().zip(want).all(|(g, w)| (*g as i32 - w as i32).abs() <= 3), "frame {k}: {got:?} vs {want:?}");
            let m = image::open(out.join(format!("mask/{k:03}.png"))).expect("mask png").to_luma8();
            assert_eq!(m, mask, "frame {k}: the PNG mask round-trips");
        }
    }

    #[test]
    fn thin_keeps_one_image_per_period() {
        let s = 1_000_000_000;
        let images: Vec<(i64, usize)> = (0..=10).map(|k| (k * s / 5, k as usize)).collect();
        let kept: Vec<usize> = thin(images.clone(), s).into_iter().map(|(_, n)| n).collect();
        assert_eq!(kept, vec![0, 5, 10], "images every 0.2 s, period 1 s");
        assert_eq!(thin(images.clone(), 0), images);
        let uneven = vec![(0, 0), (9 * s / 10, 1), (11 * s / 10, 2), (15 * s / 10, 3), (21 * s / 10, 4)];
        let kept: Vec<usize> = thin(uneven, s).into_iter().map(|(_, n)| n).collect();
        assert_eq!(kept, vec![0, 2, 4], "measured from the last image kept, not a fixed grid");
    }

    #[test]
    fn nearest_respects_slop() {
        let s = [10, 20, 30];
        assert_eq!(nearest(&s, 21, 5), Some(1));
        assert_eq!(nearest(&s, 26, 5), Some(2));
        assert_eq!(nearest(&s, 100, 5), None);
        assert_eq!(nearest(&[], 1, 5), None);
    }

    /// A `w x h` image message stamped `sec` s: rgb8 filled with `value`, or mono8 (a mask) all 255.
    fn image_msg(sec: i32, w: u32, h: u32, value: Option<u8>) -> Vec<u8> {
        let (encoding, step, data) = match value {
            Some(v) => ("rgb8", 3 * w, vec![v; (3 * w * h) as usize]),
            None => ("mono8", w, vec![255; (w * h) as usize]),
        };
        let msg = Image {
            header: Header { stamp: Time { sec, nanosec: 0 }, frame_id: "cam".into() },
            height: h,
            width: w,
            encoding: encoding.into(),
            is_bigendian: 0,
            step,
            data,
        };
        msg.to_serialized_bytes().expect("serialise a test image")
    }

    /// The stream keeps stamp order and the pairing of masks with images whatever the file order:
    /// images recorded out of order, masks recorded long after their images, one mask shared by two
    /// images, and a dropped image (mask of another size) that leaves no gap in the numbering.
    #[test]
    fn extract_streams_any_file_order_into_stamp_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bag = dir.path().join("order.mcap");
        let mut writer = TestBag::create(&bag, "sensor_msgs/msg/Image", "/img", "/mask");
        // Images at 5, 3, 1, 4, 2 s (pixel value 10 x stamp); image 4 has a 6x6 mask, so it is dropped.
        for sec in [5, 3, 1, 4, 2] {
            writer.put(false, image_msg(sec, 8, 8, Some(10 * sec as u8)));
        }
        // Masks after all images; none at 2 s: that image shares the mask at 1 s (1 s slop).
        for (sec, w) in [(1, 8), (3, 8), (4, 6), (5, 8)] {
            writer.put(true, image_msg(sec, w, w, None));
        }
        writer.finish();
        let opts = options("/img", "/mask", 1_000_000_000);
        let out = dir.path().join("out");
        let report = extract(&bag, &opts, &out).expect("extract");
        assert_eq!((report.images, report.with_mask), (4, 4), "{report:?}");
        assert!(report.skipped.iter().any(|s| s.contains("mask is 6x6")), "{:?}", report.skipped);
        let doc: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("collection.json")).expect("index")).expect("json");
        let images = doc["images"].as_array().expect("images");
        let secs: Vec<i64> = images.iter().map(|e| e["stamp_sec"].as_i64().unwrap_or(-1)).collect();
        assert_eq!(secs, vec![1, 2, 3, 5]);
        for (k, e) in images.iter().enumerate() {
            assert_eq!(e["index"].as_u64(), Some(k as u64));
            assert_eq!(e["rgb"].as_str(), Some(format!("rgb/{k:03}.png").as_str()));
            let rgb = image::open(out.join(format!("rgb/{k:03}.png"))).expect("rgb png").to_rgb8();
            assert_eq!(rgb.get_pixel(0, 0)[0] as i64, 10 * secs[k], "image {k} holds another frame's pixels");
            let mask = image::open(out.join(format!("mask/{k:03}.png"))).expect("mask png").to_luma8();
            assert_eq!(mask.dimensions(), (8, 8));
        }
        assert!(!out.join("rgb/004.png").exists() && !out.join("mask/004.png").exists(), "files left under old numbers");
    }

    #[test]
    fn dependencies_of_msg_text() {
        let text = "# c\nstd_msgs/Header header\nPoint[] pts  # x\nfloat64[9] k\nstring<=5 s\nuint8 A=1\n";
        assert_eq!(msg_dependencies(text, "geometry_msgs"), vec!["std_msgs/Header", "geometry_msgs/Point"]);
    }
}
