//! MTL material libraries: `newmtl`, `Kd`, `map_Kd`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use image::RgbImage;

use super::obj::{parse_floats, statements};
use super::{mesh_err, Material, DEFAULT_GREY};
use crate::error::{Error, Result};

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
pub(super) fn load_mtl(path: &Path) -> Result<Vec<Material>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8_lossy(&bytes);
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    // (material, has Kd, texture file)
    let mut out: Vec<(Material, bool, Option<PathBuf>)> = Vec::new();
    for (ln, kw, rest) in statements(&text) {
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
                    let v = parse_floats(rest).map_err(|t| mesh_err(path, format!("line {ln}: bad Kd value '{t}'")))?;
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
