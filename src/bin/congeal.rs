//! `congeal`: the offline command line (run, eval, bench, bag).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use congeal::collection::Collection;
use congeal::config::Config;
use congeal::congeal::transfer::Method;
use congeal::output::result::RunResult;
use congeal::shape::ShapeSpec;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(name = "congeal", version, about = "3D Congealing: align an image collection in one canonical 3D frame")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipeline on a collection folder (collection format or a plain folder of images).
    Run {
        /// Collection folder.
        collection: PathBuf,
        /// Output folder (result.json, canonical.ply, nocs/, overlays/, contact_sheet.png).
        #[arg(long)]
        out: PathBuf,
        /// Config file (default: config/default.yaml if present, else built-in defaults).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Shape source: template, sds, model:PATH.
        #[arg(long, default_value = "template")]
        shape: String,
        /// Template mesh (OBJ/PLY) overriding the collection's template.obj.
        #[arg(long)]
        template: Option<PathBuf>,
        /// Device override: cpu, cuda, cuda:N.
        #[arg(long)]
        device: Option<String>,
        /// Diffusion weights for `--shape sds` (diffusers layout of stable-diffusion-2-1-base, plus
        /// `mvdream/unet.safetensors` for MVDream guidance); overrides `sds.weights_dir`.
        #[arg(long)]
        weights_dir: Option<PathBuf>,
    },
    /// Evaluate a run against a collection's ground truth; prints JSON.
    Eval {
        /// Collection folder with ground truth.
        collection: PathBuf,
        /// Run folder written by `congeal run`.
        run: PathBuf,
        /// Also write the JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Keypoint pairs with ground truth (`congeal pairs`): adds PCK@0.1 of the predictions they
        /// hold (`congeal transfer --out`), or of the run's 3D transfer when they hold none, and PCK at
        /// 0.05-0.5 (`keypoints.curve`).
        #[arg(long)]
        pairs: Option<PathBuf>,
    },
    /// Build keypoint-transfer pairs with ground truth from a collection's NOCS maps.
    Pairs {
        /// Collection folder with NOCS maps (and poses, for single-instance collections).
        collection: PathBuf,
        /// Output PAIRS.json (with `gt`).
        #[arg(long)]
        out: PathBuf,
        /// Number of image pairs.
        #[arg(long, default_value_t = 100)]
        pairs: usize,
        /// Source points per pair.
        #[arg(long, default_value_t = 20)]
        points: usize,
        /// Seed of the pair selection.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Visibility tolerance (default: 0.01 of the bbox diagonal for single-instance, 0.05
        /// normalised NOCS for cross-instance collections).
        #[arg(long)]
        tolerance: Option<f64>,
    },
    /// Benchmark: run the pipeline and print timings, candidate-render throughput and peak memory.
    Bench {
        /// Collection folder.
        collection: PathBuf,
        /// Config file (default: config/fast.yaml).
        #[arg(long, default_value = "config/fast.yaml")]
        config: PathBuf,
        /// Output folder (a temporary one by default).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Evaluate against the collection's ground truth too.
        #[arg(long)]
        eval: bool,
    },
    /// Transfer keypoints between images of a run through the canonical shape (paper Eq. 17).
    Transfer {
        /// Run folder written by `congeal run`.
        run: PathBuf,
        /// Pairs: `[{"src": "rgb/000.png", "dst": "rgb/004.png", "points": [[x, y], ...]}]`.
        #[arg(long)]
        pairs: PathBuf,
        /// Output: the pairs with `"pred": [[x, y] | null, ...]` added.
        #[arg(long)]
        out: PathBuf,
        /// `joint` (3D-aware: features + canonical coordinates), `3d` (canonical shape alone,
        /// Eq. 17), `2d` (DINOv2 nearest neighbour, Eq. 18) or `bbox` (same spot in the mask bbox).
        #[arg(long, default_value = "joint", value_parser = parse_method)]
        method: Method,
        /// Config for `--method joint|2d|bbox` (default: the run's config.yaml).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Overrides `transfer.nocs_weight` for `--method joint`.
        #[arg(long)]
        nocs_weight: Option<f32>,
    },
    /// Predict foreground masks with the built-in U^2-Net-p segmenter; `--eval` scores them against the
    /// collection's masks (IoU).
    Masks {
        /// Collection folder.
        collection: PathBuf,
        /// Write the masks here as PNG (0/255), one per image, named like the image.
        #[arg(long)]
        out: Option<PathBuf>,
        /// U^2-Net-p weights (default: `masks.weights` of config/default.yaml, weights/u2netp.safetensors).
        #[arg(long)]
        weights: Option<PathBuf>,
        /// Print IoU against the collection's masks: median, mean, min and the worst 3 images.
        #[arg(long)]
        eval: bool,
        /// Device override: cpu, cuda, cuda:N.
        #[arg(long)]
        device: Option<String>,
    },
    /// Rosbag (MCAP) tools: extract a collection from a bag, write a run as a bag (feature `ros`).
    Bag {
        #[command(subcommand)]
        command: BagCommand,
    },
    /// Benchmark the node's collection store: milliseconds to store one frame as the collection grows.
    BenchStore {
        /// Frames to store (into a temporary folder).
        #[arg(long, default_value_t = 5000)]
        frames: usize,
        /// Side of the square test frames, pixels.
        #[arg(long, default_value_t = 64)]
        size: u32,
    },
    /// Benchmark DINOv2 patch features: seconds per image at each input size, and peak memory.
    BenchFeatures {
        /// DINOv2 weights (HF-named safetensors, see scripts/setup_weights.sh).
        #[arg(long, default_value = "weights/dinov2_vits14.safetensors")]
        weights: PathBuf,
        /// Square input sizes in pixels (multiples of 14), comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "224,448")]
        sizes: Vec<usize>,
        /// Images per forward pass.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Timed repetitions after one warm-up pass.
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Tokens of this block (0-based) instead of the final normalised output.
        #[arg(long)]
        layer: Option<usize>,
        /// Device: cpu, cuda, cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Benchmark the diffusion prior with seeded random weights: UNet forward, one textual-inversion
    /// step (text encoder + UNet forward and backward) and score-distillation steps, per model size.
    BenchSds {
        /// Model sizes: tiny (config/tiny.yaml's), sd21 (Stable Diffusion 2.1 base), mvdream.
        #[arg(long, value_delimiter = ',', default_value = "tiny,sd21")]
        models: Vec<String>,
        /// Latent side (image side / 8): 32 = 256 px (MVDream), 64 = 512 px (SD 2.1 textual inversion).
        #[arg(long, default_value_t = 32)]
        latent: usize,
        /// Timed repetitions after one warm-up.
        #[arg(long, default_value_t = 2)]
        reps: usize,
        /// Also time score-distillation steps for the full-size models (8 UNet passes each; slow on a CPU).
        #[arg(long)]
        sds_full: bool,
        /// Render side of the timed score-distillation steps.
        #[arg(long, default_value_t = 64)]
        render: u32,
        /// Device: cpu, cuda, cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Render a smooth camera orbit around a template mesh (tracking test data): OUT/rgb/NNN.png,
    /// OUT/mask/NNN.png, OUT/orbit.json (ground-truth camera_from_object in canonical units, K, jumps)
    /// and OUT/model/ (the template as a canonical model for `~/load_model`).
    RenderOrbit {
        /// Template mesh (OBJ/PLY, canonical frame).
        template: PathBuf,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        orbit: OrbitArgs,
        /// Pipeline configuration (template resolution of the model).
        #[arg(long, default_value = "config/fast.yaml")]
        config: PathBuf,
    },
    /// Benchmark live tracking on a rendered orbit (accuracy against ground truth and latency per
    /// frame): the same tracker and re-initialisation as the ROS node's `track` mode.
    BenchTrack {
        /// Template mesh (OBJ/PLY, canonical frame): the object and the model.
        template: PathBuf,
        #[command(flatten)]
        orbit: OrbitArgs,
        /// Pipeline configuration (its `track` section and the re-initialisation settings).
        #[arg(long, default_value = "config/fast.yaml")]
        config: PathBuf,
        /// Write every frame's figures here (JSON).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Convert MVDream's `sd-v2.1-base-4view.pt` (LDM/OpenCLIP naming) into our safetensors files:
    /// OUT/mvdream/unet.safetensors, OUT/vae/..., OUT/text_encoder/... (use OUT as --weights-dir,
    /// with a tokenizer/ folder from stable-diffusion-2-1-base).
    ConvertMvdream {
        /// The checkpoint (.pt / .ckpt).
        checkpoint: PathBuf,
        /// Output weights folder.
        #[arg(long)]
        out: PathBuf,
    },
}

/// `--method` by name (one list of names: `transfer::Method::NAMES`).
fn parse_method(name: &str) -> std::result::Result<Method, String> {
    Method::parse(name).map_err(|e| e.to_string())
}

/// A rendered camera orbit (see `congeal::eval::orbit::OrbitSpec`).
#[derive(clap::Args, Clone, Debug)]
struct OrbitArgs {
    /// Frames.
    #[arg(long, default_value_t = 60)]
    frames: usize,
    /// Image width.
    #[arg(long, default_value_t = 640)]
    width: u32,
    /// Image height.
    #[arg(long, default_value_t = 480)]
    height: u32,
    /// Vertical field of view, degrees.
    #[arg(long, default_value_t = 40.0)]
    fov: f64,
    /// Azimuth step between frames, degrees.
    #[arg(long, default_value_t = 3.0)]
    step: f64,
    /// Frames at which the camera teleports by --jump-deg (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "30")]
    jumps: Vec<usize>,
    /// Size of a teleport, degrees of azimuth.
    #[arg(long, default_value_t = 120.0)]
    jump_deg: f64,
}

impl OrbitArgs {
    fn spec(&self) -> congeal::eval::orbit::OrbitSpec {
        congeal::eval::orbit::OrbitSpec {
            frames: self.frames,
            width: self.width,
            height: self.height,
            fov_deg: self.fov,
            step_deg: self.step,
            jumps: self.jumps.clone(),
            jump_deg: self.jump_deg,
            ..Default::default()
        }
    }
}

#[derive(Subcommand)]
enum BagCommand {
    /// Extract a collection folder from an MCAP bag (sensor_msgs/Image or CompressedImage, masks, CameraInfo, PoseStamped).
    Extract {
        /// The MCAP bag file.
        bag: PathBuf,
        /// Topic of the colour images: sensor_msgs/Image, or sensor_msgs/CompressedImage (JPEG/PNG, e.g.
        /// `/camera/image_raw/compressed`).
        #[arg(long)]
        image_topic: String,
        /// Topic of the masks: sensor_msgs/Image (mono8) or CompressedImage (images without a matching
        /// mask are dropped).
        #[arg(long)]
        mask_topic: Option<String>,
        /// sensor_msgs/CameraInfo topic (intrinsics).
        #[arg(long)]
        camera_info_topic: Option<String>,
        /// geometry_msgs/PoseStamped ground-truth topic (camera_from_object), for `congeal eval`.
        #[arg(long)]
        pose_topic: Option<String>,
        /// Object category written to collection.json.
        #[arg(long, default_value = "object")]
        category: String,
        /// Output collection folder (must not hold a collection yet).
        #[arg(long)]
        out: PathBuf,
        /// Largest stamp difference for matching image, mask, camera info and pose, seconds.
        #[arg(long, default_value_t = 0.01)]
        slop: f64,
        /// Canonical bbox written with ground-truth poses: minx,miny,minz,maxx,maxy,maxz.
        #[arg(long, allow_hyphen_values = true)]
        bbox: Option<String>,
        /// Keep at most one image per this many seconds of stamps (0 = every image), like the node's
        /// `collect_period`: a 30 Hz recording gives 1800 near-identical images a minute.
        #[arg(long, default_value_t = 0.0, allow_hyphen_values = true)]
        period: f64,
    },
    /// Write a run's output topics (/congeal/pose, /congeal/nocs) as an MCAP bag.
    Write {
        /// Run folder written by `congeal run`.
        run_dir: PathBuf,
        /// The collection the run posed (its stored stamps and frame ids are used).
        #[arg(long)]
        collection: PathBuf,
        /// Output .mcap file.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "congeal=info".into()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run { collection, out, config, shape, template, device, weights_dir } => {
            let mut config = load_config(config.as_deref(), Some(Path::new("config/default.yaml")))?;
            if let Some(d) = device {
                config.device = d;
            }
            if let Some(w) = weights_dir {
                config.sds.weights_dir = Some(w.to_string_lossy().into_owned());
                config.sds.random_models = false;
            }
            let shape = shape_spec(&shape, template)?;
            let result = run(&collection, &shape, &config, &out)?;
            println!("posed {} images ({} skipped)", result.images.len(), result.skipped.len());
            for s in &result.skipped {
                println!("  skipped {}: {}", s.file, s.reason);
            }
            println!("results:       {}", out.join("result.json").display());
            println!("canonical:     {}", out.join("canonical.ply").display());
            if config.output.nocs {
                println!("NOCS maps:     {}", out.join("nocs").display());
            }
            if config.output.overlays {
                println!("overlays:      {}", out.join("overlays").display());
                println!("contact sheet: {}", out.join("contact_sheet.png").display());
            }
        }
        Command::Eval { collection, run, out, pairs } => {
            let collection = Collection::load(&collection)?;
            let result = RunResult::load(&run)?;
            let report = congeal::eval::report::evaluate_run(&collection, &result, &run)?;
            if report.poses.is_none() && pairs.is_none() {
                let found: Vec<_> = result.images.iter().filter_map(|im| collection.index_of(&im.file)).collect();
                let with_truth = found.iter().filter(|&&i| collection.images[i].ground_truth.is_some()).count();
                bail!(
                    "nothing to evaluate: {} of the run's {} images are in {}, {with_truth} of them with a ground-truth \
                     pose (at least {} needed; is it the collection the run was made from?), and no --pairs given",
                    found.len(),
                    result.images.len(),
                    collection.root.display(),
                    congeal::eval::report::MIN_POSES,
                );
            }
            let mut report = serde_json::to_value(&report)?;
            if let Some(pairs) = pairs {
                let mut list = read_pairs(&pairs)?;
                if list.iter().all(|p| p.pred.is_none()) {
                    congeal::congeal::transfer::transfer_pairs(&run, &mut list)?;
                }
                let pck = congeal::eval::pairs::pck_report(&collection, &list, 0.1)?;
                report["keypoints"] = serde_json::to_value(pck)?;
            }
            let text = serde_json::to_string_pretty(&report)?;
            println!("{text}");
            if let Some(out) = out {
                std::fs::write(&out, &text).with_context(|| format!("writing {}", out.display()))?;
            }
        }
        Command::Bench { collection, config, out, eval } => {
            let config = load_config(Some(&config), None)?;
            let tmp;
            let out = match out {
                Some(o) => o,
                None => {
                    tmp = std::env::temp_dir().join(format!("congeal-bench-{}", std::process::id()));
                    tmp.clone()
                }
            };
            let start = std::time::Instant::now();
            let result = run(&collection, &ShapeSpec::Template(None), &config, &out)?;
            let wall = start.elapsed().as_secs_f64();
            let p = &config.pose_init;
            let candidates = p.fovs_deg.len() * p.azimuths * p.elevations * p.rolls_deg.len();
            let render_s = result.timings_s.get("pose_init_candidate_render").copied().unwrap_or(f64::NAN);
            let mut figures = serde_json::json!({
                "collection": collection.display().to_string(),
                "images": result.images.len(),
                "wall_s": wall,
                "timings_s": result.timings_s,
                "candidates": candidates,
                "candidate_render_size": p.render_size,
                "candidate_renders_per_s": candidates as f64 / render_s,
                "peak_rss_mib": congeal::bench::peak_rss_mib(),
                "threads": rayon::current_num_threads(),
            });
            if eval {
                let coll = Collection::load(&collection)?;
                let report = congeal::eval::report::evaluate_run(&coll, &result, &out)?;
                figures["eval"] = serde_json::to_value(report)?;
            }
            println!("{}", serde_json::to_string_pretty(&figures)?);
        }
        Command::Pairs { collection, out, pairs, points, seed, tolerance } => {
            let collection = Collection::load(&collection)?;
            let cross = collection.kind == congeal::collection::CollectionKind::CrossInstance;
            let opts = congeal::eval::pairs::PairOptions {
                pairs,
                points_per_pair: points,
                seed,
                tolerance: match tolerance {
                    Some(t) if !(t.is_finite() && t > 0.0) => bail!("--tolerance must be a finite number > 0, got {t}"),
                    Some(t) => t,
                    None if cross => 0.05,
                    None => 0.01,
                },
            };
            let list = congeal::eval::pairs::ground_truth_pairs(&collection, &opts)?;
            std::fs::write(&out, serde_json::to_string_pretty(&list)?).with_context(|| format!("writing {}", out.display()))?;
            let visible: usize = list.iter().map(|p| p.gt.as_ref().map_or(0, |g| g.iter().flatten().count())).sum();
            println!("{} pairs, {visible} visible ground-truth points: {}", list.len(), out.display());
        }
        Command::Transfer { run, pairs, out, method, config, nocs_weight } => {
            let mut list = read_pairs(&pairs)?;
            match method {
                Method::Canonical => congeal::congeal::transfer::transfer_pairs(&run, &mut list)?,
                _ => transfer_2d(&run, config.as_deref(), method, nocs_weight, &mut list)?,
            }
            std::fs::write(&out, serde_json::to_string_pretty(&list)?).with_context(|| format!("writing {}", out.display()))?;
            let (n, found) =
                list.iter().flat_map(|p| p.pred.iter().flatten()).fold((0, 0), |(n, f), p| (n + 1, f + p.is_some() as usize));
            println!("transferred {found} of {n} points; predictions in {}", out.display());
        }
        Command::Bag { command } => bag(command)?,
        Command::BenchStore { frames, size } => congeal::bench::bench_store(frames, size, &mut |line| println!("{line}"))?,
        Command::BenchFeatures { weights, sizes, batch, reps, layer, device } => {
            let device = congeal::config::parse_device(&device)?;
            congeal::bench::bench_features(&weights, &sizes, batch, reps, layer, &device, &mut |line| println!("{line}"))?
        }
        Command::BenchSds { models, latent, reps, sds_full, render, device } => {
            let device = congeal::config::parse_device(&device)?;
            congeal::bench::bench_sds(&models, latent, reps, sds_full, render, &device, &mut |line| println!("{line}"))?
        }
        Command::ConvertMvdream { checkpoint, out } => {
            let report = congeal::models::convert::convert_mvdream_checkpoint(&checkpoint, &out)?;
            println!("{report:#?}");
            println!("weights folder: {} (add tokenizer/ from stable-diffusion-2-1-base)", out.display());
        }
        Command::RenderOrbit { template, out, orbit, config } => render_orbit(&template, &out, &orbit.spec(), &config)?,
        Command::BenchTrack { template, orbit, config, out } => bench_track(&template, &orbit.spec(), &config, out.as_deref())?,
        Command::Masks { collection, out, weights, eval, device } => {
            masks(&collection, out.as_deref(), weights.as_deref(), eval, device.as_deref())?
        }
    }
    Ok(())
}

fn read_pairs(path: &Path) -> Result<Vec<congeal::congeal::transfer::TransferPair>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// `congeal transfer --method 2d|joint|bbox` on the run's collection with the run's feature
/// settings.
/// `nocs_weight` overrides the config's `transfer.nocs_weight` for `joint`.
fn transfer_2d(
    run: &Path,
    config: Option<&Path>,
    method: Method,
    nocs_weight: Option<f32>,
    pairs: &mut [congeal::congeal::transfer::TransferPair],
) -> Result<()> {
    let result = RunResult::load(run)?;
    let stored = run.join("config.yaml");
    let config = match config {
        Some(c) => load_config(Some(c), None)?,
        None => load_config(None, Some(&stored))?,
    };
    let collection = Collection::load(Path::new(&result.collection))?;
    let extractor = if method.needs_features() {
        Some(congeal::congeal::features::FeatureExtractor::load(&config.features, &config.device()?)?)
    } else {
        None
    };
    let weight = nocs_weight.unwrap_or(config.transfer.nocs_weight);
    if method == Method::Joint && !(weight.is_finite() && weight >= 0.0) {
        bail!("--nocs-weight must be finite and >= 0, got {weight}");
    }
    let mut matcher = congeal::congeal::transfer::Transfer2d::for_run(
        &collection,
        extractor.as_ref(),
        &result,
        run,
        config.pose_init.crop_margin,
        method,
        weight,
    )?;
    let bar = ProgressBar::new(pairs.len() as u64);
    for pair in pairs.iter_mut() {
        let pred = matcher.transfer_by_method(&pair.src, &pair.dst, &pair.points)?;
        pair.pred = Some(pred);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(())
}

#[cfg(not(feature = "ros"))]
fn bag(_command: BagCommand) -> Result<()> {
    bail!(
        "`congeal bag` needs the ROS tools: rebuild with `scripts/setup.sh --ros` (cargo feature `ros`) and `source .ros/env.sh`"
    )
}

#[cfg(feature = "ros")]
fn bag(command: BagCommand) -> Result<()> {
    use congeal::ros::bag;
    match command {
        BagCommand::Extract {
            bag: file,
            image_topic,
            mask_topic,
            camera_info_topic,
            pose_topic,
            category,
            out,
            slop,
            bbox,
            period,
        } => {
            if !slop.is_finite() || slop < 0.0 {
                bail!("--slop must be a non-negative number of seconds, got {slop}");
            }
            if !period.is_finite() || !(0.0..=3600.0).contains(&period) {
                bail!("--period must be a number of seconds between 0 and 3600, got {period}");
            }
            let bbox = match bbox {
                None => None,
                Some(text) => {
                    let v: Vec<f64> = text
                        .split(',')
                        .map(|s| s.trim().parse::<f64>())
                        .collect::<std::result::Result<_, _>>()
                        .with_context(|| format!("--bbox `{text}`: not comma-separated numbers"))?;
                    let [a, b, c, d, e, f] = v[..] else {
                        bail!("--bbox needs 6 numbers (minx,miny,minz,maxx,maxy,maxz), got {}", v.len())
                    };
                    if !(v.iter().all(|x| x.is_finite()) && a < d && b < e && c < f) {
                        bail!("--bbox `{text}`: min must be below max on every axis (minx,miny,minz,maxx,maxy,maxz)");
                    }
                    Some(([a, b, c], [d, e, f]))
                }
            };
            let opts = bag::ExtractOptions {
                image_topic,
                mask_topic,
                camera_info_topic,
                pose_topic,
                category,
                slop_ns: (slop * 1e9).round() as i64,
                bbox,
                period_ns: (period * 1e9).round() as i64,
            };
            let report = bag::extract(&file, &opts, &out)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            println!("collection: {}", out.display());
        }
        BagCommand::Write { run_dir, collection, out } => {
            let report = bag::write(&run_dir, &collection, &out)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
    }
    Ok(())
}

fn load_config(path: Option<&Path>, fallback: Option<&Path>) -> Result<Config> {
    match (path, fallback) {
        (Some(p), _) => Ok(Config::from_yaml_file(p)?),
        (None, Some(f)) if f.exists() => Ok(Config::from_yaml_file(f)?),
        _ => Ok(Config::default()),
    }
}

fn shape_spec(shape: &str, template: Option<PathBuf>) -> Result<ShapeSpec> {
    let spec: ShapeSpec = shape.parse()?;
    match (spec, template) {
        (ShapeSpec::Template(_), Some(t)) => Ok(ShapeSpec::Template(Some(t))),
        (_, Some(_)) => bail!("--template only applies to --shape template"),
        (spec, None) => Ok(spec),
    }
}

/// Runs the pipeline with a progress bar per stage.
fn run(collection: &Path, shape: &ShapeSpec, config: &Config, out: &Path) -> Result<RunResult> {
    let collection = Collection::load(collection)?;
    let bar = ProgressBar::new(1000);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg:>12} [{bar:40}] {percent:>3}% {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let stage = Mutex::new(String::new());
    let progress = |name: &str, fraction: f32| {
        if let Ok(mut s) = stage.lock() {
            if *s != name {
                *s = name.to_string();
                bar.set_message(name.to_string());
            }
        }
        bar.set_position((fraction.clamp(0.0, 1.0) * 1000.0) as u64);
    };
    let result = congeal::congeal::run(&collection, shape, config, out, &progress);
    bar.finish_and_clear();
    Ok(result?)
}

/// `congeal masks`: predicts a mask per image with U^2-Net-p, optionally writes them and scores them.
fn masks(collection: &Path, out: Option<&Path>, weights: Option<&Path>, eval: bool, device: Option<&str>) -> Result<()> {
    use congeal::collection::segment::{Segmenter, DEFAULT_BATCH};
    let config = load_config(None, Some(Path::new("config/default.yaml")))?;
    let weights = match weights {
        Some(w) => w.to_path_buf(),
        None => congeal::config::resolve_weights(&config.masks.weights)?,
    };
    let device = congeal::config::parse_device(device.unwrap_or(&config.device))?;
    let coll = Collection::load(collection)?;
    let seg = Segmenter::load(&weights, &device)?;
    if let Some(o) = out {
        std::fs::create_dir_all(o).with_context(|| format!("creating {}", o.display()))?;
    }
    let bar = ProgressBar::new(coll.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} masks [{bar:40}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let (mut ious, mut failed) = (Vec::<(f64, String)>::new(), Vec::<(String, String)>::new());
    let mut net_s = 0.0;
    let indices: Vec<usize> = (0..coll.len()).collect();
    for chunk in indices.chunks(DEFAULT_BATCH) {
        let mut rgbs = Vec::with_capacity(chunk.len());
        let mut gts = Vec::with_capacity(chunk.len());
        for &i in chunk {
            if eval {
                let img = coll.load_image(i)?;
                rgbs.push(img.rgb);
                gts.push(Some(img.mask));
            } else {
                rgbs.push(congeal::collection::load_rgb(&coll.rgb_path(i)?)?);
                gts.push(None);
            }
        }
        let t = std::time::Instant::now();
        let masks = seg.mask_batch(&rgbs)?;
        net_s += t.elapsed().as_secs_f64();
        for ((&i, mask), gt) in chunk.iter().zip(masks).zip(&gts) {
            let entry = coll.entry(i)?;
            let name = entry.rgb.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| i.to_string());
            let mask = match mask {
                Ok(m) => Some(m),
                Err(e) => {
                    failed.push((name.clone(), e.to_string()));
                    None
                }
            };
            if let (Some(o), Some(m)) = (out, &mask) {
                let path = o.join(format!("{name}.png"));
                m.save(&path).with_context(|| format!("writing {}", path.display()))?;
            }
            if let Some(gt) = gt {
                ious.push((congeal::eval::masks::mask_iou(mask.as_ref(), gt), name));
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let n = coll.len().max(1);
    println!(
        "{}: {} images, {:.3} s per image ({} threads, device {})",
        coll.name,
        coll.len(),
        net_s / n as f64,
        rayon::current_num_threads(),
        device_name(&device)
    );
    for (name, why) in &failed {
        println!("  no mask for {name}: {why}");
    }
    if let Some(o) = out {
        println!("masks: {}", o.display());
    }
    if let (true, Some(s)) = (eval, congeal::eval::masks::summarise_ious(&ious)?) {
        let worst: Vec<String> = s.worst.iter().map(|(name, v)| format!("{name} {v:.3}")).collect();
        println!("IoU {}: median {:.3} mean {:.3} min {:.3}; worst: {}", coll.name, s.median, s.mean, s.min, worst.join(", "));
    }
    Ok(())
}

/// `cpu` or `cuda` for messages.
fn device_name(device: &candle_core::Device) -> &'static str {
    if device.is_cuda() {
        "cuda"
    } else {
        "cpu"
    }
}

/// The template's canonical shape on the CPU.
fn template_model(template: &Path, config: &Config) -> Result<congeal::shape::CanonicalShape> {
    let mesh = congeal::field::mesh::TriangleMesh::load(template)?;
    Ok(congeal::shape::template_shape(&mesh, config, &candle_core::Device::Cpu)?)
}

fn render_orbit(template: &Path, out: &Path, spec: &congeal::eval::orbit::OrbitSpec, config: &Path) -> Result<()> {
    use congeal::eval::orbit::{orbit_cameras, render_frame};
    let config = Config::from_yaml_file(config)?;
    let shape = template_model(template, &config)?;
    let field = &shape.field;
    std::fs::create_dir_all(out.join("rgb"))?;
    std::fs::create_dir_all(out.join("mask"))?;
    let mut frames = Vec::new();
    for (i, frame) in orbit_cameras(field, spec)?.iter().enumerate() {
        let (rgb, mask) = render_frame(field, frame, spec.samples_per_ray)?;
        let (rgb_file, mask_file) = (format!("rgb/{i:03}.png"), format!("mask/{i:03}.png"));
        rgb.save(out.join(&rgb_file)).with_context(|| format!("writing {rgb_file}"))?;
        mask.save(out.join(&mask_file)).with_context(|| format!("writing {mask_file}"))?;
        let camera_from_object = nalgebra::Isometry3::from_parts(
            nalgebra::Translation3::from(frame.camera_from_object.translation.vector * field.units_per_normalised),
            frame.camera_from_object.rotation,
        );
        let k = frame.intrinsics;
        frames.push(serde_json::json!({
            "rgb": rgb_file,
            "mask": mask_file,
            "jump": frame.jump,
            "camera_from_object": congeal::geometry::se3::isometry_to_row_major(&camera_from_object),
            "K": [[k.fx, 0.0, k.cx], [0.0, k.fy, k.cy], [0.0, 0.0, 1.0]],
            "width": k.width,
            "height": k.height,
        }));
    }
    let (lo, hi) = shape.bbox;
    let index = serde_json::json!({ "template": template, "bbox_min": lo, "bbox_max": hi, "frames": frames });
    std::fs::write(out.join("orbit.json"), serde_json::to_string_pretty(&index)?)?;
    congeal::shape::model::save_model(&shape, &out.join("model"))?;
    println!("{} frames and the model in {}", spec.frames, out.display());
    Ok(())
}

fn bench_track(template: &Path, spec: &congeal::eval::orbit::OrbitSpec, config: &Path, out: Option<&Path>) -> Result<()> {
    use congeal::eval::orbit::{orbit_cameras, quantile, track_orbit};
    let config = Config::from_yaml_file(config)?;
    let shape = template_model(template, &config)?;
    let field = &shape.field;
    let extractor = if config.pose_init.score.is_semantic() {
        Some(congeal::congeal::features::FeatureExtractor::load(&config.features, &candle_core::Device::Cpu)?)
    } else {
        None
    };
    let t = std::time::Instant::now();
    let mut set = congeal::congeal::pose_init::render_candidates(field, &config.pose_init, config.render.chunk_rays)?;
    println!("candidates: {} rendered in {:.2} s (once per model)", set.candidates.len(), t.elapsed().as_secs_f64());
    let cameras = orbit_cameras(field, spec)?;
    let frames = track_orbit(field, &cameras, &mut set, &config, extractor.as_ref(), spec.samples_per_ray)?;
    // Frames right after a teleport (the re-initialisation window) are reported apart.
    const RECOVERY_FRAMES: usize = 3;
    let after_jump = |i: usize| spec.jumps.iter().any(|&j| i >= j && i < j + RECOVERY_FRAMES);
    let rot: Vec<f64> = frames.iter().map(|f| f.rotation_error_deg).collect();
    let steady: Vec<&congeal::eval::orbit::TrackedFrame> =
        frames.iter().filter(|f| f.index > 0 && !after_jump(f.index)).collect();
    let tracked: Vec<f64> = frames.iter().filter(|f| f.reinitialised.is_none()).map(|f| f.latency_s * 1e3).collect();
    let reinit: Vec<&congeal::eval::orbit::TrackedFrame> = frames.iter().filter(|f| f.reinitialised.is_some()).collect();
    println!(
        "orbit: {} frames {}x{}, fov {:.0} deg, step {:.1} deg, jumps at {:?} ({:.0} deg); {} threads",
        spec.frames,
        spec.width,
        spec.height,
        spec.fov_deg,
        spec.step_deg,
        spec.jumps,
        spec.jump_deg,
        rayon::current_num_threads()
    );
    println!(
        "rotation error (deg): median {:.2}, p95 {:.2}, max {:.2}; frames > 15 deg outside the {} frames after a jump: {}",
        quantile(&rot, 0.5),
        quantile(&rot, 0.95),
        quantile(&rot, 1.0),
        RECOVERY_FRAMES,
        steady.iter().filter(|f| f.rotation_error_deg > 15.0).count()
    );
    let trans: Vec<f64> = frames.iter().map(|f| f.translation_error_rel).collect();
    println!("translation error (relative): median {:.4}, max {:.4}", quantile(&trans, 0.5), quantile(&trans, 1.0));
    println!(
        "latency per tracked frame (ms, {} frames): median {:.1}, p95 {:.1}, max {:.1}",
        tracked.len(),
        quantile(&tracked, 0.5),
        quantile(&tracked, 0.95),
        quantile(&tracked, 1.0)
    );
    for f in &reinit {
        println!(
            "re-initialised frame {} ({}): {:.2} s, error {:.2} deg",
            f.index,
            f.reinitialised.as_deref().unwrap_or(""),
            f.latency_s,
            f.rotation_error_deg
        );
    }
    for &j in &spec.jumps {
        let recovered = frames.iter().skip(j).take_while(|f| f.rotation_error_deg > 15.0).count();
        println!("jump at frame {j}: error <= 15 deg again after {recovered} frame(s)");
    }
    if let Some(out) = out {
        std::fs::write(out, serde_json::to_string_pretty(&frames)?)?;
    }
    Ok(())
}
