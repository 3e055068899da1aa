//! Triangle meshes with their colour sources: Wavefront OBJ (+ MTL, `Kd` and `map_Kd` textures) and PLY
//! (ascii, binary little/big endian) loading, binary PLY writing, and colour lookup at a surface point.
//!
//! Colour conventions: every colour is RGB in `[0, 1]`, in the files' own (sRGB) encoding. A textured
//! material's colour is `Kd * texture(uv)`, as the collection renderer (trimesh -> pyrender, where `Kd`
//! becomes `baseColorFactor`) drew it.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use image::RgbImage;

use crate::error::{Error, Result};

/// Marks a missing index in [`TriangleMesh::triangle_uvs`] and [`TriangleMesh::triangle_materials`].
pub const NO_INDEX: u32 = u32::MAX;

/// Colour returned where a mesh has no colour source at all (mid grey).
pub const DEFAULT_GREY: [f32; 3] = [0.5, 0.5, 0.5];

/// A surface material: a diffuse colour and optionally a diffuse texture (`map_Kd`).
#[derive(Clone)]
pub struct Material {
    /// Material name (`newmtl`).
    pub name: String,
    /// Diffuse colour `Kd`, RGB in `[0, 1]`; multiplies the texture where there is one.
    pub diffuse: [f32; 3],
    /// Diffuse texture; `None` if the material has none or its file could not be read.
    pub texture: Option<RgbImage>,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("name", &self.name)
            .field("diffuse", &self.diffuse)
            .field("texture", &self.texture.as_ref().map(|t| (t.width(), t.height())))
            .finish()
    }
}

impl Material {
    /// A material with a diffuse colour and no texture.
    pub fn with_diffuse(name: impl Into<String>, diffuse: [f32; 3]) -> Self {
        Self { name: name.into(), diffuse, texture: None }
    }
}

/// An indexed triangle mesh with optional colour sources (texture via UVs and materials, vertex colours,
/// material colours). Invariants (checked by [`TriangleMesh::validate`], which every loader runs):
/// `triangle_materials.len() == triangles.len()`, `triangle_uvs` (when present) has one entry per triangle,
/// `vertex_colors` (when present) one per position, all indices in range or [`NO_INDEX`] where allowed.
#[derive(Clone, Debug, Default)]
pub struct TriangleMesh {
    /// Vertex positions.
    pub positions: Vec<[f32; 3]>,
    /// Triangles as indices into `positions`, counter-clockwise seen from outside where the source is.
    pub triangles: Vec<[u32; 3]>,
    /// Per-vertex colours in `[0, 1]`.
    pub vertex_colors: Option<Vec<[f32; 3]>>,
    /// Texture coordinates (OBJ convention: v = 0 is the bottom row of the image).
    pub uvs: Vec<[f32; 2]>,
    /// Per triangle corner, an index into `uvs`, or [`NO_INDEX`] for triangles without UVs.
    pub triangle_uvs: Option<Vec<[u32; 3]>>,
    /// Per triangle, an index into `materials`, or [`NO_INDEX`].
    pub triangle_materials: Vec<u32>,
    /// Materials referenced by `triangle_materials`.
    pub materials: Vec<Material>,
}

impl TriangleMesh {
    /// A bare mesh (no colours, UVs or materials).
    pub fn from_triangles(positions: Vec<[f32; 3]>, triangles: Vec<[u32; 3]>) -> Self {
        let n = triangles.len();
        Self {
            positions,
            triangles,
            vertex_colors: None,
            uvs: Vec::new(),
            triangle_uvs: None,
            triangle_materials: vec![NO_INDEX; n],
            materials: Vec::new(),
        }
    }

    /// Number of vertices.
    pub fn num_vertices(&self) -> usize {
        self.positions.len()
    }

    /// Number of triangles.
    pub fn num_triangles(&self) -> usize {
        self.triangles.len()
    }

    /// Loads a mesh, choosing the format by extension (`.obj` or `.ply`, case-insensitive).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let ext = path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase());
        match ext.as_deref() {
            Some("obj") => Self::load_obj(path),
            Some("ply") => Self::load_ply(path),
            other => Err(mesh_err(
                path,
                format!(
                    "unsupported mesh format {} (expected .obj or .ply)",
                    other.map(|e| format!("'.{e}'")).unwrap_or_else(|| "(no extension)".into())
                ),
            )),
        }
    }

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
        let mut positions: Vec<[f32; 3]> = Vec::new();
        let mut colors: Vec<[f32; 3]> = Vec::new();
        let mut any_color = false;
        let mut uvs: Vec<[f32; 2]> = Vec::new();
        let mut triangles: Vec<[i64; 3]> = Vec::new();
        let mut tri_uvs: Vec<[u32; 3]> = Vec::new();
        let mut any_uv = false;
        let mut tri_mats: Vec<u32> = Vec::new();
        let mut tri_lines: Vec<usize> = Vec::new();
        let mut materials: Vec<Material> = Vec::new();
        let mut by_name: HashMap<String, u32> = HashMap::new();
        let mut current = NO_INDEX;
        let mut corners: Vec<(i64, Option<i64>)> = Vec::new();

        for (ln0, raw) in text.lines().enumerate() {
            let ln = ln0 + 1;
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let (kw, rest) = match line.find(char::is_whitespace) {
                Some(i) => (&line[..i], line[i..].trim()),
                None => (line, ""),
            };
            match kw {
                "v" => {
                    let vals = parse_floats(rest)
                        .map_err(|t| mesh_err(origin, format!("line {ln}: bad vertex coordinate '{t}'")))?;
                    if vals.len() < 3 {
                        return Err(mesh_err(origin, format!("line {ln}: vertex needs 3 coordinates")));
                    }
                    if vals[..3].iter().any(|v| !v.is_finite()) {
                        return Err(mesh_err(
                            origin,
                            format!("line {ln}: vertex {} has a NaN or infinite coordinate", positions.len() + 1),
                        ));
                    }
                    positions.push([vals[0], vals[1], vals[2]]);
                    if vals.len() >= 6 {
                        any_color = true;
                        colors.push([vals[3], vals[4], vals[5]].map(|c| if c.is_finite() { c.clamp(0.0, 1.0) } else { 0.5 }));
                    } else {
                        colors.push(DEFAULT_GREY);
                    }
                }
                "vt" => {
                    let vals = parse_floats(rest)
                        .map_err(|t| mesh_err(origin, format!("line {ln}: bad texture coordinate '{t}'")))?;
                    if vals.is_empty() {
                        return Err(mesh_err(origin, format!("line {ln}: empty texture coordinate")));
                    }
                    uvs.push([vals[0], vals.get(1).copied().unwrap_or(0.0)]);
                }
                "f" => {
                    corners.clear();
                    for tok in rest.split_whitespace() {
                        let mut parts = tok.split('/');
                        let vi = parts.next().unwrap_or("");
                        let ti = parts.next().unwrap_or("");
                        let v = resolve_obj_index(vi, positions.len())
                            .map_err(|m| mesh_err(origin, format!("line {ln}: vertex index {m}")))?;
                        let t = if ti.is_empty() {
                            None
                        } else {
                            Some(
                                resolve_obj_index(ti, uvs.len())
                                    .map_err(|m| mesh_err(origin, format!("line {ln}: texture index {m}")))?,
                            )
                        };
                        corners.push((v, t));
                    }
                    if corners.len() < 3 {
                        return Err(mesh_err(origin, format!("line {ln}: face has fewer than 3 vertices")));
                    }
                    for k in 1..corners.len() - 1 {
                        let c = [corners[0], corners[k], corners[k + 1]];
                        triangles.push([c[0].0, c[1].0, c[2].0]);
                        let t = match (c[0].1, c[1].1, c[2].1) {
                            (Some(a), Some(b), Some(d)) => {
                                any_uv = true;
                                [a, b, d].map(|x| u32::try_from(x).unwrap_or(NO_INDEX))
                            }
                            _ => [NO_INDEX; 3],
                        };
                        tri_uvs.push(t);
                        tri_mats.push(current);
                        tri_lines.push(ln);
                    }
                }
                "mtllib" => {
                    for file in mtllib_files(rest, base_dir) {
                        let mtl_path = base_dir.join(&file);
                        match load_mtl(&mtl_path) {
                            Ok(mats) => {
                                for m in mats {
                                    let idx = materials.len() as u32;
                                    by_name.insert(m.name.clone(), idx);
                                    materials.push(m);
                                }
                            }
                            Err(Error::Io { path, source }) => {
                                tracing::warn!(
                                    "{}: cannot read material library {}: {source}; using grey",
                                    origin.display(),
                                    path.display()
                                );
                            }
                            Err(e) => return Err(e),
                        }
                    }
                }
                "usemtl" => {
                    let name = rest.to_string();
                    current = match by_name.get(&name) {
                        Some(&i) => i,
                        None => {
                            tracing::warn!("{}: line {ln}: unknown material '{name}'; using grey", origin.display());
                            let idx = materials.len() as u32;
                            materials.push(Material::with_diffuse(name.clone(), DEFAULT_GREY));
                            by_name.insert(name, idx);
                            idx
                        }
                    };
                }
                _ => {}
            }
        }

        let n = positions.len() as i64;
        let mut tris = Vec::with_capacity(triangles.len());
        for (t, ln) in triangles.iter().zip(&tri_lines) {
            if let Some(&bad) = t.iter().find(|&&i| i < 0 || i >= n) {
                return Err(mesh_err(
                    origin,
                    format!("line {ln}: face refers to vertex {} but the file has {n} vertices", bad + 1),
                ));
            }
            tris.push(t.map(|i| i as u32));
        }
        let nuv = uvs.len() as u32;
        for (t, ln) in tri_uvs.iter().zip(&tri_lines) {
            if t.iter().any(|&i| i != NO_INDEX && i >= nuv) {
                return Err(mesh_err(
                    origin,
                    format!("line {ln}: face refers to a texture coordinate beyond the {nuv} in the file"),
                ));
            }
        }
        let mesh = TriangleMesh {
            positions,
            triangles: tris,
            vertex_colors: if any_color { Some(colors) } else { None },
            uvs,
            triangle_uvs: if any_uv { Some(tri_uvs) } else { None },
            triangle_materials: tri_mats,
            materials,
        };
        mesh.validate(origin)?;
        Ok(mesh)
    }

    /// Loads a PLY file (ascii, binary_little_endian or binary_big_endian): vertex `x y z`, optional
    /// `red green blue` (integer types scaled from 0..255, `ushort` from 0..65535, floats taken as 0..1), and
    /// face `vertex_indices` (or `vertex_index`) lists, fan-triangulated. Other elements and properties are
    /// skipped.
    pub fn load_ply(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse_ply(&bytes, path)
    }

    /// Parses the bytes of a PLY file; `origin` names the source in errors.
    pub fn parse_ply(bytes: &[u8], origin: &Path) -> Result<Self> {
        let (header, body_start) = parse_ply_header(bytes).map_err(|m| mesh_err(origin, m))?;
        let body = &bytes[body_start..];
        let parsed = match header.format {
            PlyFormat::Ascii => {
                let text = String::from_utf8_lossy(body);
                let mut r = AsciiReader { tokens: text.split_ascii_whitespace() };
                read_ply_body(&header, &mut r)
            }
            PlyFormat::BinaryLe => read_ply_body(&header, &mut BinReader { data: body, pos: 0, big: false }),
            PlyFormat::BinaryBe => read_ply_body(&header, &mut BinReader { data: body, pos: 0, big: true }),
        }
        .map_err(|m| mesh_err(origin, m))?;
        let mut mesh = TriangleMesh::from_triangles(parsed.positions, parsed.triangles);
        mesh.vertex_colors = parsed.colors;
        mesh.validate(origin)?;
        Ok(mesh)
    }

    /// Writes a binary little-endian PLY: float `x y z`, uchar `red green blue` when the mesh has vertex
    /// colours (rounded to 8 bits), and `list uchar int vertex_indices` faces. UVs and materials are not
    /// written.
    pub fn write_ply(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let io = |e| Error::io(path, e);
        let file = std::fs::File::create(path).map_err(io)?;
        let mut w = std::io::BufWriter::new(file);
        let mut header = String::from("ply\nformat binary_little_endian 1.0\ncomment written by congeal\n");
        header += &format!("element vertex {}\nproperty float x\nproperty float y\nproperty float z\n", self.positions.len());
        let colors = self.vertex_colors.as_ref().filter(|c| c.len() == self.positions.len());
        if colors.is_some() {
            header += "property uchar red\nproperty uchar green\nproperty uchar blue\n";
        }
        header += &format!("element face {}\nproperty list uchar int vertex_indices\nend_header\n", self.triangles.len());
        w.write_all(header.as_bytes()).map_err(io)?;
        let mut buf = Vec::with_capacity(15 * self.positions.len().max(self.triangles.len()));
        for (i, p) in self.positions.iter().enumerate() {
            for c in p {
                buf.extend_from_slice(&c.to_le_bytes());
            }
            if let Some(cols) = colors {
                for c in cols[i] {
                    buf.push((c.clamp(0.0, 1.0) * 255.0).round() as u8);
                }
            }
        }
        for t in &self.triangles {
            buf.push(3u8);
            for &i in t {
                buf.extend_from_slice(&(i as i32).to_le_bytes());
            }
        }
        w.write_all(&buf).map_err(io)?;
        w.flush().map_err(io)?;
        Ok(())
    }

    /// Checks the mesh's invariants: at least one triangle, finite positions, every index in range,
    /// per-triangle and per-vertex arrays of the right length. `origin` names the mesh in errors.
    pub fn validate(&self, origin: &Path) -> Result<()> {
        if self.triangles.is_empty() {
            return Err(mesh_err(
                origin,
                format!("mesh is empty ({} vertices, no triangles)", self.positions.len()),
            ));
        }
        if let Some(i) = self.positions.iter().position(|p| p.iter().any(|c| !c.is_finite())) {
            return Err(mesh_err(origin, format!("vertex {i} has a NaN or infinite coordinate")));
        }
        let n = self.positions.len();
        if let Some((t, bad)) =
            self.triangles.iter().enumerate().find_map(|(t, tri)| tri.iter().find(|&&i| i as usize >= n).map(|&i| (t, i)))
        {
            return Err(mesh_err(origin, format!("face {t} refers to vertex {bad} but there are only {n} vertices")));
        }
        if let Some(c) = &self.vertex_colors {
            if c.len() != n {
                return Err(mesh_err(origin, format!("{} vertex colours for {n} vertices", c.len())));
            }
        }
        if let Some(tu) = &self.triangle_uvs {
            if tu.len() != self.triangles.len() {
                return Err(mesh_err(origin, format!("{} uv triples for {} triangles", tu.len(), self.triangles.len())));
            }
            let nu = self.uvs.len();
            if tu.iter().flatten().any(|&i| i != NO_INDEX && i as usize >= nu) {
                return Err(mesh_err(origin, format!("a face refers to a texture coordinate beyond the {nu} present")));
            }
        }
        if self.triangle_materials.len() != self.triangles.len() {
            return Err(mesh_err(
                origin,
                format!("{} material indices for {} triangles", self.triangle_materials.len(), self.triangles.len()),
            ));
        }
        let nm = self.materials.len();
        if self.triangle_materials.iter().any(|&m| m != NO_INDEX && m as usize >= nm) {
            return Err(mesh_err(origin, format!("a face refers to a material beyond the {nm} present")));
        }
        Ok(())
    }

    /// Axis-aligned bounding box `(min, max)` of all vertex positions; an error for a mesh without vertices.
    pub fn bbox(&self) -> Result<([f32; 3], [f32; 3])> {
        if self.positions.is_empty() {
            return Err(Error::InvalidInput("an empty mesh has no bounding box".into()));
        }
        let mut lo = [f32::INFINITY; 3];
        let mut hi = [f32::NEG_INFINITY; 3];
        for p in &self.positions {
            for a in 0..3 {
                lo[a] = lo[a].min(p[a]);
                hi[a] = hi[a].max(p[a]);
            }
        }
        if lo.iter().chain(&hi).any(|v| !v.is_finite()) {
            return Err(Error::InvalidInput("mesh has NaN or infinite vertex coordinates".into()));
        }
        Ok((lo, hi))
    }

    /// The three corner positions of a triangle.
    pub fn triangle_positions(&self, triangle: usize) -> [[f32; 3]; 3] {
        self.triangles[triangle].map(|i| self.positions[i as usize])
    }

    /// Area of a triangle.
    pub fn triangle_area(&self, triangle: usize) -> f32 {
        let [a, b, c] = self.triangle_positions(triangle);
        let n = cross(sub(b, a), sub(c, a));
        0.5 * dot(n, n).sqrt()
    }

    /// Total surface area.
    pub fn surface_area(&self) -> f64 {
        (0..self.triangles.len()).map(|t| self.triangle_area(t) as f64).sum()
    }

    /// Signed enclosed volume by the divergence theorem (positive for a closed mesh whose triangles are
    /// counter-clockwise seen from outside).
    pub fn signed_volume(&self) -> f64 {
        self.triangles
            .iter()
            .map(|t| {
                let [a, b, c] = t.map(|i| self.positions[i as usize].map(f64::from));
                let cr = [b[1] * c[2] - b[2] * c[1], b[2] * c[0] - b[0] * c[2], b[0] * c[1] - b[1] * c[0]];
                (a[0] * cr[0] + a[1] * cr[1] + a[2] * cr[2]) / 6.0
            })
            .sum()
    }

    /// Colour (RGB in `[0, 1]`) of the surface point with barycentric coordinates `barycentric` in
    /// `triangle`. Sources, first available wins: the triangle's material texture sampled bilinearly at the
    /// interpolated UV (wrapping, v = 0 the bottom row) times the material's `Kd`; interpolated vertex
    /// colours; the material's `Kd`; mid grey. An out-of-range `triangle` gives mid grey.
    pub fn color_at(&self, triangle: usize, barycentric: [f32; 3]) -> [f32; 3] {
        if triangle >= self.triangles.len() {
            return DEFAULT_GREY;
        }
        let b = barycentric;
        let material = self
            .triangle_materials
            .get(triangle)
            .copied()
            .filter(|&m| m != NO_INDEX)
            .and_then(|m| self.materials.get(m as usize));
        if let (Some(m), Some(tuv)) = (material, &self.triangle_uvs) {
            if let (Some(tex), Some(c)) = (&m.texture, tuv.get(triangle)) {
                if c.iter().all(|&i| (i as usize) < self.uvs.len()) {
                    let mut uv = [0.0f32; 2];
                    for k in 0..3 {
                        let t = self.uvs[c[k] as usize];
                        uv[0] += b[k] * t[0];
                        uv[1] += b[k] * t[1];
                    }
                    if let Some(s) = sample_texture(tex, uv) {
                        return [s[0] * m.diffuse[0], s[1] * m.diffuse[1], s[2] * m.diffuse[2]];
                    }
                }
            }
        }
        if let Some(vc) = &self.vertex_colors {
            let t = self.triangles[triangle];
            if t.iter().all(|&i| (i as usize) < vc.len()) {
                let mut out = [0.0f32; 3];
                for k in 0..3 {
                    let c = vc[t[k] as usize];
                    for ch in 0..3 {
                        out[ch] += b[k] * c[ch];
                    }
                }
                return out;
            }
        }
        if let Some(m) = material {
            return m.diffuse;
        }
        DEFAULT_GREY
    }
}

/// Samples an RGB texture bilinearly at `uv` (OBJ convention: v = 0 is the bottom row), wrapping around
/// both axes. Returns `None` for non-finite UVs or an empty image.
pub fn sample_texture(tex: &RgbImage, uv: [f32; 2]) -> Option<[f32; 3]> {
    let (w, h) = (tex.width() as i64, tex.height() as i64);
    if w == 0 || h == 0 || !uv[0].is_finite() || !uv[1].is_finite() {
        return None;
    }
    // Reduce to [0, 1) first so huge UVs keep their precision.
    let u = uv[0] as f64 - (uv[0] as f64).floor();
    let v = uv[1] as f64 - (uv[1] as f64).floor();
    let x = u * w as f64 - 0.5;
    let y = (1.0 - v) * h as f64 - 0.5;
    let (x0, y0) = (x.floor(), y.floor());
    let (fx, fy) = ((x - x0) as f32, (y - y0) as f32);
    let (x0, y0) = (x0 as i64, y0 as i64);
    let px = |xi: i64, yi: i64| {
        let p = tex.get_pixel(xi.rem_euclid(w) as u32, yi.rem_euclid(h) as u32).0;
        [p[0] as f32, p[1] as f32, p[2] as f32]
    };
    let (a, b, c, d) = (px(x0, y0), px(x0 + 1, y0), px(x0, y0 + 1), px(x0 + 1, y0 + 1));
    let mut out = [0.0f32; 3];
    for ch in 0..3 {
        let top = a[ch] + (b[ch] - a[ch]) * fx;
        let bot = c[ch] + (d[ch] - c[ch]) * fx;
        out[ch] = (top + (bot - top) * fy) / 255.0;
    }
    Some(out)
}

fn mesh_err(path: &Path, message: impl Into<String>) -> Error {
    Error::Mesh { path: path.to_path_buf(), message: message.into() }
}

fn sub(a: [f32; 3], b: [f32; 3]) -> [f32; 3] {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}

fn cross(a: [f32; 3], b: [f32; 3]) -> [f32; 3] {
    [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]
}

fn dot(a: [f32; 3], b: [f32; 3]) -> f32 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

/// Parses whitespace-separated floats; on failure returns the offending token.
fn parse_floats(s: &str) -> std::result::Result<Vec<f32>, String> {
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

/// The file name of a `map_Kd` statement, skipping texture options (`-o u v w`, `-s ...`, `-clamp on`, ...).
fn texture_file_name(rest: &str) -> String {
    let toks: Vec<&str> = rest.split_whitespace().collect();
    let mut i = 0;
    while i < toks.len() && toks[i].starts_with('-') && toks[i].len() > 1 {
        let opt = toks[i];
        i += 1;
        let nargs = match opt {
            "-o" | "-s" | "-t" => {
                // up to three numbers
                let mut k = 0;
                while k < 3 && i + k < toks.len() && toks[i + k].parse::<f32>().is_ok() {
                    k += 1;
                }
                k
            }
            "-mm" => 2,
            "-blendu" | "-blendv" | "-clamp" | "-cc" | "-bm" | "-boost" | "-texres" | "-imfchan" | "-type" => 1,
            _ => 0,
        };
        i += nargs;
    }
    toks[i.min(toks.len())..].join(" ").replace('\\', "/")
}

/// Loads an MTL file: `newmtl`, `Kd`, `map_Kd`. Textures that cannot be read are warned about and left out.
fn load_mtl(path: &Path) -> Result<Vec<Material>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8_lossy(&bytes);
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    // (material, has Kd, texture file)
    let mut out: Vec<(Material, bool, Option<PathBuf>)> = Vec::new();
    for (ln0, raw) in text.lines().enumerate() {
        let ln = ln0 + 1;
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let (kw, rest) = match line.find(char::is_whitespace) {
            Some(i) => (&line[..i], line[i..].trim()),
            None => (line, ""),
        };
        match kw {
            "newmtl" => out.push((Material::with_diffuse(rest, DEFAULT_GREY), false, None)),
            "Kd" | "map_Kd" => {
                let Some(cur) = out.last_mut() else {
                    return Err(mesh_err(path, format!("line {ln}: '{kw}' before any 'newmtl'")));
                };
                if kw == "Kd" {
                    if rest.starts_with("spectral") || rest.starts_with("xyz") {
                        tracing::warn!("{}: line {ln}: unsupported Kd form; using grey", path.display());
                        continue;
                    }
                    let v = parse_floats(rest)
                        .map_err(|t| mesh_err(path, format!("line {ln}: bad Kd value '{t}'")))?;
                    let kd = match v.len() {
                        1 => [v[0]; 3],
                        n if n >= 3 => [v[0], v[1], v[2]],
                        _ => return Err(mesh_err(path, format!("line {ln}: Kd needs 1 or 3 values"))),
                    };
                    if kd.iter().any(|c| !c.is_finite()) {
                        return Err(mesh_err(path, format!("line {ln}: Kd is NaN or infinite")));
                    }
                    cur.0.diffuse = kd.map(|c| c.clamp(0.0, 1.0));
                    cur.1 = true;
                } else {
                    let name = texture_file_name(rest);
                    if !name.is_empty() {
                        cur.2 = Some(dir.join(name));
                    }
                }
            }
            _ => {}
        }
    }
    let mut cache: HashMap<PathBuf, Option<RgbImage>> = HashMap::new();
    let mut mats = Vec::with_capacity(out.len());
    for (mut m, has_kd, tex) in out {
        if let Some(tp) = tex {
            let img = cache
                .entry(tp.clone())
                .or_insert_with(|| match image::open(&tp) {
                    Ok(img) => Some(img.to_rgb8()),
                    Err(e) => {
                        tracing::warn!(
                            "{}: cannot read texture {} of material '{}': {e}; using its Kd",
                            path.display(),
                            tp.display(),
                            m.name
                        );
                        None
                    }
                })
                .clone();
            // A textured material without Kd shows the texture unscaled.
            if img.is_some() && !has_kd {
                m.diffuse = [1.0; 3];
            }
            m.texture = img;
        }
        mats.push(m);
    }
    Ok(mats)
}

// ------------------------------------------------------------------------------------------------
// PLY
// ------------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum PlyFormat {
    Ascii,
    BinaryLe,
    BinaryBe,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Scalar {
    I8,
    U8,
    I16,
    U16,
    I32,
    U32,
    F32,
    F64,
}

impl Scalar {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "char" | "int8" => Scalar::I8,
            "uchar" | "uint8" => Scalar::U8,
            "short" | "int16" => Scalar::I16,
            "ushort" | "uint16" => Scalar::U16,
            "int" | "int32" => Scalar::I32,
            "uint" | "uint32" => Scalar::U32,
            "float" | "float32" => Scalar::F32,
            "double" | "float64" => Scalar::F64,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            Scalar::I8 | Scalar::U8 => 1,
            Scalar::I16 | Scalar::U16 => 2,
            Scalar::I32 | Scalar::U32 | Scalar::F32 => 4,
            Scalar::F64 => 8,
        }
    }

    /// Factor taking a colour stored in this type to `[0, 1]`.
    fn color_scale(self) -> f64 {
        match self {
            Scalar::F32 | Scalar::F64 => 1.0,
            Scalar::U16 => 1.0 / 65535.0,
            _ => 1.0 / 255.0,
        }
    }
}

#[derive(Clone, Debug)]
enum PropKind {
    Scalar(Scalar),
    List { count: Scalar, item: Scalar },
}

#[derive(Clone, Debug)]
struct PlyProperty {
    name: String,
    kind: PropKind,
}

#[derive(Clone, Debug)]
struct PlyElement {
    name: String,
    count: usize,
    props: Vec<PlyProperty>,
}

#[derive(Clone, Debug)]
struct PlyHeader {
    format: PlyFormat,
    elements: Vec<PlyElement>,
}

/// Parses the header; returns it and the byte offset where the body starts.
fn parse_ply_header(bytes: &[u8]) -> std::result::Result<(PlyHeader, usize), String> {
    if bytes.is_empty() {
        return Err("file is empty".into());
    }
    let mut pos = 0usize;
    let mut next_line = || -> Option<String> {
        if pos >= bytes.len() {
            return None;
        }
        let end = bytes[pos..].iter().position(|&b| b == b'\n').map(|i| pos + i).unwrap_or(bytes.len());
        let line = String::from_utf8_lossy(&bytes[pos..end]).trim_end_matches('\r').to_string();
        pos = (end + 1).min(bytes.len());
        Some(line)
    };
    if next_line().as_deref().map(str::trim) != Some("ply") {
        return Err("not a PLY file (first line is not 'ply')".into());
    }
    let mut format = None;
    let mut elements: Vec<PlyElement> = Vec::new();
    loop {
        let Some(line) = next_line() else {
            return Err("header has no 'end_header'".into());
        };
        let toks: Vec<&str> = line.split_whitespace().collect();
        match toks.first().copied() {
            None | Some("comment") | Some("obj_info") => {}
            Some("format") => {
                format = Some(match toks.get(1).copied() {
                    Some("ascii") => PlyFormat::Ascii,
                    Some("binary_little_endian") => PlyFormat::BinaryLe,
                    Some("binary_big_endian") => PlyFormat::BinaryBe,
                    other => return Err(format!("unknown PLY format {:?}", other.unwrap_or(""))),
                })
            }
            Some("element") => {
                if toks.len() < 3 {
                    return Err(format!("bad header line '{line}'"));
                }
                let count = toks[2].parse::<usize>().map_err(|_| format!("bad element count in '{line}'"))?;
                elements.push(PlyElement { name: toks[1].to_string(), count, props: Vec::new() });
            }
            Some("property") => {
                let el = elements.last_mut().ok_or_else(|| format!("property before any element: '{line}'"))?;
                let bad = || format!("bad property line '{line}'");
                let kind = if toks.get(1) == Some(&"list") {
                    if toks.len() < 5 {
                        return Err(bad());
                    }
                    let count = Scalar::parse(toks[2]).ok_or_else(bad)?;
                    let item = Scalar::parse(toks[3]).ok_or_else(bad)?;
                    if matches!(count, Scalar::F32 | Scalar::F64) {
                        return Err(format!("list count type must be an integer in '{line}'"));
                    }
                    PropKind::List { count, item }
                } else {
                    if toks.len() < 3 {
                        return Err(bad());
                    }
                    PropKind::Scalar(Scalar::parse(toks[1]).ok_or_else(bad)?)
                };
                el.props.push(PlyProperty { name: toks[toks.len() - 1].to_string(), kind });
            }
            Some("end_header") => break,
            Some(other) => return Err(format!("unknown header keyword '{other}'")),
        }
    }
    let format = format.ok_or("header has no 'format' line")?;
    Ok((PlyHeader { format, elements }, pos))
}

trait PlyRead {
    fn read(&mut self, s: Scalar) -> std::result::Result<f64, String>;
    /// Skips `n` values of type `s`.
    fn skip(&mut self, s: Scalar, n: usize) -> std::result::Result<(), String> {
        for _ in 0..n {
            self.read(s)?;
        }
        Ok(())
    }
}

struct BinReader<'a> {
    data: &'a [u8],
    pos: usize,
    big: bool,
}

impl PlyRead for BinReader<'_> {
    fn read(&mut self, s: Scalar) -> std::result::Result<f64, String> {
        let n = s.size();
        let Some(b) = self.data.get(self.pos..self.pos + n) else {
            return Err("file is truncated (body shorter than the header declares)".into());
        };
        self.pos += n;
        let mut a = [0u8; 8];
        a[..n].copy_from_slice(b);
        if self.big {
            a[..n].reverse();
        }
        Ok(match s {
            Scalar::I8 => a[0] as i8 as f64,
            Scalar::U8 => a[0] as f64,
            Scalar::I16 => i16::from_le_bytes([a[0], a[1]]) as f64,
            Scalar::U16 => u16::from_le_bytes([a[0], a[1]]) as f64,
            Scalar::I32 => i32::from_le_bytes([a[0], a[1], a[2], a[3]]) as f64,
            Scalar::U32 => u32::from_le_bytes([a[0], a[1], a[2], a[3]]) as f64,
            Scalar::F32 => f32::from_le_bytes([a[0], a[1], a[2], a[3]]) as f64,
            Scalar::F64 => f64::from_le_bytes(a),
        })
    }

    fn skip(&mut self, s: Scalar, n: usize) -> std::result::Result<(), String> {
        let len = s.size().checked_mul(n).ok_or("list too long")?;
        if self.pos + len > self.data.len() {
            return Err("file is truncated (body shorter than the header declares)".into());
        }
        self.pos += len;
        Ok(())
    }
}

struct AsciiReader<'a> {
    tokens: std::str::SplitAsciiWhitespace<'a>,
}

impl PlyRead for AsciiReader<'_> {
    fn read(&mut self, _s: Scalar) -> std::result::Result<f64, String> {
        let t = self.tokens.next().ok_or("file is truncated (fewer values than the header declares)")?;
        t.parse::<f64>().map_err(|_| format!("bad number '{t}'"))
    }
}

struct PlyData {
    positions: Vec<[f32; 3]>,
    colors: Option<Vec<[f32; 3]>>,
    triangles: Vec<[u32; 3]>,
}

fn read_ply_body<R: PlyRead>(h: &PlyHeader, r: &mut R) -> std::result::Result<PlyData, String> {
    let mut out = PlyData { positions: Vec::new(), colors: None, triangles: Vec::new() };
    let mut saw_vertex = false;
    for el in &h.elements {
        let find = |names: &[&str]| -> Option<(usize, Scalar)> {
            el.props.iter().enumerate().find_map(|(i, p)| match p.kind {
                PropKind::Scalar(s) if names.contains(&p.name.as_str()) => Some((i, s)),
                _ => None,
            })
        };
        match el.name.as_str() {
            "vertex" if !saw_vertex => {
                saw_vertex = true;
                let xyz = [find(&["x"]), find(&["y"]), find(&["z"])];
                if xyz.iter().any(Option::is_none) {
                    return Err("vertex element lacks scalar x, y and z properties".into());
                }
                let xyz = xyz.map(|o| o.unwrap().0);
                let rgb = [
                    find(&["red", "r", "diffuse_red"]),
                    find(&["green", "g", "diffuse_green"]),
                    find(&["blue", "b", "diffuse_blue"]),
                ];
                let rgb = if rgb.iter().all(Option::is_some) { Some(rgb.map(Option::unwrap)) } else { None };
                out.positions.reserve(el.count.min(1 << 24));
                let mut cols = Vec::new();
                if rgb.is_some() {
                    cols.reserve(el.count.min(1 << 24));
                }
                let mut vals = vec![0.0f64; el.props.len()];
                for vi in 0..el.count {
                    for (k, p) in el.props.iter().enumerate() {
                        match p.kind {
                            PropKind::Scalar(s) => vals[k] = r.read(s)?,
                            PropKind::List { count, item } => {
                                let n = list_len(r.read(count)?)?;
                                r.skip(item, n)?;
                            }
                        }
                    }
                    let p = xyz.map(|k| vals[k] as f32);
                    if p.iter().any(|c| !c.is_finite()) {
                        return Err(format!("vertex {vi} has a NaN or infinite coordinate"));
                    }
                    out.positions.push(p);
                    if let Some(rgb) = rgb {
                        cols.push(rgb.map(|(k, s)| ((vals[k] * s.color_scale()) as f32).clamp(0.0, 1.0)));
                    }
                }
                if rgb.is_some() {
                    out.colors = Some(cols);
                }
            }
            "face" => {
                let idx = el.props.iter().position(|p| {
                    matches!(p.kind, PropKind::List { .. }) && (p.name == "vertex_indices" || p.name == "vertex_index")
                });
                let Some(idx) = idx else {
                    return Err("face element lacks a 'vertex_indices' list".into());
                };
                out.triangles.reserve(el.count.min(1 << 24));
                let mut poly: Vec<f64> = Vec::new();
                for fi in 0..el.count {
                    for (k, p) in el.props.iter().enumerate() {
                        match p.kind {
                            PropKind::Scalar(s) => {
                                r.read(s)?;
                            }
                            PropKind::List { count, item } => {
                                let n = list_len(r.read(count)?)?;
                                if k == idx {
                                    poly.clear();
                                    for _ in 0..n {
                                        poly.push(r.read(item)?);
                                    }
                                } else {
                                    r.skip(item, n)?;
                                }
                            }
                        }
                    }
                    if poly.len() < 3 {
                        return Err(format!("face {fi} has {} vertices (needs at least 3)", poly.len()));
                    }
                    if let Some(&bad) = poly.iter().find(|&&i| i < 0.0 || i >= u32::MAX as f64 || i.fract() != 0.0) {
                        return Err(format!("face {fi} has invalid vertex index {bad}"));
                    }
                    for k in 1..poly.len() - 1 {
                        out.triangles.push([poly[0] as u32, poly[k] as u32, poly[k + 1] as u32]);
                    }
                }
            }
            _ => {
                for _ in 0..el.count {
                    for p in &el.props {
                        match p.kind {
                            PropKind::Scalar(s) => r.skip(s, 1)?,
                            PropKind::List { count, item } => {
                                let n = list_len(r.read(count)?)?;
                                r.skip(item, n)?;
                            }
                        }
                    }
                }
            }
        }
    }
    if !saw_vertex {
        return Err("no vertex element".into());
    }
    Ok(out)
}

fn list_len(v: f64) -> std::result::Result<usize, String> {
    if v < 0.0 || v.fract() != 0.0 || v > 1e9 {
        return Err(format!("bad list length {v}"));
    }
    Ok(v as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collections_dir() -> PathBuf {
        let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let candidates = [
            std::env::var_os("CONGEAL_DATA_DIR").map(|d| PathBuf::from(d).join("collections")),
            Some(manifest.join("shared/data/collections")),
            Some(manifest.join("../shared/data/collections")),
            Some(PathBuf::from("/work/shared/data/collections")),
        ];
        candidates
            .into_iter()
            .flatten()
            .find(|p| p.join("duck/template.obj").is_file())
            .expect("collections not found; set CONGEAL_DATA_DIR to the folder holding collections/")
    }

    fn templates() -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(collections_dir())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("template.obj").is_file())
            .collect();
        v.sort();
        assert!(v.len() >= 5, "expected the 5 shipped collections, found {v:?}");
        v
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn message(e: Error) -> String {
        match e {
            Error::Mesh { path, message } => format!("{}: {message}", path.display()),
            other => panic!("expected Error::Mesh, got {other:?}"),
        }
    }

    #[test]
    fn loads_shipped_templates() {
        for dir in templates() {
            let obj = dir.join("template.obj");
            let mesh = TriangleMesh::load(&obj).unwrap();
            let text = std::fs::read_to_string(&obj).unwrap();
            let expect: usize =
                text.lines().filter(|l| l.starts_with("f ")).map(|l| l.split_whitespace().count() - 3).sum();
            let n_v = text.lines().filter(|l| l.starts_with("v ")).count();
            assert_eq!(mesh.triangles.len(), expect, "{}", obj.display());
            assert_eq!(mesh.positions.len(), n_v);
            let json: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("collection.json")).unwrap()).unwrap();
            let cf = &json["canonical_frame"];
            let (lo, hi) = mesh.bbox().unwrap();
            for a in 0..3 {
                let want_lo = cf["bbox_min"][a].as_f64().unwrap();
                let want_hi = cf["bbox_max"][a].as_f64().unwrap();
                assert!((lo[a] as f64 - want_lo).abs() < 1e-5, "{}: bbox_min {lo:?}", obj.display());
                assert!((hi[a] as f64 - want_hi).abs() < 1e-5, "{}: bbox_max {hi:?}", obj.display());
            }
            let mtl = std::fs::read_to_string(dir.join("template.mtl")).unwrap();
            let n_mat = mtl.lines().filter(|l| l.starts_with("newmtl")).count();
            let n_tex = mtl.lines().filter(|l| l.starts_with("map_Kd")).count();
            assert_eq!(mesh.materials.len(), n_mat);
            assert_eq!(mesh.materials.iter().filter(|m| m.texture.is_some()).count(), n_tex, "{}", obj.display());
            assert!(mesh.triangle_materials.iter().all(|&m| (m as usize) < n_mat));
        }
    }

    #[test]
    fn duck_texture_is_sampled() {
        let mesh = TriangleMesh::load(collections_dir().join("duck/template.obj")).unwrap();
        assert!(mesh.materials[0].texture.is_some());
        assert!(mesh.triangle_uvs.is_some());
        let third = [1.0 / 3.0; 3];
        let colours: Vec<[f32; 3]> = (0..mesh.triangles.len()).map(|t| mesh.color_at(t, third)).collect();
        let non_grey = colours.iter().filter(|c| (c[0] - c[2]).abs() > 0.15).count();
        assert!(non_grey > colours.len() / 2, "{non_grey} of {} coloured", colours.len());
        assert!(colours.iter().flatten().all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn untextured_parts_use_kd() {
        // chair-plaid: mat1 has UVs but no texture, Kd 0.2196 0.2196 0.3098
        let mesh = TriangleMesh::load(collections_dir().join("chair-plaid/template.obj")).unwrap();
        let mi = mesh.materials.iter().position(|m| m.name == "mat1").unwrap();
        assert!(mesh.materials[mi].texture.is_none());
        let t = mesh.triangle_materials.iter().position(|&m| m == mi as u32).unwrap();
        let c = mesh.color_at(t, [0.2, 0.3, 0.5]);
        assert!((c[0] - 0.2196).abs() < 1e-6 && (c[2] - 0.3098).abs() < 1e-6, "{c:?}");
        // sofa-burlap: mat0 faces have no UVs (`f a b c`), mat3 is textured, Kd 0.7882 0.7608 0.6824
        let mesh = TriangleMesh::load(collections_dir().join("sofa-burlap/template.obj")).unwrap();
        let t = mesh.triangle_materials.iter().position(|&m| m == 0).unwrap();
        assert_eq!(mesh.triangle_uvs.as_ref().unwrap()[t], [NO_INDEX; 3]);
        let c = mesh.color_at(t, [0.2, 0.3, 0.5]);
        assert!((c[0] - 0.7882).abs() < 1e-6 && (c[2] - 0.6824).abs() < 1e-6, "{c:?}");
        let t = mesh.triangle_materials.iter().position(|&m| m == 3).unwrap();
        assert!(mesh.triangle_uvs.as_ref().unwrap()[t].iter().all(|&i| i != NO_INDEX));
    }

    #[test]
    fn obj_polygons_negative_indices_and_missing_texture() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "m.mtl",
            "newmtl red\nKd 1 0 0\nmap_Kd -s 1 1 1 missing_texture.png\n\nnewmtl green\nKd 0 1 0\n",
        );
        let obj = write(
            dir.path(),
            "shape.OBJ",
            "# test\nmtllib m.mtl\no quad\nv 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nvt 0 0\nvt 1 0\nvt 1 1\nvt 0 1\n\
             vn 0 0 1\nusemtl red\nf 1/1/1 2/2/1 3/3/1 4/4/1\n\
             v 0 0 1\nv 1 0 1\nv 1 1 1\nv 0.5 1.5 1\nv 0 1 1\nusemtl green\nf -5//1 -4//1 -3//1 -2//1 -1//1\n\
             g tri\nusemtl nosuch\nf 1 2 -1 # comment\n",
        );
        let m = TriangleMesh::load(&obj).unwrap();
        assert_eq!(m.positions.len(), 9);
        assert_eq!(m.triangles.len(), 2 + 3 + 1);
        assert_eq!(m.triangles[0], [0, 1, 2]);
        assert_eq!(m.triangles[1], [0, 2, 3]);
        assert_eq!(m.triangles[2], [4, 5, 6]);
        assert_eq!(m.triangles[4], [4, 7, 8]);
        assert_eq!(m.triangles[5], [0, 1, 8]);
        assert_eq!(m.triangle_uvs.as_ref().unwrap()[1], [0, 2, 3]);
        assert_eq!(m.triangle_uvs.as_ref().unwrap()[2], [NO_INDEX; 3]);
        // missing texture: warned about, the material keeps Kd
        assert_eq!(m.materials.len(), 3);
        assert!(m.materials[0].texture.is_none());
        assert_eq!(m.color_at(0, [0.3, 0.3, 0.4]), [1.0, 0.0, 0.0]);
        assert_eq!(m.color_at(3, [0.3, 0.3, 0.4]), [0.0, 1.0, 0.0]);
        // unknown material: grey
        assert_eq!(m.materials[m.triangle_materials[5] as usize].name, "nosuch");
        assert_eq!(m.color_at(5, [0.3, 0.3, 0.4]), DEFAULT_GREY);
        assert_eq!(m.bbox().unwrap(), ([0.0, 0.0, 0.0], [1.0, 1.5, 1.0]));
    }

    #[test]
    fn texture_sampling_flips_v_and_wraps() {
        let dir = tempfile::tempdir().unwrap();
        // 2x2 texture: top row red, green; bottom row blue, white
        let mut img = RgbImage::new(2, 2);
        img.put_pixel(0, 0, image::Rgb([255, 0, 0]));
        img.put_pixel(1, 0, image::Rgb([0, 255, 0]));
        img.put_pixel(0, 1, image::Rgb([0, 0, 255]));
        img.put_pixel(1, 1, image::Rgb([255, 255, 255]));
        img.save(dir.path().join("t.png")).unwrap();
        write(dir.path(), "m.mtl", "newmtl tex\nmap_Kd t.png\n");
        let obj = write(
            dir.path(),
            "t.obj",
            "mtllib m.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0.25 0.75\nvt 0.75 0.25\nvt 1.25 -0.25\nusemtl tex\nf 1/1 2/2 3/3\n",
        );
        let m = TriangleMesh::load(&obj).unwrap();
        assert!(m.materials[0].texture.is_some());
        assert_eq!(m.materials[0].diffuse, [1.0; 3]); // no Kd with a texture: unscaled
        // uv (0.25, 0.75): upper-left pixel centre = red
        assert_eq!(m.color_at(0, [1.0, 0.0, 0.0]), [1.0, 0.0, 0.0]);
        // uv (0.75, 0.25): lower-right = white
        assert_eq!(m.color_at(0, [0.0, 1.0, 0.0]), [1.0, 1.0, 1.0]);
        // uv (1.25, -0.25) wraps to (0.25, 0.75) = red
        let c = m.color_at(0, [0.0, 0.0, 1.0]);
        assert!((c[0] - 1.0).abs() < 1e-5 && c[1].abs() < 1e-5 && c[2].abs() < 1e-5, "{c:?}");
        // uv (0.5, 0.75): halfway between red and green
        let c = sample_texture(m.materials[0].texture.as_ref().unwrap(), [0.5, 0.75]).unwrap();
        assert!((c[0] - 0.5).abs() < 1e-5 && (c[1] - 0.5).abs() < 1e-5 && c[2].abs() < 1e-5, "{c:?}");
        // at u = 0 the bilinear weights wrap: half red (u=0.25) and half green (u=-0.25 -> 0.75)
        let c = sample_texture(m.materials[0].texture.as_ref().unwrap(), [0.0, 0.75]).unwrap();
        assert!((c[0] - 0.5).abs() < 1e-5 && (c[1] - 0.5).abs() < 1e-5, "{c:?}");
    }

    #[test]
    fn loads_shipped_binary_ply() {
        let dir = collections_dir().join("chairs-mixed/instances");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).collect();
        files.sort();
        assert!(!files.is_empty());
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(collections_dir().join("chairs-mixed/collection.json")).unwrap(),
        )
        .unwrap();
        for f in files.iter().filter(|f| f.extension().is_some_and(|e| e == "ply")) {
            let m = TriangleMesh::load(f).unwrap();
            let bytes = std::fs::read(f).unwrap();
            let head = String::from_utf8_lossy(&bytes[..bytes.windows(10).position(|w| w == b"end_header").unwrap()]);
            let count = |el: &str| -> usize {
                head.lines().find_map(|l| l.strip_prefix(&format!("element {el} "))).unwrap().trim().parse().unwrap()
            };
            assert_eq!(m.positions.len(), count("vertex"));
            assert_eq!(m.triangles.len(), count("face"));
            assert!(m.vertex_colors.is_none());
            // bbox agrees with the instance record
            let id = f.file_stem().unwrap().to_str().unwrap();
            let inst = json["instances"].as_array().unwrap().iter().find(|i| i["id"] == id).unwrap();
            let (lo, hi) = m.bbox().unwrap();
            for a in 0..3 {
                assert!((lo[a] as f64 - inst["bbox_min"][a].as_f64().unwrap()).abs() < 1e-4, "{id} {lo:?}");
                assert!((hi[a] as f64 - inst["bbox_max"][a].as_f64().unwrap()).abs() < 1e-4, "{id} {hi:?}");
            }
        }
    }

    #[test]
    fn ply_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let positions = vec![[0.0, 0.0, 0.0], [1.5, -2.0, 3.25], [0.1, 0.2, 0.3], [-7.0, 1e-3, 4e5]];
        let triangles = vec![[0, 1, 2], [0, 2, 3], [3, 1, 0]];
        let mut m = TriangleMesh::from_triangles(positions.clone(), triangles.clone());
        m.vertex_colors = Some(vec![
            [0.0, 1.0, 128.0 / 255.0],
            [1.0 / 255.0, 0.5 + 0.5 / 255.0, 1.0],
            [0.2, 0.4, 0.6],
            [1.0, 1.0, 1.0],
        ]);
        let p = dir.path().join("out.ply");
        m.write_ply(&p).unwrap();
        let r = TriangleMesh::load_ply(&p).unwrap();
        assert_eq!(r.positions, positions);
        assert_eq!(r.triangles, triangles);
        assert_eq!(r.vertex_colors, m.vertex_colors);
        // without colours
        let bare = TriangleMesh::from_triangles(positions.clone(), triangles.clone());
        bare.write_ply(&p).unwrap();
        let r = TriangleMesh::load(&p).unwrap();
        assert_eq!((r.positions, r.triangles, r.vertex_colors), (positions, triangles, None));
    }

    #[test]
    fn ascii_ply_from_string() {
        let text = "ply\r\nformat ascii 1.0\ncomment hello\nelement vertex 5\nproperty float x\nproperty float y\n\
                    property float z\nproperty float nx\nproperty uchar red\nproperty uchar green\nproperty uchar blue\n\
                    element face 2\nproperty list uchar uint vertex_indices\nproperty int flags\n\
                    element edge 1\nproperty int vertex1\nproperty list uchar float extra\nend_header\n\
                    0 0 0 9 255 0 0\n1 0 0 9 0 255 0\n1 1 0 9 0 0 255\n0 1 0 9 0 0 0\n0.5 0.5 1 9 51 102 153\n\
                    4 0 1 2 3 7\n3 0 1 4 8\n0 2 1.0 2.0\n";
        let m = TriangleMesh::parse_ply(text.as_bytes(), Path::new("inline.ply")).unwrap();
        assert_eq!(m.positions.len(), 5);
        assert_eq!(m.triangles, vec![[0, 1, 2], [0, 2, 3], [0, 1, 4]]);
        let c = m.vertex_colors.as_ref().unwrap();
        assert_eq!(c[1], [0.0, 1.0, 0.0]);
        assert!((c[4][0] - 0.2).abs() < 1e-6 && (c[4][2] - 0.6).abs() < 1e-6);
        assert_eq!(m.color_at(0, [1.0, 0.0, 0.0]), [1.0, 0.0, 0.0]);
        // float colours, big endian binary
        let mut b = b"ply\nformat binary_big_endian 1.0\nelement vertex 3\nproperty double x\nproperty double y\n\
                      property double z\nproperty float red\nproperty float green\nproperty float blue\n\
                      element face 1\nproperty list uchar int vertex_indices\nend_header\n"
            .to_vec();
        for v in 0..3 {
            for c in [v as f64, 1.0, 2.0] {
                b.extend_from_slice(&c.to_be_bytes());
            }
            for c in [0.25f32, 0.5, 0.75] {
                b.extend_from_slice(&c.to_be_bytes());
            }
        }
        b.push(3);
        for i in [2i32, 1, 0] {
            b.extend_from_slice(&i.to_be_bytes());
        }
        let m = TriangleMesh::parse_ply(&b, Path::new("be.ply")).unwrap();
        assert_eq!(m.positions[2], [2.0, 1.0, 2.0]);
        assert_eq!(m.triangles, vec![[2, 1, 0]]);
        assert_eq!(m.vertex_colors.unwrap()[1], [0.25, 0.5, 0.75]);
    }

    #[test]
    fn errors_name_the_file_and_problem() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // empty files
        let e = message(TriangleMesh::load(write(d, "empty.obj", "")).unwrap_err());
        assert!(e.contains("empty.obj") && e.contains("empty"), "{e}");
        let e = message(TriangleMesh::load(write(d, "empty.ply", "")).unwrap_err());
        assert!(e.contains("empty.ply") && e.contains("empty"), "{e}");
        let e = message(TriangleMesh::load(write(d, "verts.obj", "v 0 0 0\nv 1 0 0\n")).unwrap_err());
        assert!(e.contains("no triangles"), "{e}");
        // face index out of range
        let e = message(TriangleMesh::load(write(d, "range.obj", "v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 4\n")).unwrap_err());
        assert!(e.contains("range.obj") && e.contains("line 4") && e.contains("vertex 4"), "{e}");
        let e = message(TriangleMesh::load(write(d, "neg.obj", "v 0 0 0\nv 1 0 0\nf 1 2 -3\n")).unwrap_err());
        assert!(e.contains("line 3"), "{e}");
        let e = message(TriangleMesh::load(write(d, "zero.obj", "v 0 0 0\nv 1 0 0\nv 0 1 0\nf 0 1 2\n")).unwrap_err());
        assert!(e.contains("start at 1"), "{e}");
        let ply = "ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\n\
                   element face 1\nproperty list uchar int vertex_indices\nend_header\n0 0 0\n1 0 0\n0 1 0\n3 0 1 3\n";
        let e = message(TriangleMesh::load(write(d, "range.ply", ply)).unwrap_err());
        assert!(e.contains("range.ply") && e.contains("vertex 3"), "{e}");
        // NaN vertex
        let e = message(TriangleMesh::load(write(d, "nan.obj", "v 0 0 0\nv nan 0 0\nv 0 1 0\nf 1 2 3\n")).unwrap_err());
        assert!(e.contains("nan.obj") && e.contains("NaN") && e.contains("line 2"), "{e}");
        let e = message(TriangleMesh::load(write(d, "nan.ply", &ply.replace("1 0 0\n", "NaN 0 0\n"))).unwrap_err());
        assert!(e.contains("nan.ply") && e.contains("NaN"), "{e}");
        // truncated binary
        let mut m = TriangleMesh::from_triangles(vec![[0.0; 3], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], vec![[0, 1, 2]]);
        m.vertex_colors = None;
        let p = d.join("trunc.ply");
        m.write_ply(&p).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
        let e = message(TriangleMesh::load(&p).unwrap_err());
        assert!(e.contains("truncated"), "{e}");
        // not a PLY / unknown extension / missing file
        let e = message(TriangleMesh::load(write(d, "bad.ply", "hello\n")).unwrap_err());
        assert!(e.contains("not a PLY"), "{e}");
        let e = message(TriangleMesh::load(write(d, "mesh.stl", "solid x\n")).unwrap_err());
        assert!(e.contains("mesh.stl") && e.contains("'.stl'"), "{e}");
        let e = message(TriangleMesh::load(d.join("noext")).unwrap_err());
        assert!(e.contains("no extension"), "{e}");
        assert!(matches!(TriangleMesh::load(d.join("missing.obj")), Err(Error::Io { .. })));
        // empty mesh has no bbox
        assert!(matches!(TriangleMesh::default().bbox(), Err(Error::InvalidInput(_))));
    }

    #[test]
    fn measures() {
        // unit right tetrahedron, outward winding
        let m = TriangleMesh::from_triangles(
            vec![[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
            vec![[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]],
        );
        assert!((m.signed_volume() - 1.0 / 6.0).abs() < 1e-9);
        assert!((m.triangle_area(0) - 0.5).abs() < 1e-6);
        assert!((m.surface_area() - (1.5 + 3f64.sqrt() / 2.0)).abs() < 1e-5);
        assert_eq!(m.color_at(0, [1.0, 0.0, 0.0]), DEFAULT_GREY);
        assert_eq!(m.color_at(99, [1.0, 0.0, 0.0]), DEFAULT_GREY);
    }
}
