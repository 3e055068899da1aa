//! The reverse canonical coordinate map (paper Eq. 12-13): canonical point -> rendered pixel with
//! the nearest NOCS -> input pixel whose warped position is nearest, and the stored forward maps a
//! run's reverse maps are built from.

use std::path::Path;

use kiddo::{KdTree, SquaredEuclidean};

use crate::congeal::coord_maps::StoredWarp;
use crate::error::{Error, Result};
use crate::output::result::{ImageResult, RunResult};
use crate::output::{read_nocs_png, read_nocs_png_for_image};

/// One image's forward map.
#[derive(Clone, Debug)]
pub struct NocsMap {
    /// Width, pixels.
    pub width: u32,
    /// Height, pixels.
    pub height: u32,
    /// NOCS per pixel (row-major); `None` off the object.
    pub nocs: Vec<Option<[f32; 3]>>,
}

impl NocsMap {
    /// Reads a run's 16-bit NOCS PNG (background = all zero).
    pub fn load(path: &Path) -> Result<Self> {
        let (width, height, values) = read_nocs_png(path)?;
        Ok(Self::from_values(width, height, values))
    }

    /// [`NocsMap::load`], refusing a map of another size than its image (`[width, height]`, as in
    /// result.json): its pixels would not be the image's.
    pub fn load_for_image(path: &Path, size: [u32; 2]) -> Result<Self> {
        let values = read_nocs_png_for_image(path, size[0], size[1])?;
        Ok(Self::from_values(size[0], size[1], values))
    }

    fn from_values(width: u32, height: u32, values: Vec<[f32; 3]>) -> Self {
        let nocs = values.into_iter().map(|v| if v.iter().any(|c| *c > 0.0) { Some(v) } else { None }).collect();
        Self { width, height, nocs }
    }

    /// The NOCS at a (sub)pixel position, nearest pixel; `None` off the object or the image.
    pub fn at(&self, x: f64, y: f64) -> Option<[f32; 3]> {
        let (u, v) = (x.round(), y.round());
        if !(u >= 0.0 && v >= 0.0 && u < self.width as f64 && v < self.height as f64) {
            return None;
        }
        self.nocs[(v as u32 * self.width + u as u32) as usize]
    }

    /// Reverse map: the pixel whose NOCS is nearest to `target`, if within `max_distance`.
    pub fn find(&self, target: [f32; 3], max_distance: f32) -> Option<[f64; 2]> {
        let mut best = (max_distance * max_distance, None);
        for (i, n) in self.nocs.iter().enumerate() {
            if let Some(n) = n {
                let d = (n[0] - target[0]).powi(2) + (n[1] - target[1]).powi(2) + (n[2] - target[2]).powi(2);
                if d <= best.0 {
                    best = (d, Some(i));
                }
            }
        }
        best.1.map(|i| [(i as u32 % self.width) as f64, (i as u32 / self.width) as f64])
    }
}

/// A k-d tree of the points, each exact duplicate (same bits) kept once with its first item: kiddo's
/// buckets cannot hold more than 32 copies of one point (a saturated warp, a flat NOCS region of a
/// quantised map), and a nearest-neighbour query finds the same distance either way. Points with a
/// NaN or infinite coordinate (a corrupt warp) are left out: kiddo cannot order them.
pub fn kd_tree<const K: usize>(points: impl Iterator<Item = ([f64; K], u64)>) -> KdTree<f64, K> {
    let mut seen = std::collections::HashSet::new();
    let mut tree: KdTree<f64, K> = KdTree::new();
    for (p, item) in points {
        if p.iter().all(|v| v.is_finite()) && seen.insert(p.map(f64::to_bits)) {
            tree.add(&p, item);
        }
    }
    tree
}

/// Reverse canonical coordinate map of one image (Eq. 12-13): NOCS point -> pixel of the rendering
/// with the nearest NOCS (Eq. 12) -> input pixel whose warped position is nearest (Eq. 13).
pub struct ReverseMap {
    rendering: KdTree<f64, 3>,
    rendering_pixels: Vec<[f64; 2]>,
    warped: KdTree<f64, 2>,
    input_pixels: Vec<[f64; 2]>,
}

impl ReverseMap {
    /// Builds the two k-d trees: `rendering` = (pixel, NOCS) of the rendering's foreground, `warped` =
    /// (input pixel, its warped position ũ in image pixels) over the input's foreground.
    pub fn new(rendering: &[([f64; 2], [f32; 3])], warped: &[([f64; 2], [f64; 2])]) -> Result<Self> {
        if rendering.is_empty() || warped.is_empty() {
            return Err(Error::InvalidInput("reverse map needs a non-empty rendering and input foreground".into()));
        }
        let tree3 = kd_tree(rendering.iter().enumerate().map(|(k, (_, n))| (n.map(|v| v as f64), k as u64)));
        let tree2 = kd_tree(warped.iter().enumerate().map(|(k, (_, w))| (*w, k as u64)));
        Ok(Self {
            rendering: tree3,
            rendering_pixels: rendering.iter().map(|r| r.0).collect(),
            warped: tree2,
            input_pixels: warped.iter().map(|w| w.0).collect(),
        })
    }

    /// The input pixel for canonical point `nocs`; `None` when no rendered NOCS lies within
    /// `max_distance` of it (the point is not visible in this image).
    pub fn find(&self, nocs: [f32; 3], max_distance: f64) -> Option<[f64; 2]> {
        if nocs.iter().any(|v| !v.is_finite()) {
            return None;
        }
        let hit = self.rendering.nearest_one::<SquaredEuclidean>(&nocs.map(|v| v as f64));
        if hit.distance > max_distance * max_distance {
            return None;
        }
        let ut = self.rendering_pixels[hit.item as usize];
        let back = self.warped.nearest_one::<SquaredEuclidean>(&ut);
        Some(self.input_pixels[back.item as usize])
    }
}

/// Builds the reverse map (Eq. 12-13) of a run's image from its NOCS rendering, its warp (identity
/// when the run has none) and its forward map's pixels.
pub fn reverse_map(run_dir: &Path, run: &RunResult, file: &str) -> Result<Option<ReverseMap>> {
    let image = find_image(run_dir, run, file)?;
    let (Some(render_file), Some(nocs_file)) = (&image.nocs_render, &image.nocs) else { return Ok(None) };
    let rendered = NocsMap::load_for_image(&run_dir.join(render_file), image.size)?;
    let forward = NocsMap::load_for_image(&run_dir.join(nocs_file), image.size)?;
    let warp: Option<StoredWarp> = match &image.warp {
        Some(w) => {
            let path = run_dir.join(w);
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            Some(serde_json::from_str(&text).map_err(|e| Error::Run { path, message: e.to_string() })?)
        }
        None => None,
    };
    let pixel = |i: usize, w: u32| [(i as u32 % w) as f64, (i as u32 / w) as f64];
    let rendering: Vec<([f64; 2], [f32; 3])> =
        rendered.nocs.iter().enumerate().filter_map(|(i, n)| n.map(|n| (pixel(i, rendered.width), n))).collect();
    let warped: Vec<([f64; 2], [f64; 2])> = forward
        .nocs
        .iter()
        .enumerate()
        .filter(|(_, n)| n.is_some())
        .map(|(i, _)| {
            let p = pixel(i, forward.width);
            (p, warp.as_ref().map_or(p, |w| w.apply_pixel(p)))
        })
        .collect();
    if rendering.is_empty() || warped.is_empty() {
        return Ok(None);
    }
    ReverseMap::new(&rendering, &warped).map(Some)
}

/// The entry of `file` in a run's result.
pub(crate) fn find_image<'a>(run_dir: &Path, run: &'a RunResult, file: &str) -> Result<&'a ImageResult> {
    run.images
        .iter()
        .find(|i| i.file == file)
        .ok_or_else(|| Error::Run { path: run_dir.join("result.json"), message: format!("image {file} is not in the run") })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 100 copies of one point (more than a kiddo bucket holds; inserting them one by one panicked)
    /// next to one other point, and 40 points with a NaN coordinate: the two points are found, each
    /// copy with the first copy's item, and the NaN points are left out.
    #[test]
    fn kd_tree_keeps_duplicates_once() {
        use kiddo::SquaredEuclidean;
        let points = (0..100).map(|k| ([0.25, 0.5, 0.75], k)).chain(std::iter::once(([1.0, 1.0, 1.0], 100)));
        let nan = (0..40).map(|k| ([f64::NAN, k as f64, 0.0], 200 + k));
        let tree = kd_tree(points.chain(nan));
        assert_eq!(tree.size(), 2);
        assert_eq!(tree.nearest_one::<SquaredEuclidean>(&[0.2, 0.5, 0.7]).item, 0);
        assert_eq!(tree.nearest_one::<SquaredEuclidean>(&[0.9, 1.0, 1.0]).item, 100);
    }

    #[test]
    fn reverse_map_finds_nearest_and_refuses_far_points() {
        let nocs = vec![None, Some([0.1, 0.1, 0.1]), Some([0.5, 0.5, 0.5]), None];
        let m = NocsMap { width: 2, height: 2, nocs };
        assert_eq!(m.find([0.12, 0.1, 0.1], 0.08), Some([1.0, 0.0]));
        assert_eq!(m.find([0.48, 0.5, 0.5], 0.08), Some([0.0, 1.0]));
        assert_eq!(m.find([0.9, 0.9, 0.9], 0.08), None);
        assert_eq!(m.at(1.2, -0.3), Some([0.1, 0.1, 0.1]));
        assert_eq!(m.at(0.0, 0.0), None);
        assert_eq!(m.at(5.0, 0.0), None);
    }

    #[test]
    fn reverse_map_inverts_nearest_neighbours() {
        let rendering = vec![([10.0, 10.0], [0.1, 0.2, 0.3]), ([20.0, 10.0], [0.8, 0.2, 0.3])];
        let warped = vec![([11.0, 9.0], [10.5, 10.0]), ([22.0, 9.0], [19.0, 10.0])];
        let r = ReverseMap::new(&rendering, &warped).unwrap();
        assert_eq!(r.find([0.75, 0.2, 0.3], 0.1), Some([22.0, 9.0]));
        assert_eq!(r.find([0.12, 0.2, 0.3], 0.1), Some([11.0, 9.0]));
        assert_eq!(r.find([0.5, 0.9, 0.9], 0.1), None);
        assert_eq!(r.find([f32::NAN, 0.0, 0.0], 0.1), None);
    }
}
