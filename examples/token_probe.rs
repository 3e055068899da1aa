//! What the DINOv2 tokens know about 3D, across instances (a research probe, not a pipeline stage).
//!
//! Linear probes (Fisher discriminants) are learnt from renders of the template (and of `--extra`
//! meshes in the same canonical frame) at the candidate poses, where every token's surface point is
//! known, and tested on the tokens of a rendered collection of *other* instances, whose ground-truth
//! NOCS and poses give each token's true answer:
//! - front / back half, left / right half, upper / lower half of the object (canonical z, x, y);
//! - near / far: in front of or behind the object's centre along the camera axis;
//! - view side: is the camera on the object's front side.
//!
//! For near / far it also asks the question a pose choice asks: do an image's tokens agree better
//! with the depths of its true pose than with those of the pose turned half way round the up axis,
//! with the instance's own geometry (ground truth) and with the template's (the candidate nearest to
//! each pose), which is all a run has.
//!
//! Run: `cargo run --release --example token_probe -- COLLECTION [--config C] [--extra MESH ...]`
//! (default config/fast_224.yaml; the collection needs NOCS maps and poses, e.g.
//! ../shared/data/collections/chairs-mixed).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use nalgebra::{DMatrix, DVector, Point2, Point3, Rotation3, UnitQuaternion, Vector3};

use congeal::collection::Collection;
use congeal::config::Config;
use congeal::congeal::category::{surface_points, token_points, WindowCamera};
use congeal::congeal::coord_maps::FeatureGrid;
use congeal::congeal::features::{token_mask, FeatureExtractor};
use congeal::congeal::pipeline::{attach_candidate_features, attach_input_features, feature_window};
use congeal::congeal::pose_init::{input_view, render_candidates};
use congeal::field::canonical::CanonicalField;
use congeal::field::mesh::TriangleMesh;
use congeal::geometry::metrics::rotation_error_deg;
use congeal::shape::template_shape;

/// The questions asked of every token.
const QUESTIONS: [&str; 5] =
    ["front / back half (z)", "left / right half (x)", "upper / lower half (y)", "near / far", "view side"];
/// Tokens closer to the boundary between the two answers than this are not asked (fraction of the
/// box side for the halves, of its diagonal for near / far).
const MARGIN: [f64; 5] = [0.15, 0.15, 0.15, 0.1, 0.0];
/// Surface points per token side.
const SUB: usize = 2;

/// A token's answers: `Some(true / false)` per question, `None` where it is too near the boundary.
type Answers = [Option<bool>; 5];

/// Answers of a token at `point` (object frame) seen by a camera with rotation `rotation`
/// (camera_from_object), for an object in the box `lo..hi`.
fn answers(point: &Point3<f64>, rotation: &UnitQuaternion<f64>, lo: &Point3<f64>, hi: &Point3<f64>) -> Answers {
    let centre = nalgebra::center(lo, hi);
    let side = hi - lo;
    let half = |axis: usize, k: usize| {
        let v = (point[axis] - centre[axis]) / side[axis].max(1e-9);
        (v.abs() >= MARGIN[k]).then_some(v > 0.0)
    };
    let depth = (rotation * (point - centre)).z / side.norm().max(1e-9);
    // The camera centre in the object frame is -R^T t; its direction, for a camera looking at the
    // object, is -R^T z.
    let camera_z = -(rotation.inverse() * Vector3::z()).z;
    [
        half(2, 0),
        half(0, 1),
        half(1, 2),
        (depth.abs() >= MARGIN[3]).then_some(depth > 0.0),
        (camera_z.abs() >= 0.3).then_some(camera_z > 0.0),
    ]
}

/// Fisher's discriminant `w . x + b > 0` of tokens (rows of `x`) by class, total covariance shrunk by
/// a tenth of its mean eigenvalue.
fn fisher(x: &[Vec<f32>], class: &[bool]) -> Result<(DVector<f64>, f64)> {
    let c = x.first().map_or(0, Vec::len);
    let n1 = class.iter().filter(|v| **v).count();
    if n1 == 0 || n1 == class.len() {
        bail!("a probe needs tokens of both classes ({n1} of {})", class.len());
    }
    let mut mean = [DVector::<f64>::zeros(c), DVector::<f64>::zeros(c)];
    let mut all = DVector::<f64>::zeros(c);
    let mut second = DMatrix::<f64>::zeros(c, c);
    for chunk in x.chunks(2048) {
        let m = DMatrix::<f32>::from_fn(chunk.len(), c, |r, k| chunk[r][k]);
        second += (m.transpose() * &m).map(f64::from);
    }
    for (row, &k) in x.iter().zip(class) {
        let v = DVector::from_iterator(c, row.iter().map(|a| f64::from(*a)));
        mean[usize::from(k)] += &v;
        all += v;
    }
    let n = x.len() as f64;
    all /= n;
    mean[0] /= (class.len() - n1) as f64;
    mean[1] /= n1 as f64;
    let mut cov = second / n - &all * all.transpose();
    let ridge = 0.1 * cov.trace() / c as f64;
    for k in 0..c {
        cov[(k, k)] += ridge;
    }
    let w = cov.cholesky().context("covariance not positive")?.solve(&(&mean[1] - &mean[0]));
    let b = -w.dot(&(&mean[0] + &mean[1])) / 2.0;
    Ok((w, b))
}

fn says(w: &(DVector<f64>, f64), token: &[f32]) -> bool {
    token.iter().zip(w.0.iter()).map(|(a, b)| f64::from(*a) * b).sum::<f64>() + w.1 > 0.0
}

fn token(grid: &FeatureGrid, t: usize) -> Vec<f32> {
    grid.data[t * grid.channels..(t + 1) * grid.channels].to_vec()
}

/// A template's candidates: their features, cameras, token points (mean per token) and the box.
struct Rendered {
    grids: Vec<FeatureGrid>,
    cameras: Vec<WindowCamera>,
    points: Vec<Vec<Option<Point3<f64>>>>,
    lo: Point3<f64>,
    hi: Point3<f64>,
}

fn token_means(
    field: &CanonicalField,
    cameras: &[WindowCamera],
    tokens: usize,
    config: &Config,
) -> Result<Vec<Vec<Option<Point3<f64>>>>> {
    let n = (tokens * SUB) as u32;
    Ok(surface_points(field, cameras, n, config.render.samples_per_ray, config.render.chunk_rays)?
        .iter()
        .map(|p| {
            token_points(p, tokens, SUB)
                .iter()
                .map(|q| {
                    (2 * q.len() >= SUB * SUB)
                        .then(|| Point3::from(q.iter().fold(Vector3::zeros(), |a, p| a + p.coords) / q.len() as f64))
                })
                .collect()
        })
        .collect())
}

fn render(mesh: &TriangleMesh, config: &Config, extractor: &FeatureExtractor) -> Result<Rendered> {
    let shape = template_shape(mesh, config, &Device::Cpu)?;
    let mut set = render_candidates(&shape.field, &config.pose_init, config.render.chunk_rays)?;
    attach_candidate_features(&mut set, &shape.field, extractor, config, None)?;
    let featured: Vec<_> = set.candidates.iter().filter_map(|c| c.features.clone().map(|f| (c, f))).collect();
    let cameras: Vec<WindowCamera> = featured
        .iter()
        .map(|(c, _)| WindowCamera { camera_from_object: c.camera_from_object, intrinsics: c.intrinsics, window: c.crop })
        .collect();
    let tokens = extractor.tokens_per_side();
    let points = token_means(&shape.field, &cameras, tokens, config)?;
    let mut all = points.iter().flatten().flatten();
    let first = *all.next().context("the template has no surface")?;
    let (lo, hi) = all.fold((first, first), |(lo, hi), p| (lo.inf(p), hi.sup(p)));
    Ok(Rendered { grids: featured.into_iter().map(|(_, f)| f).collect(), cameras, points, lo, hi })
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut collection_dir = None;
    let mut config_path = PathBuf::from("config/fast_224.yaml");
    let mut extra = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" => config_path = args.next().context("--config needs a file")?.into(),
            "--extra" => extra.push(PathBuf::from(args.next().context("--extra needs a mesh")?)),
            _ => collection_dir = Some(PathBuf::from(a)),
        }
    }
    let collection_dir = collection_dir.context("usage: token_probe COLLECTION [--config C] [--extra MESH ...]")?;
    let config = Config::from_yaml_file(&config_path)?;
    let collection = Collection::load(&collection_dir)?;
    let extractor = FeatureExtractor::load(&config.features, &Device::Cpu)?;
    let template = collection.template.clone().context("the collection has no template.obj")?;
    let mut meshes = vec![template];
    meshes.extend(extra);

    // Training tokens from the templates' candidate renders.
    let mut rendered = Vec::new();
    for m in &meshes {
        rendered.push(render(&TriangleMesh::load(m)?, &config, &extractor)?);
    }
    let mut probes = Vec::new();
    for q in 0..QUESTIONS.len() {
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for r in &rendered {
            for ((grid, camera), points) in r.grids.iter().zip(&r.cameras).zip(&r.points) {
                for (t, p) in points.iter().enumerate() {
                    if let Some(a) = p.and_then(|p| answers(&p, &camera.camera_from_object.rotation, &r.lo, &r.hi)[q]) {
                        x.push(token(grid, t));
                        y.push(a);
                    }
                }
            }
        }
        probes.push(fisher(&x, &y)?);
    }

    // Test tokens: the collection's images with their ground-truth surface points.
    let tokens = extractor.tokens_per_side();
    let size = extractor.input_size();
    let (mut right, mut asked) = ([0usize; 5], [0usize; 5]);
    let (mut truth_wins, mut template_wins, mut images) = (0, 0, 0);
    let own = &rendered[0];
    let turn = UnitQuaternion::from_axis_angle(&Vector3::y_axis(), std::f64::consts::PI);
    for (i, entry) in collection.images.iter().enumerate() {
        let (Some(gt), Some(nocs)) = (&entry.ground_truth, &entry.nocs) else { continue };
        let image = collection.load_image(i)?;
        let mut view = input_view(&image.rgb, &image.mask, Some(gt.intrinsics), &config.pose_init)?;
        attach_input_features(std::slice::from_mut(&mut view), &[(&image.rgb, &image.mask)], &extractor)?;
        let grid = view.features.clone().context("no input features")?;
        let (w, _, values) = congeal::output::read_nocs_png(&collection.root.join(nocs))?;
        let (lo, hi) = (Point3::from(gt.nocs_bbox_min), Point3::from(gt.nocs_bbox_max));
        let window = feature_window(&view, size);
        let cell = (size as usize) / tokens;
        // Each token's ground-truth point: the mean over its window pixels on the mask.
        let truth: Vec<Option<Point3<f64>>> = (0..tokens * tokens)
            .map(|t| {
                let (tx, ty) = (t % tokens, t / tokens);
                let mut sum = Vector3::zeros();
                let mut n = 0;
                for v in 0..cell {
                    for u in 0..cell {
                        let q = window.image_from_crop(Point2::new((tx * cell + u) as f64, (ty * cell + v) as f64));
                        let (x, y) = (q.x.round(), q.y.round());
                        if x < 0.0 || y < 0.0 || x >= image.mask.width() as f64 || y >= image.mask.height() as f64 {
                            continue;
                        }
                        if image.mask.get_pixel(x as u32, y as u32)[0] < 128 {
                            continue;
                        }
                        let c = values[(y as u32 * w + x as u32) as usize];
                        sum += Vector3::from_fn(|a, _| lo[a] + f64::from(c[a]) * (hi[a] - lo[a]));
                        n += 1;
                    }
                }
                (2 * n >= cell * cell).then(|| Point3::from(sum / n as f64))
            })
            .collect();
        let rotation = gt.camera_from_object.rotation;
        for (t, p) in truth.iter().enumerate() {
            let Some(p) = p else { continue };
            let a = answers(p, &rotation, &lo, &hi);
            for q in 0..QUESTIONS.len() {
                if let Some(a) = a[q] {
                    asked[q] += 1;
                    right[q] += usize::from(says(&probes[q], &token(&grid, t)) == a);
                }
            }
        }
        // Near / far, pose against its half turn: instance geometry, then the template's.
        let near_far = |answers_of: &dyn Fn(usize) -> Option<bool>| {
            let (mut agree, mut n) = (0usize, 0usize);
            for t in 0..tokens * tokens {
                if let Some(a) = answers_of(t) {
                    n += 1;
                    agree += usize::from(says(&probes[3], &token(&grid, t)) == a);
                }
            }
            agree as f64 / n.max(1) as f64
        };
        let truth_depth = near_far(&|t| truth[t].and_then(|p| answers(&p, &rotation, &lo, &hi)[3]));
        let twin_depth = near_far(&|t| truth[t].and_then(|p| answers(&p, &(rotation * turn), &lo, &hi)[3]));
        let fg = token_mask(&view.silhouette, config.pose_init.score_size, tokens);
        let nearest = |r: &Rotation3<f64>| {
            (0..own.cameras.len())
                .min_by(|&a, &b| {
                    rotation_error_deg(&own.cameras[a].camera_from_object.rotation.to_rotation_matrix(), r)
                        .total_cmp(&rotation_error_deg(&own.cameras[b].camera_from_object.rotation.to_rotation_matrix(), r))
                })
                .unwrap_or(0)
        };
        let template_depth = |k: usize| {
            let cam = &own.cameras[k];
            near_far(&|t| {
                if !fg[t] {
                    return None;
                }
                own.points[k][t].and_then(|p| answers(&p, &cam.camera_from_object.rotation, &own.lo, &own.hi)[3])
            })
        };
        let at_truth = template_depth(nearest(&rotation.to_rotation_matrix()));
        let at_twin = template_depth(nearest(&(rotation * turn).to_rotation_matrix()));
        images += 1;
        truth_wins += usize::from(truth_depth > twin_depth);
        template_wins += usize::from(at_truth > at_twin);
    }
    println!("token probes learnt from {} template(s), tested on {} ({} images)", meshes.len(), collection_dir.display(), images);
    println!("| question | tokens asked | right |");
    println!("|---|---|---|");
    for q in 0..QUESTIONS.len() {
        println!("| {} | {} | {:.1} % |", QUESTIONS[q], asked[q], 100.0 * right[q] as f64 / asked[q].max(1) as f64);
    }
    println!(
        "near / far agrees better with the true pose than with its half turn about up: {truth_wins} of {images} images \
         with the instance's geometry, {template_wins} of {images} with the template's (candidate nearest to each pose)"
    );
    Ok(())
}
