//! Image collections: folders described by `collection.json` (the collection format; `demo/duck` is one,
//! `json.rs` reads it) or plain folders of images with optional masks; image/mask loading and
//! validation; square crops around the object.

mod crop;
mod images;
mod json;
pub mod segment;

use std::path::{Path, PathBuf};

use image::{GrayImage, RgbImage};
use nalgebra::Isometry3;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::geometry::Intrinsics;

pub use crop::{mask_bbox, BorderContact, PixelBox, SquareCrop};
pub use images::{binarise, decode_mask, informative_mask, load_dynamic, load_mask, load_rgb, mask_from_alpha, validate_mask};

/// What a collection contains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CollectionKind {
    /// Several images of one object, with ground truth.
    SingleInstance,
    /// Images of several objects of one category in a shared canonical frame, with ground truth.
    CrossInstance,
    /// Images without ground truth.
    Plain,
}

/// Ground truth of one image of a rendered collection.
#[derive(Clone, Debug, PartialEq)]
pub struct GroundTruth {
    /// Camera intrinsics of the image.
    pub intrinsics: Intrinsics,
    /// Rigid transform from the canonical object frame to the OpenCV camera frame.
    pub camera_from_object: Isometry3<f64>,
    /// Lower corner of the box the NOCS values are normalised over (canonical frame units).
    pub nocs_bbox_min: [f64; 3],
    /// Upper corner of the NOCS box.
    pub nocs_bbox_max: [f64; 3],
    /// Which instance is shown (cross-instance collections).
    pub instance_id: Option<String>,
}

/// One image of a collection. Paths are relative to [`Collection::root`].
#[derive(Clone, Debug, PartialEq)]
pub struct ImageEntry {
    /// Image index (from `collection.json`, or the position in sorted order for plain folders).
    pub index: usize,
    /// Colour image, relative to the collection root (e.g. `rgb/000.png`).
    pub rgb: PathBuf,
    /// Binary mask, relative to the root, if any.
    pub mask: Option<PathBuf>,
    /// Ground-truth NOCS image (16-bit RGB PNG), relative to the root, if any.
    pub nocs: Option<PathBuf>,
    /// Image width, pixels.
    pub width: u32,
    /// Image height, pixels.
    pub height: u32,
    /// Known intrinsics, if any.
    pub intrinsics: Option<Intrinsics>,
    /// Ground truth, for rendered collections.
    pub ground_truth: Option<GroundTruth>,
}

/// A collection of images of one object or category.
#[derive(Clone, Debug, PartialEq)]
pub struct Collection {
    /// The collection folder.
    pub root: PathBuf,
    /// Collection name (the folder name for plain folders).
    pub name: String,
    /// Object category (`"unknown"` for plain folders).
    pub category: String,
    /// Kind of collection.
    pub kind: CollectionKind,
    /// The images, in file order.
    pub images: Vec<ImageEntry>,
    /// Absolute path of the template mesh (`template.obj`), if present.
    pub template: Option<PathBuf>,
    /// Canonical-frame bounding box `(min, max)` of the template, if given.
    pub canonical_bbox: Option<([f64; 3], [f64; 3])>,
    /// Metres per canonical frame unit, if given.
    pub metres_per_unit: Option<f64>,
    /// Image files of a plain folder that could not be read at all (path relative to `root`, reason):
    /// they are left out of `images`, and a run lists them as skipped.
    pub unreadable: Vec<(PathBuf, String)>,
}

/// A decoded image and its binary mask (0 or 255), of the same size.
#[derive(Clone, Debug)]
pub struct LoadedImage {
    /// Colour image.
    pub rgb: RgbImage,
    /// Binary mask: 255 = object, 0 = background.
    pub mask: GrayImage,
}

/// Image file extensions recognised in plain folders (lower case).
const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

impl Collection {
    /// Loads a collection folder: `dir/collection.json` if it exists, otherwise a plain folder of images
    /// (`*.png`, `*.jpg`, `*.jpeg`, in `dir/rgb/` if that exists, else in `dir/`, sorted by name) with
    /// optional masks of the same file stem in `dir/mask/` or `dir/masks/` (PNG).
    pub fn load(dir: &Path) -> Result<Collection> {
        if !dir.is_dir() {
            let message = if dir.exists() { "is not a folder" } else { "folder not found" };
            return Err(Error::Collection { path: dir.to_path_buf(), message: message.into() });
        }
        let file = dir.join("collection.json");
        if file.is_file() {
            // The node's journal is read before the index: a fold in between moves frames from the
            // journal into the index, never out of both.
            let journal = crate::ingest::store::read_journal(dir)?;
            let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
            let text = with_journal(&file, text, &journal)?;
            json::parse(dir, &file, &text)
        } else {
            load_plain(dir)
        }
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.images.len()
    }

    /// True if the collection has no image.
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// Index of the image whose file is `file` (as result.json and pairs files name it, e.g.
    /// `rgb/000.png`), if the collection has it.
    pub fn index_of(&self, file: &str) -> Option<usize> {
        self.images.iter().position(|e| e.rgb.to_string_lossy() == file)
    }

    /// The entry of image `i`, or [`Error::InvalidInput`] if out of range.
    pub fn entry(&self, i: usize) -> Result<&ImageEntry> {
        self.images.get(i).ok_or_else(|| {
            Error::InvalidInput(format!("image {i} does not exist: collection {} has {} images", self.name, self.len()))
        })
    }

    /// Full path of image `i`'s colour file.
    pub fn rgb_path(&self, i: usize) -> Result<PathBuf> {
        Ok(self.root.join(&self.entry(i)?.rgb))
    }

    /// Full path of image `i`'s mask file, if it has one.
    pub fn mask_path(&self, i: usize) -> Result<Option<PathBuf>> {
        Ok(self.entry(i)?.mask.as_ref().map(|m| self.root.join(m)))
    }

    /// Full path of image `i`'s ground-truth NOCS file, if it has one.
    pub fn nocs_path(&self, i: usize) -> Result<Option<PathBuf>> {
        Ok(self.entry(i)?.nocs.as_ref().map(|m| self.root.join(m)))
    }

    /// Decodes image `i` (any PNG/JPEG colour type, as RGB8) and its binary mask (the mask file, else the
    /// image's alpha channel `>= 128`), and checks sizes (image vs. the recorded size, mask vs. image)
    /// and that the mask is neither empty nor full.
    pub fn load_image(&self, i: usize) -> Result<LoadedImage> {
        self.load_image_or_segment(i, None)
    }

    /// Whether image `i` has a mask file (images without one need their alpha channel or a segmenter).
    pub fn has_mask_file(&self, i: usize) -> bool {
        self.images.get(i).is_some_and(|e| e.mask.is_some())
    }

    /// [`Collection::load_image`], with `segmenter` computing the mask of an image that has neither a
    /// mask file nor an alpha channel.
    pub fn load_image_or_segment(&self, i: usize, segmenter: Option<&segment::Segmenter>) -> Result<LoadedImage> {
        let entry = self.entry(i)?;
        let rgb_path = self.root.join(&entry.rgb);
        let img = load_dynamic(&rgb_path)?;
        if (img.width(), img.height()) != (entry.width, entry.height) {
            return Err(Error::Image {
                path: rgb_path,
                message: format!(
                    "image is {}x{} but the collection says {}x{}",
                    img.width(),
                    img.height(),
                    entry.width,
                    entry.height
                ),
            });
        }
        let (mask, mask_source) = match &entry.mask {
            Some(m) => {
                let p = self.root.join(m);
                (load_mask(&p)?, p)
            }
            None => match (mask_from_alpha(&img), segmenter) {
                (Some(m), _) => (m, rgb_path.clone()),
                (None, Some(seg)) => (seg.mask(&img.to_rgb8())?, rgb_path.clone()),
                (None, None) => {
                    return Err(Error::Mask {
                        path: rgb_path,
                        message: "no mask was found for this image (no mask file, no alpha channel) and no \
                                  segmenter was given; add a mask/<stem>.png or the U^2-Net-p weights \
                                  (scripts/setup_weights.sh)"
                            .into(),
                    })
                }
            },
        };
        validate_mask(&mask, img.width(), img.height(), &mask_source)?;
        Ok(LoadedImage { rgb: img.to_rgb8(), mask })
    }
}

/// True if `p` has an image extension (case-insensitive).
fn is_image_file(p: &Path) -> bool {
    p.is_file()
        && p.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Files of `dir`, sorted by name.
fn list_dir(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        out.push(e.map_err(|e| Error::io(dir, e))?.path());
    }
    out.sort();
    Ok(out)
}

/// `collection.json`'s text (`file`) with the journal's frames that it lacks appended, so a collection
/// whose node was killed, or is still collecting, loads with every committed frame.
fn with_journal(file: &Path, text: String, journal: &str) -> Result<String> {
    if journal.is_empty() {
        return Ok(text);
    }
    let bad = |message: String| Error::Collection { path: file.to_path_buf(), message };
    let mut doc: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let Some(images) = doc.get_mut("images").and_then(serde_json::Value::as_array_mut) else {
        return Ok(text); // the parser names what is wrong
    };
    let known = images.iter().filter_map(|e| e.get("index")?.as_u64()).map(|i| i as usize).collect();
    for frame in crate::ingest::store::journal_frames(journal, &known) {
        images.push(serde_json::to_value(frame).map_err(|e| bad(e.to_string()))?);
    }
    serde_json::to_string(&doc).map_err(|e| bad(e.to_string()))
}

/// A folder of images without `collection.json`.
fn load_plain(dir: &Path) -> Result<Collection> {
    let rgb_dir = dir.join("rgb");
    let img_dir = if rgb_dir.is_dir() { rgb_dir } else { dir.to_path_buf() };
    let files: Vec<PathBuf> = list_dir(&img_dir)?.into_iter().filter(|p| is_image_file(p)).collect();
    if files.is_empty() {
        return Err(Error::Collection {
            path: dir.to_path_buf(),
            message: format!("no collection.json and no images (*.png, *.jpg, *.jpeg) in {}", img_dir.display()),
        });
    }
    // Masks: <stem>.png (any case of the extension) in mask/ or masks/.
    let mask_dir = ["mask", "masks"].iter().map(|m| dir.join(m)).find(|p| p.is_dir());
    let masks: Vec<PathBuf> = match &mask_dir {
        Some(md) => list_dir(md)?
            .into_iter()
            .filter(|p| p.is_file() && p.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("png")))
            .collect(),
        None => Vec::new(),
    };
    let rel = |p: &Path| p.strip_prefix(dir).map(Path::to_path_buf).unwrap_or_else(|_| p.to_path_buf());
    let mut images = Vec::with_capacity(files.len());
    let mut unreadable = Vec::new();
    for f in &files {
        // A file that is not an image after all (empty, truncated header, another format) is left
        // out with its reason: one bad download must not stop a folder of photos.
        let (width, height) = match image::image_dimensions(f) {
            Ok(size) => size,
            Err(e) => {
                let reason = images::image_error(f, e).to_string();
                tracing::warn!("leaving out {reason}");
                unreadable.push((rel(f), reason));
                continue;
            }
        };
        let mask = masks.iter().find(|m| m.file_stem() == f.file_stem()).map(|m| rel(m));
        let index = images.len();
        images.push(ImageEntry { index, rgb: rel(f), mask, nocs: None, width, height, intrinsics: None, ground_truth: None });
    }
    if images.is_empty() {
        return Err(Error::Collection {
            path: dir.to_path_buf(),
            message: format!(
                "none of the {} image files in {} can be read (first: {})",
                files.len(),
                img_dir.display(),
                unreadable.first().map_or("", |u| u.1.as_str())
            ),
        });
    }
    let name = json::absolute(dir).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "collection".into());
    let template = dir.join("template.obj");
    Ok(Collection {
        root: dir.to_path_buf(),
        name,
        category: "unknown".into(),
        kind: CollectionKind::Plain,
        images,
        template: template.is_file().then(|| json::absolute(&template)),
        canonical_bbox: None,
        metres_per_unit: None,
        unreadable,
    })
}

#[cfg(test)]
mod tests;
