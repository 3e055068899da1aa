//! Renderer against closed forms (a sphere's mask, depth and NOCS) and its gradients with respect to
//! pose and focal length against finite differences.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use congeal::congeal::pose_refine::{corrected_cameras, se3_exp_batch, soft_iou_batch};
use congeal::field::render::{pixel_grid, render_rays, render_rays_host, CameraBatch, RenderWhat};
use congeal::geometry::se3::{orbit_camera_from_object, se3_exp};
use congeal::geometry::Intrinsics;
use nalgebra::{Isometry3, Point2, Vector6};

/// Exact ray/sphere entry point (object frame) for a camera pixel, if the ray hits.
fn ray_sphere(pose: &Isometry3<f64>, k: &Intrinsics, px: Point2<f64>, radius: f64) -> Option<(f64, nalgebra::Point3<f64>)> {
    let inv = pose.inverse();
    let o = inv * nalgebra::Point3::origin();
    let d = inv.rotation * k.ray_direction(&px); // z = 1 in camera
    let a = d.norm_squared();
    let b = 2.0 * o.coords.dot(&d);
    let c = o.coords.norm_squared() - radius * radius;
    let disc = b * b - 4.0 * a * c;
    if disc < 0.0 {
        return None;
    }
    let t = (-b - disc.sqrt()) / (2.0 * a);
    Some((t, o + d * t))
}

#[test]
fn sphere_mask_depth_and_nocs_match_closed_form() {
    let radius = 0.5f32;
    let field = common::sphere_field(radius, 0.6, 64, 8.0);
    let (w, h) = (64u32, 48u32);
    let k = Intrinsics::from_fov_y(40.0, w, h).unwrap();
    let pose = orbit_camera_from_object(30.0, 20.0, 2.5);
    let cams = CameraBatch::from_poses(&[pose], &[k], &Device::Cpu).unwrap();
    let rays = cams.rays(&pixel_grid(w, h, &Device::Cpu).unwrap()).unwrap();
    let what = RenderWhat { colour: true, depth: true, nocs: true, orientation: false };
    let r = render_rays_host(&field, &rays, 256, what, 1 << 14).unwrap();
    let voxel = field.voxel_size() as f64;
    let (mut checked_in, mut checked_out, mut depth_err, mut nocs_err, mut n_in) = (0, 0, 0.0f64, 0.0f64, 0);
    for y in 0..h {
        for x in 0..w {
            let i = (y * w + x) as usize;
            let px = Point2::new(x as f64, y as f64);
            // Distance of the ray from the centre decides; skip the one-voxel-wide soft rim.
            let inner = ray_sphere(&pose, &k, px, radius as f64 - 1.5 * voxel);
            let outer = ray_sphere(&pose, &k, px, radius as f64 + 1.5 * voxel);
            if let Some((t, p)) = inner {
                assert!(r.opacity[i] > 0.98, "pixel ({x},{y}) inside the sphere has opacity {}", r.opacity[i]);
                let (t_exact, p_exact) = ray_sphere(&pose, &k, px, radius as f64).unwrap();
                let _ = (t, p);
                depth_err += (r.depth[i] as f64 - t_exact).abs();
                let nocs_exact = p_exact.coords.map(|v| (v + radius as f64) / (2.0 * radius as f64));
                let n = r.nocs[i];
                nocs_err += ((n[0] as f64 - nocs_exact.x).powi(2)
                    + (n[1] as f64 - nocs_exact.y).powi(2)
                    + (n[2] as f64 - nocs_exact.z).powi(2))
                .sqrt();
                n_in += 1;
                checked_in += 1;
            } else if outer.is_none() {
                assert!(r.opacity[i] < 0.02, "pixel ({x},{y}) off the sphere has opacity {}", r.opacity[i]);
                checked_out += 1;
            }
        }
    }
    assert!(checked_in > 200 && checked_out > 200, "in {checked_in} out {checked_out}");
    let depth_err = depth_err / n_in as f64;
    let nocs_err = nocs_err / n_in as f64;
    // The density edge is one voxel wide: expected depth sits within about a voxel of the surface.
    assert!(depth_err < 1.5 * voxel, "mean depth error {depth_err} (voxel {voxel})");
    assert!(nocs_err < 0.05, "mean NOCS error {nocs_err}");
}

#[test]
fn batched_se3_exp_matches_nalgebra() {
    let xis = [
        [0.0, 0.0, 0.0, 0.1, -0.2, 0.3],
        [1e-5, -2e-5, 3e-5, 0.01, 0.02, 0.03],
        [0.3, -0.4, 0.5, 1.0, -2.0, 0.5],
        [2.0, 1.0, -0.5, 0.2, 0.1, -0.3],
    ];
    let flat: Vec<f64> = xis.iter().flatten().copied().collect();
    let t = Tensor::from_vec(flat, (4, 6), &Device::Cpu).unwrap();
    let (rot, v) = se3_exp_batch(&t).unwrap();
    let rot = rot.to_vec3::<f64>().unwrap();
    let v = v.to_vec3::<f64>().unwrap();
    for (i, xi) in xis.iter().enumerate() {
        let reference = se3_exp(&Vector6::from_row_slice(xi));
        let r = reference.rotation.to_rotation_matrix();
        let trans = nalgebra::Vector3::new(
            (0..3).map(|j| v[i][0][j] * xi[3 + j]).sum::<f64>(),
            (0..3).map(|j| v[i][1][j] * xi[3 + j]).sum::<f64>(),
            (0..3).map(|j| v[i][2][j] * xi[3 + j]).sum::<f64>(),
        );
        for a in 0..3 {
            for b in 0..3 {
                assert!((rot[i][a][b] - r[(a, b)]).abs() < 1e-9, "rotation {i} ({a},{b})");
            }
            assert!((trans[a] - reference.translation.vector[a]).abs() < 1e-9, "translation {i} {a}");
        }
    }
}

/// IoU loss of a sphere rendering against a fixed target, as a function of (xi, log focal).
fn iou_loss(field: &congeal::field::canonical::CanonicalField, xi: &Tensor, log_f: &Tensor, target: &Tensor) -> Tensor {
    let pose = orbit_camera_from_object(10.0, 15.0, 2.2);
    let k = Intrinsics::from_fov_y(35.0, 32, 32).unwrap();
    let mask = Tensor::ones(1, DType::F32, &Device::Cpu).unwrap();
    let cams = corrected_cameras(&[pose], &[k], xi, log_f, &mask).unwrap();
    let rays = cams.rays(&pixel_grid(32, 32, &Device::Cpu).unwrap()).unwrap();
    let opacity = render_rays(field, &rays, 384, RenderWhat::default()).unwrap().opacity.reshape((1, 1024)).unwrap();
    soft_iou_batch(&opacity, target).unwrap().affine(-1.0, 1.0).unwrap().mean_all().unwrap()
}

#[test]
fn renderer_gradients_match_finite_differences() {
    // An off-centre ellipsoid-like target: the sphere shifted, so the gradient is far from zero.
    let field = common::sphere_field(0.5, 0.6, 48, 3.0);
    let target = {
        let pose = orbit_camera_from_object(10.0, 15.0, 2.2);
        let shifted = Isometry3::translation(0.12, -0.08, 0.2) * pose;
        let k = Intrinsics::from_fov_y(33.0, 32, 32).unwrap();
        let cams = CameraBatch::from_poses(&[shifted], &[k], &Device::Cpu).unwrap();
        let rays = cams.rays(&pixel_grid(32, 32, &Device::Cpu).unwrap()).unwrap();
        render_rays(&field, &rays, 96, RenderWhat::default()).unwrap().opacity.reshape((1, 1024)).unwrap()
    };
    let xi0 = [0.03, -0.02, 0.01, 0.02, 0.01, -0.03];
    let xi = Var::from_vec(xi0.to_vec(), (1, 6), &Device::Cpu).unwrap();
    let log_f = Var::from_vec(vec![0.02f32], 1, &Device::Cpu).unwrap();
    let loss = iou_loss(&field, xi.as_tensor(), log_f.as_tensor(), &target);
    let grads = loss.backward().unwrap();
    let g_xi = grads.get(xi.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let g_f = grads.get(log_f.as_tensor()).unwrap().to_vec1::<f32>().unwrap()[0] as f64;
    let eval = |xi_v: [f64; 6], f: f32| -> f64 {
        let xi = Tensor::from_vec(xi_v.to_vec(), (1, 6), &Device::Cpu).unwrap();
        let lf = Tensor::from_vec(vec![f], 1, &Device::Cpu).unwrap();
        iou_loss(&field, &xi, &lf, &target).to_scalar::<f32>().unwrap() as f64
    };
    // Trilinear interpolation is piecewise linear, so the loss has kinks at the scale of a voxel
    // crossing: a small step is needed for the difference quotient to see the local derivative.
    let h = 2.5e-4;
    let mut max_rel = 0.0f64;
    for j in 0..6 {
        let (mut plus, mut minus) = (xi0, xi0);
        plus[j] += h;
        minus[j] -= h;
        let fd = (eval(plus, 0.02) - eval(minus, 0.02)) / (2.0 * h);
        let rel = (fd - g_xi[j]).abs() / (fd.abs().max(g_xi[j].abs()).max(0.02));
        assert!(rel < 0.05, "d loss / d xi[{j}]: autograd {} vs finite difference {fd}", g_xi[j]);
        max_rel = max_rel.max(rel);
    }
    let hf = 2.5e-4f32;
    let fd_f = (eval(xi0, 0.02 + hf) - eval(xi0, 0.02 - hf)) / (2.0 * hf as f64);
    let rel = (fd_f - g_f).abs() / fd_f.abs().max(g_f.abs()).max(0.02);
    assert!(rel < 0.05, "d loss / d log focal: autograd {g_f} vs finite difference {fd_f}");
    assert!(g_xi.iter().map(|v| v.abs()).fold(0.0, f64::max) > 1e-3, "gradient vanished: {g_xi:?}");
    eprintln!("max relative gradient error {max_rel:.4}");
}

#[test]
fn se3_exp_batch_gradient_matches_finite_differences() {
    let xi0 = [0.03, -0.02, 0.01, 0.02, 0.01, -0.03, 0.4, 0.9, -0.7, 0.1, 0.2, 0.3];
    let weights: Vec<f64> = (0..24).map(|i| ((i * 7919) % 13) as f64 / 13.0 - 0.4).collect();
    let w = Tensor::from_vec(weights, (2, 12), &Device::Cpu).unwrap();
    let f = |xi: &Tensor| -> Tensor {
        let (r, v) = se3_exp_batch(xi).unwrap();
        let t = v.matmul(&xi.narrow(1, 3, 3).unwrap().unsqueeze(2).unwrap()).unwrap().squeeze(2).unwrap();
        let flat = Tensor::cat(&[r.reshape((2, 9)).unwrap(), t], 1).unwrap();
        (flat * &w).unwrap().sum_all().unwrap()
    };
    let xi = Var::from_vec(xi0.to_vec(), (2, 6), &Device::Cpu).unwrap();
    let g = f(xi.as_tensor()).backward().unwrap();
    let g = g.get(xi.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    for j in 0..12 {
        let h = 1e-6;
        let (mut p, mut m) = (xi0, xi0);
        p[j] += h;
        m[j] -= h;
        let fp = f(&Tensor::from_vec(p.to_vec(), (2, 6), &Device::Cpu).unwrap()).to_scalar::<f64>().unwrap();
        let fm = f(&Tensor::from_vec(m.to_vec(), (2, 6), &Device::Cpu).unwrap()).to_scalar::<f64>().unwrap();
        let fd = (fp - fm) / (2.0 * h);
        assert!((fd - g[j]).abs() < 1e-6 * fd.abs().max(1.0), "param {j}: autograd {} fd {fd}", g[j]);
    }
}

#[test]
fn fused_cpu_renderer_matches_tensor_renderer() {
    use congeal::field::render::render_rays_tensor;
    let field = common::asymmetric_field(40);
    assert!(field.host.is_some(), "CPU fields carry the fused renderer");
    let k = Intrinsics::from_fov_y(45.0, 40, 30).unwrap();
    let pose = orbit_camera_from_object(-70.0, 25.0, 1.9);
    let cams = CameraBatch::from_poses(&[pose], &[k], &Device::Cpu).unwrap();
    let rays = cams.rays(&pixel_grid(40, 30, &Device::Cpu).unwrap()).unwrap();
    // Values: opacity, colour, depth, NOCS.
    let what = RenderWhat { colour: true, depth: true, nocs: true, orientation: false };
    let fused = render_rays_host(&field, &rays, 64, what, 4096).unwrap();
    let tensor = render_rays_tensor(&field, &rays, 64, what).unwrap();
    let op = tensor.opacity.to_vec1::<f32>().unwrap();
    let col = tensor.colour.unwrap().to_vec2::<f32>().unwrap();
    let noc = tensor.nocs.unwrap().to_vec2::<f32>().unwrap();
    let mut hits = 0;
    for i in 0..op.len() {
        assert!((fused.opacity[i] - op[i]).abs() < 1e-4, "opacity {i}: {} vs {}", fused.opacity[i], op[i]);
        if op[i] > 0.5 {
            hits += 1;
            for a in 0..3 {
                assert!((fused.colour[i][a] - col[i][a]).abs() < 1e-4, "colour {i}");
                assert!((fused.nocs[i][a] - (noc[i][a] / op[i]).clamp(0.0, 1.0)).abs() < 1e-3, "nocs {i}");
            }
        }
    }
    assert!(hits > 100, "only {hits} rays hit");
    // Gradients of a weighted opacity sum with respect to origins and directions.
    let o = Var::from_tensor(&rays.origins).unwrap();
    let d = Var::from_tensor(&rays.directions).unwrap();
    let n = op.len();
    let weights: Vec<f32> = (0..n).map(|i| ((i * 31) % 17) as f32 / 17.0 - 0.3).collect();
    let w = Tensor::from_vec(weights, n, &Device::Cpu).unwrap();
    let grads = |fused: bool| {
        let r = congeal::field::render::Rays { origins: o.as_tensor().clone(), directions: d.as_tensor().clone() };
        let out = if fused {
            congeal::field::render::render_rays(&field, &r, 64, RenderWhat::default()).unwrap()
        } else {
            render_rays_tensor(&field, &r, 64, RenderWhat::default()).unwrap()
        };
        let g = (out.opacity * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let go = g.get(o.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let gd = g.get(d.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (go, gd)
    };
    let (fo, fd) = grads(true);
    let (to, td) = grads(false);
    let scale = to.iter().chain(&td).map(|v| v.abs()).fold(0.0f32, f32::max);
    assert!(scale > 1e-3, "gradients vanished");
    for i in 0..fo.len() {
        assert!((fo[i] - to[i]).abs() < 1e-3 * scale, "d/d origin {i}: fused {} tensor {}", fo[i], to[i]);
        assert!((fd[i] - td[i]).abs() < 1e-3 * scale, "d/d direction {i}: fused {} tensor {}", fd[i], td[i]);
    }
}
