//! Unit tests of the `sds` shape source.

use candle_core::Var;

use super::*;
use crate::config::SdsConfig;

#[test]
fn schedule_matches_closed_form_and_inverts() {
    let s = NoiseSchedule::stable_diffusion();
    // diffusers' scaled_linear: first beta 0.00085, last 0.012.
    assert!((s.alphas_cumprod[0] - (1.0 - 0.00085)).abs() < 1e-12);
    let last_ratio = s.alphas_cumprod[999] / s.alphas_cumprod[998];
    assert!((1.0 - last_ratio - 0.012).abs() < 1e-9);
    assert!((s.alphas_cumprod[999] - 0.0046).abs() < 2e-4, "{}", s.alphas_cumprod[999]);
    let dev = Device::Cpu;
    let x0 = Tensor::randn(0f32, 1.0, (2, 4, 3, 3), &dev).unwrap();
    let eps = Tensor::randn(0f32, 1.0, (2, 4, 3, 3), &dev).unwrap();
    let xt = s.add_noise(&x0, &eps, &[10, 900]).unwrap();
    let back = s.predict_x0(&xt, &eps, &[10, 900]).unwrap();
    let d = (back - x0).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(d < 1e-4, "{d}");
}

#[test]
fn bilinear_resize_matches_direct_interpolation_and_has_gradient() {
    let dev = Device::Cpu;
    let x = Tensor::arange(0f32, 12.0, &dev).unwrap().reshape((1, 1, 3, 4)).unwrap();
    let y = resize_bilinear(&x, 6, 8).unwrap();
    // Half-pixel centres: output (0,0) samples source (-0.25,-0.25) -> clamped to (0,0);
    // output (1,1) samples (0.25, 0.25): 0.75^2*0 + 0.75*0.25*1 + 0.25*0.75*4 + 0.25^2*5.
    let v = y.to_vec3::<f32>().unwrap_or_default();
    let v = if v.is_empty() { y.squeeze(0).unwrap().to_vec3::<f32>().unwrap() } else { v };
    assert!((v[0][0][0] - 0.0).abs() < 1e-6);
    let expect = 0.75 * 0.25 * 1.0 + 0.25 * 0.75 * 4.0 + 0.0625 * 5.0;
    assert!((v[0][1][1] - expect).abs() < 1e-5, "{} vs {expect}", v[0][1][1]);
    let var = Var::from_tensor(&x).unwrap();
    let g = resize_bilinear(var.as_tensor(), 6, 8).unwrap().sum_all().unwrap().backward().unwrap();
    // Each output distributes weight 1 over the inputs: gradients sum to the output count.
    let total = g.get(var.as_tensor()).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert!((total - 48.0).abs() < 1e-3, "{total}");
}

#[test]
fn mvdream_camera_is_a_unit_sphere_camera_to_world() {
    for (az, el) in [(0.0, 0.0), (90.0, 15.0), (-135.0, 30.0)] {
        let m = mvdream_camera(az, el);
        let r = |i: usize, j: usize| m[i * 4 + j] as f64;
        for a in 0..3 {
            for b in 0..3 {
                let dot: f64 = (0..3).map(|k| r(k, a) * r(k, b)).sum();
                assert!((dot - if a == b { 1.0 } else { 0.0 }).abs() < 1e-6);
            }
        }
        let t = [r(0, 3), r(1, 3), r(2, 3)];
        assert!(((t[0] * t[0] + t[1] * t[1] + t[2] * t[2]).sqrt() - 1.0).abs() < 1e-6);
        // Blender z-up: elevation is the z component of the camera position.
        assert!((t[2] - el.to_radians().sin()).abs() < 1e-6);
        // The camera looks at the origin: its -z axis (third column, negated) is -position.
        for (k, tk) in t.iter().enumerate() {
            assert!((r(k, 2) - tk).abs() < 1e-6);
        }
        assert_eq!(&m[12..], &[0.0, 0.0, 0.0, 1.0]);
    }
    // Azimuth 0, elevation 0: camera on the object's +z (Blender -y), right = +x.
    let m = mvdream_camera(0.0, 0.0);
    assert!((m[7] + 1.0).abs() < 1e-6 && (m[0] - 1.0).abs() < 1e-6);
}

#[test]
fn blob_field_renders_an_opaque_centre_and_freezes_to_a_unit_bbox() {
    let cfg = SdsConfig { grid: 16, ..SdsConfig::default() };
    let field = SdsField::new(&cfg, &Device::Cpu).unwrap();
    let shape = field.freeze().unwrap();
    let (lo, hi) = (shape.field.nocs_min, shape.field.nocs_max);
    let extent = (0..3).map(|k| hi[k] - lo[k]).fold(0f32, f32::max);
    assert!((extent - 1.0).abs() < 1e-5, "{extent}");
    let mut rng = Stream::new(1);
    let views = sample_views(&cfg, 16, &mut rng, &Device::Cpu).unwrap();
    let (img, stats) = render_views(&field.field().unwrap(), &views, &[1.0, 1.0, 1.0], 32, true).unwrap();
    assert_eq!(img.dims(), &[4, 3, 16, 16]);
    let o = stats.mean_opacity.to_scalar::<f32>().unwrap();
    // A ball's density falls outwards, so the normals where the weight is (its front) face the
    // cameras: a small penalty (from what light reaches the back half of the soft blob).
    let ball = stats.orientation.unwrap().to_scalar::<f32>().unwrap();
    // Turned inside out (no blob; density growing outwards), the normals face away: a large penalty.
    let inverted = SdsField::new(&SdsConfig { blob_density: 0.0, ..cfg.clone() }, &Device::Cpu).unwrap();
    let g = 16;
    let cell = 1.0 / g as f32;
    let radial: Vec<f32> = (0..g * g * g)
        .map(|i| {
            let (x, y, z) = (i % g, (i / g) % g, i / (g * g));
            let p = [x, y, z].map(|k| -0.5 + (k as f32 + 0.5) * cell);
            20.0 * (p[0] * p[0] + p[1] * p[1] + p[2] * p[2]).sqrt() - 4.0
        })
        .collect();
    inverted.raw_density.set(&Tensor::from_vec(radial, (g * g * g, 1), &Device::Cpu).unwrap()).unwrap();
    let (_, stats) = render_views(&inverted.field().unwrap(), &views, &[1.0, 1.0, 1.0], 32, true).unwrap();
    let inside_out = stats.orientation.unwrap().to_scalar::<f32>().unwrap();
    assert!(inside_out > 5.0 * ball, "orientation penalty: ball {ball}, inverted ball {inside_out}");
    assert!(o > 0.02 && o < 0.9, "mean opacity {o}");
    // The frozen field is what pose initialisation renders: its candidates must see it.
    let pcfg = crate::config::Config::default().pose_init;
    let pcfg = crate::config::PoseInitConfig { azimuths: 4, elevations: 2, fovs_deg: vec![30.0], render_size: 32, ..pcfg };
    let set = crate::congeal::pose_init::render_candidates(&shape.field, &pcfg, 1 << 16).unwrap();
    assert_eq!(set.candidates.len(), 8);
}
