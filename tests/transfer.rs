//! Keypoint transfer through the canonical shape on the demo collection, against ground-truth pairs
//! built from the collection's NOCS maps (FORMAT.md: decode X at a source pixel, project it with the
//! target's pose; visible when it lands on the target mask and the target NOCS decodes to X).

mod common;

use congeal::collection::{mask_bbox, Collection};
use congeal::config::Config;
use congeal::congeal::pipeline::{no_progress, run};
use congeal::congeal::transfer::{pck, transfer_pairs, TransferPair};
use congeal::output::read_nocs_png;
use congeal::shape::ShapeSpec;
use nalgebra::Point3;

#[test]
fn transfer_beats_chance_on_ground_truth_pairs() {
    let dir = common::demo_collection();
    let collection = Collection::load(&dir).unwrap();
    let config = Config::from_yaml_file(&dir.join("../../config/fast.yaml")).unwrap();
    let out = tempfile::tempdir().unwrap();
    run(&collection, &ShapeSpec::Template(None), &config, out.path(), &no_progress).unwrap();

    let (lo, hi) = collection.canonical_bbox.unwrap();
    let diag = ((0..3).map(|a| (hi[a] - lo[a]).powi(2)).sum::<f64>()).sqrt();
    let mut pairs = Vec::new();
    for (i, j) in [(0usize, 1usize), (2, 3), (4, 5), (6, 7), (1, 6)] {
        let (ei, ej) = (&collection.images[i], &collection.images[j]);
        let (w, h, ni) = read_nocs_png(&collection.root.join(ei.nocs.as_ref().unwrap())).unwrap();
        let (wj, _, nj) = read_nocs_png(&collection.root.join(ej.nocs.as_ref().unwrap())).unwrap();
        let mask_i = collection.load_image(i).unwrap().mask;
        let mask_j = collection.load_image(j).unwrap().mask;
        let gt_j = ej.ground_truth.as_ref().unwrap();
        let decode = |n: [f32; 3]| Point3::from(nalgebra::Vector3::from_fn(|a, _| lo[a] + n[a] as f64 * (hi[a] - lo[a])));
        let (mut points, mut gt) = (Vec::new(), Vec::new());
        for k in 0..(w * h) as usize {
            if k % 37 != 0 || mask_i.as_raw()[k] < 128 {
                continue;
            }
            let x = decode(ni[k]);
            let g = gt_j.intrinsics.project(&(gt_j.camera_from_object * x)).and_then(|p| {
                let (u, v) = (p.x.round() as i64, p.y.round() as i64);
                if u < 0 || v < 0 || u >= wj as i64 || v >= mask_j.height() as i64 {
                    return None;
                }
                let kk = (v as u32 * wj + u as u32) as usize;
                let seen = decode(nj[kk]);
                (mask_j.as_raw()[kk] >= 128 && (seen - x).norm() < 0.01 * diag).then_some([p.x, p.y])
            });
            points.push([(k as u32 % w) as f64, (k as u32 / w) as f64]);
            gt.push(g);
        }
        pairs.push(TransferPair { src: ei.rgb.to_string_lossy().into(), dst: ej.rgb.to_string_lossy().into(), points, pred: None, gt: Some(gt) });
    }
    let visible: usize = pairs.iter().map(|p| p.gt.as_ref().unwrap().iter().flatten().count()).sum();
    assert!(visible > 50, "only {visible} visible ground-truth points");
    transfer_pairs(out.path(), &mut pairs).unwrap();
    let size = |file: &str| {
        let i = collection.images.iter().position(|e| e.rgb.to_string_lossy() == file)?;
        let b = mask_bbox(&collection.load_image(i).ok()?.mask)?;
        Some(b.width().max(b.height()))
    };
    let score = pck(&pairs, &size, 0.1).unwrap();
    eprintln!("PCK@0.1 over {visible} visible points: {score:.3}");
    assert!(score > 0.7, "PCK@0.1 = {score}");
    // A point off the source mask transfers to nothing.
    let run_result = congeal::output::result::RunResult::load(out.path()).unwrap();
    let none = congeal::congeal::transfer::transfer(out.path(), &run_result, &pairs[0].src, &pairs[0].dst, &[[0.0, 0.0]]).unwrap();
    assert_eq!(none, vec![None]);
}
