//! End to end on a shipped collection: `run` with the CPU profile, then `eval` against the ground
//! truth, with accuracy thresholds, and the output files' formats.

mod common;

use std::path::Path;

use congeal::collection::Collection;
use congeal::config::Config;
use congeal::congeal::pipeline::{no_progress, run};
use congeal::eval::report::evaluate_run;
use congeal::field::mesh::TriangleMesh;
use congeal::output::read_nocs_png;
use congeal::shape::ShapeSpec;

#[test]
fn duck_collection_end_to_end() {
    // The full 40-image collection when the evaluation data sits beside the checkout, else the demo.
    let dir = common::shared_collection("duck").unwrap_or_else(common::demo_collection);
    let collection = Collection::load(&dir).unwrap();
    let config = Config::from_yaml_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config/fast.yaml")).unwrap();
    let out = tempfile::tempdir().unwrap();
    let result = run(&collection, &ShapeSpec::Template(None), &config, out.path(), &no_progress).unwrap();
    assert_eq!(result.images.len(), collection.images.len());
    assert!(result.skipped.is_empty());

    // Accuracy against ground truth (issue target: median rotation error <= 15 deg unaligned).
    let report = evaluate_run(&collection, &result, out.path()).unwrap();
    let poses = report.poses.as_ref().expect("the duck has ground-truth poses");
    let rot = &poses.rotation_deg_unaligned;
    eprintln!(
        "{}: rotation error median {:.2} mean {:.2} <15deg {:.2}; aligned median {:.2}; NOCS {:?}",
        dir.display(),
        rot.median,
        rot.mean,
        rot.frac_below_15deg,
        poses.rotation_deg_aligned.median,
        report.nocs.as_ref().map(|n| n.median)
    );
    assert!(rot.median <= 15.0, "median rotation error {} deg", rot.median);
    assert!(poses.translation_unaligned.median < 0.15, "translation {:?}", poses.translation_unaligned);
    let nocs = report.nocs.expect("NOCS maps evaluated");
    assert!(nocs.median < 0.15, "median NOCS error {}", nocs.median);

    // Output formats.
    let mesh = TriangleMesh::load(out.path().join("canonical.ply")).unwrap();
    let (lo, hi) = mesh.bbox().unwrap();
    for a in 0..3 {
        let (l, h) = (result.canonical.bbox_min[a], result.canonical.bbox_max[a]);
        let voxel = (h - l) / 20.0;
        assert!((lo[a] as f64 - l).abs() < voxel && (hi[a] as f64 - h).abs() < voxel, "mesh bbox {lo:?} {hi:?}");
    }
    let first = &result.images[0];
    let (w, h, values) = read_nocs_png(&out.path().join(first.nocs.as_ref().unwrap())).unwrap();
    assert_eq!([w, h], first.size);
    assert!(values.iter().any(|v| v.iter().any(|c| *c > 0.0)));
    assert!(out.path().join("contact_sheet.png").exists());
    assert!(out.path().join(format!("overlays/{:03}.png", collection.images[0].index)).exists());
    // result.json round-trips and K/fov agree.
    let reloaded = congeal::output::result::RunResult::load(out.path()).unwrap();
    assert_eq!(reloaded.images.len(), result.images.len());
    for (a, b) in reloaded.images.iter().zip(&result.images) {
        assert_eq!(a.file, b.file);
        let diff = a.camera_from_object.iter().flatten().zip(b.camera_from_object.iter().flatten());
        assert!(diff.map(|(x, y)| (x - y).abs()).fold(0.0, f64::max) < 1e-12);
    }
    let k = first.intrinsics().unwrap();
    assert!((k.fov_y_deg() - first.fov_deg).abs() < 1e-9);
}
