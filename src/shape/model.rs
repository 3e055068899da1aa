//! Saved canonical models (shape source `model:PATH`): the field of an earlier run, so new images
//! can be registered without rebuilding or re-optimising the shape (the online robot case).
//!
//! A model is a folder with `model.json` (grid geometry, NOCS bbox, units) and `field.safetensors`
//! (`density` `[V, 1]`, `colour` `[V, 3]`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::field::canonical::CanonicalField;
use crate::shape::CanonicalShape;

/// Format tag written into `model.json`.
pub const MODEL_FORMAT: &str = "congeal-model-1";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct ModelInfo {
    format: String,
    dims: [usize; 3],
    grid_min: [f32; 3],
    grid_max: [f32; 3],
    nocs_min: [f32; 3],
    nocs_max: [f32; 3],
    units_per_normalised: f64,
    bounding_radius: f32,
    density_per_occupancy: f32,
    bbox_min: [f64; 3],
    bbox_max: [f64; 3],
}

/// Writes `shape` into the folder `dir` (created if needed).
pub fn save_model(shape: &CanonicalShape, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let f = &shape.field;
    let info = ModelInfo {
        format: MODEL_FORMAT.into(),
        dims: f.dims,
        grid_min: f.grid_min,
        grid_max: f.grid_max,
        nocs_min: f.nocs_min,
        nocs_max: f.nocs_max,
        units_per_normalised: f.units_per_normalised,
        bounding_radius: f.bounding_radius,
        density_per_occupancy: f.density_per_occupancy,
        bbox_min: shape.bbox.0,
        bbox_max: shape.bbox.1,
    };
    let json = dir.join("model.json");
    let text = serde_json::to_string_pretty(&info).map_err(|e| Error::Run { path: json.clone(), message: e.to_string() })?;
    std::fs::write(&json, text).map_err(|e| Error::io(&json, e))?;
    let tensors: HashMap<String, Tensor> = [
        ("density".to_string(), f.density.to_dtype(DType::F32)?.to_device(&Device::Cpu)?),
        ("colour".to_string(), f.colour.to_dtype(DType::F32)?.to_device(&Device::Cpu)?),
    ]
    .into_iter()
    .collect();
    candle_core::safetensors::save(&tensors, dir.join("field.safetensors"))?;
    Ok(())
}

/// Loads a model folder written by [`save_model`] onto `device`; every problem is a clear error
/// naming the file and what was expected.
pub fn load_model(dir: &Path, device: &Device) -> Result<CanonicalShape> {
    let json = dir.join("model.json");
    let bad = |path: &Path, message: String| Error::Run { path: path.to_path_buf(), message };
    let text = std::fs::read_to_string(&json).map_err(|e| Error::io(&json, e))?;
    let info: ModelInfo = serde_json::from_str(&text).map_err(|e| bad(&json, format!("not a congeal model description: {e}")))?;
    if info.format != MODEL_FORMAT {
        return Err(bad(&json, format!("format `{}`, expected `{MODEL_FORMAT}`", info.format)));
    }
    let numbers =
        info.grid_min.iter().chain(&info.grid_max).chain(&info.nocs_min).chain(&info.nocs_max).map(|v| *v as f64).chain([
            info.units_per_normalised,
            info.bounding_radius as f64,
            info.density_per_occupancy as f64,
        ]);
    if numbers.clone().any(|v| !v.is_finite()) || info.units_per_normalised <= 0.0 || info.density_per_occupancy <= 0.0 {
        return Err(bad(&json, "non-finite or non-positive geometry".into()));
    }
    let n: usize = info.dims.iter().product();
    if n == 0 || info.dims.iter().any(|d| *d < 2) {
        return Err(bad(&json, format!("grid dims {:?} are too small", info.dims)));
    }
    let st = dir.join("field.safetensors");
    if !st.exists() {
        return Err(bad(&st, "missing (expected the field tensors `density` and `colour`)".into()));
    }
    let tensors = candle_core::safetensors::load(&st, device).map_err(|e| bad(&st, format!("unreadable: {e}")))?;
    let get = |name: &str, channels: usize| -> Result<Tensor> {
        let t = tensors.get(name).ok_or_else(|| bad(&st, format!("has no tensor `{name}`")))?;
        if t.dims() != [n, channels] {
            return Err(bad(&st, format!("tensor `{name}` is {:?}, expected [{n}, {channels}]", t.dims())));
        }
        let t = t.to_dtype(DType::F32)?;
        let finite = t.flatten_all()?.to_vec1::<f32>()?.iter().all(|v| v.is_finite());
        if !finite {
            return Err(bad(&st, format!("tensor `{name}` holds NaN or inf")));
        }
        Ok(t)
    };
    let field = CanonicalField::from_parts(
        info.dims,
        (info.grid_min, info.grid_max),
        get("density", 1)?,
        get("colour", 3)?,
        (info.nocs_min, info.nocs_max),
        info.units_per_normalised,
        info.bounding_radius,
        info.density_per_occupancy,
    )?;
    Ok(CanonicalShape { field, bbox: (info.bbox_min, info.bbox_max) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::field::voxel::VoxelGrid;

    fn shape() -> CanonicalShape {
        let n = 6;
        let occupancy = (0..n * n * n).map(|i| ((i * 7) % 5) as f32 / 4.0).collect();
        let colors = (0..n * n * n).map(|i| [(i % 3) as f32 / 2.0, 0.5, 0.25]).collect();
        let grid = VoxelGrid { dims: [n, n, n], bbox_min: [-0.3; 3], bbox_max: [0.3; 3], occupancy, colors };
        let field = CanonicalField::from_voxels(&grid, ([-0.2; 3], [0.2; 3]), 4.0, &Device::Cpu).unwrap();
        CanonicalShape { field, bbox: ([-0.2; 3], [0.2; 3]) }
    }

    #[test]
    fn save_load_round_trip_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let s = shape();
        save_model(&s, dir.path()).unwrap();
        let l = load_model(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(l.bbox, s.bbox);
        assert_eq!(l.field.dims, s.field.dims);
        assert_eq!(l.field.density_host().unwrap(), s.field.density_host().unwrap());
        assert_eq!(l.field.colour_host().unwrap(), s.field.colour_host().unwrap());
        assert_eq!(l.field.nocs_max, s.field.nocs_max);
        assert!(l.field.host.is_some());
    }

    #[test]
    fn broken_models_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_model(dir.path(), &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("model.json"), "{err}");
        save_model(&shape(), dir.path()).unwrap();
        std::fs::write(dir.path().join("field.safetensors"), b"garbage").unwrap();
        let err = load_model(dir.path(), &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("field.safetensors"), "{err}");
        let t: HashMap<String, Tensor> =
            [("density".to_string(), Tensor::zeros((3, 1), DType::F32, &Device::Cpu).unwrap())].into_iter().collect();
        candle_core::safetensors::save(&t, dir.path().join("field.safetensors")).unwrap();
        let err = load_model(dir.path(), &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("density") && err.contains("[216, 1]"), "{err}");
        let json = dir.path().join("model.json");
        let text = std::fs::read_to_string(&json).unwrap().replace(MODEL_FORMAT, "other-format");
        std::fs::write(&json, text).unwrap();
        assert!(load_model(dir.path(), &Device::Cpu).unwrap_err().to_string().contains("other-format"));
    }
}
