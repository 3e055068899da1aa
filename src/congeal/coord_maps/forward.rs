//! The forward canonical coordinate map (paper Eq. 10-11): per image, the warp `u -> ũ` from the
//! input's DINOv2 features to those of the rendering at its estimated pose (`coordinate_warps`),
//! then the rendered NOCS at `ũ` ([`forward_map`]); and the full-image rasters at a pose that a run
//! writes (`pose_rasters`).

use std::collections::BTreeMap;
use std::time::Instant;

use nalgebra::Isometry3;
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::collection::SquareCrop;
use crate::config::Config;
use crate::congeal::coord_maps::{optimise_warps, Warp, WarpProblem};
use crate::congeal::features::FeatureExtractor;
use crate::congeal::pipeline::{feature_window, Prepared, Registration};
use crate::congeal::pose_init::{window_intrinsics, InputView};
use crate::error::{Error, Result};
use crate::field::canonical::CanonicalField;
use crate::field::render::{render_rays_host, CameraBatch, HostRendering, RenderWhat};
use crate::geometry::Intrinsics;
use crate::output::images::{ColourRasters, NocsRasters, PoseRasters};

/// A coordinate-map warp as stored in a run (`warps/NNN.json`): the image's square feature window
/// and the warp over its unit square.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StoredWarp {
    /// The window (image pixels) whose unit square the warp is defined on.
    pub crop: SquareCrop,
    /// The warp u -> ũ.
    pub warp: Warp,
}

impl StoredWarp {
    /// ũ of image pixel `p`, in image pixels.
    pub fn apply_pixel(&self, p: [f64; 2]) -> [f64; 2] {
        let c = self.crop.crop_from_image(nalgebra::Point2::new(p[0], p[1]));
        let size = self.crop.size as f64;
        let u = self.warp.apply([(c.x + 0.5) / size, (c.y + 0.5) / size]);
        let q = self.crop.image_from_crop(nalgebra::Point2::new(u[0] * size - 0.5, u[1] * size - 0.5));
        [q.x, q.y]
    }
}

/// Eq. 10 for every image: render the shape at the estimated pose over the image's feature window,
/// take its DINOv2 features, and optimise the warp from the input's features to the rendering's.
pub(crate) fn coordinate_warps(
    field: &CanonicalField,
    prepared: &[Prepared],
    registration: &Registration,
    extractor: &FeatureExtractor,
    config: &Config,
    timings: &mut BTreeMap<String, f64>,
) -> Result<Vec<StoredWarp>> {
    let t = Instant::now();
    let size = extractor.input_size();
    let windows: Vec<SquareCrop> = prepared.iter().map(|p| feature_window(&p.view, size)).collect();
    let device = field.device();
    let pixels_one = crate::field::render::pixel_grid(size, size, device)?;
    let mut crops = Vec::with_capacity(prepared.len());
    for (k, window) in windows.iter().enumerate() {
        let intr = window_intrinsics(&registration.intrinsics[k], window);
        let cams = CameraBatch::from_poses(&[registration.camera_from_object[k]], &[intr], device)?;
        let rays = cams.rays(&pixels_one)?;
        let what = RenderWhat { colour: true, ..Default::default() };
        let host = render_rays_host(field, &rays, config.render.samples_per_ray, what, config.render.chunk_rays)?;
        crops.push(host.colour);
    }
    let rendered = extractor.extract(&crops)?;
    let mut problems = Vec::with_capacity(prepared.len());
    for (k, p) in prepared.iter().enumerate() {
        let input = p.view.features.as_ref().ok_or_else(|| Error::InvalidInput("input features missing".into()))?;
        let window = windows[k];
        let mask = &p.image.mask;
        let fg = |x: f64, y: f64| -> bool {
            let q = window.image_from_crop(nalgebra::Point2::new(x * size as f64 - 0.5, y * size as f64 - 0.5));
            let (px, py) = (q.x.round(), q.y.round());
            px >= 0.0
                && py >= 0.0
                && (px as u32) < mask.width()
                && (py as u32) < mask.height()
                && mask.get_pixel(px as u32, py as u32)[0] >= 128
        };
        problems.push(WarpProblem::new(input, &rendered[k], &fg, config.coord_maps.grid)?);
    }
    timings.insert("coord_maps_renders_features".to_string(), t.elapsed().as_secs_f64());
    let t = Instant::now();
    let warps = optimise_warps(&problems, &config.coord_maps)?;
    timings.insert("coord_maps_optimise".to_string(), t.elapsed().as_secs_f64());
    for (k, (p, w)) in problems.iter().zip(&warps).enumerate() {
        info!(
            "{}: coordinate map semantic distance {:.3} -> {:.3}",
            prepared[k].file,
            p.semantic_distance(&Warp::identity(w.grid)),
            p.semantic_distance(w)
        );
    }
    Ok(windows.into_iter().zip(warps).map(|(crop, warp)| StoredWarp { crop, warp }).collect())
}

/// The forward canonical coordinate map (Eq. 11 after Eq. 10) on an image's mask pixels: each
/// pixel's warped position ũ (itself when there is no warp) looks up the rendered NOCS; where ũ
/// misses the rendered silhouette, the nearest rendered pixel is used.
pub fn forward_map(
    rendered: &[[f32; 3]],
    rendered_fg: &[bool],
    mask: &[bool],
    width: u32,
    height: u32,
    warp: Option<&StoredWarp>,
) -> Result<Vec<[f32; 3]>> {
    use kiddo::{KdTree, SquaredEuclidean};
    let n = (width * height) as usize;
    if rendered.len() != n || rendered_fg.len() != n || mask.len() != n {
        return Err(Error::InvalidInput("forward map rasters differ in size".into()));
    }
    let mut tree: KdTree<f64, 2> = KdTree::new();
    for (i, _) in rendered_fg.iter().enumerate().filter(|(_, f)| **f) {
        tree.add(&[(i as u32 % width) as f64, (i as u32 / width) as f64], i as u64);
    }
    if tree.size() == 0 {
        return Err(Error::Numerical("the rendering at the estimated pose is empty".into()));
    }
    let mut out = vec![[0f32; 3]; n];
    for i in (0..n).filter(|&i| mask[i]) {
        let p = nalgebra::Point2::new((i as u32 % width) as f64, (i as u32 / width) as f64);
        let q = match warp {
            Some(w) => {
                let q = w.apply_pixel([p.x, p.y]);
                nalgebra::Point2::new(q[0], q[1])
            }
            None => p,
        };
        let (x, y) = (q.x.round(), q.y.round());
        let direct = (x >= 0.0 && y >= 0.0 && x < width as f64 && y < height as f64)
            .then(|| (y as u32 * width + x as u32) as usize)
            .filter(|&j| rendered_fg[j]);
        let j = match direct {
            Some(j) => j,
            None => tree.nearest_one::<SquaredEuclidean>(&[q.x, q.y]).item as usize,
        };
        out[i] = rendered[j];
    }
    Ok(out)
}

/// The rasters a run writes of one image at its estimated pose (full image size): the forward map
/// (Eq. 11), the NOCS rendering and its foreground when `output.nocs`, the rendered colour and opacity
/// when `output.overlays`. Renders nothing when neither is asked for.
pub(crate) fn pose_rasters(
    field: &CanonicalField,
    view: &InputView,
    mask: &image::GrayImage,
    pose: &Isometry3<f64>,
    intr: &Intrinsics,
    warp: Option<&StoredWarp>,
    config: &Config,
) -> Result<PoseRasters> {
    let mut rasters = PoseRasters::default();
    if !(config.output.nocs || config.output.overlays) {
        return Ok(rasters);
    }
    let window = render_window(view, config.pose_refine.crop_margin)?;
    let (rendering, rect) = render_full(field, pose, intr, &window, config)?;
    let (w, h) = (intr.width, intr.height);
    if config.output.nocs {
        let mask: Vec<bool> = mask.pixels().map(|px| px.0[0] >= 128).collect();
        let rendered = full_raster(&rendering.nocs, &rect, w, h, [0.0; 3]);
        let alpha = full_raster(&rendering.opacity, &rect, w, h, 0.0);
        let rendered_fg: Vec<bool> = alpha.iter().map(|a| *a >= 0.5).collect();
        let forward = forward_map(&rendered, &rendered_fg, &mask, w, h, warp)?;
        rasters.nocs = Some(NocsRasters { mask, forward, rendered, rendered_fg });
    }
    if config.output.overlays {
        let colour = full_raster(&rendering.colour, &rect, w, h, [0.0; 3]);
        let alpha = full_raster(&rendering.opacity, &rect, w, h, 0.0);
        let colour: Vec<[f32; 3]> = colour
            .iter()
            .zip(&alpha)
            .map(|(c, a)| if *a > 1e-3 { c.map(|v| (v / a).clamp(0.0, 1.0)) } else { [0.0; 3] })
            .collect();
        rasters.colour = Some(ColourRasters { colour, alpha });
    }
    Ok(rasters)
}

/// The square window around an input's mask that refinement and the output renders cover.
fn render_window(view: &InputView, margin: f64) -> Result<SquareCrop> {
    match &view.frame {
        // An object cut by the frame: the whole image (its cut edges are not its own).
        Some(_) => Ok(SquareCrop::whole_image(view.width, view.height, view.crop.size)),
        None => SquareCrop::around(&view.bbox, margin, view.crop.size),
    }
}

/// An axis-aligned block of integer pixels `[x0, x1) x [y0, y1)`.
#[derive(Clone, Copy, Debug)]
struct PixelRect {
    x0: u32,
    y0: u32,
    x1: u32,
    y1: u32,
}

impl PixelRect {
    /// The pixels of `window` that lie inside a `width` x `height` image.
    fn of_window(window: &SquareCrop, width: u32, height: u32) -> Self {
        let half = 0.5 * window.side;
        let clip = |v: f64, hi: u32| v.max(0.0).min(hi as f64) as u32;
        Self {
            x0: clip((window.centre_x - half).floor(), width),
            y0: clip((window.centre_y - half).floor(), height),
            x1: clip((window.centre_x + half).ceil() + 1.0, width),
            y1: clip((window.centre_y + half).ceil() + 1.0, height),
        }
    }

    fn len(&self) -> usize {
        ((self.x1 - self.x0) * (self.y1 - self.y0)) as usize
    }
}

/// Places per-pixel values of `rect` into a full `width` x `height` raster filled with `fill`.
fn full_raster<T: Copy>(values: &[T], rect: &PixelRect, width: u32, height: u32, fill: T) -> Vec<T> {
    let mut out = vec![fill; (width * height) as usize];
    let w = (rect.x1 - rect.x0) as usize;
    if w == 0 {
        return out;
    }
    for (row, chunk) in values.chunks(w).enumerate() {
        let y = rect.y0 as usize + row;
        if y >= height as usize {
            break;
        }
        let start = y * width as usize + rect.x0 as usize;
        out[start..start + chunk.len()].copy_from_slice(chunk);
    }
    out
}

/// Renders opacity, colour and NOCS for every integer pixel of `window` (clipped to the image).
fn render_full(
    field: &CanonicalField,
    pose: &Isometry3<f64>,
    intr: &Intrinsics,
    window: &SquareCrop,
    config: &Config,
) -> Result<(HostRendering, PixelRect)> {
    let rect = PixelRect::of_window(window, intr.width, intr.height);
    let mut pixels = Vec::with_capacity(rect.len() * 2);
    for y in rect.y0..rect.y1 {
        for x in rect.x0..rect.x1 {
            pixels.push(x as f32);
            pixels.push(y as f32);
        }
    }
    let device = field.device();
    let cams = CameraBatch::from_poses(&[*pose], &[*intr], device)?;
    let pixels = candle_core::Tensor::from_vec(pixels, (1, rect.len(), 2), device)?;
    let rays = cams.rays(&pixels)?;
    let what = RenderWhat { colour: true, nocs: true, ..Default::default() };
    let host = render_rays_host(field, &rays, config.render.samples_per_ray, what, config.render.chunk_rays)?;
    Ok((host, rect))
}
