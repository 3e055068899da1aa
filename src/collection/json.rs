//! Reading `collection.json` (the collection format, version 1.0; `demo/duck/collection.json` is an
//! example): only the fields congeal needs, with error messages that name the file and the full path of
//! the offending field (e.g. `images[0].K`).

use std::path::{Path, PathBuf};

use nalgebra::{Isometry3, Matrix3, Rotation3, Translation3, UnitQuaternion, Vector3};
use serde_json::Value;

use super::{Collection, CollectionKind, GroundTruth, ImageEntry};
use crate::error::{Error, Result};
use crate::geometry::Intrinsics;

/// Largest deviation of `RᵀR` from the identity (per entry) accepted for a pose's rotation.
const ORTHONORMAL_TOL: f64 = 1e-3;

/// Context for error messages: the file being parsed.
struct Ctx<'a> {
    file: &'a Path,
}

impl Ctx<'_> {
    fn err(&self, message: impl Into<String>) -> Error {
        Error::Collection { path: self.file.to_path_buf(), message: message.into() }
    }

    /// A required field of an object.
    fn req<'v>(&self, obj: &'v Value, parent: &str, key: &str) -> Result<&'v Value> {
        let name = join(parent, key);
        if !obj.is_object() {
            return Err(self.err(format!("`{}` must be an object, got {}", display_name(parent), kind_of(obj))));
        }
        match obj.get(key) {
            Some(Value::Null) | None => Err(self.err(format!("missing required field `{name}`"))),
            Some(v) => Ok(v),
        }
    }

    /// An optional field of an object (`null` counts as absent).
    fn opt<'v>(&self, obj: &'v Value, key: &str) -> Option<&'v Value> {
        match obj.get(key) {
            Some(Value::Null) | None => None,
            Some(v) => Some(v),
        }
    }

    fn string(&self, v: &Value, name: &str) -> Result<String> {
        v.as_str().map(str::to_owned).ok_or_else(|| self.err(format!("field `{name}` must be a string, got {}", kind_of(v))))
    }

    fn number(&self, v: &Value, name: &str) -> Result<f64> {
        match v.as_f64() {
            Some(x) if x.is_finite() => Ok(x),
            _ => Err(self.err(format!("field `{name}` must be a finite number, got {}", kind_of(v)))),
        }
    }

    fn uint(&self, v: &Value, name: &str) -> Result<u64> {
        v.as_u64().ok_or_else(|| self.err(format!("field `{name}` must be a non-negative integer, got {}", kind_of(v))))
    }

    fn size(&self, v: &Value, name: &str) -> Result<u32> {
        let n = self.uint(v, name)?;
        if n == 0 || n > u32::MAX as u64 {
            return Err(self.err(format!("field `{name}` must be a positive image size, got {n}")));
        }
        Ok(n as u32)
    }

    fn vec3(&self, v: &Value, name: &str) -> Result<[f64; 3]> {
        let arr = match v.as_array() {
            Some(a) if a.len() == 3 => a,
            _ => return Err(self.err(format!("field `{name}` must be an array of 3 numbers, got {}", kind_of(v)))),
        };
        let mut out = [0.0; 3];
        for (i, x) in arr.iter().enumerate() {
            out[i] = self.number(x, &format!("{name}[{i}]"))?;
        }
        Ok(out)
    }

    /// A `rows` x `cols` matrix given as an array of row arrays.
    fn matrix(&self, v: &Value, name: &str, rows: usize, cols: usize) -> Result<Vec<Vec<f64>>> {
        let shape_err =
            || self.err(format!("field `{name}` must be a {rows}x{cols} array of numbers (row-major rows), got {}", kind_of(v)));
        let arr = v.as_array().filter(|a| a.len() == rows).ok_or_else(shape_err)?;
        let mut out = Vec::with_capacity(rows);
        for (r, row) in arr.iter().enumerate() {
            let row = row.as_array().filter(|a| a.len() == cols).ok_or_else(shape_err)?;
            let mut vals = Vec::with_capacity(cols);
            for (c, x) in row.iter().enumerate() {
                vals.push(self.number(x, &format!("{name}[{r}][{c}]"))?);
            }
            out.push(vals);
        }
        Ok(out)
    }

    fn bbox(&self, obj: &Value, parent: &str, min_key: &str, max_key: &str) -> Result<([f64; 3], [f64; 3])> {
        let min = self.vec3(self.req(obj, parent, min_key)?, &join(parent, min_key))?;
        let max = self.vec3(self.req(obj, parent, max_key)?, &join(parent, max_key))?;
        if (0..3).any(|c| max[c] <= min[c]) {
            return Err(self.err(format!(
                "`{}`/`{}` is not a valid box: min {min:?} is not below max {max:?} on every axis",
                join(parent, min_key),
                join(parent, max_key)
            )));
        }
        Ok((min, max))
    }

    /// `K` as [`Intrinsics`]; the matrix must be `[[fx,s,cx],[0,fy,cy],[0,0,1]]` with a negligible
    /// skew `s` (see [`crate::geometry::camera::MAX_SKEW_RATIO`]); `image` names the image in errors.
    fn intrinsics(&self, v: &Value, name: &str, image: &str, width: u32, height: u32) -> Result<Intrinsics> {
        let k = self.matrix(v, name, 3, 3)?;
        let m = Matrix3::new(k[0][0], k[0][1], k[0][2], k[1][0], k[1][1], k[1][2], k[2][0], k[2][1], k[2][2]);
        Intrinsics::from_matrix(&m, width, height).map_err(|e| self.err(format!("{image}: field `{name}`: {e}")))
    }

    /// A rigid 4x4 row-major transform as an isometry (rotation orthonormal within [`ORTHONORMAL_TOL`]).
    fn pose(&self, v: &Value, name: &str, image: &str) -> Result<Isometry3<f64>> {
        let m = self.matrix(v, name, 4, 4)?;
        let bottom = [m[3][0], m[3][1], m[3][2], m[3][3] - 1.0];
        if bottom.iter().any(|x| x.abs() > 1e-6) {
            return Err(
                self.err(format!("{image}: `{name}` is not a rigid transform: last row is {:?}, expected [0, 0, 0, 1]", m[3]))
            );
        }
        let r = Matrix3::new(m[0][0], m[0][1], m[0][2], m[1][0], m[1][1], m[1][2], m[2][0], m[2][1], m[2][2]);
        let dev = (r.transpose() * r - Matrix3::identity()).abs().max();
        if dev > ORTHONORMAL_TOL {
            return Err(self.err(format!(
                "{image}: the rotation of `{name}` is not orthonormal (|RᵀR - I| = {dev:.2e} > {ORTHONORMAL_TOL:.0e})"
            )));
        }
        let det = r.determinant();
        if det <= 0.0 {
            return Err(self.err(format!(
                "{image}: the rotation of `{name}` is a reflection (determinant {det:.4}), expected a proper rotation"
            )));
        }
        // Shepperd's method is robust for any angle; renormalising removes the tiny non-orthonormality.
        let q = UnitQuaternion::from_rotation_matrix(&Rotation3::from_matrix_unchecked(r));
        let q = UnitQuaternion::new_normalize(q.into_inner());
        let t = Translation3::from(Vector3::new(m[0][3], m[1][3], m[2][3]));
        Ok(Isometry3::from_parts(t, q))
    }
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

fn display_name(parent: &str) -> &str {
    if parent.is_empty() {
        "(top level)"
    } else {
        parent
    }
}

fn kind_of(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) if s.len() <= 40 => format!("the string {s:?}"),
        Value::String(_) => "a string".into(),
        Value::Array(a) => format!("an array of {} elements", a.len()),
        Value::Object(_) => "an object".into(),
    }
}

/// A relative path from the JSON, refused if absolute or escaping the collection folder.
fn rel_path(ctx: &Ctx, v: &Value, name: &str) -> Result<PathBuf> {
    let s = ctx.string(v, name)?;
    let p = PathBuf::from(&s);
    if s.is_empty() || p.is_absolute() || p.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(ctx.err(format!("field `{name}` must be a path relative to the collection folder (no `..`), got {s:?}")));
    }
    Ok(p)
}

/// Parses the text of `collection.json` of the collection in `root` (the file is `file`).
pub(super) fn parse(root: &Path, file: &Path, text: &str) -> Result<Collection> {
    let ctx = Ctx { file };
    let doc: Value = serde_json::from_str(text).map_err(|e| ctx.err(format!("not valid JSON: {e}")))?;
    if !doc.is_object() {
        return Err(ctx.err(format!("the top level must be a JSON object, got {}", kind_of(&doc))));
    }
    let name = ctx.string(ctx.req(&doc, "", "name")?, "name")?;
    let category = ctx.string(ctx.req(&doc, "", "category")?, "category")?;
    let kind_str = ctx.string(ctx.req(&doc, "", "kind")?, "kind")?;
    let kind = match kind_str.as_str() {
        "single_instance" => CollectionKind::SingleInstance,
        "cross_instance" => CollectionKind::CrossInstance,
        "plain" => CollectionKind::Plain,
        other => {
            return Err(
                ctx.err(format!("field `kind` must be \"single_instance\", \"cross_instance\" or \"plain\", got {other:?}"))
            )
        }
    };
    let has_gt = kind != CollectionKind::Plain;

    // Canonical frame: its bbox is needed for single-instance NOCS; metres_per_unit is optional.
    let frame = ctx.opt(&doc, "canonical_frame");
    let canonical_bbox = match frame {
        Some(f) if kind == CollectionKind::SingleInstance || (f.get("bbox_min").is_some() && f.get("bbox_max").is_some()) => {
            Some(ctx.bbox(f, "canonical_frame", "bbox_min", "bbox_max")?)
        }
        Some(_) => None,
        None if kind == CollectionKind::SingleInstance => {
            return Err(ctx.err("missing required field `canonical_frame` (its bbox_min/bbox_max define the NOCS box)"))
        }
        None => None,
    };
    let metres_per_unit = match frame.and_then(|f| ctx.opt(f, "metres_per_unit")) {
        Some(v) => {
            let m = ctx.number(v, "canonical_frame.metres_per_unit")?;
            if m <= 0.0 {
                return Err(ctx.err(format!("field `canonical_frame.metres_per_unit` must be positive, got {m}")));
            }
            Some(m)
        }
        None => None,
    };

    // Template: `template.obj` (relative path) if given, else `template.obj` in the folder, if present.
    let template_rel = match ctx.opt(&doc, "template").and_then(|t| ctx.opt(t, "obj")) {
        Some(v) => rel_path(&ctx, v, "template.obj")?,
        None => PathBuf::from("template.obj"),
    };
    let template_abs = root.join(&template_rel);
    let template = template_abs.is_file().then(|| absolute(&template_abs));

    let images_v = ctx.req(&doc, "", "images")?;
    let arr =
        images_v.as_array().ok_or_else(|| ctx.err(format!("field `images` must be an array, got {}", kind_of(images_v))))?;
    if arr.is_empty() {
        return Err(ctx.err("field `images` is empty: a collection needs at least one image"));
    }
    let mut images = Vec::with_capacity(arr.len());
    for (i, im) in arr.iter().enumerate() {
        let p = format!("images[{i}]");
        let index = ctx.uint(ctx.req(im, &p, "index")?, &join(&p, "index"))? as usize;
        let rgb = rel_path(&ctx, ctx.req(im, &p, "rgb")?, &join(&p, "rgb"))?;
        let label = format!("image {i} ({})", rgb.display());
        let mask = ctx.opt(im, "mask").map(|v| rel_path(&ctx, v, &join(&p, "mask"))).transpose()?;
        let nocs = ctx.opt(im, "nocs").map(|v| rel_path(&ctx, v, &join(&p, "nocs"))).transpose()?;
        let width = ctx.size(ctx.req(im, &p, "width")?, &join(&p, "width"))?;
        let height = ctx.size(ctx.req(im, &p, "height")?, &join(&p, "height"))?;
        let k_v = if has_gt { Some(ctx.req(im, &p, "K")?) } else { ctx.opt(im, "K") };
        let intrinsics = k_v.map(|v| ctx.intrinsics(v, &join(&p, "K"), &label, width, height)).transpose()?;
        let pose_v = if has_gt { Some(ctx.req(im, &p, "camera_from_object")?) } else { ctx.opt(im, "camera_from_object") };
        let pose = pose_v.map(|v| ctx.pose(v, &join(&p, "camera_from_object"), &label)).transpose()?;

        let (nocs_bbox, instance_id) = match kind {
            CollectionKind::CrossInstance => {
                let b = ctx.bbox(im, &p, "nocs_bbox_min", "nocs_bbox_max")?;
                let id = ctx.string(ctx.req(im, &p, "instance_id")?, &join(&p, "instance_id"))?;
                (Some(b), Some(id))
            }
            _ => {
                let id = ctx.opt(im, "instance_id").map(|v| ctx.string(v, &join(&p, "instance_id"))).transpose()?;
                (canonical_bbox, id)
            }
        };
        let ground_truth = match (intrinsics, pose, nocs_bbox) {
            (Some(intrinsics), Some(camera_from_object), Some((nocs_bbox_min, nocs_bbox_max))) => {
                Some(GroundTruth { intrinsics, camera_from_object, nocs_bbox_min, nocs_bbox_max, instance_id })
            }
            _ => None,
        };
        images.push(ImageEntry { index, rgb, mask, nocs, width, height, intrinsics, ground_truth });
    }

    Ok(Collection {
        root: root.to_path_buf(),
        name,
        category,
        kind,
        images,
        template,
        canonical_bbox,
        metres_per_unit,
        unreadable: Vec::new(),
    })
}

/// `p` made absolute against the current directory (unchanged if that fails).
pub(super) fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}
