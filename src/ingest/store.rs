//! A per-category collection on disk that grows one frame at a time (the node's accumulation):
//! `data_dir/<category>/` in the collection format (kind `plain`: `rgb/NNN.png`, `mask/NNN.png`,
//! optional K, plus each frame's stamp and frame id), so `congeal run` can rerun it offline.
//!
//! Crash safety and cost: every image is written to a temporary name and renamed into place, then the
//! frame's index entry is appended to the journal [`JOURNAL`] (one JSON line, flushed to disk): that
//! line is the commit point. `collection.json` is rewritten from time to time and the journal emptied:
//! at the first frame, when the journal holds 64 frames or an eighth of the collection, at a frame 2 s
//! after the last rewrite, when the store is opened or dropped, and (the node) whenever the input
//! pauses for half a second. So storing a frame costs about the same after 20 000 frames as after 10
//! (rewriting the whole index for every frame did not), and a reader of `collection.json` alone lags
//! by at most 2 s.
//! A kill at any moment leaves `collection.json` (old or new, both valid) plus the journal;
//! [`CollectionStore::open`] and [`Collection::load`](crate::collection::Collection::load) read both,
//! so nothing committed is lost. A frame whose files landed but whose line did not is overwritten by
//! the next frame; a torn last line (power loss mid-write) is dropped.

use std::io::Write;
use std::path::{Path, PathBuf};

use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::geometry::Intrinsics;

/// The journal of frames stored since `collection.json` was last rewritten (JSON lines of
/// [`StoredFrame`]), next to it in the collection folder.
pub const JOURNAL: &str = "frames.jsonl";

/// `collection.json` is rewritten once the journal holds this many frames, or an eighth of the
/// collection if that is more (the rewrites then cost O(1) per frame on average)...
const COMPACT_MIN: usize = 64;

/// ... or at the first frame this long after the last rewrite, so a reader of `collection.json`
/// alone (not through [`Collection::load`](crate::collection::Collection::load)) lags little.
const COMPACT_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// One stored frame as recorded in `collection.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StoredFrame {
    /// Frame index (file stem).
    pub index: usize,
    /// Colour image, relative path.
    pub rgb: String,
    /// Mask, relative path (absent when none came).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
    /// Width, pixels.
    pub width: u32,
    /// Height, pixels.
    pub height: u32,
    /// Intrinsics, row-major 3x3, when camera info gave them.
    #[serde(rename = "K", default, skip_serializing_if = "Option::is_none")]
    pub k: Option<[[f64; 3]; 3]>,
    /// Header stamp: seconds.
    pub stamp_sec: i32,
    /// Header stamp: nanoseconds.
    pub stamp_nanosec: u32,
    /// Header frame id (the camera frame).
    pub frame_id: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Index {
    format_version: String,
    name: String,
    category: String,
    kind: String,
    description: String,
    images: Vec<StoredFrame>,
}

/// A growing collection for one category.
#[derive(Debug)]
pub struct CollectionStore {
    root: PathBuf,
    index: Index,
    /// Frames in the journal that `collection.json` does not hold yet.
    journaled: usize,
    /// Index of the next frame.
    next_index: usize,
    /// When `collection.json` was last written.
    rewritten: std::time::Instant,
    /// Whether `collection.json` exists (the first frame writes it at once, so a loader never takes
    /// the folder for a plain folder of images).
    indexed: bool,
}

/// The text of the journal in the collection folder `root` (empty when there is none).
pub fn read_journal(root: &Path) -> Result<String> {
    let journal = root.join(JOURNAL);
    match std::fs::read(&journal) {
        Ok(bytes) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(Error::io(&journal, e)),
    }
}

/// The frames of a journal's complete, readable lines (a torn or unreadable line is skipped) that
/// are not in `known` (by index), in journal order.
pub fn journal_frames(text: &str, known: &std::collections::HashSet<usize>) -> Vec<StoredFrame> {
    let mut seen = known.clone();
    text.split_inclusive('\n')
        .filter(|line| line.ends_with('\n'))
        .filter_map(|line| serde_json::from_str::<StoredFrame>(line.trim()).ok())
        .filter(|f| seen.insert(f.index))
        .collect()
}

fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    write(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn save_png_atomic(img: &impl SavePng, path: &Path) -> Result<()> {
    write_atomic(path, |tmp| img.save_png(tmp))
}

trait SavePng {
    fn save_png(&self, path: &Path) -> Result<()>;
}

impl SavePng for RgbImage {
    fn save_png(&self, path: &Path) -> Result<()> {
        self.save_with_format(path, image::ImageFormat::Png)
            .map_err(|e| Error::Image { path: path.to_path_buf(), message: e.to_string() })
    }
}

impl SavePng for GrayImage {
    fn save_png(&self, path: &Path) -> Result<()> {
        self.save_with_format(path, image::ImageFormat::Png)
            .map_err(|e| Error::Image { path: path.to_path_buf(), message: e.to_string() })
    }
}

/// Category names become folder names: letters, digits, `-`, `_`, `.` only, not starting with `.`.
pub fn validate_category(category: &str) -> Result<()> {
    let ok = !category.is_empty()
        && category.len() <= 128
        && !category.starts_with('.')
        && category.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!(
            "category `{category}` must be 1-128 characters of letters, digits, '-', '_' or '.', not starting with '.'"
        )))
    }
}

impl CollectionStore {
    /// Opens (or creates) `data_dir/<category>/`, keeping every frame already indexed there.
    pub fn open(data_dir: &Path, category: &str) -> Result<Self> {
        validate_category(category)?;
        let root = data_dir.join(category);
        for sub in ["rgb", "mask"] {
            std::fs::create_dir_all(root.join(sub)).map_err(|e| Error::io(root.join(sub), e))?;
        }
        let json = root.join("collection.json");
        let mut index = if json.exists() {
            let text = std::fs::read_to_string(&json).map_err(|e| Error::io(&json, e))?;
            serde_json::from_str(&text).map_err(|e| Error::Collection { path: json.clone(), message: e.to_string() })?
        } else {
            Index {
                format_version: "1.0".into(),
                name: category.into(),
                category: category.into(),
                kind: "plain".into(),
                description: "frames accumulated by congeal_node".into(),
                images: Vec::new(),
            }
        };
        // Frames committed to the journal since the last rewrite (a kill, or a crash) join the index.
        let journal_text = read_journal(&root)?;
        let known = index.images.iter().map(|f| f.index).collect();
        index.images.extend(journal_frames(&journal_text, &known));
        let next_index = index.images.iter().map(|f| f.index + 1).max().unwrap_or(0);
        let indexed = json.exists();
        let mut store = Self { root, index, journaled: 0, next_index, rewritten: std::time::Instant::now(), indexed };
        if !journal_text.is_empty() {
            // Also drops a torn last line, which the next append would otherwise run into.
            store.rewrite()?;
        }
        Ok(store)
    }

    /// The collection folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Frames stored so far.
    pub fn frames(&self) -> &[StoredFrame] {
        &self.index.images
    }

    /// Number of frames stored.
    pub fn len(&self) -> usize {
        self.index.images.len()
    }

    /// True when nothing is stored yet.
    pub fn is_empty(&self) -> bool {
        self.index.images.is_empty()
    }

    /// Appends a frame; returns its index. The mask must match the image size.
    pub fn append(
        &mut self,
        rgb: &RgbImage,
        mask: Option<&GrayImage>,
        intrinsics: Option<&Intrinsics>,
        stamp: (i32, u32),
        frame_id: &str,
    ) -> Result<usize> {
        if let Some(m) = mask {
            if m.dimensions() != rgb.dimensions() {
                return Err(Error::Mask {
                    path: self.root.join("mask"),
                    message: format!("mask is {}x{} but the image is {}x{}", m.width(), m.height(), rgb.width(), rgb.height()),
                });
            }
        }
        let index = self.next_index;
        let rgb_rel = format!("rgb/{index:03}.png");
        save_png_atomic(rgb, &self.root.join(&rgb_rel))?;
        let mask_rel = match mask {
            Some(m) => {
                let rel = format!("mask/{index:03}.png");
                save_png_atomic(m, &self.root.join(&rel))?;
                Some(rel)
            }
            None => None,
        };
        let frame = StoredFrame {
            index,
            rgb: rgb_rel,
            mask: mask_rel,
            width: rgb.width(),
            height: rgb.height(),
            k: intrinsics.map(|k| [[k.fx, 0.0, k.cx], [0.0, k.fy, k.cy], [0.0, 0.0, 1.0]]),
            stamp_sec: stamp.0,
            stamp_nanosec: stamp.1,
            frame_id: frame_id.to_string(),
        };
        self.journal_append(&frame)?;
        self.index.images.push(frame);
        self.next_index = index + 1;
        self.journaled += 1;
        if !self.indexed
            || self.journaled >= COMPACT_MIN.max(self.index.images.len() / 8)
            || self.rewritten.elapsed() >= COMPACT_AFTER
        {
            // The frame is committed already; a failed rewrite is tried again at the next one.
            if let Err(e) = self.flush() {
                tracing::warn!("rewriting the collection index (the frames stay in {JOURNAL}): {e}");
            }
        }
        Ok(index)
    }

    /// Appends `frame`'s line to the journal and flushes it to disk; on failure the journal is cut
    /// back to its old length (a partial line would swallow the next frame's).
    fn journal_append(&self, frame: &StoredFrame) -> Result<()> {
        let path = self.root.join(JOURNAL);
        let mut line =
            serde_json::to_string(frame).map_err(|e| Error::Collection { path: path.clone(), message: e.to_string() })?;
        line.push('\n');
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|e| Error::io(&path, e))?;
        let old_len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if let Err(e) = file.write_all(line.as_bytes()).and_then(|_| file.sync_data()) {
            let _ = file.set_len(old_len);
            return Err(Error::io(&path, e));
        }
        Ok(())
    }

    /// Rewrites `collection.json` with every frame and empties the journal (nothing to do when the
    /// journal is empty).
    pub fn flush(&mut self) -> Result<()> {
        if self.journaled == 0 {
            return Ok(());
        }
        self.rewrite()
    }

    /// Rewrites `collection.json` with every frame and empties the journal.
    fn rewrite(&mut self) -> Result<()> {
        self.write_index()?;
        self.indexed = true;
        self.rewritten = std::time::Instant::now();
        let path = self.root.join(JOURNAL);
        // The new index holds every journaled frame: a kill before this leaves lines it already has,
        // which loading skips.
        std::fs::File::create(&path).and_then(|f| f.sync_all()).map_err(|e| Error::io(&path, e))?;
        self.journaled = 0;
        Ok(())
    }

    /// Writes `collection.json` (atomically, flushed before it replaces the old one).
    fn write_index(&self) -> Result<()> {
        let path = self.root.join("collection.json");
        let text = serde_json::to_string_pretty(&self.index)
            .map_err(|e| Error::Collection { path: path.clone(), message: e.to_string() })?;
        // The index is the commit point: its bytes reach the disk before the rename makes it current,
        // so a power loss leaves the old index or the new one, never an empty file that would hide
        // every frame collected so far. (A frame whose PNGs were not yet flushed is skipped on load.)
        write_atomic(&path, |tmp| {
            let mut file = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
            file.write_all(text.as_bytes()).and_then(|_| file.sync_all()).map_err(|e| Error::io(tmp, e))
        })
    }

    /// The stored frame whose stamp is nearest to `stamp` within `tolerance_ns`.
    pub fn frame_at(&self, stamp: (i32, u32), tolerance_ns: i64) -> Option<&StoredFrame> {
        let t = stamp.0 as i64 * 1_000_000_000 + stamp.1 as i64;
        self.index
            .images
            .iter()
            .map(|f| (f, (f.stamp_sec as i64 * 1_000_000_000 + f.stamp_nanosec as i64 - t).abs()))
            .filter(|(_, d)| *d <= tolerance_ns)
            .min_by_key(|(_, d)| *d)
            .map(|(f, _)| f)
    }
}

impl Drop for CollectionStore {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!("rewriting the collection index at close (the frames stay in {JOURNAL}): {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collection::Collection;

    fn frame(seed: u8) -> (RgbImage, GrayImage) {
        let rgb = RgbImage::from_fn(40, 30, |x, y| image::Rgb([seed, x as u8, y as u8]));
        let mask =
            GrayImage::from_fn(40, 30, |x, y| image::Luma([if (10..30).contains(&x) && (5..25).contains(&y) { 255 } else { 0 }]));
        (rgb, mask)
    }

    #[test]
    fn frames_persist_across_reopen_and_load_as_a_collection() {
        let dir = tempfile::tempdir().unwrap();
        let k = Intrinsics::from_fov_y(40.0, 40, 30).unwrap();
        {
            let mut store = CollectionStore::open(dir.path(), "mugs").unwrap();
            let (rgb, mask) = frame(1);
            assert_eq!(store.append(&rgb, Some(&mask), Some(&k), (10, 5), "cam").unwrap(), 0);
            let (rgb, _) = frame(2);
            assert_eq!(store.append(&rgb, None, None, (11, 0), "cam").unwrap(), 1);
        }
        let mut store = CollectionStore::open(dir.path(), "mugs").unwrap();
        assert_eq!(store.len(), 2, "reopening keeps what was stored");
        let (rgb, mask) = frame(3);
        assert_eq!(store.append(&rgb, Some(&mask), None, (12, 0), "cam").unwrap(), 2);
        assert_eq!(store.frame_at((11, 1000), 10_000).map(|f| f.index), Some(1));
        assert!(store.frame_at((50, 0), 10_000).is_none());

        let c = Collection::load(store.root()).unwrap();
        assert_eq!(c.images.len(), 3);
        assert_eq!(c.images[0].intrinsics.map(|i| i.fx), Some(k.fx));
        let loaded = c.load_image(2).unwrap();
        assert_eq!(loaded.rgb.get_pixel(0, 0).0[0], 3);
        assert!(c.load_image(1).is_err(), "a frame without mask cannot be posed yet");
    }

    fn index_frames(root: &Path) -> usize {
        let text = std::fs::read_to_string(root.join("collection.json")).unwrap();
        serde_json::from_str::<Index>(&text).unwrap().images.len()
    }

    fn journal_lines(root: &Path) -> usize {
        std::fs::read_to_string(root.join(JOURNAL)).unwrap_or_default().lines().count()
    }

    /// Frames are committed to the journal; the index is rewritten every 64 frames (or an eighth of
    /// the collection) and on close; a kill loses nothing committed, a torn line only itself.
    #[test]
    fn journal_commits_frames_and_index_catches_up() {
        let dir = tempfile::tempdir().unwrap();
        let (rgb, mask) = frame(7);
        let mut store = CollectionStore::open(dir.path(), "cups").unwrap();
        let root = store.root().to_path_buf();
        assert!(!root.join("collection.json").exists(), "no index before the first frame");
        for k in 0..3 {
            store.append(&rgb, Some(&mask), None, (k, 0), "cam").unwrap();
        }
        assert_eq!((index_frames(&root), journal_lines(&root)), (1, 2), "the first frame writes the index, two wait");
        assert_eq!(Collection::load(&root).unwrap().images.len(), 3, "the loader reads the journal too");

        // A kill (no Drop): reopening takes the journal into the index and empties it.
        std::mem::forget(store);
        let mut store = CollectionStore::open(dir.path(), "cups").unwrap();
        assert_eq!((store.len(), index_frames(&root), journal_lines(&root)), (3, 3, 0));

        // A torn last line (power loss mid-write) is dropped; the next frame gets the next index.
        store.append(&rgb, Some(&mask), None, (3, 0), "cam").unwrap();
        std::mem::forget(store);
        let mut f = std::fs::OpenOptions::new().append(true).open(root.join(JOURNAL)).unwrap();
        f.write_all(b"{\"index\":4,\"rgb\":\"rgb/0").unwrap();
        drop(f);
        assert_eq!(Collection::load(&root).unwrap().images.len(), 4, "the torn line is skipped on load");
        let mut store = CollectionStore::open(dir.path(), "cups").unwrap();
        assert_eq!(store.len(), 4);
        assert_eq!(store.append(&rgb, Some(&mask), None, (4, 0), "cam").unwrap(), 4);

        // The index catches up every 64 frames; the journal never holds more.
        for k in 5..80 {
            store.append(&rgb, Some(&mask), None, (k, 0), "cam").unwrap();
            assert!(journal_lines(&root) < COMPACT_MIN, "journal at frame {k}");
        }
        assert_eq!((index_frames(&root), journal_lines(&root)), (68, 12));
        drop(store);
        assert_eq!((index_frames(&root), journal_lines(&root)), (80, 0), "closing rewrites the index");
        let c = Collection::load(&root).unwrap();
        let indices: Vec<usize> = c.images.iter().map(|e| e.index).collect();
        assert_eq!(indices, (0..80).collect::<Vec<_>>());
    }

    #[test]
    fn bad_category_and_mismatched_mask_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for bad in ["", "../x", ".hidden", "a/b", "sp ace"] {
            assert!(CollectionStore::open(dir.path(), bad).is_err(), "{bad}");
        }
        let mut store = CollectionStore::open(dir.path(), "ok").unwrap();
        let (rgb, _) = frame(1);
        let small = GrayImage::new(4, 4);
        let err = store.append(&rgb, Some(&small), None, (0, 0), "cam").unwrap_err().to_string();
        assert!(err.contains("4x4"), "{err}");
        assert!(store.is_empty());
    }
}
