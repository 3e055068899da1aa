//! Live tracking (`congeal::track`) against ground truth on an asymmetric shape rendered along a
//! smooth orbit: warm-started frames stay accurate without the candidate search; the search runs on the
//! first frame, on request, after a jump of the camera and after the object was lost; an empty mask is
//! an error, not a pose. The re-initialisation here returns the ground truth (the search itself is
//! tested in pose_recovery.rs), and counts its calls.

mod common;

use std::cell::Cell;

use congeal::config::TrackConfig;
use congeal::congeal::track::{ReinitReason, TrackedPose, Tracker};
use congeal::eval::orbit::{orbit_cameras, render_frame, OrbitFrame, OrbitSpec};
use congeal::geometry::metrics::rotation_error_deg;

fn rot_err(a: &TrackedPose, b: &OrbitFrame) -> f64 {
    rotation_error_deg(&a.camera_from_object.rotation.to_rotation_matrix(), &b.camera_from_object.rotation.to_rotation_matrix())
}

#[test]
fn tracks_a_smooth_orbit_and_reinitialises_when_needed() {
    let field = common::asymmetric_field(40);
    let spec = OrbitSpec {
        frames: 14,
        width: 160,
        height: 120,
        step_deg: 3.0,
        jumps: vec![10],
        jump_deg: 120.0,
        samples_per_ray: 48,
        ..Default::default()
    };
    let frames = orbit_cameras(&field, &spec).unwrap();
    let mut tracker = Tracker::new(TrackConfig::default());
    let searches = Cell::new(0);
    let mut errors = Vec::new();
    let mut reasons = Vec::new();
    for (i, frame) in frames.iter().enumerate() {
        let (_, mask) = render_frame(&field, frame, spec.samples_per_ray).unwrap();
        if i == 5 {
            tracker.request_reset();
        }
        let mut reinit = || {
            searches.set(searches.get() + 1);
            Ok(TrackedPose { camera_from_object: frame.camera_from_object, intrinsics: frame.intrinsics, score: 0.95 })
        };
        let out = tracker.step(&field, &mask, Some(frame.intrinsics), i as f64 / 30.0, &mut reinit).unwrap();
        errors.push(rot_err(&out.pose, frame));
        reasons.push(out.reinitialised);
    }
    println!("errors {errors:.2?}\nreasons {reasons:?}");
    assert_eq!(reasons[0], Some(ReinitReason::NoPrevious));
    assert_eq!(reasons[5], Some(ReinitReason::Requested));
    assert_eq!(reasons[10], Some(ReinitReason::Jump), "the 120 deg jump must be detected");
    let warm: Vec<usize> = (0..frames.len()).filter(|i| reasons[*i].is_none()).collect();
    assert_eq!(warm.len(), frames.len() - 3, "no other frame needs the search: {reasons:?}");
    assert_eq!(searches.get(), 3);
    for i in warm {
        assert!(errors[i] < 6.0, "warm-started frame {i}: {:.2} deg", errors[i]);
    }
    // The object leaves the view: no pose, and the next frame is re-initialised.
    let empty = image::GrayImage::new(spec.width, spec.height);
    let last = frames.last().unwrap();
    let mut reinit = || Ok(TrackedPose { camera_from_object: last.camera_from_object, intrinsics: last.intrinsics, score: 0.9 });
    assert!(tracker.step(&field, &empty, Some(last.intrinsics), 1.0, &mut reinit).is_err(), "an empty mask has no pose");
    tracker.lose();
    let (_, mask) = render_frame(&field, last, spec.samples_per_ray).unwrap();
    let out = tracker.step(&field, &mask, Some(last.intrinsics), 1.1, &mut reinit).unwrap();
    assert_eq!(out.reinitialised, Some(ReinitReason::NoPrevious));
}

#[test]
fn a_poor_fit_triggers_the_search() {
    let field = common::asymmetric_field(32);
    let spec = OrbitSpec { frames: 2, width: 128, height: 96, samples_per_ray: 32, ..Default::default() };
    let frames = orbit_cameras(&field, &spec).unwrap();
    let (_, mask0) = render_frame(&field, &frames[0], spec.samples_per_ray).unwrap();
    let mut tracker = Tracker::new(TrackConfig { min_score: 0.999, ..TrackConfig::default() });
    let f0 = frames[0].clone();
    let mut reinit = || Ok(TrackedPose { camera_from_object: f0.camera_from_object, intrinsics: f0.intrinsics, score: 0.5 });
    tracker.step(&field, &mask0, None, 0.0, &mut reinit).unwrap();
    // No fit reaches 0.999: the search runs, and the better of the two poses is kept.
    let (_, mask1) = render_frame(&field, &frames[1], spec.samples_per_ray).unwrap();
    let out = tracker.step(&field, &mask1, None, 1.0 / 30.0, &mut reinit).unwrap();
    assert_eq!(out.reinitialised, Some(ReinitReason::LowScore));
    assert!(out.pose.score > 0.5, "the refined pose fits better than the search's 0.5: {}", out.pose.score);
}
