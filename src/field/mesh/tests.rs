//! Mesh loading, writing and geometry tests.

use std::path::{Path, PathBuf};

use super::*;
use crate::error::Error;

use crate::test_util::collections_dir;

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
        let expect: usize = text.lines().filter(|l| l.starts_with("f ")).map(|l| l.split_whitespace().count() - 3).sum();
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
    write(dir.path(), "m.mtl", "newmtl red\nKd 1 0 0\nmap_Kd -s 1 1 1 missing_texture.png\n\nnewmtl green\nKd 0 1 0\n");
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
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(collections_dir().join("chairs-mixed/collection.json")).unwrap()).unwrap();
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
    m.vertex_colors =
        Some(vec![[0.0, 1.0, 128.0 / 255.0], [1.0 / 255.0, 0.5 + 0.5 / 255.0, 1.0], [0.2, 0.4, 0.6], [1.0, 1.0, 1.0]]);
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
    // A finite f64 beyond f32 (the positions' type) is named as such, not called infinite.
    let e = message(TriangleMesh::load(write(d, "huge.obj", "v 0 0 0\nv 1e308 0 0\nv 0 1 0\nf 1 2 3\n")).unwrap_err());
    assert!(e.contains("huge.obj") && e.contains("too large for f32") && e.contains("line 2"), "{e}");
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
