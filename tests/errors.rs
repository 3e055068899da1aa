//! Bad input gives clear errors; bad images are skipped with their reason, never fatal while
//! good ones remain.

mod common;

use std::path::Path;

use congeal::collection::Collection;
use congeal::config::Config;
use congeal::congeal::pipeline::{no_progress, run};
use congeal::shape::ShapeSpec;

fn demo_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = common::demo_collection();
    for sub in ["", "rgb", "mask", "nocs"] {
        let from = src.join(sub);
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        for e in std::fs::read_dir(&from).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                std::fs::copy(e.path(), dir.path().join(sub).join(e.file_name())).unwrap();
            }
        }
    }
    dir
}

fn tiny() -> Config {
    Config::from_yaml_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tiny.yaml")).unwrap()
}

#[test]
fn bad_images_are_skipped_with_their_reason() {
    let dir = demo_copy();
    let p = dir.path();
    std::fs::write(p.join("rgb/000.png"), b"definitely not a png").unwrap(); // corrupt
    std::fs::remove_file(p.join("rgb/005.png")).unwrap(); // missing
    image::GrayImage::new(10, 10).save(p.join("mask/010.png")).unwrap(); // wrong size
    image::GrayImage::new(256, 256).save(p.join("mask/015.png")).unwrap(); // empty (if 256x256)
    let collection = Collection::load(p).unwrap();
    let out = tempfile::tempdir().unwrap();
    let result = run(&collection, &ShapeSpec::Template(None), &tiny(), out.path(), &no_progress).unwrap();
    let reason = |f: &str| result.skipped.iter().find(|s| s.file == f).map(|s| s.reason.clone());
    let r0 = reason("rgb/000.png").expect("corrupt image skipped");
    assert!(r0.contains("000.png"), "{r0}");
    let r5 = reason("rgb/005.png").expect("missing image skipped");
    assert!(r5.contains("005.png"), "{r5}");
    let r10 = reason("rgb/010.png").expect("wrong-size mask skipped");
    assert!(r10.contains("10x10") || r10.contains("size"), "{r10}");
    let r15 = reason("rgb/015.png").expect("empty/wrong mask skipped");
    assert!(r15.contains("mask"), "{r15}");
    assert_eq!(result.images.len() + result.skipped.len(), collection.images.len());
    assert_eq!(result.images.len(), collection.images.len() - 4);
    for im in &result.images {
        assert!(im.camera_from_object.iter().flatten().all(|v| v.is_finite()));
    }
}

#[test]
fn no_usable_image_is_an_error() {
    let dir = demo_copy();
    for e in std::fs::read_dir(dir.path().join("mask")).unwrap() {
        image::GrayImage::new(4, 4).save(e.unwrap().path()).unwrap();
    }
    let collection = Collection::load(dir.path()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let err = run(&collection, &ShapeSpec::Template(None), &tiny(), out.path(), &no_progress).unwrap_err();
    assert!(err.to_string().contains("no usable image"), "{err}");
}

#[test]
fn collection_json_missing_field_names_it() {
    let dir = demo_copy();
    let path = dir.path().join("collection.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["images"][1].as_object_mut().unwrap().remove("camera_from_object");
    std::fs::write(&path, serde_json::to_string(&json).unwrap()).unwrap();
    let err = Collection::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("camera_from_object") && err.contains("collection.json"), "{err}");
}

#[test]
fn missing_template_and_unknown_sources_are_clear_errors() {
    let dir = demo_copy();
    std::fs::remove_file(dir.path().join("template.obj")).unwrap();
    let collection = Collection::load(dir.path()).unwrap();
    let out = tempfile::tempdir().unwrap();
    let err = run(&collection, &ShapeSpec::Template(None), &tiny(), out.path(), &no_progress).unwrap_err();
    assert!(err.to_string().contains("template"), "{err}");
    let bad = ShapeSpec::Template(Some(dir.path().join("nope.obj")));
    let err = run(&collection, &bad, &tiny(), out.path(), &no_progress).unwrap_err();
    assert!(err.to_string().contains("nope.obj"), "{err}");
    assert!("splines".parse::<ShapeSpec>().is_err());
}

#[test]
fn config_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.yaml");
    std::fs::write(&p, "pose_init:\n  azimuthz: 3\n").unwrap();
    let err = Config::from_yaml_file(&p).unwrap_err().to_string();
    assert!(err.contains("azimuthz"), "{err}");
    std::fs::write(&p, "device: tpu\n").unwrap();
    let err = Config::from_yaml_file(&p).unwrap_err().to_string();
    assert!(err.contains("tpu"), "{err}");
    std::fs::write(&p, "pose_refine:\n  lr: .nan\n").unwrap();
    assert!(Config::from_yaml_file(&p).is_err());
    for profile in ["default", "fast", "fast_224", "tiny"] {
        Config::from_yaml_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("config/{profile}.yaml"))).unwrap();
    }
}

#[test]
fn missing_or_wrong_weights_are_clear_errors() {
    let collection = Collection::load(&common::demo_collection()).unwrap();
    let out = tempfile::tempdir().unwrap();
    // Missing DINOv2 weights: the error names the file and how to get it.
    let mut config = tiny();
    config.features.weights = "/nonexistent/dinov2.safetensors".into();
    let err = run(&collection, &ShapeSpec::Template(None), &config, out.path(), &no_progress).unwrap_err().to_string();
    assert!(err.contains("/nonexistent/dinov2.safetensors") && err.contains("setup_weights.sh"), "{err}");
    // A file that is not DINOv2 (the U^2-Net-p weights): names the path and what is missing.
    let mut config = tiny();
    config.features.weights = congeal::config::resolve_weights("weights/u2netp.safetensors").unwrap().display().to_string();
    let err = run(&collection, &ShapeSpec::Template(None), &config, out.path(), &no_progress).unwrap_err().to_string();
    assert!(err.contains("u2netp.safetensors"), "{err}");
    // Without features (silhouette scoring, no coordinate maps) no weights are needed at all.
    let mut config = tiny();
    config.features.weights = "/nonexistent/dinov2.safetensors".into();
    config.pose_init.score = congeal::config::PoseScore::Iou;
    config.coord_maps.enabled = false;
    run(&collection, &ShapeSpec::Template(None), &config, out.path(), &no_progress).unwrap();
}

#[test]
fn images_without_masks_get_built_in_masks() {
    // A plain folder of images without masks: U^2-Net-p masks them and the run poses them.
    let src = common::demo_collection();
    let dir = tempfile::tempdir().unwrap();
    for k in [0, 5, 10] {
        std::fs::copy(src.join(format!("rgb/{k:03}.png")), dir.path().join(format!("{k:03}.png"))).unwrap();
    }
    // An RGBA export with an opaque alpha channel: the alpha says nothing, so the segmenter masks it
    // (it was read as a mask covering the whole image, and the image skipped).
    let opaque = image::open(src.join("rgb/015.png")).unwrap().to_rgba8();
    assert!(opaque.pixels().all(|p| p[3] == 255));
    opaque.save(dir.path().join("015.png")).unwrap();
    // Files that are no image at all (an interrupted download, an empty file) are left out of the
    // folder with their reason and reported as skipped; they do not stop the run.
    std::fs::write(dir.path().join("empty.png"), b"").unwrap();
    let png = std::fs::read(src.join("rgb/000.png")).unwrap();
    std::fs::write(dir.path().join("cut.jpg"), &png[..12]).unwrap();
    let collection = Collection::load(dir.path()).unwrap();
    assert!(collection.images.iter().all(|e| e.mask.is_none()));
    assert_eq!(collection.images.len(), 4);
    let unreadable: Vec<_> = collection.unreadable.iter().map(|(f, _)| f.to_string_lossy().to_string()).collect();
    assert_eq!(unreadable, ["cut.jpg", "empty.png"]);
    let out = tempfile::tempdir().unwrap();
    let result =
        run(&collection, &ShapeSpec::Template(Some(src.join("template.obj"))), &tiny(), out.path(), &no_progress).unwrap();
    assert_eq!(result.images.len(), 4, "skipped: {:?}", result.skipped);
    for f in ["empty.png", "cut.jpg"] {
        let s = result.skipped.iter().find(|s| s.file == f).unwrap_or_else(|| panic!("{f} not reported: {:?}", result.skipped));
        assert!(s.reason.contains(f), "{}", s.reason);
    }
    // The computed masks are kept with the run and agree with the ground truth.
    for (im, k) in result.images.iter().zip([0, 5, 10, 15]) {
        let rel = im.mask.as_ref().expect("computed mask recorded in result.json");
        let mask = congeal::collection::load_mask(&out.path().join(rel)).unwrap();
        let gt = congeal::collection::load_mask(&src.join(format!("mask/{k:03}.png"))).unwrap();
        let (mut inter, mut union) = (0u32, 0u32);
        for (a, b) in mask.pixels().zip(gt.pixels()) {
            let (a, b) = (a[0] >= 128, b[0] >= 128);
            inter += u32::from(a && b);
            union += u32::from(a || b);
        }
        assert!(inter as f64 / union as f64 > 0.8, "{rel}: IoU {}", inter as f64 / union as f64);
    }
    // The 2D baseline on the mask-less collection uses them (it failed with "no mask" before).
    let pairs = vec![congeal::congeal::transfer::TransferPair {
        src: result.images[0].file.clone(),
        dst: result.images[1].file.clone(),
        points: vec![[160.0, 120.0], [0.0, 0.0]],
        gt: None,
        pred: None,
    }];
    let pairs_path = out.path().join("pairs.json");
    std::fs::write(&pairs_path, serde_json::to_string(&pairs).unwrap()).unwrap();
    let pred_path = out.path().join("pred.json");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_congeal"))
        .args([
            "transfer",
            out.path().to_str().unwrap(),
            "--pairs",
            pairs_path.to_str().unwrap(),
            "--out",
            pred_path.to_str().unwrap(),
            "--method",
            "2d",
        ])
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let pred: Vec<congeal::congeal::transfer::TransferPair> =
        serde_json::from_str(&std::fs::read_to_string(&pred_path).unwrap()).unwrap();
    let p = pred[0].pred.as_ref().unwrap();
    assert_eq!(p.len(), 2);
    assert!(p[1].is_none(), "a background point transfers to nothing");
}
