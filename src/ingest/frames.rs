//! Raw image buffers (as in `sensor_msgs/Image`) to images, with clear errors for bad input.

use image::{GrayImage, RgbImage};

use crate::error::{Error, Result};
use crate::geometry::Intrinsics;

/// An image as it arrives on the wire: size, encoding name, row stride and bytes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RawImage {
    /// Width, pixels.
    pub width: u32,
    /// Height, pixels.
    pub height: u32,
    /// ROS encoding name (`rgb8`, `bgr8`, `rgba8`, `bgra8`, `mono8`, ...).
    pub encoding: String,
    /// Bytes per row.
    pub step: u32,
    /// Pixel bytes, `step * height` of them.
    pub data: Vec<u8>,
}

/// Encodings accepted for colour images.
pub const IMAGE_ENCODINGS: [&str; 5] = ["rgb8", "bgr8", "rgba8", "bgra8", "mono8"];

/// Largest accepted side, pixels (guards against absurd headers).
pub const MAX_SIDE: u32 = 16384;

fn channels(encoding: &str) -> Option<usize> {
    match encoding {
        "rgb8" | "bgr8" => Some(3),
        "rgba8" | "bgra8" => Some(4),
        "mono8" | "8UC1" => Some(1),
        _ => None,
    }
}

fn check_layout(raw: &RawImage, channels: usize) -> Result<()> {
    if raw.width == 0 || raw.height == 0 || raw.width > MAX_SIDE || raw.height > MAX_SIDE {
        return Err(Error::InvalidInput(format!("image size {}x{} is out of range", raw.width, raw.height)));
    }
    let row = raw.width as usize * channels;
    if (raw.step as usize) < row {
        return Err(Error::InvalidInput(format!(
            "{} image row stride {} is shorter than width {} x {channels} bytes",
            raw.encoding, raw.step, raw.width
        )));
    }
    let needed = raw.step as usize * (raw.height as usize - 1) + row;
    if raw.data.len() < needed {
        return Err(Error::InvalidInput(format!(
            "{} image {}x{} needs {needed} bytes, got {} (truncated)",
            raw.encoding,
            raw.width,
            raw.height,
            raw.data.len()
        )));
    }
    Ok(())
}

/// Decodes a colour image; for `rgba8`/`bgra8` also returns the alpha channel as a binary mask, unless
/// it is the same everywhere (opaque camera frames: no mask).
pub fn decode_rgb(raw: &RawImage) -> Result<(RgbImage, Option<GrayImage>)> {
    let ch = channels(&raw.encoding).ok_or_else(|| {
        Error::InvalidInput(format!(
            "unsupported image encoding `{}` (expected one of {})",
            raw.encoding,
            IMAGE_ENCODINGS.join(", ")
        ))
    })?;
    check_layout(raw, ch)?;
    let (w, h) = (raw.width, raw.height);
    let bgr = raw.encoding.starts_with("bgr");
    let mut rgb = RgbImage::new(w, h);
    let mut alpha = (ch == 4).then(|| GrayImage::new(w, h));
    for y in 0..h {
        let row = &raw.data[y as usize * raw.step as usize..];
        for x in 0..w {
            let p = &row[x as usize * ch..x as usize * ch + ch];
            let px = match ch {
                1 => [p[0], p[0], p[0]],
                _ if bgr => [p[2], p[1], p[0]],
                _ => [p[0], p[1], p[2]],
            };
            rgb.put_pixel(x, y, image::Rgb(px));
            if let Some(a) = alpha.as_mut() {
                a.put_pixel(x, y, image::Luma([if p[3] >= 128 { 255 } else { 0 }]));
            }
        }
    }
    Ok((rgb, alpha.and_then(crate::collection::informative_mask)))
}

/// Decodes a mask (`mono8`/`8UC1`): values >= 128 are object.
pub fn decode_mask(raw: &RawImage) -> Result<GrayImage> {
    if channels(&raw.encoding) != Some(1) {
        return Err(Error::InvalidInput(format!("unsupported mask encoding `{}` (expected mono8)", raw.encoding)));
    }
    check_layout(raw, 1)?;
    Ok(GrayImage::from_fn(raw.width, raw.height, |x, y| {
        let v = raw.data[y as usize * raw.step as usize + x as usize];
        image::Luma([if v >= 128 { 255 } else { 0 }])
    }))
}

/// Intrinsics from a `sensor_msgs/CameraInfo` K (row-major). `Ok(None)` when K is all zero
/// (uncalibrated: the FoV is estimated); an error for NaN/inf, non-positive focal lengths, or a size
/// that differs from the image's.
pub fn intrinsics_from_camera_info(k: &[f64; 9], info_size: (u32, u32), image_size: (u32, u32)) -> Result<Option<Intrinsics>> {
    if k.iter().all(|v| *v == 0.0) {
        return Ok(None);
    }
    if info_size != (0, 0) && info_size != image_size {
        return Err(Error::InvalidInput(format!(
            "camera_info is for {}x{} but the image is {}x{}",
            info_size.0, info_size.1, image_size.0, image_size.1
        )));
    }
    let m = nalgebra::Matrix3::from_row_slice(k);
    Intrinsics::from_matrix(&m, image_size.0, image_size.1).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(encoding: &str, w: u32, h: u32, ch: u32, pad: u32) -> RawImage {
        let step = w * ch + pad;
        let data = (0..step * h).map(|i| (i % 251) as u8).collect();
        RawImage { width: w, height: h, encoding: encoding.into(), step, data }
    }

    #[test]
    fn encodings_decode_to_the_same_colours() {
        let mut rgb = raw("rgb8", 5, 4, 3, 2);
        let (a, alpha) = decode_rgb(&rgb).unwrap();
        assert!(alpha.is_none());
        // Same pixels in BGR order.
        let mut bgr = rgb.clone();
        bgr.encoding = "bgr8".into();
        for y in 0..4usize {
            for x in 0..5usize {
                let o = y * rgb.step as usize + x * 3;
                bgr.data.swap(o, o + 2);
            }
        }
        assert_eq!(decode_rgb(&bgr).unwrap().0, a);
        // Padding bytes are skipped: pixel (0,1) starts at step.
        assert_eq!(a.get_pixel(0, 1).0[0], rgb.data[rgb.step as usize]);
        let mut rgba = raw("rgba8", 3, 3, 4, 0);
        rgba.data[3] = 200; // pixel (0,0) is object, the others (alpha < 128) background
        let (_, alpha) = decode_rgb(&rgba).unwrap();
        let alpha = alpha.unwrap();
        assert_eq!((alpha.get_pixel(0, 0).0[0], alpha.get_pixel(1, 0).0[0]), (255, 0));
        // An opaque (or fully transparent) alpha channel is no mask.
        for a in [255u8, 0] {
            for k in (3..rgba.data.len()).step_by(4) {
                rgba.data[k] = a;
            }
            assert!(decode_rgb(&rgba).unwrap().1.is_none(), "alpha {a} everywhere");
        }
        rgb.encoding = "mono8".into();
        rgb.step = 5;
        let (g, _) = decode_rgb(&rgb).unwrap();
        assert_eq!(g.get_pixel(1, 0).0, [rgb.data[1]; 3]);
    }

    #[test]
    fn bad_frames_give_clear_errors() {
        let err = decode_rgb(&raw("16UC1", 4, 4, 2, 0)).unwrap_err().to_string();
        assert!(err.contains("16UC1") && err.contains("rgb8"), "{err}");
        assert!(decode_rgb(&raw("yuv422", 4, 4, 2, 0)).unwrap_err().to_string().contains("yuv422"));
        let mut truncated = raw("rgb8", 8, 8, 3, 0);
        truncated.data.truncate(10);
        assert!(decode_rgb(&truncated).unwrap_err().to_string().contains("truncated"));
        let mut short_step = raw("rgb8", 8, 8, 3, 0);
        short_step.step = 5;
        assert!(decode_rgb(&short_step).is_err());
        assert!(decode_rgb(&raw("rgb8", 0, 8, 3, 0)).is_err());
        assert!(decode_mask(&raw("rgb8", 4, 4, 3, 0)).unwrap_err().to_string().contains("mono8"));
    }

    #[test]
    fn camera_info_validation() {
        let zero = [0.0; 9];
        assert_eq!(intrinsics_from_camera_info(&zero, (64, 48), (64, 48)).unwrap(), None);
        let k = [50.0, 0.0, 32.0, 0.0, 50.0, 24.0, 0.0, 0.0, 1.0];
        assert_eq!(intrinsics_from_camera_info(&k, (64, 48), (64, 48)).unwrap().unwrap().fx, 50.0);
        let mut nan = k;
        nan[0] = f64::NAN;
        assert!(intrinsics_from_camera_info(&nan, (64, 48), (64, 48)).is_err());
        assert!(intrinsics_from_camera_info(&k, (640, 480), (64, 48)).is_err());
        let mut neg = k;
        neg[4] = -1.0;
        assert!(intrinsics_from_camera_info(&neg, (64, 48), (64, 48)).is_err());
    }
}
