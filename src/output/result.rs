//! `result.json`: the run's contract with evaluation scripts and users (README, "`RUN_DIR` receives").

use std::collections::BTreeMap;
use std::path::Path;

use nalgebra::Isometry3;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::geometry::Intrinsics;

/// The canonical shape's files and bbox.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CanonicalInfo {
    /// Mesh file, relative to the run folder.
    pub mesh: String,
    /// Canonical bbox p_min (canonical units); NOCS is normalised over it.
    pub bbox_min: [f64; 3],
    /// Canonical bbox p_max (canonical units).
    pub bbox_max: [f64; 3],
}

/// The candidate a pose came from (for diagnosis).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CandidateInfo {
    /// Azimuth, degrees.
    pub azimuth_deg: f64,
    /// Elevation, degrees.
    pub elevation_deg: f64,
    /// Candidate FoV, degrees.
    pub fov_deg: f64,
    /// Candidate score.
    pub score: f32,
}

/// One image's result.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ImageResult {
    /// Image path relative to the collection (e.g. `rgb/000.png`).
    pub file: String,
    /// camera_from_object, 4x4 row-major, OpenCV camera, canonical frame and units.
    pub camera_from_object: [[f64; 4]; 4],
    /// Intrinsics of the original image, 3x3 row-major.
    #[serde(rename = "K")]
    pub k: [[f64; 3]; 3],
    /// Vertical field of view, degrees.
    pub fov_deg: f64,
    /// Horizontal field of view, degrees.
    pub fov_deg_x: f64,
    /// Final fit: IoU between the rendered silhouette and the input mask (0..1, higher is better).
    pub score: f32,
    /// Image size [width, height].
    pub size: [u32; 2],
    /// The initial candidate that won.
    pub init: CandidateInfo,
    /// NOCS map file relative to the run folder, if written: the forward canonical coordinate map
    /// (Eq. 10-11) on the image's mask pixels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nocs: Option<String>,
    /// The NOCS rendering at the estimated pose (Eq. 11 at ũ = u), for the reverse map (Eq. 12).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nocs_render: Option<String>,
    /// The coordinate-map warp u -> ũ (Eq. 10) as JSON, for the reverse map (Eq. 13).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warp: Option<String>,
    /// The foreground mask the run used, relative to the run folder, when the collection has no mask
    /// file for the image (taken from its alpha channel or computed by the built-in segmenter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
    /// The mask touches the image border: the object is cut by the frame (fitted in the image's own
    /// frame when `pose_init.truncation_aware`).
    #[serde(default)]
    pub mask_touches_border: bool,
    /// Which sides it touches (`left`, `right`, `top`, `bottom`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub border_sides: Vec<String>,
}

/// An input that could not be used, and why.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SkippedImage {
    /// Image path relative to the collection.
    pub file: String,
    /// The error.
    pub reason: String,
}

/// The whole `result.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RunResult {
    /// Collection folder.
    pub collection: String,
    /// `template`, `sds` or `model`.
    pub shape_source: String,
    /// Canonical shape.
    pub canonical: CanonicalInfo,
    /// Per-image results, in collection order.
    pub images: Vec<ImageResult>,
    /// Inputs that were skipped.
    #[serde(default)]
    pub skipped: Vec<SkippedImage>,
    /// Seconds per stage.
    pub timings_s: BTreeMap<String, f64>,
}

impl ImageResult {
    /// The pose as an isometry (canonical units).
    pub fn pose(&self) -> Result<Isometry3<f64>> {
        crate::geometry::se3::isometry_from_row_major(&self.camera_from_object)
    }

    /// The intrinsics.
    pub fn intrinsics(&self) -> Result<Intrinsics> {
        let k = nalgebra::Matrix3::from_fn(|i, j| self.k[i][j]);
        Intrinsics::from_matrix(&k, self.size[0], self.size[1])
    }
}

impl RunResult {
    /// Reads `RUN_DIR/result.json`.
    pub fn load(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join("result.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::Run { path, message: e.to_string() })
    }

    /// Writes `RUN_DIR/result.json`.
    pub fn save(&self, run_dir: &Path) -> Result<()> {
        std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
        let path = run_dir.join("result.json");
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Run { path: path.clone(), message: e.to_string() })?;
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
    }
}
