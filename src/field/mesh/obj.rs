//! Wavefront OBJ parsing, and the statement tokeniser that OBJ and MTL share.

use std::collections::HashMap;
use std::path::Path;

use super::mtl::load_mtl;
use super::{mesh_err, Material, TriangleMesh, DEFAULT_GREY, NO_INDEX};
use crate::error::{Error, Result};

impl TriangleMesh {
    /// Loads a Wavefront OBJ file with its MTL materials and textures (paths relative to the OBJ/MTL file).
    pub fn load_obj(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let text = String::from_utf8_lossy(&bytes);
        let dir = path.parent().unwrap_or_else(|| Path::new("."));
        Self::parse_obj(&text, dir, path)
    }

    /// Parses OBJ text. `base_dir` resolves `mtllib`; `origin` names the source in errors.
    ///
    /// Supports `v` (with optional `r g b` vertex colours), `vt`, `f` in the `v`, `v/vt`, `v//vn` and
    /// `v/vt/vn` forms with positive or negative (relative) indices, polygons (fan-triangulated), `mtllib`
    /// and `usemtl`; other statements (`vn`, `o`, `g`, `s`, `l`, `p`, ...) are ignored. A missing MTL or
    /// texture file only logs a warning (the material falls back to its `Kd`, or grey).
    pub fn parse_obj(text: &str, base_dir: &Path, origin: &Path) -> Result<Self> {
        let mut obj = ObjBuilder::new(origin);
        for (ln, kw, rest) in statements(text) {
            match kw {
                "v" => obj.vertex(ln, rest)?,
                "vt" => obj.texcoord(ln, rest)?,
                "f" => obj.face(ln, rest)?,
                "mtllib" => obj.mtllib(rest, base_dir)?,
                "usemtl" => obj.usemtl(ln, rest),
                _ => {}
            }
        }
        obj.finish()
    }
}

/// What an OBJ file has defined so far; faces keep their (resolved, unchecked) indices and line until
/// [`ObjBuilder::finish`] checks them against the whole file.
struct ObjBuilder<'a> {
    /// Names the source in errors.
    origin: &'a Path,
    positions: Vec<[f32; 3]>,
    colors: Vec<[f32; 3]>,
    any_color: bool,
    uvs: Vec<[f32; 2]>,
    triangles: Vec<[i64; 3]>,
    tri_uvs: Vec<[u32; 3]>,
    any_uv: bool,
    tri_mats: Vec<u32>,
    tri_lines: Vec<usize>,
    materials: Vec<Material>,
    by_name: HashMap<String, u32>,
    /// The material of `usemtl`, `NO_INDEX` before any.
    current: u32,
    /// Scratch: the corners `(vertex, texture)` of the face being read.
    corners: Vec<(i64, Option<i64>)>,
}

impl<'a> ObjBuilder<'a> {
    fn new(origin: &'a Path) -> Self {
        Self {
            origin,
            positions: Vec::new(),
            colors: Vec::new(),
            any_color: false,
            uvs: Vec::new(),
            triangles: Vec::new(),
            tri_uvs: Vec::new(),
            any_uv: false,
            tri_mats: Vec::new(),
            tri_lines: Vec::new(),
            materials: Vec::new(),
            by_name: HashMap::new(),
            current: NO_INDEX,
            corners: Vec::new(),
        }
    }

    /// `v x y z [r g b]`.
    fn vertex(&mut self, ln: usize, rest: &str) -> Result<()> {
        let origin = self.origin;
        let vals = parse_floats(rest).map_err(|t| mesh_err(origin, format!("line {ln}: bad vertex coordinate '{t}'")))?;
        if vals.len() < 3 {
            return Err(mesh_err(origin, format!("line {ln}: vertex needs 3 coordinates")));
        }
        if vals[..3].iter().any(|v| !v.is_finite()) {
            return Err(mesh_err(origin, format!("line {ln}: vertex {} {}", self.positions.len() + 1, super::NON_FINITE_VERTEX)));
        }
        self.positions.push([vals[0], vals[1], vals[2]]);
        if vals.len() >= 6 {
            self.any_color = true;
            self.colors.push([vals[3], vals[4], vals[5]].map(|c| if c.is_finite() { c.clamp(0.0, 1.0) } else { 0.5 }));
        } else {
            self.colors.push(DEFAULT_GREY);
        }
        Ok(())
    }

    /// `vt u [v [w]]`.
    fn texcoord(&mut self, ln: usize, rest: &str) -> Result<()> {
        let origin = self.origin;
        let vals = parse_floats(rest).map_err(|t| mesh_err(origin, format!("line {ln}: bad texture coordinate '{t}'")))?;
        if vals.is_empty() {
            return Err(mesh_err(origin, format!("line {ln}: empty texture coordinate")));
        }
        self.uvs.push([vals[0], vals.get(1).copied().unwrap_or(0.0)]);
        Ok(())
    }

    /// `f v[/vt[/vn]] ...`, fan-triangulated.
    fn face(&mut self, ln: usize, rest: &str) -> Result<()> {
        let origin = self.origin;
        self.corners.clear();
        for tok in rest.split_whitespace() {
            let mut parts = tok.split('/');
            let vi = parts.next().unwrap_or("");
            let ti = parts.next().unwrap_or("");
            let v = resolve_obj_index(vi, self.positions.len())
                .map_err(|m| mesh_err(origin, format!("line {ln}: vertex index {m}")))?;
            let t = if ti.is_empty() {
                None
            } else {
                Some(
                    resolve_obj_index(ti, self.uvs.len())
                        .map_err(|m| mesh_err(origin, format!("line {ln}: texture index {m}")))?,
                )
            };
            self.corners.push((v, t));
        }
        if self.corners.len() < 3 {
            return Err(mesh_err(origin, format!("line {ln}: face has fewer than 3 vertices")));
        }
        for k in 1..self.corners.len() - 1 {
            let c = [self.corners[0], self.corners[k], self.corners[k + 1]];
            self.triangles.push([c[0].0, c[1].0, c[2].0]);
            let t = match (c[0].1, c[1].1, c[2].1) {
                (Some(a), Some(b), Some(d)) => {
                    self.any_uv = true;
                    [a, b, d].map(|x| u32::try_from(x).unwrap_or(NO_INDEX))
                }
                _ => [NO_INDEX; 3],
            };
            self.tri_uvs.push(t);
            self.tri_mats.push(self.current);
            self.tri_lines.push(ln);
        }
        Ok(())
    }

    /// `mtllib FILE...`: an unreadable library only logs a warning.
    fn mtllib(&mut self, rest: &str, base_dir: &Path) -> Result<()> {
        for file in mtllib_files(rest, base_dir) {
            let mtl_path = base_dir.join(&file);
            match load_mtl(&mtl_path) {
                Ok(mats) => {
                    for m in mats {
                        let idx = self.materials.len() as u32;
                        self.by_name.insert(m.name.clone(), idx);
                        self.materials.push(m);
                    }
                }
                Err(Error::Io { path, source }) => {
                    tracing::warn!(
                        "{}: cannot read material library {}: {source}; using grey",
                        self.origin.display(),
                        path.display()
                    );
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// `usemtl NAME`: an unknown name becomes a grey material.
    fn usemtl(&mut self, ln: usize, rest: &str) {
        let name = rest.to_string();
        self.current = match self.by_name.get(&name) {
            Some(&i) => i,
            None => {
                tracing::warn!("{}: line {ln}: unknown material '{name}'; using grey", self.origin.display());
                let idx = self.materials.len() as u32;
                self.materials.push(Material::with_diffuse(name.clone(), DEFAULT_GREY));
                self.by_name.insert(name, idx);
                idx
            }
        };
    }

    /// Checks every face's indices against the whole file and builds the mesh.
    fn finish(self) -> Result<TriangleMesh> {
        let origin = self.origin;
        let n = self.positions.len() as i64;
        let mut tris = Vec::with_capacity(self.triangles.len());
        for (t, ln) in self.triangles.iter().zip(&self.tri_lines) {
            if let Some(&bad) = t.iter().find(|&&i| i < 0 || i >= n) {
                return Err(mesh_err(
                    origin,
                    format!("line {ln}: face refers to vertex {} but the file has {n} vertices", bad + 1),
                ));
            }
            tris.push(t.map(|i| i as u32));
        }
        let nuv = self.uvs.len() as u32;
        for (t, ln) in self.tri_uvs.iter().zip(&self.tri_lines) {
            if t.iter().any(|&i| i != NO_INDEX && i >= nuv) {
                return Err(mesh_err(
                    origin,
                    format!("line {ln}: face refers to a texture coordinate beyond the {nuv} in the file"),
                ));
            }
        }
        let mesh = TriangleMesh {
            positions: self.positions,
            triangles: tris,
            vertex_colors: if self.any_color { Some(self.colors) } else { None },
            uvs: self.uvs,
            triangle_uvs: if self.any_uv { Some(self.tri_uvs) } else { None },
            triangle_materials: self.tri_mats,
            materials: self.materials,
        };
        mesh.validate(origin)?;
        Ok(mesh)
    }
}

/// Parses whitespace-separated floats; on failure returns the offending token.
pub(super) fn parse_floats(s: &str) -> std::result::Result<Vec<f32>, String> {
    s.split_whitespace().map(|t| t.parse::<f32>().map_err(|_| t.to_string())).collect()
}

/// Resolves a 1-based (or negative, relative) OBJ index against `count` elements defined so far. Positive
/// indices are range-checked later (against the whole file), negative ones here.
fn resolve_obj_index(tok: &str, count: usize) -> std::result::Result<i64, String> {
    let i: i64 = tok.parse().map_err(|_| format!("'{tok}' is not an integer"))?;
    if i > 0 {
        Ok(i - 1)
    } else if i < 0 {
        let r = count as i64 + i;
        if r < 0 {
            Err(format!("{i} reaches before the first of the {count} defined so far"))
        } else {
            Ok(r)
        }
    } else {
        Err("0 is invalid (OBJ indices start at 1)".into())
    }
}

/// File names of an `mtllib` statement: the whole rest of the line if that file exists (names with
/// spaces), else its whitespace-separated words.
fn mtllib_files(rest: &str, base_dir: &Path) -> Vec<String> {
    let whole = rest.replace('\\', "/");
    if base_dir.join(&whole).is_file() || !whole.contains(char::is_whitespace) {
        return vec![whole];
    }
    whole.split_whitespace().map(str::to_string).collect()
}

/// The statements of OBJ or MTL text: `(line number, keyword, rest of the line)` for every line that
/// is not blank once its `#` comment is cut off.
pub(super) fn statements(text: &str) -> impl Iterator<Item = (usize, &str, &str)> {
    text.lines().enumerate().filter_map(|(ln0, raw)| {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            return None;
        }
        let (kw, rest) = match line.find(char::is_whitespace) {
            Some(i) => (&line[..i], line[i..].trim()),
            None => (line, ""),
        };
        Some((ln0 + 1, kw, rest))
    })
}
