//! Triangle meshes with their colour sources: Wavefront OBJ (+ MTL, `Kd` and `map_Kd` textures) and PLY
//! (ascii, binary little/big endian) loading, binary PLY writing, and colour lookup at a surface point.
//!
//! - this module: [`TriangleMesh`], [`Material`], the geometry (bbox, areas, volume) and colour lookup;
//! - `obj`: OBJ parsing and the statement tokeniser shared with `mtl`;
//! - `mtl`: MTL material libraries;
//! - `ply`: PLY reading and writing.
//!
//! Colour conventions: every colour is RGB in `[0, 1]`, in the files' own (sRGB) encoding. A textured
//! material's colour is `Kd * texture(uv)`, as the collection renderer (trimesh -> pyrender, where `Kd`
//! becomes `baseColorFactor`) drew it.

use std::path::Path;

use image::RgbImage;

use crate::error::{Error, Result};

/// Marks a missing index in [`TriangleMesh::triangle_uvs`] and [`TriangleMesh::triangle_materials`].
pub const NO_INDEX: u32 = u32::MAX;

/// Colour returned where a mesh has no colour source at all (mid grey).
pub const DEFAULT_GREY: [f32; 3] = [0.5, 0.5, 0.5];

/// What the loaders say of a vertex whose position is not a finite f32 (NaN, infinite, or a finite
/// number too large for f32, the positions' type).
const NON_FINITE_VERTEX: &str = "has a coordinate that is NaN, infinite or too large for f32";

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

    /// Checks the mesh's invariants: at least one triangle, finite positions, every index in range,
    /// per-triangle and per-vertex arrays of the right length. `origin` names the mesh in errors.
    pub fn validate(&self, origin: &Path) -> Result<()> {
        if self.triangles.is_empty() {
            return Err(mesh_err(origin, format!("mesh is empty ({} vertices, no triangles)", self.positions.len())));
        }
        if let Some(i) = self.positions.iter().position(|p| p.iter().any(|c| !c.is_finite())) {
            return Err(mesh_err(origin, format!("vertex {i} {NON_FINITE_VERTEX}")));
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

mod mtl;
mod obj;
mod ply;

#[cfg(test)]
mod tests;
