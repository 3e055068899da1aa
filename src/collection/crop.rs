//! Square crops around the object (paper Sec. 3.4: inputs are cropped to the tightest mask bounding box).
//!
//! Coordinates follow the camera convention: pixel centres at integer coordinates, so image pixel `(u, v)`
//! covers `[u - 0.5, u + 0.5] x [v - 0.5, v + 0.5]`. The same holds in the crop raster.

use image::{GrayImage, RgbImage};
use nalgebra::Point2;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Supersamples per crop pixel along each axis for the box-filter resampling.
const SUPERSAMPLE: usize = 4;

/// An axis-aligned box in image pixel-centre coordinates, inclusive of the extreme pixel centres
/// (a single pixel at `(u, v)` is the box `u..=u, v..=v`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PixelBox {
    /// Smallest column (pixel centre).
    pub x_min: f64,
    /// Smallest row (pixel centre).
    pub y_min: f64,
    /// Largest column (pixel centre).
    pub x_max: f64,
    /// Largest row (pixel centre).
    pub y_max: f64,
}

impl PixelBox {
    /// Distance between the extreme pixel centres along x (0 for a one-pixel-wide box; the covered
    /// extent in pixels is `width() + 1`).
    pub fn width(&self) -> f64 {
        self.x_max - self.x_min
    }

    /// Distance between the extreme pixel centres along y (see [`PixelBox::width`]).
    pub fn height(&self) -> f64 {
        self.y_max - self.y_min
    }

    /// Centre of the box.
    pub fn centre(&self) -> Point2<f64> {
        Point2::new(0.5 * (self.x_min + self.x_max), 0.5 * (self.y_min + self.y_max))
    }
}

/// The sides of the image that a mask touches (its object is cut by the frame there).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BorderContact {
    /// The mask reaches the first column.
    pub left: bool,
    /// The mask reaches the last column.
    pub right: bool,
    /// The mask reaches the first row.
    pub top: bool,
    /// The mask reaches the last row.
    pub bottom: bool,
}

impl BorderContact {
    /// The sides of a `width` x `height` image that the mask box `bbox` reaches.
    pub fn of(bbox: &PixelBox, width: u32, height: u32) -> Self {
        Self {
            left: bbox.x_min <= 0.0,
            right: bbox.x_max >= width as f64 - 1.0,
            top: bbox.y_min <= 0.0,
            bottom: bbox.y_max >= height as f64 - 1.0,
        }
    }

    /// Whether the mask touches any side (the object is truncated by the frame).
    pub fn any(&self) -> bool {
        self.left || self.right || self.top || self.bottom
    }

    /// The touched sides by name (`left`, `right`, `top`, `bottom`).
    pub fn sides(&self) -> Vec<&'static str> {
        [(self.left, "left"), (self.right, "right"), (self.top, "top"), (self.bottom, "bottom")]
            .into_iter()
            .filter_map(|(b, n)| b.then_some(n))
            .collect()
    }
}

/// The tightest box around the set pixels (`>= 128`) of a mask; `None` if no pixel is set.
pub fn mask_bbox(mask: &GrayImage) -> Option<PixelBox> {
    PixelBox::covering(mask.enumerate_pixels().filter(|(_, _, p)| p[0] >= 128).map(|(x, y, _)| (x, y)))
}

impl PixelBox {
    /// The tightest box around pixels `(x, y)`; `None` when there are none.
    pub fn covering(pixels: impl IntoIterator<Item = (u32, u32)>) -> Option<Self> {
        let mut pixels = pixels.into_iter();
        let (x, y) = pixels.next()?;
        let ((x0, y0), (x1, y1)) =
            pixels.fold(((x, y), (x, y)), |((x0, y0), (x1, y1)), (x, y)| ((x0.min(x), y0.min(y)), (x1.max(x), y1.max(y))));
        Some(Self { x_min: x0 as f64, y_min: y0 as f64, x_max: x1 as f64, y_max: y1 as f64 })
    }
}

/// A square window of the image resampled to a `size` x `size` raster.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SquareCrop {
    /// Window centre, image x (pixel-centre coordinates).
    pub centre_x: f64,
    /// Window centre, image y.
    pub centre_y: f64,
    /// Window side length, image pixels.
    pub side: f64,
    /// Crop raster side, pixels.
    pub size: u32,
}

impl SquareCrop {
    /// A square window centred on `bbox` whose side is the box's larger pixel extent
    /// (`max(width, height) + 1`) padded by `margin` on each side (`side = extent * (1 + 2 margin)`),
    /// resampled to `size` x `size`. Errors on non-finite input, `margin <= -0.5` or `size == 0`.
    pub fn around(bbox: &PixelBox, margin: f64, size: u32) -> Result<Self> {
        let vals = [bbox.x_min, bbox.y_min, bbox.x_max, bbox.y_max];
        if vals.iter().any(|v| !v.is_finite()) || bbox.width() < 0.0 || bbox.height() < 0.0 {
            return Err(Error::InvalidInput(format!("crop box {bbox:?} is not a finite, ordered box")));
        }
        if !(margin.is_finite() && margin > -0.5) {
            return Err(Error::InvalidInput(format!("crop margin {margin} must be finite and > -0.5")));
        }
        if size == 0 {
            return Err(Error::InvalidInput("crop raster size must be positive".into()));
        }
        let extent = bbox.width().max(bbox.height()) + 1.0;
        let c = bbox.centre();
        Ok(Self { centre_x: c.x, centre_y: c.y, side: extent * (1.0 + 2.0 * margin), size })
    }

    /// Image pixels per crop pixel.
    pub fn scale(&self) -> f64 {
        self.side / self.size as f64
    }

    /// Crop raster coordinates of an image point (crop pixel centres at integers).
    pub fn crop_from_image(&self, p: Point2<f64>) -> Point2<f64> {
        let s = self.scale();
        let h = 0.5 * (self.size as f64 - 1.0);
        Point2::new((p.x - self.centre_x) / s + h, (p.y - self.centre_y) / s + h)
    }

    /// Image coordinates of a crop raster point; the inverse of [`SquareCrop::crop_from_image`].
    pub fn image_from_crop(&self, q: Point2<f64>) -> Point2<f64> {
        let s = self.scale();
        let h = 0.5 * (self.size as f64 - 1.0);
        Point2::new(self.centre_x + (q.x - h) * s, self.centre_y + (q.y - h) * s)
    }

    /// Image coordinates of the centres of the `size` x `size` crop pixels, row-major.
    pub fn sample_pixels(&self) -> Vec<Point2<f64>> {
        let n = self.size as usize;
        let mut out = Vec::with_capacity(n * n);
        for j in 0..n {
            for i in 0..n {
                out.push(self.image_from_crop(Point2::new(i as f64, j as f64)));
            }
        }
        out
    }

    /// Calls `f(row-major crop index, image point)` for the `SUPERSAMPLE²` sample points of each crop pixel.
    fn for_each_subsample(&self, mut f: impl FnMut(usize, Point2<f64>)) {
        let n = self.size as usize;
        let offs: Vec<f64> = (0..SUPERSAMPLE).map(|k| (k as f64 + 0.5) / SUPERSAMPLE as f64 - 0.5).collect();
        for j in 0..n {
            for i in 0..n {
                for &dy in &offs {
                    for &dx in &offs {
                        f(j * n + i, self.image_from_crop(Point2::new(i as f64 + dx, j as f64 + dy)));
                    }
                }
            }
        }
    }

    /// The fraction of each crop pixel that lies inside a `width` x `height` image: `size²` row-major
    /// values in `[0, 1]` (1 inside, 0 beyond the border; the same supersampling as the masks).
    pub fn resample_inside(&self, width: u32, height: u32) -> Vec<f32> {
        let n = self.size as usize;
        let mut acc = vec![0u32; n * n];
        let (wf, hf) = (width as f64, height as f64);
        self.for_each_subsample(|k, p| {
            if p.x >= -0.5 && p.y >= -0.5 && p.x < wf - 0.5 && p.y < hf - 0.5 {
                acc[k] += 1;
            }
        });
        let d = (SUPERSAMPLE * SUPERSAMPLE) as f32;
        acc.into_iter().map(|a| a as f32 / d).collect()
    }

    /// A square window covering a whole `width` x `height` image (centred on it, side = the longer
    /// side), resampled to `size` x `size`: the frame in which a truncated object is compared.
    pub fn whole_image(width: u32, height: u32, size: u32) -> Self {
        Self { centre_x: 0.5 * (width as f64 - 1.0), centre_y: 0.5 * (height as f64 - 1.0), side: width.max(height) as f64, size }
    }

    /// The binary mask resampled to the crop: `size²` row-major coverage values in `[0, 1]`
    /// (box filter over each crop pixel by 4x4 supersampling; outside the image counts as 0).
    pub fn resample_mask(&self, mask: &GrayImage) -> Vec<f32> {
        let n = self.size as usize;
        let mut acc = vec![0u32; n * n];
        let (w, h) = (mask.width() as i64, mask.height() as i64);
        self.for_each_subsample(|k, p| {
            let (x, y) = (p.x.round() as i64, p.y.round() as i64);
            if x >= 0 && y >= 0 && x < w && y < h && mask.get_pixel(x as u32, y as u32)[0] >= 128 {
                acc[k] += 1;
            }
        });
        let d = (SUPERSAMPLE * SUPERSAMPLE) as f32;
        acc.into_iter().map(|a| a as f32 / d).collect()
    }

    /// The colour image resampled to the crop: `size²` row-major RGB values in `[0, 1]` (4x4 bilinear
    /// supersamples averaged per crop pixel; samples outside the image are black).
    pub fn resample_rgb(&self, rgb: &RgbImage) -> Vec<[f32; 3]> {
        let n = self.size as usize;
        let mut acc = vec![[0f32; 3]; n * n];
        let (w, h) = (rgb.width() as i64, rgb.height() as i64);
        let (wf, hf) = (w as f64, h as f64);
        self.for_each_subsample(|k, p| {
            if w == 0 || h == 0 || p.x < -0.5 || p.y < -0.5 || p.x >= wf - 0.5 || p.y >= hf - 0.5 {
                return;
            }
            let (fx, fy) = (p.x.floor(), p.y.floor());
            let (tx, ty) = ((p.x - fx) as f32, (p.y - fy) as f32);
            let x0 = (fx as i64).clamp(0, w - 1) as u32;
            let y0 = (fy as i64).clamp(0, h - 1) as u32;
            let x1 = (fx as i64 + 1).clamp(0, w - 1) as u32;
            let y1 = (fy as i64 + 1).clamp(0, h - 1) as u32;
            let (a, b, c, d) = (rgb.get_pixel(x0, y0), rgb.get_pixel(x1, y0), rgb.get_pixel(x0, y1), rgb.get_pixel(x1, y1));
            for ch in 0..3 {
                let top = a[ch] as f32 * (1.0 - tx) + b[ch] as f32 * tx;
                let bot = c[ch] as f32 * (1.0 - tx) + d[ch] as f32 * tx;
                acc[k][ch] += top * (1.0 - ty) + bot * ty;
            }
        });
        let d = (SUPERSAMPLE * SUPERSAMPLE) as f32 * 255.0;
        acc.into_iter().map(|c| [c[0] / d, c[1] / d, c[2] / d]).collect()
    }
}
