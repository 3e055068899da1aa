//! A run's per-image files (NOCS maps, NOCS pictures, warps, overlays, kept masks, the contact sheet)
//! and each image's entry in `result.json`.

use std::path::Path;

use image::{GrayImage, RgbImage};
use nalgebra::Isometry3;
use serde::Serialize;

use crate::config::OutputConfig;
use crate::error::Result;
use crate::geometry::se3::isometry_to_row_major;
use crate::geometry::Intrinsics;
use crate::output::result::{CandidateInfo, ImageResult};
use crate::output::{contact_sheet, nocs_color_image, overlay, save_gray_png, save_png, write_json, write_nocs_png};

/// NOCS rasters of one image at its estimated pose, full image size, row-major.
#[derive(Clone, Debug)]
pub struct NocsRasters {
    /// The input's foreground mask.
    pub mask: Vec<bool>,
    /// The forward canonical coordinate map on the mask's pixels (Eq. 11).
    pub forward: Vec<[f32; 3]>,
    /// The NOCS rendering at the pose.
    pub rendered: Vec<[f32; 3]>,
    /// The rendering's foreground (opacity >= 0.5).
    pub rendered_fg: Vec<bool>,
}

/// The rendered colour of one image at its estimated pose, full image size, row-major.
#[derive(Clone, Debug)]
pub struct ColourRasters {
    /// Colour, divided by the opacity (black where there is none).
    pub colour: Vec<[f32; 3]>,
    /// Opacity.
    pub alpha: Vec<f32>,
}

/// What is rendered of one image at its pose for the files a run writes.
#[derive(Clone, Debug, Default)]
pub struct PoseRasters {
    /// For `nocs/`, `nocs_render/` and `nocs_vis/` (when `output.nocs`).
    pub nocs: Option<NocsRasters>,
    /// For `overlays/` and the contact sheet (when `output.overlays`).
    pub colour: Option<ColourRasters>,
}

/// One posed image, as a run writes it.
pub struct PosedImage<'a, W> {
    /// Position in the collection (file names `NNN`).
    pub index: usize,
    /// Image path relative to the collection.
    pub file: String,
    /// The input image.
    pub rgb: &'a RgbImage,
    /// Its foreground mask.
    pub mask: &'a GrayImage,
    /// Whether the collection holds a mask file for it (otherwise the run keeps the mask).
    pub mask_has_file: bool,
    /// camera_from_object, canonical frame and units.
    pub camera_from_object: Isometry3<f64>,
    /// Intrinsics of the image.
    pub intrinsics: Intrinsics,
    /// Final fit (silhouette IoU).
    pub score: f32,
    /// The initial candidate that won.
    pub init: CandidateInfo,
    /// The image sides its mask touches (the object is cut by the frame there).
    pub border: crate::collection::BorderContact,
    /// The coordinate-map warp, written as `warps/NNN.json` with the NOCS maps.
    pub warp: Option<&'a W>,
    /// The rendered rasters.
    pub rasters: PoseRasters,
}

/// Writes the files of every image (`count` of them, produced one at a time by `images`) into
/// `out_dir`, and the contact sheet of the overlays; returns the images' `result.json` entries.
/// `progress` receives the fraction done.
pub fn write_images<'a, W: Serialize + 'a>(
    out_dir: &Path,
    config: &OutputConfig,
    count: usize,
    images: impl Iterator<Item = Result<PosedImage<'a, W>>>,
    progress: &dyn Fn(f32),
) -> Result<Vec<ImageResult>> {
    let mut results = Vec::with_capacity(count);
    let mut overlays = Vec::new();
    for (k, image) in images.enumerate() {
        let image = image?;
        let (result, drawn) = write_image(out_dir, config, &image)?;
        results.push(result);
        overlays.extend(drawn);
        progress((k + 1) as f32 / count as f32);
    }
    if !overlays.is_empty() {
        let sheet = contact_sheet(&overlays, 8, 160);
        save_png(&sheet, &out_dir.join("contact_sheet.png"))?;
    }
    Ok(results)
}

/// Writes one image's files; returns its `result.json` entry and its overlay, if drawn.
fn write_image<W: Serialize>(
    out_dir: &Path,
    config: &OutputConfig,
    p: &PosedImage<'_, W>,
) -> Result<(ImageResult, Option<RgbImage>)> {
    let intr = p.intrinsics;
    let (w, h) = (intr.width, intr.height);
    let nocs_file = format!("nocs/{:03}.png", p.index);
    if let Some(n) = &p.rasters.nocs {
        write_nocs_png(&out_dir.join(&nocs_file), w, h, &n.forward, &n.mask)?;
        write_nocs_png(&out_dir.join(format!("nocs_render/{:03}.png", p.index)), w, h, &n.rendered, &n.rendered_fg)?;
        let picture = nocs_color_image(w, h, &n.forward, &n.mask);
        save_png(&picture, &out_dir.join(format!("nocs_vis/{:03}.png", p.index)))?;
        if let Some(stored) = p.warp {
            write_json(&out_dir.join(format!("warps/{:03}.json", p.index)), stored)?;
        }
    }
    let mut drawn = None;
    if let Some(c) = &p.rasters.colour {
        let over = overlay(p.rgb, &c.colour, &c.alpha, config.overlay_strength);
        save_png(&over, &out_dir.join(format!("overlays/{:03}.png", p.index)))?;
        drawn = Some(over);
    }
    // Masks that no file holds (alpha or built-in segmenter) are kept with the run, so that later
    // commands (e.g. `congeal transfer --method 2d`) see the same foreground.
    let mask_file = if p.mask_has_file {
        None
    } else {
        let rel = format!("masks/{:03}.png", p.index);
        save_gray_png(p.mask, &out_dir.join(&rel))?;
        Some(rel)
    };
    let result = ImageResult {
        file: p.file.clone(),
        camera_from_object: isometry_to_row_major(&p.camera_from_object),
        k: intrinsics_rows(&intr),
        fov_deg: intr.fov_y_deg(),
        fov_deg_x: intr.fov_x_deg(),
        score: p.score,
        size: [intr.width, intr.height],
        init: p.init.clone(),
        nocs: config.nocs.then(|| nocs_file.clone()),
        nocs_render: config.nocs.then(|| format!("nocs_render/{:03}.png", p.index)),
        warp: (config.nocs && p.warp.is_some()).then(|| format!("warps/{:03}.json", p.index)),
        mask: mask_file,
        mask_touches_border: p.border.any(),
        border_sides: p.border.sides().into_iter().map(String::from).collect(),
    };
    Ok((result, drawn))
}

/// K as row-major rows.
fn intrinsics_rows(k: &Intrinsics) -> [[f64; 3]; 3] {
    [[k.fx, 0.0, k.cx], [0.0, k.fy, k.cy], [0.0, 0.0, 1.0]]
}
