//! PLY: reading (ascii, binary little/big endian) and binary little-endian writing.

use std::io::Write;
use std::path::Path;

use super::{mesh_err, TriangleMesh};
use crate::error::{Error, Result};

impl TriangleMesh {
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
}

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
                        return Err(format!("vertex {vi} {}", super::NON_FINITE_VERTEX));
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
