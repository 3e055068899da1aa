//! The `congeal` binary: `run` writes the contract files, `eval` prints parseable JSON, bad
//! arguments fail with a message.

mod common;

use std::process::Command;

fn congeal() -> Command {
    Command::new(env!("CARGO_BIN_EXE_congeal"))
}

#[test]
fn run_then_eval_on_the_demo() {
    let out = tempfile::tempdir().unwrap();
    let demo = common::demo_collection();
    let tiny = concat!(env!("CARGO_MANIFEST_DIR"), "/config/tiny.yaml");
    let status = congeal()
        .args(["run", demo.to_str().unwrap(), "--out", out.path().to_str().unwrap(), "--config", tiny])
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(stdout.contains("result.json") && stdout.contains("contact_sheet.png"), "{stdout}");
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("result.json")).unwrap()).unwrap();
    for key in ["collection", "shape_source", "canonical", "images", "timings_s"] {
        assert!(result.get(key).is_some(), "result.json lacks {key}");
    }
    let image = &result["images"][0];
    assert_eq!(image["camera_from_object"].as_array().unwrap().len(), 4);
    assert_eq!(image["K"].as_array().unwrap().len(), 3);
    assert!(image["fov_deg"].as_f64().unwrap() > 1.0);
    assert!(out.path().join("canonical.ply").exists());

    let eval = congeal().args(["eval", demo.to_str().unwrap(), out.path().to_str().unwrap()]).output().unwrap();
    assert!(eval.status.success(), "{}", String::from_utf8_lossy(&eval.stderr));
    let report: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    assert_eq!(report["n_evaluated"].as_u64().unwrap(), 8);
    assert!(report["poses"]["rotation_deg_aligned"]["median"].as_f64().unwrap().is_finite());

    // The run against a collection it was not made from: the error says how many images matched.
    let other = tempfile::tempdir().unwrap();
    std::fs::copy(demo.join("rgb/000.png"), other.path().join("photo.png")).unwrap();
    let wrong = congeal().args(["eval", other.path().to_str().unwrap(), out.path().to_str().unwrap()]).output().unwrap();
    assert!(!wrong.status.success());
    let msg = String::from_utf8_lossy(&wrong.stderr);
    let posed = result["images"].as_array().unwrap().len();
    assert!(msg.contains(&format!("0 of the run's {posed} images are in")), "{msg}");
}

#[test]
fn bad_arguments_fail_with_a_message() {
    let out = tempfile::tempdir().unwrap();
    let missing = congeal().args(["run", "/nonexistent/collection", "--out", out.path().to_str().unwrap()]).output().unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/collection"));
    let demo = common::demo_collection();
    let sds = congeal()
        .args(["run", demo.to_str().unwrap(), "--out", out.path().to_str().unwrap(), "--shape", "sds"])
        .output()
        .unwrap();
    assert!(!sds.status.success());
    assert!(String::from_utf8_lossy(&sds.stderr).contains("sds"));
}

#[test]
fn transfer_method_is_checked_by_the_parser() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().to_str().unwrap();
    let bad = congeal().args(["transfer", dir, "--pairs", dir, "--out", dir, "--method", "4d"]).output().unwrap();
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("4d") && stderr.contains("3d") && stderr.contains("2d"), "{stderr}");
}
