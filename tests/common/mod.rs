//! Shared helpers for the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use congeal::field::canonical::CanonicalField;
use congeal::field::voxel::VoxelGrid;

/// A solid sphere of `radius` (canonical units) voxelised analytically on an `n`^3 grid spanning
/// [-half, half]^3, with a soft one-voxel edge, coloured by position.
pub fn sphere_field(radius: f32, half: f32, n: usize, opacity_per_voxel: f32) -> CanonicalField {
    let voxel = 2.0 * half / n as f32;
    let mut occupancy = Vec::with_capacity(n * n * n);
    let mut colors = Vec::with_capacity(n * n * n);
    for z in 0..n {
        for y in 0..n {
            for x in 0..n {
                let c = [x, y, z].map(|i| -half + (i as f32 + 0.5) * voxel);
                let r = (c[0] * c[0] + c[1] * c[1] + c[2] * c[2]).sqrt();
                occupancy.push(((radius - r) / voxel + 0.5).clamp(0.0, 1.0));
                colors.push([0.5 + 0.5 * c[0] / half, 0.5 + 0.5 * c[1] / half, 0.5 + 0.5 * c[2] / half]);
            }
        }
    }
    let grid = VoxelGrid { dims: [n, n, n], bbox_min: [-half; 3], bbox_max: [half; 3], occupancy, colors };
    CanonicalField::from_voxels(&grid, ([-radius; 3], [radius; 3]), opacity_per_voxel, &Device::Cpu).unwrap()
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The folder of the shared evaluation collections: `$CONGEAL_DATA_DIR/collections` when that is
/// set, else `../shared/data/collections` beside the repository (the rule of the unit tests'
/// `test_util::collections_dir`).
pub fn collections_dir() -> PathBuf {
    match std::env::var_os("CONGEAL_DATA_DIR") {
        Some(d) => PathBuf::from(d).join("collections"),
        None => repo().join("../shared/data/collections"),
    }
}

/// The shared evaluation collection `name` when present.
pub fn shared_collection(name: &str) -> Option<PathBuf> {
    let p = collections_dir().join(name);
    p.join("collection.json").exists().then_some(p)
}

/// A file of `tests/fixtures/`.
pub fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures").join(name)
}

/// Every tensor of a safetensors file on the CPU; panics naming the file if it cannot be read.
pub fn load_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Largest absolute difference of two tensors of one shape, computed in f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

/// The demo collection shipped in the repo.
pub fn demo_collection() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("demo/duck")
}

/// An asymmetric shape (a block with a tall post at one corner and a bump on its front), voxelised
/// analytically on an `n`^3 grid over [-0.5, 0.5]^3 with soft edges. No rotation maps it onto itself.
pub fn asymmetric_field(n: usize) -> CanonicalField {
    asymmetric_variant(n, 0.42, 0.42)
}

/// Another instance of [`asymmetric_field`]'s category: the same parts (slab, post, bump) with the
/// post reaching `post_top` and the bump reaching `bump_front` (the original: 0.42, 0.42).
pub fn asymmetric_variant(n: usize, post_top: f32, bump_front: f32) -> CanonicalField {
    let boxes = [
        ([-0.35f32, -0.15, -0.25], [0.35f32, 0.05, 0.25]),  // base slab
        ([0.15, 0.05, -0.25], [0.35, post_top, -0.05]),     // post at +x, -z, tall
        ([-0.35, -0.15, 0.25], [-0.05, -0.02, bump_front]), // bump at -x, front
    ];
    boxes_field(n, &boxes, ([-0.35, -0.15, -0.25], [0.35, 0.42, 0.42]))
}

/// A slab with two posts on opposite corners, at (+x, -z) reaching `back_post_top` and at (-x, +z)
/// reaching `front_post_top`: with equal posts the shape is the same after a half turn about y, so
/// its silhouettes tell front from back only by the posts' heights. Coloured by position.
pub fn two_post_variant(n: usize, back_post_top: f32, front_post_top: f32) -> CanonicalField {
    let boxes = [
        ([-0.35f32, -0.15, -0.25], [0.35f32, 0.05, 0.25]), // base slab
        ([0.15, 0.05, -0.25], [0.35, back_post_top, -0.05]),
        ([-0.35, 0.05, 0.05], [-0.15, front_post_top, 0.25]),
    ];
    let top = back_post_top.max(front_post_top);
    boxes_field(n, &boxes, ([-0.35, -0.15, -0.25], [0.35, top, 0.25]))
}

/// A field of unions of axis-aligned boxes (min, max) in the cube `[-0.5, 0.5]^3`, `n` voxels a side,
/// coloured by position; `bbox` is the object's bounding box.
fn boxes_field(n: usize, boxes: &[([f32; 3], [f32; 3])], bbox: ([f32; 3], [f32; 3])) -> CanonicalField {
    let half = 0.5f32;
    let voxel = 2.0 * half / n as f32;
    let mut occupancy = Vec::with_capacity(n * n * n);
    let mut colors = Vec::with_capacity(n * n * n);
    for z in 0..n {
        for y in 0..n {
            for x in 0..n {
                let c = [x, y, z].map(|i| -half + (i as f32 + 0.5) * voxel);
                let mut occ = 0.0f32;
                for (lo, hi) in boxes {
                    // Signed distance to the box (negative inside), Chebyshev-style.
                    let d = (0..3).map(|a| (lo[a] - c[a]).max(c[a] - hi[a])).fold(f32::NEG_INFINITY, f32::max);
                    occ = occ.max((0.5 - d / voxel).clamp(0.0, 1.0));
                }
                occupancy.push(occ);
                colors.push([0.2 + 0.6 * (c[0] + 0.5), 0.5, 0.2 + 0.6 * (c[2] + 0.5)]);
            }
        }
    }
    let grid = VoxelGrid { dims: [n, n, n], bbox_min: [-half; 3], bbox_max: [half; 3], occupancy, colors };
    CanonicalField::from_voxels(&grid, bbox, 4.0, &Device::Cpu).unwrap()
}

/// A real-photograph set (`../shared/data/real/NAME`) when present; prints why a test is skipped
/// when not (the photographs live in shared/ and never in the repository).
pub fn shared_real(name: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/real").join(name);
    if p.is_dir() {
        Some(p)
    } else {
        eprintln!("skipped: {} is absent (real photographs are read from shared/, never shipped)", p.display());
        None
    }
}
