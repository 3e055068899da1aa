mod common;
use std::collections::BTreeMap;
use candle_core::Device;
use congeal::config::Config;
use congeal::congeal::pipeline::{no_progress, register};
use congeal::congeal::pose_init::input_view;
use congeal::field::render::{pixel_grid, render_rays_host, CameraBatch, RenderWhat};
use congeal::geometry::se3::orbit_camera_from_object;
use congeal::geometry::metrics::rotation_error_deg;
use congeal::geometry::Intrinsics;
use image::{GrayImage, Luma, RgbImage};
use nalgebra::{Isometry3, Translation3, UnitQuaternion, Vector3};

fn env(name: &str, d: f64) -> f64 { std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(d) }

#[test]
fn debug_register() {
    let field = common::asymmetric_field(48);
    let views = [(37.0, 23.0, 5.0, 40.0), (-123.0, 8.0, -4.0, 25.0), (161.0, 41.0, 2.0, 55.0), (-58.0, -12.0, 0.0, 33.0)];
    let mut truths = Vec::new();
    let mut masks = Vec::new();
    for (az, el, roll, fov) in views {
        let k = Intrinsics::from_fov_y(fov, 120, 100).unwrap();
        let radius = 0.8 / (0.5f64 * fov.to_radians()).tan();
        let roll_q = UnitQuaternion::from_axis_angle(&Vector3::z_axis(), f64::to_radians(roll));
        let pose = Isometry3::from_parts(Translation3::new(0.0, 0.0, 0.0), roll_q) * orbit_camera_from_object(az, el, radius);
        let cams = CameraBatch::from_poses(&[pose], &[k], &Device::Cpu).unwrap();
        let rays = cams.rays(&pixel_grid(120, 100, &Device::Cpu).unwrap()).unwrap();
        let r = render_rays_host(&field, &rays, 128, RenderWhat::default(), 1 << 15).unwrap();
        masks.push(GrayImage::from_fn(120, 100, |x, y| Luma([if r.opacity[(y * 120 + x) as usize] >= 0.5 { 255 } else { 0 }])));
        truths.push((pose, k));
    }
    let mut config = Config::default();
    config.pose_init.render_size = 48;
    config.pose_init.samples_per_ray = 48;
    config.render.samples_per_ray = 48;
    config.pose_refine.iterations = env("IT", 80.0) as usize;
    config.pose_refine.hypothesis_iterations = env("HIT", 30.0) as usize;
    config.pose_refine.lr = env("LR", 0.01);
    config.pose_refine.ray_grid = env("GRID", 32.0) as u32;
    config.pose_init.top_k = env("TOPK", 3.0) as usize;
    let rgb = RgbImage::new(120, 100);
    let inputs: Vec<_> = masks.iter().zip(&truths).map(|(m, (_, k))| input_view(&rgb, m, Some(*k), &config.pose_init).unwrap()).collect();
    let mask_refs: Vec<&GrayImage> = masks.iter().collect();
    let mut timings = BTreeMap::new();
    let reg = register(&field, &inputs, &mask_refs, &config, &no_progress, &mut timings).unwrap();
    for (i, (pose, _)) in truths.iter().enumerate() {
        let err = rotation_error_deg(&reg.camera_from_object[i].rotation.to_rotation_matrix(), &pose.rotation.to_rotation_matrix());
        let e0 = rotation_error_deg(&reg.init[i].camera_from_object.rotation.to_rotation_matrix(), &pose.rotation.to_rotation_matrix());
        eprintln!("view {i}: init err {e0:.2} final {err:.2} IoU {:.3}  init {:?}", reg.iou[i], reg.init_info[i]);
    }
    eprintln!("{timings:?}");
}
