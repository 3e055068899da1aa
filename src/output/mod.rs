//! Pictures and files for people and evaluation scripts: NOCS PNGs (the collection format's 16-bit encoding), NOCS colour
//! pictures, rendering overlays, contact sheets.

use std::path::Path;

use image::{DynamicImage, ImageBuffer, ImageError, ImageFormat, Rgb, RgbImage};

use crate::error::{Error, Result};

/// Colour of the silhouette outline drawn by [`overlay`].
pub const OUTLINE_COLOR: [u8; 3] = [0, 255, 0];
/// Background colour of [`contact_sheet`].
pub const SHEET_BACKGROUND: [u8; 3] = [40, 40, 40];
/// Gap between thumbnails of a [`contact_sheet`], pixels.
const SHEET_GAP: u32 = 4;

/// A 16-bit RGB image buffer.
type Rgb16Image = ImageBuffer<Rgb<u16>, Vec<u16>>;

fn check_len(what: &str, len: usize, width: u32, height: u32) -> Result<()> {
    let n = width as usize * height as usize;
    if len != n {
        return Err(Error::InvalidInput(format!("{what} has {len} values but the image is {width}x{height} = {n} pixels")));
    }
    Ok(())
}

/// Creates the parent folder of `path` if needed.
fn create_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => std::fs::create_dir_all(p).map_err(|e| Error::io(p, e)),
        _ => Ok(()),
    }
}

/// Maps an `image` write error to [`Error::Io`] / [`Error::Image`].
fn write_error(path: &Path, e: ImageError) -> Error {
    match e {
        ImageError::IoError(io) => Error::io(path, io),
        other => Error::Image { path: path.to_path_buf(), message: format!("cannot encode PNG: {other}") },
    }
}

/// Writes a NOCS image as a 16-bit RGB PNG (as the collection format's ground-truth `nocs/`):
/// channel = `round(65535 * clamp(nocs, 0, 1))` on
/// mask pixels, `(0, 0, 0)` elsewhere. `nocs` and `mask` are row-major, `width * height` long. NaN/inf on a
/// mask pixel is an error; parent folders are created.
pub fn write_nocs_png(path: &Path, width: u32, height: u32, nocs: &[[f32; 3]], mask: &[bool]) -> Result<()> {
    check_len("NOCS", nocs.len(), width, height)?;
    check_len("NOCS mask", mask.len(), width, height)?;
    if width == 0 || height == 0 {
        return Err(Error::InvalidInput(format!("NOCS image {} is empty ({width}x{height})", path.display())));
    }
    let mut data = Vec::with_capacity(nocs.len() * 3);
    for (k, (v, &m)) in nocs.iter().zip(mask).enumerate() {
        if !m {
            data.extend_from_slice(&[0, 0, 0]);
            continue;
        }
        for &c in v {
            if !c.is_finite() {
                return Err(Error::InvalidInput(format!(
                    "NOCS value {v:?} at pixel ({}, {}) is not finite; cannot write {}",
                    k % width as usize,
                    k / width as usize,
                    path.display()
                )));
            }
            data.push((c.clamp(0.0, 1.0) as f64 * 65535.0).round() as u16);
        }
    }
    let buf = Rgb16Image::from_raw(width, height, data)
        .ok_or_else(|| Error::InvalidInput(format!("NOCS buffer does not match {width}x{height}")))?;
    create_parent(path)?;
    DynamicImage::ImageRgb16(buf).save_with_format(path, ImageFormat::Png).map_err(|e| write_error(path, e))
}

/// Reads a 16-bit RGB (or RGBA, alpha ignored) NOCS PNG: `(width, height, row-major values / 65535)`.
/// 8-bit files are refused, since they cannot hold the 16-bit precision of the encoding.
pub fn read_nocs_png(path: &Path) -> Result<(u32, u32, Vec<[f32; 3]>)> {
    let img = crate::collection::load_dynamic(path)?;
    let (w, h) = (img.width(), img.height());
    let to_f = |v: u16| v as f32 / 65535.0;
    let values: Vec<[f32; 3]> = match img {
        DynamicImage::ImageRgb16(b) => b.pixels().map(|p| [to_f(p[0]), to_f(p[1]), to_f(p[2])]).collect(),
        DynamicImage::ImageRgba16(b) => b.pixels().map(|p| [to_f(p[0]), to_f(p[1]), to_f(p[2])]).collect(),
        other => {
            return Err(Error::Image {
                path: path.to_path_buf(),
                message: format!("expected a 16-bit RGB NOCS PNG, got colour type {:?}", other.color()),
            })
        }
    };
    Ok((w, h, values))
}

/// [`read_nocs_png`] of the map of an image of `width` x `height`, refusing a map of another size
/// (its pixels would not be the image's).
pub fn read_nocs_png_for_image(path: &Path, width: u32, height: u32) -> Result<Vec<[f32; 3]>> {
    let (w, h, values) = read_nocs_png(path)?;
    if (w, h) != (width, height) {
        return Err(Error::Image {
            path: path.to_path_buf(),
            message: format!("NOCS map is {w}x{h} but its image is {width}x{height}"),
        });
    }
    Ok(values)
}

fn to_u8(v: f32) -> u8 {
    if v.is_nan() {
        0
    } else {
        (v.clamp(0.0, 1.0) * 255.0).round() as u8
    }
}

/// NOCS as an 8-bit colour picture (x, y, z -> R, G, B), background black. Values are clamped to
/// `[0, 1]`, NaN shows black; missing entries (slices shorter than `width * height`) count as background.
pub fn nocs_color_image(width: u32, height: u32, nocs: &[[f32; 3]], mask: &[bool]) -> RgbImage {
    if nocs.len() != width as usize * height as usize || mask.len() != nocs.len() {
        tracing::warn!("nocs_color_image: {} values / {} mask entries for a {width}x{height} image", nocs.len(), mask.len());
    }
    RgbImage::from_fn(width, height, |x, y| {
        let k = y as usize * width as usize + x as usize;
        match (nocs.get(k), mask.get(k)) {
            (Some(v), Some(true)) => Rgb([to_u8(v[0]), to_u8(v[1]), to_u8(v[2])]),
            _ => Rgb([0, 0, 0]),
        }
    })
}

/// The image with a rendering (row-major, same size, colours in `[0, 1]`) alpha-blended on top with
/// opacity `alpha * strength`, and the rendered silhouette's outline in [`OUTLINE_COLOR`]: the pixels
/// with `alpha >= 0.5` that have a 4-neighbour with `alpha < 0.5` (the inner border). Missing entries
/// (slices shorter than the image) count as transparent; NaN alpha counts as 0.
pub fn overlay(rgb: &RgbImage, render_rgb: &[[f32; 3]], render_alpha: &[f32], strength: f32) -> RgbImage {
    let (w, h) = rgb.dimensions();
    let n = w as usize * h as usize;
    if render_rgb.len() != n || render_alpha.len() != n {
        tracing::warn!("overlay: rendering has {} colours / {} alphas for a {w}x{h} image", render_rgb.len(), render_alpha.len());
    }
    let s = if strength.is_nan() { 0.0 } else { strength.clamp(0.0, 1.0) };
    let alpha = |x: i64, y: i64| -> f32 {
        if x < 0 || y < 0 || x >= w as i64 || y >= h as i64 {
            return 0.0;
        }
        match render_alpha.get(y as usize * w as usize + x as usize) {
            Some(a) if !a.is_nan() => a.clamp(0.0, 1.0),
            _ => 0.0,
        }
    };
    let mut out = rgb.clone();
    for (x, y, p) in out.enumerate_pixels_mut() {
        let (xi, yi) = (x as i64, y as i64);
        let a = alpha(xi, yi);
        let inside = a >= 0.5;
        let border = inside
            && [(1, 0), (-1, 0), (0, 1), (0, -1)].iter().any(|(dx, dy)| {
                let (nx, ny) = (xi + dx, yi + dy);
                nx >= 0 && ny >= 0 && nx < w as i64 && ny < h as i64 && alpha(nx, ny) < 0.5
            });
        if border {
            *p = Rgb(OUTLINE_COLOR);
            continue;
        }
        let t = a * s;
        if t <= 0.0 {
            continue;
        }
        let k = y as usize * w as usize + x as usize;
        let c = render_rgb.get(k).copied().unwrap_or([0.0; 3]);
        for ch in 0..3 {
            let r = if c[ch].is_nan() { 0.0 } else { c[ch].clamp(0.0, 1.0) * 255.0 };
            p[ch] = (p[ch] as f32 * (1.0 - t) + r * t).round().clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// A grid of thumbnails (`columns` per row, each fitted into `thumb` x `thumb` keeping its aspect ratio,
/// centred and letterboxed on dark grey, `SHEET_GAP` (4) pixels apart). Empty input gives a small blank
/// image; `columns`/`thumb` of 0 are treated as 1.
pub fn contact_sheet(images: &[RgbImage], columns: u32, thumb: u32) -> RgbImage {
    let thumb = thumb.max(1);
    if images.is_empty() {
        return RgbImage::from_pixel(thumb.min(16), thumb.min(16), Rgb(SHEET_BACKGROUND));
    }
    let n = images.len() as u32;
    let cols = columns.clamp(1, n);
    let rows = n.div_ceil(cols);
    let cell = thumb + SHEET_GAP;
    let mut sheet = RgbImage::from_pixel(cols * cell + SHEET_GAP, rows * cell + SHEET_GAP, Rgb(SHEET_BACKGROUND));
    for (k, img) in images.iter().enumerate() {
        let (iw, ih) = img.dimensions();
        if iw == 0 || ih == 0 {
            continue;
        }
        let scale = thumb as f64 / iw.max(ih) as f64;
        let tw = ((iw as f64 * scale).round() as u32).clamp(1, thumb);
        let th = ((ih as f64 * scale).round() as u32).clamp(1, thumb);
        let small = image::imageops::resize(img, tw, th, image::imageops::FilterType::Triangle);
        let (col, row) = (k as u32 % cols, k as u32 / cols);
        let x0 = SHEET_GAP + col * cell + (thumb - tw) / 2;
        let y0 = SHEET_GAP + row * cell + (thumb - th) / 2;
        image::imageops::replace(&mut sheet, &small, x0 as i64, y0 as i64);
    }
    sheet
}

/// Saves an RGB image as PNG, creating parent folders.
pub fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    create_parent(path)?;
    img.save_with_format(path, ImageFormat::Png).map_err(|e| write_error(path, e))
}

/// Saves a single-channel image (a mask) as PNG, creating parent folders.
pub fn save_gray_png(img: &image::GrayImage, path: &Path) -> Result<()> {
    create_parent(path)?;
    img.save_with_format(path, ImageFormat::Png).map_err(|e| write_error(path, e))
}

/// Writes `value` as pretty JSON, creating parent folders.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    create_parent(path)?;
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::InvalidInput(format!("cannot serialise {}: {e}", path.display())))?;
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

pub mod images;
pub mod result;
#[cfg(test)]
mod tests;
