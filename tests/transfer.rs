//! Keypoint transfer on the demo collection against ground-truth pairs built from the collection's
//! NOCS maps (`congeal::eval::pairs`: decode X at a source pixel, project it with the target's pose;
//! visible when it lands on the target mask and the target NOCS decodes to X): the 3D route through
//! the canonical shape and coordinate maps (Eq. 17), and the 2D DINOv2 baseline (Eq. 18).

mod common;

use congeal::collection::Collection;
use congeal::config::Config;
use congeal::congeal::features::FeatureExtractor;
use congeal::congeal::pipeline::{no_progress, run};
use congeal::congeal::transfer::{transfer, transfer_2d, transfer_pairs};
use congeal::eval::pairs::{ground_truth_pairs, pck_report, PairOptions};
use congeal::output::result::RunResult;
use congeal::shape::ShapeSpec;

#[test]
fn ground_truth_pairs_are_consistent_both_ways() {
    let collection = Collection::load(&common::demo_collection()).unwrap();
    let opts = PairOptions { pairs: 6, points_per_pair: 30, seed: 3, tolerance: 0.01 };
    let pairs = ground_truth_pairs(&collection, &opts).unwrap();
    assert_eq!(pairs.len(), 6);
    let mut errors = Vec::new();
    for p in &pairs {
        // Map every visible ground-truth target point back to the source: it must land where it started.
        let back: Vec<[f64; 2]> = p.gt.as_ref().unwrap().iter().flatten().copied().collect();
        let reverse = congeal::congeal::transfer::TransferPair {
            src: p.dst.clone(),
            dst: p.src.clone(),
            points: back.clone(),
            pred: None,
            gt: None,
        };
        let list = ground_truth_pairs_for(&collection, &reverse);
        let starts: Vec<[f64; 2]> =
            p.points.iter().zip(p.gt.as_ref().unwrap()).filter(|(_, g)| g.is_some()).map(|(s, _)| *s).collect();
        for (s, r) in starts.iter().zip(&list) {
            if let Some(r) = r {
                errors.push((s[0] - r[0]).hypot(s[1] - r[1]));
            }
        }
    }
    assert!(errors.len() > 40, "only {} round trips", errors.len());
    errors.sort_by(f64::total_cmp);
    // Rounding to the nearest target pixel moves a point by up to 0.7 px; at depth edges a neighbour
    // pixel can be a different surface, hence a percentile, not the maximum.
    let (median, p90) = (errors[errors.len() / 2], errors[errors.len() * 9 / 10]);
    assert!(median < 1.0 && p90 < 2.5, "round-trip error median {median:.2} px, 90% {p90:.2} px");
}

/// Ground truth of arbitrary (sub-pixel) points: the nearest pixel's ground truth.
fn ground_truth_pairs_for(collection: &Collection, pair: &congeal::congeal::transfer::TransferPair) -> Vec<Option<[f64; 2]>> {
    let i = collection.images.iter().position(|e| e.rgb.to_string_lossy() == pair.src).unwrap();
    let j = collection.images.iter().position(|e| e.rgb.to_string_lossy() == pair.dst).unwrap();
    let (w, _, ni) = congeal::output::read_nocs_png(&collection.root.join(collection.images[i].nocs.as_ref().unwrap())).unwrap();
    let gi = collection.images[i].ground_truth.as_ref().unwrap();
    let gj = collection.images[j].ground_truth.as_ref().unwrap();
    let (lo, hi) = (gi.nocs_bbox_min, gi.nocs_bbox_max);
    pair.points
        .iter()
        .map(|p| {
            let k = (p[1].round() as u32 * w + p[0].round() as u32) as usize;
            let x = nalgebra::Point3::from(nalgebra::Vector3::from_fn(|a, _| lo[a] + ni[k][a] as f64 * (hi[a] - lo[a])));
            gj.intrinsics.project(&(gj.camera_from_object * x)).map(|q| [q.x, q.y])
        })
        .collect()
}

#[test]
fn transfer_3d_and_2d_baseline_on_ground_truth_pairs() {
    let dir = common::demo_collection();
    let collection = Collection::load(&dir).unwrap();
    let config = Config::from_yaml_file(&dir.join("../../config/fast.yaml")).unwrap();
    let out = tempfile::tempdir().unwrap();
    run(&collection, &ShapeSpec::Template(None), &config, out.path(), &no_progress).unwrap();
    // The run wrote its coordinate maps.
    let result = RunResult::load(out.path()).unwrap();
    for image in &result.images {
        assert!(out.path().join(image.warp.as_ref().unwrap()).is_file());
        assert!(out.path().join(image.nocs_render.as_ref().unwrap()).is_file());
    }

    let opts = PairOptions { pairs: 12, points_per_pair: 25, seed: 1, tolerance: 0.01 };
    let mut pairs = ground_truth_pairs(&collection, &opts).unwrap();
    let visible: usize = pairs.iter().map(|p| p.gt.as_ref().unwrap().iter().flatten().count()).sum();
    assert!(visible > 100, "only {visible} visible ground-truth points");
    transfer_pairs(out.path(), &mut pairs).unwrap();
    let report_3d = pck_report(&collection, &pairs, 0.1).unwrap();

    let extractor = FeatureExtractor::load(&config.features, &candle_core::Device::Cpu).unwrap();
    for p in pairs.iter_mut() {
        p.pred = Some(transfer_2d(&collection, &extractor, config.pose_init.crop_margin, &p.src, &p.dst, &p.points).unwrap());
    }
    let report_2d = pck_report(&collection, &pairs, 0.1).unwrap();
    eprintln!(
        "PCK@0.1 over {visible} points: 3D {:?} (wide {:?}), 2D {:?} (wide {:?})",
        report_3d.pck, report_3d.pck_wide, report_2d.pck, report_2d.pck_wide
    );
    let (p3, p2) = (report_3d.pck.unwrap(), report_2d.pck.unwrap());
    assert!(p3 > 0.6, "3D PCK@0.1 = {p3}");
    assert!(p2 > 0.05 && p2 < 1.0, "2D PCK@0.1 = {p2} (the baseline must run and be imperfect)");

    // The forward then reverse map of an image onto itself returns near the start (Eq. 12-13 invert
    // Eq. 10-11), and points off the source mask transfer to nothing.
    let src = pairs[0].src.clone();
    let pts: Vec<[f64; 2]> = pairs[0].points.clone();
    let back = transfer(out.path(), &result, &src, &src, &pts).unwrap();
    let errors: Vec<f64> = pts.iter().zip(&back).filter_map(|(p, b)| b.map(|b| (p[0] - b[0]).hypot(p[1] - b[1]))).collect();
    assert!(errors.len() * 10 >= pts.len() * 9, "{} of {} points came back", errors.len(), pts.len());
    let mut sorted = errors.clone();
    sorted.sort_by(f64::total_cmp);
    assert!(sorted[sorted.len() / 2] < 3.0, "median round-trip error {} px", sorted[sorted.len() / 2]);
    assert_eq!(transfer(out.path(), &result, &src, &pairs[0].dst, &[[0.0, 0.0]]).unwrap(), vec![None]);
    assert_eq!(transfer_2d(&collection, &extractor, 0.05, &src, &pairs[0].dst, &[[0.0, 0.0]]).unwrap(), vec![None]);

    // A point 2 px left of the source mask (well within SNAP_FRACTION of its bbox) is transferred as
    // the mask pixel it snaps to; both routes give it an answer.
    let i = collection.index_of(&src).unwrap();
    let mask = collection.load_image(i).unwrap().mask;
    let bbox = congeal::collection::mask_bbox(&mask).unwrap();
    let row = (bbox.y_min + bbox.y_max) / 2.0;
    let left = (0..mask.width()).find(|&x| mask.get_pixel(x, row as u32)[0] >= 128).unwrap() as f64;
    assert!(2.0 <= congeal::congeal::transfer::SNAP_FRACTION * (bbox.width().max(bbox.height()) + 1.0));
    let off = [left - 2.0, row];
    // The nearest mask pixel, by brute force over the whole mask.
    let nearest = mask
        .enumerate_pixels()
        .filter(|(_, _, v)| v[0] >= 128)
        .map(|(x, y, _)| [x as f64, y as f64])
        .min_by(|a, b| (a[0] - off[0]).hypot(a[1] - off[1]).total_cmp(&(b[0] - off[0]).hypot(b[1] - off[1])))
        .unwrap();
    assert!((nearest[0] - off[0]).hypot(nearest[1] - off[1]) <= 2.0);
    let dst = pairs[0].dst.clone();
    let snapped = transfer_2d(&collection, &extractor, 0.05, &src, &dst, &[nearest]).unwrap();
    assert!(snapped[0].is_some());
    assert_eq!(transfer_2d(&collection, &extractor, 0.05, &src, &dst, &[off]).unwrap(), snapped);
    assert!(transfer(out.path(), &result, &src, &dst, &[off]).unwrap()[0].is_some(), "3D route: a point 2 px off the mask");

    // A run's NOCS map of another size than its image (a hand-edited run) is refused, naming it: its
    // pixels were read as the image's.
    let im = result.images.iter().find(|im| im.file == dst).unwrap();
    let nocs = out.path().join(im.nocs.as_ref().unwrap());
    let map = image::open(&nocs).unwrap().to_rgb16();
    image::imageops::crop_imm(&map, 0, 0, map.width() / 2, map.height()).to_image().save(&nocs).unwrap();
    let e = transfer(out.path(), &result, &src, &dst, &[nearest]).unwrap_err().to_string();
    assert!(e.contains("NOCS map is") && e.contains(im.nocs.as_ref().unwrap().as_str()), "{e}");
}

/// `Transfer2d::for_run` as the CLI and the node build it: the bbox guess works without DINOv2 (the
/// node no longer loads it for `bbox`) and maps each point to the same relative spot of the target
/// mask's bbox; the feature methods without features, `3d`, and a bad joint weight are refused.
#[test]
fn bbox_transfer_needs_no_features_and_the_others_say_what_they_miss() {
    use congeal::congeal::transfer::{Method, Transfer2d};
    let dir = common::demo_collection();
    let collection = Collection::load(&dir).unwrap();
    let run: RunResult = serde_json::from_value(serde_json::json!({
        "collection": dir.to_string_lossy(),
        "shape_source": "template",
        "canonical": {"mesh": "canonical.ply", "bbox_min": [-0.5, -0.5, -0.5], "bbox_max": [0.5, 0.5, 0.5]},
        "images": [],
        "timings_s": {}
    }))
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let build = |method, weight| Transfer2d::for_run(&collection, None, &run, out.path(), 0.05, method, weight);
    let mut matcher = build(Method::Bbox, 1.0).unwrap();
    let (src, dst) =
        (collection.images[0].rgb.to_string_lossy().to_string(), collection.images[1].rgb.to_string_lossy().to_string());
    let box_of = |i: usize| congeal::collection::mask_bbox(&collection.load_image(i).unwrap().mask).unwrap();
    let (a, b) = (box_of(0), box_of(1));
    // The source bbox's centre and a point a quarter in from its top-left corner (both on the object
    // or within snapping distance of it), mapped by hand.
    let points =
        [[a.x_min + 0.5 * a.width(), a.y_min + 0.5 * a.height()], [a.x_min + 0.25 * a.width(), a.y_min + 0.25 * a.height()]];
    let pred = matcher.transfer_by_method(&src, &dst, &points).unwrap();
    let mut mapped = 0;
    for (p, q) in points.iter().zip(&pred) {
        let Some(q) = q else { continue };
        mapped += 1;
        let u = ((q[0] - b.x_min) / b.width(), (q[1] - b.y_min) / b.height());
        let expected = ((p[0] - a.x_min) / a.width(), (p[1] - a.y_min) / a.height());
        // A point snapped onto the mask moves a little; the centre of the duck is on it.
        assert!((u.0 - expected.0).abs() < 0.1 && (u.1 - expected.1).abs() < 0.1, "{p:?} -> {q:?}: {u:?} vs {expected:?}");
    }
    assert!(mapped >= 1, "no point was mapped: {pred:?}");
    // Feature matching on a bbox-only matcher is refused, not a panic.
    let err = matcher.transfer(&src, &dst, &points).unwrap_err().to_string();
    assert!(err.contains("without DINOv2"), "{err}");
    for (method, weight, says) in [
        (Method::Features, 1.0, "need DINOv2"),
        (Method::Joint, 1.0, "need DINOv2"),
        (Method::Joint, f32::NAN, "finite"),
        (Method::Canonical, 1.0, "coordinate maps"),
    ] {
        let err = build(method, weight).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains(says), "{method:?} weight {weight}: `{err}`");
    }
}

/// The PCK curve counts a point at every threshold its error is within, and its 0.1 entry is the
/// headline PCK: predictions offset from the ground truth by known fractions of the target's mask
/// bbox side (0.07, 0.12, 0.25, 0.6, and one unanswered) give 0, 1, 2, 2, 3, 3 hits of 5 at
/// alpha 0.05, 0.1, 0.15, 0.2, 0.3, 0.5. Lists that do not match the points are refused.
#[test]
fn pck_curve_counts_each_point_at_the_thresholds_it_meets() {
    use congeal::collection::mask_bbox;
    use congeal::congeal::transfer::TransferPair;
    use congeal::eval::pairs::CURVE_ALPHAS;
    let collection = Collection::load(&common::demo_collection()).unwrap();
    let dst = collection.images[1].rgb.to_string_lossy().to_string();
    let src = collection.images[0].rgb.to_string_lossy().to_string();
    let bbox = mask_bbox(&collection.load_image(1).unwrap().mask).unwrap();
    let side = bbox.width().max(bbox.height()) as f64;
    let gt = [[40.0, 50.0], [60.0, 70.0], [80.0, 90.0], [100.0, 110.0], [120.0, 130.0]];
    // Offsets along a diagonal, so both coordinates move.
    let off = |g: [f64; 2], f: f64| [g[0] + f * side * 0.6, g[1] + f * side * 0.8];
    let pred = vec![Some(off(gt[0], 0.07)), Some(off(gt[1], 0.12)), Some(off(gt[2], 0.25)), Some(off(gt[3], 0.6)), None];
    let pair = TransferPair { src, dst, points: gt.to_vec(), pred: Some(pred), gt: Some(gt.iter().map(|g| Some(*g)).collect()) };
    let report = pck_report(&collection, std::slice::from_ref(&pair), 0.1).unwrap();
    // A short prediction list, or predictions on only some pairs, would drop points from the score
    // but not from the count: refused.
    let mut short = pair.clone();
    short.pred.as_mut().unwrap().pop();
    assert!(pck_report(&collection, &[short], 0.1).unwrap_err().to_string().contains("4 `pred` entries for 5 points"));
    let unpredicted = TransferPair { pred: None, ..pair.clone() };
    let e = pck_report(&collection, &[pair, unpredicted], 0.1).unwrap_err().to_string();
    assert!(e.contains("1 of 2 pairs have no predictions"), "{e}");
    let alphas: Vec<f64> = report.curve.iter().map(|p| p.alpha).collect();
    assert_eq!(alphas, CURVE_ALPHAS.to_vec());
    let hits: Vec<f64> = report.curve.iter().map(|p| (p.pck.unwrap() * 5.0).round()).collect();
    assert_eq!(hits, vec![0.0, 1.0, 2.0, 2.0, 3.0, 3.0]);
    assert_eq!(report.curve[1].pck, report.pck);
}

/// A ground-truth NOCS map of another size than its image is refused, naming the file (it indexed the
/// image's mask with the map's own width and panicked, or paired points wrongly).
#[test]
fn pairs_refuse_a_nocs_map_of_another_size() {
    let src = common::demo_collection();
    let dir = tempfile::tempdir().unwrap();
    for sub in ["rgb", "mask", "nocs"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        for e in std::fs::read_dir(src.join(sub)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.path().join(sub).join(e.file_name())).unwrap();
        }
    }
    std::fs::copy(src.join("collection.json"), dir.path().join("collection.json")).unwrap();
    let collection = Collection::load(dir.path()).unwrap();
    let opts = PairOptions { pairs: 1000, points_per_pair: 5, seed: 1, tolerance: 0.01 };
    assert!(ground_truth_pairs(&collection, &opts).is_ok());
    let nocs = collection.images[1].nocs.clone().unwrap();
    let map = image::open(dir.path().join(&nocs)).unwrap().to_rgb16();
    let (w, h) = map.dimensions();
    image::imageops::resize(&map, w * 2, h * 2, image::imageops::FilterType::Nearest).save(dir.path().join(&nocs)).unwrap();
    let msg = ground_truth_pairs(&collection, &opts).unwrap_err().to_string();
    assert!(msg.contains(&nocs.to_string_lossy().to_string()) && msg.contains("NOCS map is"), "{msg}");
}
