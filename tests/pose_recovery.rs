//! Pose recovery on a synthetic scene with known poses: masks rendered from an asymmetric field at
//! known cameras are registered back (candidate search + refinement) and compared.

mod common;

use std::collections::BTreeMap;

use candle_core::Device;
use congeal::config::Config;
use congeal::congeal::pipeline::{no_progress, register};
use congeal::congeal::pose_init::input_view;
use congeal::field::render::{pixel_grid, render_rays_host, CameraBatch, RenderWhat};
use congeal::geometry::metrics::rotation_error_deg;
use congeal::geometry::se3::orbit_camera_from_object;
use congeal::geometry::Intrinsics;
use image::{GrayImage, Luma, RgbImage};
use nalgebra::{Isometry3, Translation3, UnitQuaternion, Vector3};

fn render_mask(field: &congeal::field::canonical::CanonicalField, pose: &Isometry3<f64>, k: &Intrinsics) -> GrayImage {
    let cams = CameraBatch::from_poses(&[*pose], &[*k], &Device::Cpu).unwrap();
    let rays = cams.rays(&pixel_grid(k.width, k.height, &Device::Cpu).unwrap()).unwrap();
    let r = render_rays_host(field, &rays, 128, RenderWhat::default(), 1 << 15).unwrap();
    GrayImage::from_fn(k.width, k.height, |x, y| Luma([if r.opacity[(y * k.width + x) as usize] >= 0.5 { 255 } else { 0 }]))
}

/// A small, fast configuration that scores by silhouettes only: these tests pin the geometry of
/// candidate search and refinement.
fn silhouette_config() -> Config {
    let mut config = Config::default();
    config.pose_init.render_size = 48;
    config.pose_init.samples_per_ray = 48;
    config.render.samples_per_ray = 48;
    config.pose_refine.iterations = 80;
    config.pose_refine.hypothesis_iterations = 30;
    config.pose_refine.lr = 0.01;
    config.pose_refine.ray_grid = 32;
    config.pose_init.top_k = 3;
    config.pose_init.score = congeal::config::PoseScore::Iou;
    config
}

#[test]
fn known_poses_are_recovered() {
    let field = common::asymmetric_field(48);
    // Off-grid viewpoints (not on the 22.5 deg azimuth grid), with roll and off-centre placement.
    let views = [(37.0, 23.0, 5.0, 40.0), (-123.0, 8.0, -4.0, 25.0), (161.0, 41.0, 2.0, 55.0), (-58.0, -12.0, 0.0, 33.0)];
    let mut truths = Vec::new();
    let mut masks = Vec::new();
    for (az, el, roll, fov) in views {
        let k = Intrinsics::from_fov_y(fov, 120, 100).unwrap();
        let radius = 0.8 / (0.5f64 * fov.to_radians()).tan();
        let roll_q = UnitQuaternion::from_axis_angle(&Vector3::z_axis(), f64::to_radians(roll));
        let shift = Translation3::new(0.05 * radius * 0.1, -0.03 * radius * 0.1, 0.0);
        let pose = Isometry3::from_parts(shift, roll_q) * orbit_camera_from_object(az, el, radius);
        masks.push(render_mask(&field, &pose, &k));
        truths.push((pose, k));
    }
    let config = silhouette_config();
    let rgb = RgbImage::new(120, 100);
    let inputs: Vec<_> =
        masks.iter().zip(&truths).map(|(m, (_, k))| input_view(&rgb, m, Some(*k), &config.pose_init).unwrap()).collect();
    let mask_refs: Vec<&GrayImage> = masks.iter().collect();
    let mut timings = BTreeMap::new();
    let reg = register(&field, &inputs, &mask_refs, &config, None, &no_progress, &mut timings).unwrap();
    let mut errors = Vec::new();
    for (i, (pose, _)) in truths.iter().enumerate() {
        let err =
            rotation_error_deg(&reg.camera_from_object[i].rotation.to_rotation_matrix(), &pose.rotation.to_rotation_matrix());
        let t_err =
            (reg.camera_from_object[i].translation.vector - pose.translation.vector).norm() / pose.translation.vector.norm();
        eprintln!("view {i}: rotation error {err:.2} deg, relative translation error {t_err:.3}, IoU {:.3}", reg.iou[i]);
        errors.push((err, t_err, reg.iou[i]));
    }
    for (i, (err, t_err, iou)) in errors.iter().enumerate() {
        assert!(*err < 3.0, "view {i}: rotation error {err} deg");
        assert!(*t_err < 0.05, "view {i}: relative translation error {t_err}");
        assert!(*iou > 0.9, "view {i}: IoU {iou}");
    }
}

/// A rendered object shifted half out of the frame, with known K: the truncation-aware path (place
/// each candidate with the same cut, refine over the image only) recovers the pose within 5 deg;
/// the tight-crop path (`truncation_aware: false`) compares a cut silhouette with whole ones.
#[test]
fn truncated_objects_are_recovered_with_known_k() {
    let field = common::asymmetric_field(48);
    let (w, h) = (160u32, 120u32);
    // Object centre on the left / right / bottom border: about half of it is outside the image.
    let views =
        [(37.0, 23.0, 0.0, 40.0, [-1.0, 0.0]), (-123.0, 15.0, 0.0, 35.0, [1.0, 0.0]), (70.0, 30.0, 0.0, 45.0, [0.0, 1.0])];
    let mut truths = Vec::new();
    let mut masks = Vec::new();
    for (az, el, roll, fov, side) in views {
        let k = Intrinsics::from_fov_y(fov, w, h).unwrap();
        let radius = 0.7 / (0.5f64 * fov.to_radians()).tan();
        let roll_q = UnitQuaternion::from_axis_angle(&Vector3::z_axis(), f64::to_radians(roll));
        let orbit = Isometry3::from_parts(Translation3::identity(), roll_q) * orbit_camera_from_object(az, el, radius);
        // Move the object so its origin projects onto the border named by `side`.
        let z = orbit.translation.vector.z;
        let target_u = if side[0] < 0.0 {
            -0.5
        } else if side[0] > 0.0 {
            w as f64 - 0.5
        } else {
            k.cx
        };
        let target_v = if side[1] > 0.0 { h as f64 - 0.5 } else { k.cy };
        let t = Vector3::new((target_u - k.cx) / k.fx * z, (target_v - k.cy) / k.fy * z, z);
        let pose = Isometry3::from_parts(Translation3::from(t), orbit.rotation);
        let mask = render_mask(&field, &pose, &k);
        let bbox = congeal::collection::mask_bbox(&mask).unwrap();
        assert!(congeal::collection::BorderContact::of(&bbox, w, h).any(), "view {az}: the object must be cut");
        masks.push(mask);
        truths.push((pose, k));
    }
    let mut config = silhouette_config();
    config.pose_refine.truncated_ray_grid = 64;
    config.pose_refine.iterations = 160;
    let rgb = RgbImage::new(w, h);
    let mask_refs: Vec<&GrayImage> = masks.iter().collect();
    let errors = |config: &Config| -> Vec<f64> {
        let inputs: Vec<_> =
            masks.iter().zip(&truths).map(|(m, (_, k))| input_view(&rgb, m, Some(*k), &config.pose_init).unwrap()).collect();
        let reg = register(&field, &inputs, &mask_refs, config, None, &no_progress, &mut BTreeMap::new()).unwrap();
        truths
            .iter()
            .enumerate()
            .map(|(i, (pose, _))| {
                rotation_error_deg(&reg.camera_from_object[i].rotation.to_rotation_matrix(), &pose.rotation.to_rotation_matrix())
            })
            .collect()
    };
    let aware = errors(&config);
    config.pose_init.truncation_aware = false;
    let tight = errors(&config);
    eprintln!("rotation errors (deg): truncation-aware {aware:.2?}, tight crops {tight:.2?}");
    for (i, e) in aware.iter().enumerate() {
        assert!(*e < 5.0, "view {i}: rotation error {e} deg with the truncation-aware path");
    }
}

/// The semantic term of refinement (`pose_refine::FeatureTarget`) turns a pose that silhouettes cannot
/// see: a sphere spun 12 deg about its own axis has the same mask, so IoU alone leaves it there, while
/// features painted on the sphere (its surface normal, seen at the true pose) bring it back.
#[test]
fn feature_term_recovers_a_spin_the_silhouette_cannot_see() {
    use congeal::collection::SquareCrop;
    use congeal::congeal::category::{surface_points, token_points, WindowCamera};
    use congeal::congeal::coord_maps::FeatureGrid;
    use congeal::congeal::pose_refine::{refine_poses, FeatureTarget, RefineSettings, RefineTarget};

    let field = common::sphere_field(0.5, 0.6, 48, 8.0);
    let k = Intrinsics::from_fov_y(40.0, 96, 96).unwrap();
    let truth = orbit_camera_from_object(30.0, 20.0, 2.6);
    let spin = UnitQuaternion::from_axis_angle(&Vector3::y_axis(), 12f64.to_radians());
    let start = Isometry3::from_parts(truth.translation, truth.rotation * spin);
    let mask = render_mask(&field, &truth, &k);
    let (tokens, sub) = (32, 2);
    let window = SquareCrop::whole_image(96, 96, tokens as u32);
    let camera = |pose: Isometry3<f64>| WindowCamera { camera_from_object: pose, intrinsics: k, window };
    let seen = surface_points(&field, &[camera(truth), camera(start)], (tokens * sub) as u32, 96, 1 << 15).unwrap();
    // A feature per surface point: its unit normal, mixed into 6 channels so that it varies faster.
    let feature = |p: &nalgebra::Point3<f64>| {
        let n = p.coords / p.coords.norm();
        [n.x, n.y, n.z, (3.0 * n.x).sin(), (3.0 * n.y).sin(), (3.0 * n.z).sin()].map(|v| v as f32)
    };
    let mean_feature = |pts: &[nalgebra::Point3<f64>]| {
        let mut f = [0f32; 6];
        for p in pts {
            f.iter_mut().zip(feature(p)).for_each(|(a, b)| *a += b);
        }
        f
    };
    // The image: features of what the true pose sees in each token; the expectation: features of
    // what the start pose sees there.
    let image_points = token_points(&seen[0], tokens, sub);
    let image = FeatureGrid::new(tokens, tokens, 6, image_points.iter().flat_map(|p| mean_feature(p)).collect()).unwrap();
    let start_points = token_points(&seen[1], tokens, sub);
    let expected = FeatureGrid::new(tokens, tokens, 6, start_points.iter().flat_map(|p| mean_feature(p)).collect()).unwrap();
    let covered: Vec<bool> = start_points.iter().map(|p| p.len() == sub * sub).collect();
    let features = FeatureTarget::from_tokens(&start_points, &covered, &expected.data, &image, window, 1.0).unwrap();
    let settings = RefineSettings { iterations: 150, lr: 0.01, focal_lr: 0.0, samples_per_ray: 48 };
    let error_after = |features: Option<FeatureTarget>| {
        let target = RefineTarget { features, ..RefineTarget::new(SquareCrop::whole_image(96, 96, 32), &mask) };
        let r = refine_poses(&field, &[start], &[k], &[target], &[false], &settings, &mut |_, _| ()).unwrap();
        rotation_error_deg(&r.camera_from_object[0].rotation.to_rotation_matrix(), &truth.rotation.to_rotation_matrix())
    };
    let (silhouette, with_features) = (error_after(None), error_after(Some(features)));
    eprintln!("spin of 12 deg after refinement: IoU only {silhouette:.2} deg, with the feature term {with_features:.2} deg");
    assert!(silhouette > 7.0, "IoU alone should not see the spin: {silhouette} deg");
    assert!(with_features < 3.5, "the feature term should undo most of the spin: {with_features} deg");
}
