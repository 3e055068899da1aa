//! Iso-surface extraction from a scalar field on a [`VoxelGrid`]-style lattice (marching cubes).
//!
//! The field is sampled at voxel centres (`index = (z * ny + y) * nx + x`, centre
//! `bbox_min + (i + 0.5) * (bbox_max - bbox_min) / dims`). Convention: values above `iso` are *inside*
//! (occupancy-like; pass a negated signed distance). Triangles wind counter-clockwise seen from outside, so
//! their normals point towards lower values and a closed surface has a positive signed volume.
//!
//! Method: marching cubes without a precomputed 256-case table. For each cell whose corners straddle
//! `iso`, the contour is traced on the cell's six faces: each face contributes segments between its edge
//! crossings, oriented so the inside lies on their right seen from outside the cell; faces with four
//! crossings are resolved with the asymptotic decider (the bilinear saddle), a decision that depends
//! only on the face's four values, so the two cells sharing a face always agree. The segments chain into
//! closed loops that are triangulated (a fan, or a fan around the loop's centroid when a fan diagonal
//! would lie on a cell face). Vertices lie on lattice edges (linear interpolation) and are shared by all
//! cells around the edge. The lattice is padded with one virtual layer of outside values, so the surface
//! is closed even where the inside touches the grid boundary (it is capped on the outermost centres).
//! The result is a closed, consistently oriented 2-manifold (barring degenerate triangles where values
//! equal `iso` exactly).

use std::collections::HashMap;

use crate::field::mesh::TriangleMesh;
use crate::field::voxel::VoxelGrid;

/// Cell topology: corner offsets, edges, faces.
struct Topology {
    /// Edge `e` joins corners `edges[e].0` and `edges[e].1`, which differ along axis `edges[e].2`;
    /// `.0` is the lower corner.
    edges: [(usize, usize, usize); 12],
    /// `edge_of[a][b]`: the edge joining corners `a` and `b`.
    edge_of: [[usize; 8]; 8],
    /// Corners of each face, counter-clockwise seen from outside the cell.
    faces: [[usize; 4]; 6],
    /// Bit set of the faces each edge lies on.
    edge_faces: [u8; 12],
}

fn corner_offset(k: usize) -> [usize; 3] {
    [k & 1, (k >> 1) & 1, (k >> 2) & 1]
}

fn topology() -> Topology {
    let mut edges = [(0, 0, 0); 12];
    let mut edge_of = [[usize::MAX; 8]; 8];
    let mut e = 0;
    for axis in 0..3 {
        for c in (0..8usize).filter(|c| c & (1 << axis) == 0) {
            let d = c | (1 << axis);
            edges[e] = (c, d, axis);
            edge_of[c][d] = e;
            edge_of[d][c] = e;
            e += 1;
        }
    }
    let mut faces = [[0usize; 4]; 6];
    let mut edge_faces = [0u8; 12];
    for axis in 0..3 {
        let (b, c) = ((axis + 1) % 3, (axis + 2) % 3);
        for side in 0..2 {
            // (b, c) offsets, counter-clockwise seen along +axis; reversed for the -axis face
            let mut order = [(0, 0), (1, 0), (1, 1), (0, 1)];
            if side == 0 {
                order = [(0, 0), (0, 1), (1, 1), (1, 0)];
            }
            let f = axis * 2 + side;
            for (k, &(ob, oc)) in order.iter().enumerate() {
                faces[f][k] = (side << axis) | (ob << b) | (oc << c);
            }
            for k in 0..4 {
                let ed = edge_of[faces[f][k]][faces[f][(k + 1) % 4]];
                edge_faces[ed] |= 1 << f;
            }
        }
    }
    Topology { edges, edge_of, faces, edge_faces }
}

/// Extracts the `iso` level set of `values` (sampled at the voxel centres of a grid with `dims` voxels
/// spanning `bbox_min..bbox_max`) as a closed triangle mesh with normals pointing towards lower values.
/// Values that are NaN count as outside. Returns a mesh without triangles when nothing crosses `iso`.
///
/// # Panics
/// If `values.len()` differs from `dims[0] * dims[1] * dims[2]`.
///
/// # Examples
///
/// ```
/// use congeal::field::marching_cubes::marching_cubes;
///
/// // A ball of radius 0.5: value 1 inside, 0 outside, on a 16^3 grid over [-1, 1]^3.
/// let n = 16;
/// let centre = |i: usize| -1.0 + (i as f32 + 0.5) * 2.0 / n as f32;
/// let mut values = Vec::with_capacity(n * n * n);
/// for z in 0..n {
///     for y in 0..n {
///         for x in 0..n {
///             let r = (centre(x).powi(2) + centre(y).powi(2) + centre(z).powi(2)).sqrt();
///             values.push(if r < 0.5 { 1.0 } else { 0.0 });
///         }
///     }
/// }
/// let mesh = marching_cubes(&values, [n, n, n], [-1.0; 3], [1.0; 3], 0.5);
/// assert!(mesh.num_triangles() > 0);
/// let (lo, hi) = mesh.bbox()?;
/// assert!(lo.iter().all(|v| (-0.7..-0.4).contains(v)) && hi.iter().all(|v| (0.4..0.7).contains(v)));
/// # Ok::<(), congeal::Error>(())
/// ```
pub fn marching_cubes(values: &[f32], dims: [usize; 3], bbox_min: [f32; 3], bbox_max: [f32; 3], iso: f32) -> TriangleMesh {
    let [nx, ny, nz] = dims;
    assert_eq!(values.len(), nx * ny * nz, "marching_cubes: {} values for dims {dims:?}", values.len());
    let topo = topology();
    let size = [0, 1, 2].map(|a| (bbox_max[a] - bbox_min[a]) / dims[a].max(1) as f32);
    let (inx, iny, inz) = (nx as i64, ny as i64, nz as i64);
    let value = |p: [i64; 3]| -> Option<f32> {
        if p[0] < 0 || p[1] < 0 || p[2] < 0 || p[0] >= inx || p[1] >= iny || p[2] >= inz {
            None
        } else {
            Some(values[((p[2] * iny + p[1]) * inx + p[0]) as usize])
        }
    };
    let is_inside = |v: Option<f32>| matches!(v, Some(v) if v > iso);
    let centre = |p: [i64; 3]| [0, 1, 2].map(|a| bbox_min[a] + (p[a] as f32 + 0.5) * size[a]);

    let mut positions: Vec<[f32; 3]> = Vec::new();
    let mut triangles: Vec<[u32; 3]> = Vec::new();
    let mut edge_vertex: HashMap<u64, u32> = HashMap::new();

    let mut vertex_on = |p: [i64; 3], axis: usize, positions: &mut Vec<[f32; 3]>| -> u32 {
        let key = (((p[2] + 1) as u64) << 42) | (((p[1] + 1) as u64) << 22) | (((p[0] + 1) as u64) << 2) | axis as u64;
        *edge_vertex.entry(key).or_insert_with(|| {
            let mut q = p;
            q[axis] += 1;
            let pos = match (value(p), value(q)) {
                (Some(a), Some(b)) => {
                    let t = (iso - a) / (b - a);
                    let t = if t.is_finite() { t.clamp(0.0, 1.0) } else { 0.5 };
                    let (ca, cb) = (centre(p), centre(q));
                    [0, 1, 2].map(|i| ca[i] + t * (cb[i] - ca[i]))
                }
                (Some(_), None) => centre(p),
                (None, Some(_)) => centre(q),
                (None, None) => unreachable!("a crossed edge has a real inside end"),
            };
            positions.push(pos);
            (positions.len() - 1) as u32
        })
    };

    let mut loop_ids: Vec<usize> = Vec::with_capacity(12);
    for cz in -1..inz {
        for cy in -1..iny {
            for cx in -1..inx {
                let base = [cx, cy, cz];
                let mut vals = [None; 8];
                let mut inside = [false; 8];
                let mut count = 0;
                for k in 0..8 {
                    let o = corner_offset(k);
                    vals[k] = value([cx + o[0] as i64, cy + o[1] as i64, cz + o[2] as i64]);
                    inside[k] = is_inside(vals[k]);
                    count += inside[k] as usize;
                }
                if count == 0 || count == 8 {
                    continue;
                }
                // next[e] = edge where the contour segment starting at edge e's crossing ends
                let mut next = [usize::MAX; 12];
                for face in &topo.faces {
                    let mut enter = [usize::MAX; 4];
                    let mut exit = [usize::MAX; 4];
                    let mut n_cross = 0;
                    for k in 0..4 {
                        let (a, b) = (face[k], face[(k + 1) % 4]);
                        if !inside[a] && inside[b] {
                            enter[k] = topo.edge_of[a][b];
                            n_cross += 1;
                        } else if inside[a] && !inside[b] {
                            exit[k] = topo.edge_of[a][b];
                            n_cross += 1;
                        }
                    }
                    if n_cross == 2 {
                        let e_in = enter.iter().copied().find(|&e| e != usize::MAX).unwrap();
                        let e_out = exit.iter().copied().find(|&e| e != usize::MAX).unwrap();
                        next[e_in] = e_out;
                    } else if n_cross == 4 {
                        // alternating corners: asymptotic decider on the face
                        let ins: Vec<usize> = face.iter().copied().filter(|&c| inside[c]).collect();
                        let outs: Vec<usize> = face.iter().copied().filter(|&c| !inside[c]).collect();
                        let connected = match (vals[outs[0]], vals[outs[1]]) {
                            (Some(o0), Some(o1)) => {
                                let i0 = vals[ins[0]].unwrap() as f64 - iso as f64;
                                let i1 = vals[ins[1]].unwrap() as f64 - iso as f64;
                                let (o0, o1) = (o0 as f64 - iso as f64, o1 as f64 - iso as f64);
                                i0 * i1 > o0 * o1
                            }
                            _ => false,
                        };
                        for k in 0..4 {
                            if enter[k] != usize::MAX {
                                let j = if connected { (k + 3) % 4 } else { (k + 1) % 4 };
                                next[enter[k]] = exit[j];
                            }
                        }
                    }
                }
                // chain segments into loops and triangulate
                let mut visited = [false; 12];
                for start in 0..12 {
                    if next[start] == usize::MAX || visited[start] {
                        continue;
                    }
                    loop_ids.clear();
                    let mut e = start;
                    while !visited[e] {
                        visited[e] = true;
                        loop_ids.push(e);
                        e = next[e];
                        debug_assert!(e != usize::MAX, "open contour in a cell");
                        if e == usize::MAX {
                            break;
                        }
                    }
                    if loop_ids.len() < 3 {
                        continue;
                    }
                    let vid: Vec<u32> = loop_ids
                        .iter()
                        .map(|&e| {
                            let (c0, _, axis) = topo.edges[e];
                            let o = corner_offset(c0);
                            vertex_on([base[0] + o[0] as i64, base[1] + o[1] as i64, base[2] + o[2] as i64], axis, &mut positions)
                        })
                        .collect();
                    let m = vid.len();
                    if m == 3 {
                        triangles.push([vid[0], vid[1], vid[2]]);
                        continue;
                    }
                    // a fan apex whose diagonals do not lie on a cell face (those could be shared by the
                    // neighbouring cell too)
                    let apex = (0..m).find(|&s| {
                        (2..m - 1).all(|d| topo.edge_faces[loop_ids[s]] & topo.edge_faces[loop_ids[(s + d) % m]] == 0)
                    });
                    match apex {
                        Some(s) => {
                            for d in 1..m - 1 {
                                triangles.push([vid[s], vid[(s + d) % m], vid[(s + d + 1) % m]]);
                            }
                        }
                        None => {
                            let mut c = [0.0f32; 3];
                            for &v in &vid {
                                for a in 0..3 {
                                    c[a] += positions[v as usize][a] / m as f32;
                                }
                            }
                            positions.push(c);
                            let ci = (positions.len() - 1) as u32;
                            for k in 0..m {
                                triangles.push([ci, vid[k], vid[(k + 1) % m]]);
                            }
                        }
                    }
                }
            }
        }
    }
    TriangleMesh::from_triangles(positions, triangles)
}

/// Sets `mesh.vertex_colors` by trilinear sampling of the grid's colours at each vertex.
pub fn colorize(mesh: &mut TriangleMesh, grid: &VoxelGrid) {
    mesh.vertex_colors = Some(mesh.positions.iter().map(|&p| grid.trilinear_color(p)).collect());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(dims: [usize; 3], lo: [f32; 3], hi: [f32; 3], f: impl Fn([f32; 3]) -> f32) -> Vec<f32> {
        let mut g = VoxelGrid::new(dims, lo, hi).unwrap();
        for z in 0..dims[2] {
            for y in 0..dims[1] {
                for x in 0..dims[0] {
                    let i = g.index(x, y, z);
                    g.occupancy[i] = f(g.centre(x, y, z));
                }
            }
        }
        g.occupancy
    }

    /// Every directed edge appears once and its reverse once: closed, manifold, consistently wound.
    fn assert_closed_oriented(m: &TriangleMesh) {
        let mut edges: HashMap<(u32, u32), u32> = HashMap::new();
        for t in &m.triangles {
            for k in 0..3 {
                *edges.entry((t[k], t[(k + 1) % 3])).or_default() += 1;
            }
        }
        for (&(a, b), &c) in &edges {
            assert_eq!(c, 1, "directed edge {a}->{b} used {c} times");
            assert_eq!(edges.get(&(b, a)), Some(&1), "edge {a}-{b} has no opposite half (open or flipped)");
        }
    }

    #[test]
    fn topology_is_consistent() {
        let t = topology();
        for e in &t.edges {
            assert_eq!(e.0 ^ e.1, 1 << e.2);
        }
        for (f, face) in t.faces.iter().enumerate() {
            // counter-clockwise seen from outside: (c1 - c0) x (c3 - c0) = outward normal
            let p = face.map(|c| corner_offset(c).map(|v| v as i32));
            let u = [0, 1, 2].map(|i| p[1][i] - p[0][i]);
            let v = [0, 1, 2].map(|i| p[3][i] - p[0][i]);
            let n = [u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0]];
            let mut want = [0; 3];
            want[f / 2] = if f % 2 == 1 { 1 } else { -1 };
            assert_eq!(n, want, "face {f}");
        }
        assert!(t.edge_faces.iter().all(|m| m.count_ones() == 2));
    }

    #[test]
    fn sphere_sdf() {
        let r = 0.7f32;
        let dims = [40, 40, 40];
        let (lo, hi) = ([-1.0; 3], [1.0; 3]);
        let vals = field(dims, lo, hi, |p| r - (p[0] * p[0] + p[1] * p[1] + p[2] * p[2]).sqrt());
        let m = marching_cubes(&vals, dims, lo, hi, 0.0);
        let voxel = 2.0 / 40.0;
        assert!(m.triangles.len() > 1000);
        for p in &m.positions {
            let d = (p[0] * p[0] + p[1] * p[1] + p[2] * p[2]).sqrt();
            assert!((d - r).abs() < 0.5 * voxel, "vertex at radius {d}");
        }
        assert_closed_oriented(&m);
        let exact = 4.0 / 3.0 * std::f64::consts::PI * (r as f64).powi(3);
        let v = m.signed_volume();
        assert!(v > 0.0, "negative volume {v}: winding is inverted");
        assert!((v - exact).abs() < 0.05 * exact, "volume {v} vs {exact}");
        // vertices are shared: Euler characteristic of a sphere
        let mut und = std::collections::HashSet::new();
        for t in &m.triangles {
            for k in 0..3 {
                let (a, b) = (t[k], t[(k + 1) % 3]);
                und.insert((a.min(b), a.max(b)));
            }
        }
        let chi = m.positions.len() as i64 - und.len() as i64 + m.triangles.len() as i64;
        assert_eq!(chi, 2);
    }

    #[test]
    fn inside_touching_the_border_is_capped() {
        let dims = [3, 4, 5];
        let vals = vec![1.0f32; 60];
        let m = marching_cubes(&vals, dims, [0.0; 3], [3.0, 4.0, 5.0], 0.5);
        assert_closed_oriented(&m);
        // the surface runs through the outermost centres: a (2 x 3 x 4) box
        assert!((m.signed_volume() - 24.0).abs() < 1e-4, "volume {}", m.signed_volume());
        let empty = marching_cubes(&vec![0.0f32; 60], dims, [0.0; 3], [3.0, 4.0, 5.0], 0.5);
        assert!(empty.triangles.is_empty());
    }

    #[test]
    fn random_fields_give_closed_oriented_surfaces() {
        // a tiny LCG: deterministic noise with many ambiguous faces and cells
        let mut s: u64 = 12345;
        for trial in 0..20 {
            let dims = [6 + trial % 3, 5, 7];
            let n = dims[0] * dims[1] * dims[2];
            let vals: Vec<f32> = (0..n)
                .map(|_| {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((s >> 33) as f32) / (1u64 << 31) as f32
                })
                .collect();
            let m = marching_cubes(&vals, dims, [0.0; 3], [1.0; 3], 0.5);
            assert!(!m.triangles.is_empty());
            assert_closed_oriented(&m);
            assert!(m.signed_volume() > 0.0);
        }
    }

    #[test]
    fn two_blobs_and_a_shell() {
        // inside = a spherical shell: two surfaces, the inner one wound inwards; volume = difference
        let dims = [48, 48, 48];
        let (lo, hi) = ([-1.2; 3], [1.2; 3]);
        let vals = field(dims, lo, hi, |p| {
            let d = (p[0] * p[0] + p[1] * p[1] + p[2] * p[2]).sqrt();
            (1.0 - d).min(d - 0.5)
        });
        let m = marching_cubes(&vals, dims, lo, hi, 0.0);
        assert_closed_oriented(&m);
        let exact = 4.0 / 3.0 * std::f64::consts::PI * (1.0 - 0.125);
        assert!((m.signed_volume() - exact).abs() < 0.05 * exact);
    }

    #[test]
    fn colorize_samples_grid_colours() {
        let mut g = VoxelGrid::new([8, 8, 8], [-1.0; 3], [1.0; 3]).unwrap();
        for z in 0..8 {
            for y in 0..8 {
                for x in 0..8 {
                    let i = g.index(x, y, z);
                    let c = g.centre(x, y, z);
                    g.occupancy[i] = if c.iter().map(|v| v * v).sum::<f32>() < 0.5 { 1.0 } else { 0.0 };
                    g.colors[i] = [(c[0] + 1.0) / 2.0, 0.25, 0.75];
                }
            }
        }
        let mut m = marching_cubes(&g.occupancy, g.dims, g.bbox_min, g.bbox_max, 0.5);
        colorize(&mut m, &g);
        let cols = m.vertex_colors.as_ref().unwrap();
        assert_eq!(cols.len(), m.positions.len());
        for (p, c) in m.positions.iter().zip(cols) {
            // colours vary linearly in x, so trilinear sampling reproduces them exactly
            assert!((c[0] - (p[0] + 1.0) / 2.0).abs() < 1e-4 && (c[1] - 0.25).abs() < 1e-5 && (c[2] - 0.75).abs() < 1e-5);
        }
    }
}
