use std::path::{Path, PathBuf};

use image::{GrayImage, Luma, Rgb, RgbImage, Rgba, RgbaImage};
use nalgebra::{Point2, Point3};

use super::*;

use crate::test_util::collection_dir as data_dir;

fn json_of(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(data_dir(name).join("collection.json")).unwrap()).unwrap()
}

/// A grey image with a filled rectangle `x0..=x1, y0..=y1`.
fn rect_mask(w: u32, h: u32, x0: u32, y0: u32, x1: u32, y1: u32) -> GrayImage {
    GrayImage::from_fn(w, h, |x, y| Luma([if (x0..=x1).contains(&x) && (y0..=y1).contains(&y) { 255 } else { 0 }]))
}

#[test]
fn loads_duck_single_instance() {
    let c = Collection::load(&data_dir("duck")).unwrap();
    let j = json_of("duck");
    assert_eq!(c.kind, CollectionKind::SingleInstance);
    assert_eq!(c.name, "duck");
    assert_eq!(c.category, "toy");
    assert_eq!(c.images.len(), 40);
    assert!(c.template.as_ref().unwrap().is_absolute() && c.template.as_ref().unwrap().is_file());
    let (bmin, bmax) = c.canonical_bbox.unwrap();
    assert_eq!(bmin[0], j["canonical_frame"]["bbox_min"][0].as_f64().unwrap());
    assert_eq!(c.metres_per_unit, Some(1.0));
    for (i, e) in c.images.iter().enumerate() {
        assert_eq!(e.index, i);
        let gt = e.ground_truth.as_ref().unwrap();
        assert_eq!(gt.nocs_bbox_min, bmin);
        assert_eq!(gt.nocs_bbox_max, bmax);
        assert!(gt.instance_id.is_none());
        assert_eq!(e.intrinsics, Some(gt.intrinsics));
    }
    let e = &c.images[1];
    let jk = &j["images"][1]["K"];
    let k = e.intrinsics.unwrap();
    assert_eq!(k.fx, jk[0][0].as_f64().unwrap());
    assert_eq!(k.cx, jk[0][2].as_f64().unwrap());
    assert_eq!(k.cy, jk[1][2].as_f64().unwrap());
    assert_eq!((k.width, k.height), (e.width, e.height));
    // Pose: the full 4x4 agrees with the JSON.
    let m = e.ground_truth.as_ref().unwrap().camera_from_object.to_homogeneous();
    let jp = &j["images"][1]["camera_from_object"];
    for r in 0..4 {
        for col in 0..4 {
            assert!((m[(r, col)] - jp[r][col].as_f64().unwrap()).abs() < 1e-9, "({r},{col})");
        }
    }
    assert_eq!(e.rgb, PathBuf::from("rgb/001.png"));
    assert_eq!(e.mask.as_deref(), Some(Path::new("mask/001.png")));
    assert_eq!(e.nocs.as_deref(), Some(Path::new("nocs/001.png")));
}

#[test]
fn duck_ground_truth_projects_bbox_centre_into_mask() {
    // The object origin (bbox centre) projects inside the object's 2-D box for every image.
    let c = Collection::load(&data_dir("duck")).unwrap();
    for i in [0, 7, 23] {
        let img = c.load_image(i).unwrap();
        let gt = c.images[i].ground_truth.as_ref().unwrap();
        let p = gt.intrinsics.project(&(gt.camera_from_object * Point3::origin())).unwrap();
        let b = mask_bbox(&img.mask).unwrap();
        assert!(p.x > b.x_min && p.x < b.x_max && p.y > b.y_min && p.y < b.y_max, "image {i}: {p:?} {b:?}");
    }
}

#[test]
fn loads_chairs_mixed_cross_instance() {
    let c = Collection::load(&data_dir("chairs-mixed")).unwrap();
    let j = json_of("chairs-mixed");
    assert_eq!(c.kind, CollectionKind::CrossInstance);
    assert_eq!(c.images.len(), 40);
    let (cmin, cmax) = c.canonical_bbox.unwrap();
    let gt = c.images[0].ground_truth.as_ref().unwrap();
    assert_eq!(gt.instance_id.as_deref(), j["images"][0]["instance_id"].as_str());
    assert_eq!(gt.nocs_bbox_min[1], j["images"][0]["nocs_bbox_min"][1].as_f64().unwrap());
    assert_ne!(gt.nocs_bbox_min, cmin);
    assert_ne!(gt.nocs_bbox_max, cmax);
    assert_eq!(gt.intrinsics.fx, j["images"][0]["K"][0][0].as_f64().unwrap());
    assert!(
        (gt.camera_from_object.translation.vector.z - j["images"][0]["camera_from_object"][2][3].as_f64().unwrap()).abs() < 1e-12
    );
    let ids: std::collections::BTreeSet<_> =
        c.images.iter().map(|e| e.ground_truth.as_ref().unwrap().instance_id.clone().unwrap()).collect();
    assert_eq!(ids.len(), 10);
}

#[test]
fn loads_shipped_image_and_mask() {
    let c = Collection::load(&data_dir("chairs-mixed")).unwrap();
    let j = json_of("chairs-mixed");
    let img = c.load_image(0).unwrap();
    assert_eq!(img.rgb.dimensions(), (c.images[0].width, c.images[0].height));
    assert!(img.mask.pixels().all(|p| p[0] == 0 || p[0] == 255));
    let n = img.mask.pixels().filter(|p| p[0] == 255).count() as u64;
    assert_eq!(n, j["images"][0]["mask_pixels"].as_u64().unwrap());
    assert!(c.load_image(40).is_err());
}

fn write_json(dir: &Path, v: &serde_json::Value) {
    std::fs::write(dir.join("collection.json"), serde_json::to_string(v).unwrap()).unwrap();
}

#[test]
fn missing_field_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let mut v = json_of("duck");
    v["images"][0].as_object_mut().unwrap().remove("K");
    write_json(tmp.path(), &v);
    let err = Collection::load(tmp.path()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Collection { .. }), "{msg}");
    assert!(msg.contains("images[0].K") && msg.contains("collection.json"), "{msg}");

    let mut v = json_of("chairs-mixed");
    v["images"][3].as_object_mut().unwrap().remove("nocs_bbox_max");
    write_json(tmp.path(), &v);
    let msg = Collection::load(tmp.path()).unwrap_err().to_string();
    assert!(msg.contains("images[3].nocs_bbox_max"), "{msg}");

    let mut v = json_of("duck");
    v.as_object_mut().unwrap().remove("kind");
    write_json(tmp.path(), &v);
    let msg = Collection::load(tmp.path()).unwrap_err().to_string();
    assert!(msg.contains("`kind`"), "{msg}");
}

#[test]
fn wrong_types_and_bad_poses_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let mut v = json_of("duck");
    v["images"][2]["width"] = serde_json::json!("wide");
    write_json(tmp.path(), &v);
    let msg = Collection::load(tmp.path()).unwrap_err().to_string();
    assert!(msg.contains("images[2].width") && msg.contains("integer"), "{msg}");

    let mut v = json_of("duck");
    v["images"][5]["K"] = serde_json::json!([[1.0, 0.0], [0.0, 1.0]]);
    write_json(tmp.path(), &v);
    let msg = Collection::load(tmp.path()).unwrap_err().to_string();
    assert!(msg.contains("images[5].K") && msg.contains("3x3"), "{msg}");

    let mut v = json_of("duck");
    v["images"][4]["camera_from_object"][0][0] = serde_json::json!(1.5);
    write_json(tmp.path(), &v);
    let msg = Collection::load(tmp.path()).unwrap_err().to_string();
    assert!(msg.contains("orthonormal") && msg.contains("image 4") && msg.contains("rgb/004.png"), "{msg}");

    std::fs::write(tmp.path().join("collection.json"), "{ not json").unwrap();
    assert!(matches!(Collection::load(tmp.path()), Err(Error::Collection { .. })));
}

/// Real calibrations: a negligible skew (1e-4 fx) and fx != fy (0.3 %) are accepted (skew dropped,
/// both focal lengths kept); a skew of 0.1 fx, or fx and fy 2 % apart, is refused with a message naming
/// the image and file.
#[test]
fn real_calibrations_accept_negligible_skew_only() {
    let tmp = tempfile::tempdir().unwrap();
    let mut v = json_of("duck");
    let fx = v["images"][3]["K"][0][0].as_f64().unwrap();
    let fy = fx * 1.003;
    v["images"][3]["K"][0][1] = serde_json::json!(1e-4 * fx);
    v["images"][3]["K"][1][1] = serde_json::json!(fy);
    write_json(tmp.path(), &v);
    let c = Collection::load(tmp.path()).unwrap();
    let k = c.images[3].intrinsics.unwrap();
    assert_eq!((k.fx, k.fy), (fx, fy));
    assert_eq!(k.matrix()[(0, 1)], 0.0);

    v["images"][3]["K"][0][1] = serde_json::json!(0.1 * fx);
    write_json(tmp.path(), &v);
    let msg = Collection::load(tmp.path()).unwrap_err().to_string();
    assert!(msg.contains("rgb/003.png") && msg.contains("images[3].K") && msg.contains("skew"), "{msg}");
    assert!(msg.contains("collection.json"), "{msg}");

    // The same rule for camera_info-style matrices.
    let m = |s: f64| nalgebra::Matrix3::new(fx, s, 64.0, 0.0, fy, 64.0, 0.0, 0.0, 1.0);
    assert!(crate::geometry::Intrinsics::from_matrix(&m(0.9e-3 * fx), 128, 128).is_ok());
    assert!(crate::geometry::Intrinsics::from_matrix(&m(1.1e-3 * fx), 128, 128).is_err());

    // Non-square pixels beyond 1 % would be rendered wrong (rays use the mean focal length): refused,
    // naming the image.
    v["images"][3]["K"][0][1] = serde_json::json!(0.0);
    v["images"][3]["K"][1][1] = serde_json::json!(fx * 1.02);
    write_json(tmp.path(), &v);
    let msg = Collection::load(tmp.path()).unwrap_err().to_string();
    assert!(msg.contains("rgb/003.png") && msg.contains("square pixels"), "{msg}");
    let aspect = |r: f64| nalgebra::Matrix3::new(fx, 0.0, 64.0, 0.0, fx * r, 64.0, 0.0, 0.0, 1.0);
    assert!(crate::geometry::Intrinsics::from_matrix(&aspect(1.009), 128, 128).is_ok());
    assert!(crate::geometry::Intrinsics::from_matrix(&aspect(0.989), 128, 128).is_err());
}

/// A copy of image 0 of the duck collection, as a one-image collection in `dir`.
fn one_image_collection(dir: &Path) -> Collection {
    std::fs::create_dir_all(dir.join("rgb")).unwrap();
    std::fs::create_dir_all(dir.join("mask")).unwrap();
    std::fs::copy(data_dir("duck").join("rgb/000.png"), dir.join("rgb/000.png")).unwrap();
    std::fs::copy(data_dir("duck").join("mask/000.png"), dir.join("mask/000.png")).unwrap();
    let mut v = json_of("duck");
    let im0 = v["images"][0].clone();
    v["images"] = serde_json::json!([im0]);
    write_json(dir, &v);
    Collection::load(dir).unwrap()
}

#[test]
fn image_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let c = one_image_collection(tmp.path());
    let (w, h) = (c.images[0].width, c.images[0].height);
    c.load_image(0).unwrap();
    let rgb = tmp.path().join("rgb/000.png");
    let mask = tmp.path().join("mask/000.png");
    let good_png = std::fs::read(&rgb).unwrap();

    // Truncated PNG.
    std::fs::write(&rgb, &good_png[..good_png.len() / 2]).unwrap();
    let err = c.load_image(0).unwrap_err();
    assert!(matches!(err, Error::Image { ref path, .. } if path == &rgb), "{err}");
    // Random bytes.
    let junk: Vec<u8> = (0..5000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(&rgb, &junk).unwrap();
    let err = c.load_image(0).unwrap_err();
    assert!(matches!(err, Error::Image { .. }), "{err}");
    // Missing file.
    std::fs::remove_file(&rgb).unwrap();
    let err = c.load_image(0).unwrap_err();
    assert!(matches!(err, Error::Image { .. }) && err.to_string().contains("000.png"), "{err}");
    std::fs::write(&rgb, &good_png).unwrap();

    // Mask of the wrong size.
    rect_mask(w / 2, h, 10, 10, 20, 20).save(&mask).unwrap();
    let err = c.load_image(0).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Mask { .. }), "{msg}");
    assert!(msg.contains(&format!("{}x{h}", w / 2)) && msg.contains(&format!("{w}x{h}")), "{msg}");
    // Empty mask.
    GrayImage::new(w, h).save(&mask).unwrap();
    let msg = c.load_image(0).unwrap_err().to_string();
    assert!(msg.contains("mask is empty"), "{msg}");
    // Full mask.
    GrayImage::from_pixel(w, h, Luma([255])).save(&mask).unwrap();
    let msg = c.load_image(0).unwrap_err().to_string();
    assert!(msg.contains("mask covers the whole image"), "{msg}");
    // Grey mask values are thresholded at 128.
    GrayImage::from_fn(w, h, |x, _| Luma([if x < 5 { 200 } else { 127 }])).save(&mask).unwrap();
    let m = c.load_image(0).unwrap().mask;
    assert_eq!(m.get_pixel(4, 0)[0], 255);
    assert_eq!(m.get_pixel(5, 0)[0], 0);
    // Image of a size other than the recorded one.
    RgbImage::new(w + 1, h).save(&rgb).unwrap();
    let err = c.load_image(0).unwrap_err();
    assert!(matches!(err, Error::Image { .. }) && err.to_string().contains("collection says"), "{err}");
}

#[test]
fn plain_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    // b.JPG (no mask, no alpha), a.png (mask); a non-image file is ignored.
    RgbImage::from_pixel(30, 20, Rgb([200, 10, 10])).save_with_format(d.join("b.JPG"), image::ImageFormat::Jpeg).unwrap();
    RgbImage::from_pixel(16, 12, Rgb([10, 200, 10])).save(d.join("a.png")).unwrap();
    std::fs::write(d.join("notes.txt"), "hello").unwrap();
    std::fs::create_dir(d.join("masks")).unwrap();
    rect_mask(16, 12, 2, 3, 9, 8).save(d.join("masks/a.png")).unwrap();

    let c = Collection::load(d).unwrap();
    assert_eq!(c.kind, CollectionKind::Plain);
    assert_eq!(c.images.len(), 2);
    assert_eq!(c.images[0].rgb, PathBuf::from("a.png"));
    assert_eq!(c.images[1].rgb, PathBuf::from("b.JPG"));
    assert_eq!((c.images[0].width, c.images[0].height), (16, 12));
    assert_eq!((c.images[1].width, c.images[1].height), (30, 20));
    assert_eq!(c.images[0].mask.as_deref(), Some(Path::new("masks/a.png")));
    assert!(c.images[1].mask.is_none() && c.images[1].ground_truth.is_none() && c.template.is_none());

    let a = c.load_image(0).unwrap();
    assert_eq!(mask_bbox(&a.mask), Some(PixelBox { x_min: 2.0, y_min: 3.0, x_max: 9.0, y_max: 8.0 }));
    let err = c.load_image(1).unwrap_err();
    assert!(matches!(err, Error::Mask { .. }) && err.to_string().contains("no mask was found"), "{err}");
}

#[test]
fn plain_folder_rgb_subdir_and_alpha_mask() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::create_dir(d.join("rgb")).unwrap();
    let rgba = RgbaImage::from_fn(10, 10, |x, y| Rgba([1, 2, 3, if x > 3 && y > 4 { 255 } else { 0 }]));
    rgba.save(d.join("rgb/x.png")).unwrap();
    RgbImage::new(5, 5).save(d.join("ignored.png")).unwrap();
    let c = Collection::load(d).unwrap();
    assert_eq!(c.images.len(), 1);
    assert_eq!(c.images[0].rgb, PathBuf::from("rgb/x.png"));
    let li = c.load_image(0).unwrap();
    assert_eq!(mask_bbox(&li.mask), Some(PixelBox { x_min: 4.0, y_min: 5.0, x_max: 9.0, y_max: 9.0 }));
    assert_eq!(li.rgb.get_pixel(0, 0), &Rgb([1, 2, 3]));
}

#[test]
fn plain_folder_without_a_readable_image_names_one() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("a.png"), b"").unwrap();
    std::fs::write(tmp.path().join("b.jpg"), b"not a jpeg").unwrap();
    let err = Collection::load(tmp.path()).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, Error::Collection { .. }) && msg.contains("none of the 2 image files") && msg.contains("a.png"),
        "{msg}"
    );
}

#[test]
fn empty_and_missing_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let err = Collection::load(tmp.path()).unwrap_err();
    assert!(matches!(err, Error::Collection { .. }) && err.to_string().contains("no images"), "{err}");
    assert!(matches!(Collection::load(&tmp.path().join("nope")), Err(Error::Collection { .. })));
}

#[test]
fn load_mask_standalone() {
    let tmp = tempfile::tempdir().unwrap();
    let m = load_mask(&data_dir("duck").join("mask/000.png")).unwrap();
    assert!(m.pixels().any(|p| p[0] == 255));
    let bad = tmp.path().join("bad.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nxxxx").unwrap();
    assert!(matches!(load_mask(&bad), Err(Error::Mask { .. })));
}

#[test]
fn mask_bbox_of_rectangle_is_exact() {
    let m = rect_mask(50, 40, 7, 11, 30, 12);
    let b = mask_bbox(&m).unwrap();
    assert_eq!(b, PixelBox { x_min: 7.0, y_min: 11.0, x_max: 30.0, y_max: 12.0 });
    assert_eq!((b.width(), b.height()), (23.0, 1.0));
    assert_eq!(b.centre(), Point2::new(18.5, 11.5));
    assert!(mask_bbox(&GrayImage::new(5, 5)).is_none());
}

#[test]
fn crop_transforms_are_inverse() {
    let b = PixelBox { x_min: 7.0, y_min: 11.0, x_max: 30.0, y_max: 12.0 };
    let c = SquareCrop::around(&b, 0.1, 64).unwrap();
    assert!((c.side - 24.0 * 1.2).abs() < 1e-12);
    assert_eq!((c.centre_x, c.centre_y), (18.5, 11.5));
    for p in [Point2::new(0.0, 0.0), Point2::new(18.5, 11.5), Point2::new(-3.25, 100.75)] {
        let q = c.crop_from_image(p);
        assert!((c.image_from_crop(q) - p).norm() < 1e-12);
        assert!((c.crop_from_image(c.image_from_crop(p)) - p).norm() < 1e-12);
    }
    // Crop centre maps to the box centre; the crop's outer edges map to the window's edges.
    let h = 31.5;
    assert!((c.image_from_crop(Point2::new(h, h)) - Point2::new(18.5, 11.5)).norm() < 1e-12);
    let edge = c.image_from_crop(Point2::new(-0.5, -0.5));
    assert!((edge - Point2::new(18.5 - c.side / 2.0, 11.5 - c.side / 2.0)).norm() < 1e-12);
    let s = c.sample_pixels();
    assert_eq!(s.len(), 64 * 64);
    assert!((s[1] - s[0]).x - c.side / 64.0 < 1e-12);
    assert!((c.crop_from_image(s[64 * 3 + 5]) - Point2::new(5.0, 3.0)).norm() < 1e-9);
    // One-pixel box is not degenerate; bad arguments are errors.
    let one = PixelBox { x_min: 4.0, y_min: 4.0, x_max: 4.0, y_max: 4.0 };
    assert_eq!(SquareCrop::around(&one, 0.0, 8).unwrap().side, 1.0);
    assert!(SquareCrop::around(&one, 0.1, 0).is_err());
    assert!(SquareCrop::around(&one, f64::NAN, 8).is_err());
}

#[test]
fn resample_mask_and_rgb() {
    // Filled square 20..=59 in a 100x100 image.
    let m = rect_mask(100, 100, 20, 20, 59, 59);
    let inside = SquareCrop { centre_x: 39.5, centre_y: 39.5, side: 30.0, size: 16 };
    assert!(inside.resample_mask(&m).iter().all(|&v| (v - 1.0).abs() < 1e-6));
    let outside = SquareCrop { centre_x: 85.0, centre_y: 85.0, side: 20.0, size: 8 };
    assert!(outside.resample_mask(&m).iter().all(|&v| v == 0.0));
    // Off-image area counts as 0; the tight crop covers the square with ~full coverage in the middle.
    let tight = SquareCrop::around(&mask_bbox(&m).unwrap(), 0.25, 60).unwrap();
    let r = tight.resample_mask(&m);
    assert_eq!(r.len(), 3600);
    let total: f32 = r.iter().sum::<f32>() * (tight.side as f32 / 60.0).powi(2);
    assert!((total - 1600.0).abs() < 40.0, "{total}");
    assert_eq!(r[30 * 60 + 30], 1.0);
    assert_eq!(r[0], 0.0);
    let off = SquareCrop { centre_x: -50.0, centre_y: 10.0, side: 20.0, size: 4 };
    assert!(off.resample_mask(&GrayImage::from_pixel(10, 10, Luma([255]))).iter().all(|&v| v == 0.0));

    let rgb = RgbImage::from_pixel(100, 100, Rgb([255, 128, 0]));
    let cols = inside.resample_rgb(&rgb);
    assert_eq!(cols.len(), 256);
    for c in &cols {
        assert!((c[0] - 1.0).abs() < 1e-5 && (c[1] - 128.0 / 255.0).abs() < 1e-5 && c[2].abs() < 1e-6);
    }
    assert!(off.resample_rgb(&rgb).iter().all(|c| *c == [0.0; 3]));
}
