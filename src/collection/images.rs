//! Decoding colour images and masks from disk, with errors that name the file.

use std::path::Path;

use image::{DynamicImage, GrayImage, ImageError, ImageReader, RgbImage};

use crate::error::{Error, Result};

/// Converts an `image` error on `path` into [`Error::Image`] (missing, unreadable, corrupt or truncated file).
pub(crate) fn image_error(path: &Path, e: ImageError) -> Error {
    let message = match e {
        ImageError::IoError(io) if io.kind() == std::io::ErrorKind::NotFound => "file not found".to_owned(),
        ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            format!("truncated image file ({io})")
        }
        ImageError::IoError(io) => format!("cannot read the file: {io}"),
        ImageError::Decoding(d) => format!("corrupt or truncated image, decoder says: {d}"),
        ImageError::Unsupported(u) => format!("unsupported image format (expected PNG or JPEG): {u}"),
        ImageError::Limits(l) => format!("image too large to decode: {l}"),
        other => other.to_string(),
    };
    Error::Image { path: path.to_path_buf(), message }
}

/// Decodes any PNG/JPEG file (format guessed from the content, then the extension).
pub fn load_dynamic(path: &Path) -> Result<DynamicImage> {
    let reader = ImageReader::open(path).map_err(|e| image_error(path, ImageError::IoError(e)))?;
    let reader = reader.with_guessed_format().map_err(|e| image_error(path, ImageError::IoError(e)))?;
    reader.decode().map_err(|e| image_error(path, e))
}

/// Loads a colour image of any PNG/JPEG colour type as 8-bit RGB (alpha is dropped).
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    Ok(load_dynamic(path)?.to_rgb8())
}

/// Binarises a decoded mask image: grey value (any bit depth, scaled to 8 bits) `>= 128` becomes 255,
/// everything else 0. Colour masks are converted to luminance first.
pub fn decode_mask(img: &DynamicImage) -> GrayImage {
    let mut g = img.to_luma8();
    binarise(&mut g);
    g
}

/// A binary mask (0/255) from the alpha channel of an image (`alpha >= 128`), or `None` if the image has
/// no alpha channel or one that marks every pixel alike (an opaque export or camera image: no mask, so
/// a mask file or the segmenter decides).
pub fn mask_from_alpha(img: &DynamicImage) -> Option<GrayImage> {
    if !img.color().has_alpha() {
        return None;
    }
    let rgba = img.to_rgba8();
    informative_mask(GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        image::Luma([if rgba.get_pixel(x, y)[3] >= 128 { 255 } else { 0 }])
    }))
}

/// The mask, or `None` when all its pixels are alike (all object or all background: such an alpha
/// channel says nothing about where the object is).
pub fn informative_mask(mask: GrayImage) -> Option<GrayImage> {
    let first = mask.as_raw().first().copied()?;
    mask.as_raw().iter().any(|&v| v != first).then_some(mask)
}

/// Sets every pixel `>= 128` to 255 and the rest to 0.
pub fn binarise(mask: &mut GrayImage) {
    for p in mask.pixels_mut() {
        p[0] = if p[0] >= 128 { 255 } else { 0 };
    }
}

/// Loads a mask file (8-bit grey PNG expected; other types are converted) as a binary 0/255 image.
/// Decoding failures are reported as [`Error::Mask`] naming the file.
pub fn load_mask(path: &Path) -> Result<GrayImage> {
    match load_dynamic(path) {
        Ok(img) => Ok(decode_mask(&img)),
        Err(Error::Image { path, message }) => Err(Error::Mask { path, message }),
        Err(e) => Err(e),
    }
}

/// Checks that a binary mask is usable: same size as its image, neither empty nor covering every pixel.
/// `path` names the mask (or its source) in the error.
pub fn validate_mask(mask: &GrayImage, image_width: u32, image_height: u32, path: &Path) -> Result<()> {
    if mask.dimensions() != (image_width, image_height) {
        return Err(Error::Mask {
            path: path.to_path_buf(),
            message: format!(
                "mask is {}x{} but the image is {image_width}x{image_height}; they must be the same size",
                mask.width(),
                mask.height()
            ),
        });
    }
    let set = mask.pixels().filter(|p| p[0] >= 128).count();
    if set == 0 {
        return Err(Error::Mask { path: path.to_path_buf(), message: "mask is empty (no object pixel)".into() });
    }
    if set == mask.pixels().len() {
        return Err(Error::Mask {
            path: path.to_path_buf(),
            message: "mask covers the whole image (every pixel is object; the object must not fill the frame)".into(),
        });
    }
    Ok(())
}
