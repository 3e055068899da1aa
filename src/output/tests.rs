use image::{Rgb, RgbImage};

use super::*;

use crate::test_util::collection_dir as data_dir;

#[test]
fn nocs_png_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let (w, h) = (13u32, 7u32);
    let n = (w * h) as usize;
    let nocs: Vec<[f32; 3]> =
        (0..n).map(|k| [k as f32 / n as f32, (k as f32 * 0.37).fract(), (k as f32 * 0.713).sin().abs()]).collect();
    let mask: Vec<bool> = (0..n).map(|k| k % 5 != 0).collect();
    let path = tmp.path().join("sub/dir/nocs.png");
    write_nocs_png(&path, w, h, &nocs, &mask).unwrap();
    let (rw, rh, back) = read_nocs_png(&path).unwrap();
    assert_eq!((rw, rh), (w, h));
    for k in 0..n {
        for c in 0..3 {
            let want = if mask[k] { nocs[k][c] } else { 0.0 };
            assert!((back[k][c] - want).abs() <= 0.5 / 65535.0 + 1e-7, "{k} {c}: {} vs {want}", back[k][c]);
        }
    }
    // Clamping, NaN, size mismatch.
    let mut odd = nocs.clone();
    odd[1] = [1.5, -0.2, 0.5];
    write_nocs_png(&path, w, h, &odd, &mask).unwrap();
    let (_, _, back) = read_nocs_png(&path).unwrap();
    assert_eq!(back[1], [1.0, 0.0, 32768.0 / 65535.0]);
    odd[1] = [f32::NAN, 0.0, 0.0];
    assert!(matches!(write_nocs_png(&path, w, h, &odd, &mask), Err(Error::InvalidInput(_))));
    odd[1] = [0.0; 3];
    assert!(write_nocs_png(&path, w + 1, h, &odd, &mask).is_err());
    // An 8-bit PNG is refused.
    let p8 = tmp.path().join("eight.png");
    RgbImage::new(4, 4).save(&p8).unwrap();
    assert!(matches!(read_nocs_png(&p8), Err(Error::Image { .. })));
}

#[test]
fn reads_shipped_gt_nocs_at_16_bit() {
    let (w, h, v) = read_nocs_png(&data_dir("duck").join("nocs/000.png")).unwrap();
    assert_eq!((w, h), (320, 240));
    assert!(v.iter().flatten().all(|&x| (0.0..=1.0).contains(&x)));
    let nonzero = v.iter().filter(|p| p.iter().any(|&x| x > 0.0)).count();
    assert!(nonzero > 1000, "{nonzero}");
    // 16-bit precision: many values are not multiples of 1/255 (i.e. the raw value is not a multiple of 257).
    let fine = v.iter().flatten().filter(|&&x| !((x * 65535.0).round() as u32).is_multiple_of(257)).count();
    assert!(fine > nonzero, "{fine}");
    // Background (by mask) is zero, and the object's NOCS span a good part of [0,1].
    let mask = crate::collection::load_mask(&data_dir("duck").join("mask/000.png")).unwrap();
    for (k, p) in v.iter().enumerate() {
        if mask.as_raw()[k] == 0 {
            assert_eq!(*p, [0.0; 3]);
        }
    }
    let max_x = v.iter().map(|p| p[0]).fold(0.0f32, f32::max);
    assert!(max_x > 0.5);
    let (_, _, v2) = read_nocs_png(&data_dir("chairs-mixed").join("nocs/010.png")).unwrap();
    assert!(v2.iter().flatten().all(|&x| (0.0..=1.0).contains(&x)));
}

#[test]
fn nocs_color_picture() {
    let nocs = vec![[1.0, 0.5, 0.0], [0.2, 0.2, 0.2], [f32::NAN, 2.0, -1.0], [0.3; 3]];
    let img = nocs_color_image(2, 2, &nocs, &[true, false, true, true]);
    assert_eq!(img.get_pixel(0, 0), &Rgb([255, 128, 0]));
    assert_eq!(img.get_pixel(1, 0), &Rgb([0, 0, 0]));
    assert_eq!(img.get_pixel(0, 1), &Rgb([0, 255, 0]));
    // Short slices do not panic.
    let img = nocs_color_image(3, 3, &nocs, &[true]);
    assert_eq!(img.dimensions(), (3, 3));
}

#[test]
fn overlay_outline_is_on_disc_border() {
    let (w, h) = (64u32, 48u32);
    let (cx, cy, r) = (30.0f32, 22.0f32, 12.5f32);
    let inside = |x: i64, y: i64| {
        x >= 0 && y >= 0 && x < w as i64 && y < h as i64 && ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt() <= r
    };
    let alpha: Vec<f32> = (0..w * h).map(|k| if inside((k % w) as i64, (k / w) as i64) { 1.0 } else { 0.0 }).collect();
    let colour = vec![[0.0, 0.0, 1.0]; (w * h) as usize];
    let base = RgbImage::from_pixel(w, h, Rgb([100, 100, 100]));
    let out = overlay(&base, &colour, &alpha, 0.5);
    let mut n_border = 0;
    for y in 0..h as i64 {
        for x in 0..w as i64 {
            let border = inside(x, y) && [(1, 0), (-1, 0), (0, 1), (0, -1)].iter().any(|(dx, dy)| !inside(x + dx, y + dy));
            let p = out.get_pixel(x as u32, y as u32);
            assert_eq!(p == &Rgb(OUTLINE_COLOR), border, "pixel ({x},{y})");
            if border {
                n_border += 1;
            } else if inside(x, y) {
                assert_eq!(p, &Rgb([50, 50, 178]));
            } else {
                assert_eq!(p, &Rgb([100, 100, 100]));
            }
        }
    }
    // The outline is a closed ring of roughly the disc's circumference.
    assert!(n_border > 60 && n_border < 110, "{n_border}");
    // Mismatched lengths do not panic.
    assert_eq!(overlay(&base, &[], &alpha[..10], 1.0).dimensions(), (w, h));
}

#[test]
fn contact_sheet_layout() {
    let imgs = vec![
        RgbImage::from_pixel(100, 50, Rgb([255, 0, 0])),
        RgbImage::from_pixel(20, 40, Rgb([0, 255, 0])),
        RgbImage::from_pixel(30, 30, Rgb([0, 0, 255])),
    ];
    let sheet = contact_sheet(&imgs, 2, 32);
    assert_eq!(sheet.dimensions(), (2 * 36 + 4, 2 * 36 + 4));
    // First thumb: 32x16 centred vertically in its cell at (4,4): red at the middle, grey above.
    assert_eq!(sheet.get_pixel(4 + 16, 4 + 16), &Rgb([255, 0, 0]));
    assert_eq!(sheet.get_pixel(4 + 16, 4 + 2), &Rgb(SHEET_BACKGROUND));
    // Second: 16x32 in the cell at (40,4): green centre, grey at the left edge.
    assert_eq!(sheet.get_pixel(40 + 16, 4 + 16), &Rgb([0, 255, 0]));
    assert_eq!(sheet.get_pixel(40 + 2, 4 + 16), &Rgb(SHEET_BACKGROUND));
    assert_eq!(sheet.get_pixel(4 + 16, 40 + 16), &Rgb([0, 0, 255]));
    let empty = contact_sheet(&[], 4, 64);
    assert!(empty.width() > 0 && empty.height() > 0);
    assert!(contact_sheet(&imgs, 0, 0).width() > 0);
    assert!(contact_sheet(&[RgbImage::new(0, 0)], 3, 10).width() > 0);
}

#[test]
fn save_png_creates_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("a/b/c.png");
    let img = RgbImage::from_pixel(3, 2, Rgb([1, 2, 3]));
    save_png(&img, &p).unwrap();
    assert_eq!(image::open(&p).unwrap().to_rgb8(), img);
    // A file where a folder should be: an I/O error.
    let blocked = tmp.path().join("a/b/c.png/d.png");
    assert!(matches!(save_png(&img, &blocked), Err(Error::Io { .. })));
}
