//! The coordinate-map warp (paper Eq. 10, 14-16).
//!
//! For each image `x` with estimated pose, [`optimise_warps`] finds the 2D warp `u -> ũ` from the
//! image to the rendering `x̃ = R(π(x), θ)` that minimises
//! `d_ζ^{ũ,u}(x̃, x) + λ_l2 ||ũ - u||² + λ_smooth L_smooth` (Eq. 10) with AdamW, all images at once.
//!
//! Coordinates: `u` and `ũ` live in the unit square of the image's square feature crop (`[0, 1]²`,
//! so `||ũ - u||` is normalised as the paper asks). The warp is a `grid x grid` field of
//! displacements `ũ - u` at node centres `((j + 0.5) / grid, (i + 0.5) / grid)`, bilinear in between.
//!
//! The semantic term is exact but cheap: features are unit vectors, so the cosine between the input
//! feature at `u` and the bilinearly interpolated rendering feature at `ũ` is
//! `Σ w_k <a, b_k> / sqrt(Σ_kl w_k w_l <b_k, b_l>)`. The dot products `<a_u, b_t>` with every
//! rendering token `t` and the Gram entries of neighbouring tokens are computed once, after which an
//! iteration costs O(1) per node, with an analytic gradient (checked by finite differences in the
//! tests).

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::config::CoordMapsConfig as WarpSettings;

use crate::error::{Error, Result};

/// Feature vectors on a regular `width x height` grid over the unit square (token `(i, j)` centred
/// at `((j + 0.5) / width, (i + 0.5) / height)`), channel-last, each normalised to unit length.
#[derive(Clone, Debug)]
pub struct FeatureGrid {
    /// Tokens per row.
    pub width: usize,
    /// Token rows.
    pub height: usize,
    /// Channels per token.
    pub channels: usize,
    /// `height * width * channels` values, row-major, each token L2-normalised (zero stays zero).
    pub data: Vec<f32>,
}

impl FeatureGrid {
    /// Wraps and normalises raw features. Errors on a size mismatch, an empty grid or non-finite values.
    pub fn new(width: usize, height: usize, channels: usize, mut data: Vec<f32>) -> Result<Self> {
        if width == 0 || height == 0 || channels == 0 || data.len() != width * height * channels {
            return Err(Error::InvalidInput(format!(
                "feature grid {width}x{height}x{channels} does not match {} values",
                data.len()
            )));
        }
        if data.iter().any(|v| !v.is_finite()) {
            return Err(Error::Numerical("feature grid holds NaN/inf".into()));
        }
        for token in data.chunks_mut(channels) {
            let n = token.iter().map(|v| v * v).sum::<f32>().sqrt();
            if n > 1e-12 {
                token.iter_mut().for_each(|v| *v /= n);
            }
        }
        Ok(Self { width, height, channels, data })
    }

    /// Token `(row, col)`.
    pub fn token(&self, row: usize, col: usize) -> &[f32] {
        let k = (row * self.width + col) * self.channels;
        &self.data[k..k + self.channels]
    }

    /// The bilinear interpolation's taps at a unit-square point (clamped to the token centres): four
    /// `(token index, weight)`, weights summing to 1 (zero-weight taps repeat a valid index).
    pub fn taps(&self, x: f64, y: f64) -> [(usize, f32); 4] {
        let (c, _) = cell(x, self.width);
        let (r, _) = cell(y, self.height);
        let mut out = [(0usize, 0f32); 4];
        let mut k = 0;
        for (rr, wy) in [(r.0, 1.0 - r.1), (r.0 + 1, r.1)] {
            for (cc, wx) in [(c.0, 1.0 - c.1), (c.0 + 1, c.1)] {
                out[k] = (rr.min(self.height - 1) * self.width + cc.min(self.width - 1), (wx * wy) as f32);
                k += 1;
            }
        }
        out
    }

    /// Adds `weight` x the bilinear interpolation at a unit-square point (clamped to the token
    /// centres, not normalised) to `out` (`channels` values).
    pub fn add_bilinear(&self, x: f64, y: f64, weight: f32, out: &mut [f32]) {
        for (t, w) in self.taps(x, y) {
            let w = weight * w;
            if w != 0.0 {
                let t = &self.data[t * self.channels..(t + 1) * self.channels];
                out.iter_mut().zip(t).for_each(|(o, v)| *o += w * v);
            }
        }
    }

    /// Bilinear interpolation at a unit-square point (clamped to the token centres), L2-normalised.
    pub fn sample_normalised(&self, x: f64, y: f64) -> Vec<f32> {
        let mut out = vec![0f32; self.channels];
        self.add_bilinear(x, y, 1.0, &mut out);
        let n = out.iter().map(|v| v * v).sum::<f32>().sqrt();
        if n > 1e-12 {
            out.iter_mut().for_each(|v| *v /= n);
        }
        out
    }
}

/// The dot products a bilinear interpolation's norm needs: each token with itself and with its right,
/// lower, lower-right and lower-left neighbours. `|Σ_k w_k t_k|² = Σ_kl w_k w_l <t_k, t_l>` over the 4
/// taps of one cell then costs 16 lookups instead of building the interpolated feature.
#[derive(Clone, Debug)]
pub struct NeighbourGram {
    width: usize,
    /// Per token: `<t,t>`, `<t,right>`, `<t,down>`, `<t,down-right>`, `<t,down-left>` (0 off the grid).
    entries: Vec<[f32; 5]>,
}

impl NeighbourGram {
    /// The neighbour dot products of `grid`'s tokens.
    pub fn new(grid: &FeatureGrid) -> Self {
        let (w, h, c) = (grid.width, grid.height, grid.channels);
        let dot = |a: usize, b: usize| -> f32 {
            grid.data[a * c..(a + 1) * c].iter().zip(&grid.data[b * c..(b + 1) * c]).map(|(p, q)| p * q).sum()
        };
        let mut entries = vec![[0f32; 5]; w * h];
        for i in 0..h {
            for j in 0..w {
                let t = i * w + j;
                let g = &mut entries[t];
                g[0] = dot(t, t);
                if j + 1 < w {
                    g[1] = dot(t, t + 1);
                }
                if i + 1 < h {
                    g[2] = dot(t, t + w);
                    if j + 1 < w {
                        g[3] = dot(t, t + w + 1);
                    }
                    if j > 0 {
                        g[4] = dot(t, t + w - 1);
                    }
                }
            }
        }
        Self { width: w, entries }
    }

    /// `<t_a, t_b>` for two tokens of one bilinear cell (equal, or neighbours by row and column); NaN for
    /// tokens no cell holds together.
    pub fn dot(&self, a: usize, b: usize) -> f32 {
        let (lo, hi) = (a.min(b), a.max(b));
        let w = self.width.max(1);
        let Some(e) = self.entries.get(lo) else { return f32::NAN };
        let (rows, cols) = (hi / w - lo / w, (hi % w) as isize - (lo % w) as isize);
        match (rows, cols) {
            (0, 0) => e[0],
            (0, 1) => e[1],
            (1, 0) => e[2],
            (1, 1) => e[3],
            (1, -1) => e[4],
            _ => f32::NAN,
        }
    }

    /// `|Σ_k w_k t_k|²` for the taps of [`FeatureGrid::taps`].
    pub fn norm2(&self, taps: &[(usize, f32); 4]) -> f32 {
        taps.iter()
            .flat_map(|&(a, wa)| taps.iter().map(move |&(b, wb)| (a, b, wa * wb)))
            .map(|(a, b, w)| w * self.dot(a, b))
            .sum()
    }
}

/// Cell of a unit-square coordinate on an `n`-token axis: `((index, fraction), clamped)` with
/// `index + 1 < n` unless `n == 1`.
fn cell(x: f64, n: usize) -> ((usize, f64), bool) {
    let t = x * n as f64 - 0.5;
    let hi = (n - 1) as f64;
    let clamped = !(t > 0.0 && t < hi);
    let t = t.clamp(0.0, hi);
    if n == 1 {
        return ((0, 0.0), true);
    }
    let i = (t.floor() as usize).min(n - 2);
    ((i, t - i as f64), clamped)
}

/// A warp `u -> ũ`: displacements at `grid x grid` nodes, unit-square coordinates.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Warp {
    /// Nodes per side.
    pub grid: usize,
    /// `ũ - u` per node, row-major.
    pub displacement: Vec<[f32; 2]>,
}

impl Warp {
    /// The identity warp.
    pub fn identity(grid: usize) -> Self {
        Self { grid, displacement: vec![[0.0; 2]; grid * grid] }
    }

    /// `ũ` of a unit-square point (bilinear between nodes, constant beyond the outer nodes).
    pub fn apply(&self, u: [f64; 2]) -> [f64; 2] {
        let g = self.grid;
        if g == 0 || self.displacement.len() != g * g {
            return u;
        }
        let ((c, fx), _) = cell(u[0], g);
        let ((r, fy), _) = cell(u[1], g);
        let mut d = [0f64; 2];
        for (rr, wy) in [(r, 1.0 - fy), (r + 1, fy)] {
            for (cc, wx) in [(c, 1.0 - fx), (c + 1, fx)] {
                let w = wx * wy;
                if w == 0.0 {
                    continue;
                }
                let v = self.displacement[rr.min(g - 1) * g + cc.min(g - 1)];
                d[0] += w * v[0] as f64;
                d[1] += w * v[1] as f64;
            }
        }
        [u[0] + d[0], u[1] + d[1]]
    }
}

/// Unit-square position of warp node `n`.
fn node_position(n: usize, grid: usize) -> [f64; 2] {
    [((n % grid) as f64 + 0.5) / grid as f64, ((n / grid) as f64 + 0.5) / grid as f64]
}

/// One image's instance of Eq. 10, with the feature dot products precomputed.
#[derive(Clone, Debug)]
pub struct WarpProblem {
    grid: usize,
    /// Whether each node lies on the input's foreground (the semantic term applies there only).
    foreground: Vec<bool>,
    /// Rendering token grid size.
    render_w: usize,
    render_h: usize,
    /// `<a_n, b_t>` for node `n` and rendering token `t`: `[grid², render_w * render_h]`.
    sim: Vec<f32>,
    /// Dot products of neighbouring rendering tokens.
    gram: NeighbourGram,
}

impl WarpProblem {
    /// Builds the problem for input features `input`, rendering features `rendering` (both over the
    /// same unit square) and the input's foreground test at unit-square points.
    pub fn new(input: &FeatureGrid, rendering: &FeatureGrid, foreground: &dyn Fn(f64, f64) -> bool, grid: usize) -> Result<Self> {
        if input.channels != rendering.channels {
            return Err(Error::InvalidInput(format!(
                "input features have {} channels, rendering features {}",
                input.channels, rendering.channels
            )));
        }
        if grid < 2 {
            return Err(Error::InvalidInput("warp grid must be >= 2".into()));
        }
        let (rw, rh, c) = (rendering.width, rendering.height, rendering.channels);
        let nodes = grid * grid;
        let mut fg = Vec::with_capacity(nodes);
        let mut sim = vec![0f32; nodes * rw * rh];
        for n in 0..nodes {
            let [x, y] = node_position(n, grid);
            fg.push(foreground(x, y));
        }
        sim.par_chunks_mut(rw * rh).enumerate().for_each(|(n, row)| {
            if !fg[n] {
                return;
            }
            let [x, y] = node_position(n, grid);
            let a = input.sample_normalised(x, y);
            for (t, s) in row.iter_mut().enumerate() {
                let b = &rendering.data[t * c..(t + 1) * c];
                *s = a.iter().zip(b).map(|(p, q)| p * q).sum();
            }
        });
        let gram = NeighbourGram::new(rendering);
        Ok(Self { grid, foreground: fg, render_w: rw, render_h: rh, sim, gram })
    }

    /// Warp nodes per side.
    pub fn grid(&self) -> usize {
        self.grid
    }

    /// Cosine `c` between node `n`'s input feature and the rendering feature at `ũ`, and `dc/dũ`.
    fn cosine(&self, n: usize, ut: [f64; 2]) -> (f64, [f64; 2]) {
        let (rw, rh) = (self.render_w, self.render_h);
        let ((x0, fx), cx) = cell(ut[0], rw);
        let ((y0, fy), cy) = cell(ut[1], rh);
        let x1 = (x0 + 1).min(rw - 1);
        let y1 = (y0 + 1).min(rh - 1);
        let t = [y0 * rw + x0, y0 * rw + x1, y1 * rw + x0, y1 * rw + x1];
        let w = [(1.0 - fx) * (1.0 - fy), fx * (1.0 - fy), (1.0 - fx) * fy, fx * fy];
        let dw_dfx = [-(1.0 - fy), 1.0 - fy, -fy, fy];
        let dw_dfy = [-(1.0 - fx), -fx, 1.0 - fx, fx];
        let row = &self.sim[n * rw * rh..(n + 1) * rw * rh];
        let s: [f64; 4] = t.map(|k| row[k] as f64);
        // Gram of the 4 corners (degenerate axes of 1-token grids repeat a token).
        let mut g = [[0f64; 4]; 4];
        let pair = |a: usize, b: usize| -> f64 { self.gram.dot(t[a], t[b]) as f64 };
        for (a, row) in g.iter_mut().enumerate() {
            for (b, v) in row.iter_mut().enumerate() {
                *v = pair(a, b);
            }
        }
        let num: f64 = (0..4).map(|k| w[k] * s[k]).sum();
        let mut q = 0.0;
        let mut dq = [0f64; 4];
        for a in 0..4 {
            for b in 0..4 {
                q += w[a] * w[b] * g[a][b];
                dq[a] += 2.0 * w[b] * g[a][b];
            }
        }
        let q = q.max(1e-12);
        let sq = q.sqrt();
        let c = num / sq;
        let dc_dw: [f64; 4] = std::array::from_fn(|k| s[k] / sq - 0.5 * num / (q * sq) * dq[k]);
        let mut grad = [0f64; 2];
        if !cx {
            grad[0] = (0..4).map(|k| dc_dw[k] * dw_dfx[k]).sum::<f64>() * rw as f64;
        }
        if !cy {
            grad[1] = (0..4).map(|k| dc_dw[k] * dw_dfy[k]).sum::<f64>() * rh as f64;
        }
        (c, grad)
    }

    /// Mean semantic distance `1 - cos` over foreground nodes under `warp` (Eq. 6 averaged).
    pub fn semantic_distance(&self, warp: &Warp) -> f64 {
        let (mut sum, mut count) = (0.0, 0usize);
        for n in 0..self.grid * self.grid {
            if self.foreground[n] {
                let u = node_position(n, self.grid);
                let d = warp.displacement[n];
                sum += 1.0 - self.cosine(n, [u[0] + d[0] as f64, u[1] + d[1] as f64]).0;
                count += 1;
            }
        }
        if count == 0 {
            0.0
        } else {
            sum / count as f64
        }
    }

    /// The objective of Eq. 10 summed over nodes (divided by the node count) and its gradient with
    /// respect to the displacements.
    pub fn loss_and_grad(&self, displacement: &[[f32; 2]], s: &WarpSettings, grad: &mut [[f64; 2]]) -> f64 {
        let g = self.grid;
        let nodes = g * g;
        grad.iter_mut().for_each(|v| *v = [0.0; 2]);
        let inv = 1.0 / nodes as f64;
        let mut loss = 0.0;
        for n in 0..nodes {
            let u = node_position(n, g);
            let d = [displacement[n][0] as f64, displacement[n][1] as f64];
            if self.foreground[n] {
                let (c, dc) = self.cosine(n, [u[0] + d[0], u[1] + d[1]]);
                loss += (1.0 - c) * inv;
                grad[n][0] -= dc[0] * inv;
                grad[n][1] -= dc[1] * inv;
            }
            loss += s.lambda_l2 * (d[0] * d[0] + d[1] * d[1]) * inv;
            grad[n][0] += 2.0 * s.lambda_l2 * d[0] * inv;
            grad[n][1] += 2.0 * s.lambda_l2 * d[1] * inv;
        }
        if s.lambda_smooth > 0.0 {
            // Eq. 16: L_rigidity(∇ = 10) + 0.1 L_rigidity(∇ = 1) + 10 L_TV, offsets in warp nodes.
            loss += s.lambda_smooth * rigidity(displacement, g, 10.min(g - 1), 1.0, s.lambda_smooth, grad);
            loss += s.lambda_smooth * rigidity(displacement, g, 1, 0.1, s.lambda_smooth, grad);
            loss += s.lambda_smooth * total_variation(displacement, g, 10.0, s.huber_delta, s.lambda_smooth, grad);
        }
        loss
    }
}

/// `weight * L_rigidity(∇ = offset)` (Eq. 14) of the map `ũ = u + d`, averaged over the nodes where it
/// is defined; adds `outer * d/dd` of it to `grad` and returns `weight * L`.
fn rigidity(d: &[[f32; 2]], g: usize, offset: usize, weight: f64, outer: f64, grad: &mut [[f64; 2]]) -> f64 {
    if offset == 0 || offset >= g {
        return 0.0;
    }
    let h = offset as f64 / g as f64;
    let m = |n: usize| -> [f64; 2] {
        let u = node_position(n, g);
        [u[0] + d[n][0] as f64, u[1] + d[n][1] as f64]
    };
    let count = ((g - offset) * (g - offset)) as f64;
    let scale = weight / count;
    let mut total = 0.0;
    for i in 0..g - offset {
        for j in 0..g - offset {
            let (n, nx, ny) = (i * g + j, i * g + j + offset, (i + offset) * g + j);
            let (m0, mx, my) = (m(n), m(nx), m(ny));
            // J = [[a, b], [c, d]] = [dM/dx, dM/dy] by forward differences.
            let a = (mx[0] - m0[0]) / h;
            let c = (mx[1] - m0[1]) / h;
            let b = (my[0] - m0[0]) / h;
            let dd = (my[1] - m0[1]) / h;
            let p = a * a + c * c;
            let q = a * b + c * dd;
            let r = b * b + dd * dd;
            let f = (p * p + 2.0 * q * q + r * r).sqrt().max(1e-12);
            let det = a * dd - b * c;
            let det2 = (det * det).max(1e-6);
            // ||M||_F + ||M^-1||_F with M = JᵀJ: ||M^-1||_F = ||M||_F / det(M) = f / det(J)².
            total += f * (1.0 + 1.0 / det2);
            let dl_df = 1.0 + 1.0 / det2;
            let dl_ddet = if det * det > 1e-6 { -2.0 * f * det / (det2 * det2) } else { 0.0 };
            let ga = dl_df * (2.0 * a * p + 2.0 * q * b) / f + dl_ddet * dd;
            let gb = dl_df * (2.0 * q * a + 2.0 * r * b) / f - dl_ddet * c;
            let gc = dl_df * (2.0 * c * p + 2.0 * q * dd) / f - dl_ddet * b;
            let gd = dl_df * (2.0 * q * c + 2.0 * r * dd) / f + dl_ddet * a;
            let k = outer * scale / h;
            grad[nx][0] += k * ga;
            grad[n][0] -= k * ga;
            grad[nx][1] += k * gc;
            grad[n][1] -= k * gc;
            grad[ny][0] += k * gb;
            grad[n][0] -= k * gb;
            grad[ny][1] += k * gd;
            grad[n][1] -= k * gd;
        }
    }
    total * scale
}

/// `weight * L_TV` (Eq. 15): mean Huber loss of the displacement's forward differences along x and y.
fn total_variation(d: &[[f32; 2]], g: usize, weight: f64, delta: f64, outer: f64, grad: &mut [[f64; 2]]) -> f64 {
    let count = (g * (g - 1) * 2) as f64;
    let scale = weight / count;
    let huber = |x: f64| -> (f64, f64) {
        if x.abs() < delta {
            (0.5 * x * x, x)
        } else {
            (delta * (x.abs() - 0.5 * delta), delta * x.signum())
        }
    };
    let mut total = 0.0;
    for i in 0..g {
        for j in 0..g {
            let n = i * g + j;
            for next in [(j + 1 < g).then_some(n + 1), (i + 1 < g).then_some(n + g)].into_iter().flatten() {
                for c in 0..2 {
                    let (v, dv) = huber(d[next][c] as f64 - d[n][c] as f64);
                    total += v;
                    grad[next][c] += outer * scale * dv;
                    grad[n][c] -= outer * scale * dv;
                }
            }
        }
    }
    total * scale
}

/// Solves Eq. 10 for every problem (in parallel) with AdamW from the identity warp.
pub fn optimise_warps(problems: &[WarpProblem], s: &WarpSettings) -> Result<Vec<Warp>> {
    s.validate()?;
    problems
        .par_iter()
        .map(|p| {
            let nodes = p.grid * p.grid;
            let mut d = vec![[0f32; 2]; nodes];
            let mut grad = vec![[0f64; 2]; nodes];
            let (mut m, mut v) = (vec![[0f64; 2]; nodes], vec![[0f64; 2]; nodes]);
            let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
            for it in 1..=s.iterations {
                let loss = p.loss_and_grad(&d, s, &mut grad);
                if !loss.is_finite() {
                    return Err(Error::Numerical(format!("coordinate-map loss is {loss} at iteration {it}")));
                }
                let (c1, c2) = (1.0 - b1.powi(it as i32), 1.0 - b2.powi(it as i32));
                for n in 0..nodes {
                    for c in 0..2 {
                        let gr = grad[n][c];
                        m[n][c] = b1 * m[n][c] + (1.0 - b1) * gr;
                        v[n][c] = b2 * v[n][c] + (1.0 - b2) * gr * gr;
                        let mut x = d[n][c] as f64;
                        x -= s.lr * s.weight_decay * x;
                        x -= s.lr * (m[n][c] / c1) / ((v[n][c] / c2).sqrt() + eps);
                        d[n][c] = x as f32;
                    }
                }
            }
            Ok(Warp { grid: p.grid, displacement: d })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    }

    fn random_grid(w: usize, h: usize, c: usize, seed: u64) -> FeatureGrid {
        let mut s = seed;
        FeatureGrid::new(w, h, c, (0..w * h * c).map(|_| lcg(&mut s)).collect()).unwrap()
    }

    /// The neighbour dot products give the squared norm of the interpolated feature built by hand, on
    /// grids one or two tokens wide or high too (where neighbours cannot be told apart by index
    /// differences alone), and refuse pairs no cell holds.
    #[test]
    fn neighbour_gram_gives_the_norm_of_every_interpolation() {
        let mut seed = 7u64;
        for (w, h) in [(1, 3), (3, 1), (2, 2), (2, 3), (3, 2), (5, 4)] {
            let grid = random_grid(w, h, 6, 11 + (w * 10 + h) as u64);
            let gram = NeighbourGram::new(&grid);
            for _ in 0..200 {
                let (x, y) = (lcg(&mut seed) as f64 * 1.4 + 0.5, lcg(&mut seed) as f64 * 1.4 + 0.5);
                let mut f = vec![0f32; 6];
                grid.add_bilinear(x, y, 1.0, &mut f);
                let direct: f32 = f.iter().map(|v| v * v).sum();
                let via = gram.norm2(&grid.taps(x, y));
                assert!((direct - via).abs() < 1e-5, "{w}x{h} at ({x}, {y}): {direct} vs {via}");
            }
        }
        let gram = NeighbourGram::new(&random_grid(5, 4, 6, 3));
        assert!(gram.dot(0, 2).is_nan() && gram.dot(0, 10).is_nan() && gram.dot(4, 5).is_nan());
        assert!(!gram.dot(4, 8).is_nan() && !gram.dot(1, 5).is_nan());
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let input = random_grid(5, 5, 8, 1);
        let rendering = random_grid(5, 5, 8, 2);
        let grid = 12;
        let p = WarpProblem::new(&input, &rendering, &|x, y| (x - 0.5).abs() < 0.35 && (y - 0.5).abs() < 0.4, grid).unwrap();
        let mut seed = 7;
        let d: Vec<[f32; 2]> = (0..grid * grid).map(|_| [0.05 * lcg(&mut seed), 0.05 * lcg(&mut seed)]).collect();
        let s = WarpSettings { lambda_smooth: 0.3, huber_delta: 0.01, ..Default::default() };
        let mut grad = vec![[0f64; 2]; grid * grid];
        p.loss_and_grad(&d, &s, &mut grad);
        let mut scratch = vec![[0f64; 2]; grid * grid];
        let mut worst: f64 = 0.0;
        let mut checked = 0;
        for n in (0..grid * grid).step_by(7) {
            for c in 0..2 {
                let h = 1e-4f32;
                let mut dp = d.clone();
                dp[n][c] += h;
                let mut dm = d.clone();
                dm[n][c] -= h;
                let fd = (p.loss_and_grad(&dp, &s, &mut scratch) - p.loss_and_grad(&dm, &s, &mut scratch)) / (2.0 * h as f64);
                let a = grad[n][c];
                let err = (fd - a).abs() / (fd.abs().max(a.abs()).max(1e-3));
                worst = worst.max(err);
                checked += 1;
            }
        }
        assert!(checked > 30);
        assert!(worst < 2e-2, "worst relative gradient error {worst}");
    }

    #[test]
    fn recovers_a_known_shift() {
        // The rendering is the input shifted right by exactly one token (of 8): the optimum of the
        // semantic term is ũ = u + (1/8, 0), and a small λ_l2 barely moves it.
        let (w, c) = (8usize, 16usize);
        let mut seed = 3;
        let base: Vec<f32> = (0..(w + 1) * w * c).map(|_| lcg(&mut seed)).collect();
        let pick = |shift: usize| -> Vec<f32> {
            let mut out = Vec::new();
            for i in 0..w {
                for j in 0..w {
                    let k = (i * (w + 1) + j + shift) * c;
                    out.extend_from_slice(&base[k..k + c]);
                }
            }
            out
        };
        let input = FeatureGrid::new(w, w, c, pick(1)).unwrap();
        let rendering = FeatureGrid::new(w, w, c, pick(0)).unwrap();
        let p = WarpProblem::new(&input, &rendering, &|x, y| x > 0.2 && x < 0.7 && y > 0.2 && y < 0.8, 16).unwrap();
        let s = WarpSettings { iterations: 600, lambda_l2: 0.1, ..Default::default() };
        let warp = optimise_warps(std::slice::from_ref(&p), &s).unwrap().remove(0);
        let before = p.semantic_distance(&Warp::identity(16));
        let after = p.semantic_distance(&warp);
        assert!(after < 0.2 * before, "semantic distance {before} -> {after}");
        let moved = warp.apply([0.45, 0.5]);
        assert!((moved[0] - 0.45 - 0.125).abs() < 0.03 && (moved[1] - 0.5).abs() < 0.03, "{moved:?}");
    }

    #[test]
    fn identity_stays_put_on_identical_features() {
        let g = random_grid(6, 6, 8, 9);
        let p = WarpProblem::new(&g, &g, &|_, _| true, 8).unwrap();
        let warp = optimise_warps(&[p], &WarpSettings { iterations: 200, ..Default::default() }).unwrap().remove(0);
        let max = warp.displacement.iter().map(|d| d[0].abs().max(d[1].abs())).fold(0.0, f32::max);
        assert!(max < 0.02, "identity drifted by {max}");
    }

    #[test]
    fn rigidity_is_minimal_for_a_rotation() {
        let g = 8;
        let mut grad = vec![[0f64; 2]; g * g];
        let identity = vec![[0f32; 2]; g * g];
        let at_identity = rigidity(&identity, g, 1, 1.0, 1.0, &mut grad);
        assert!((at_identity - 2.0 * 2f64.sqrt()).abs() < 1e-9, "{at_identity}");
        let stretch: Vec<[f32; 2]> = (0..g * g).map(|n| [0.3 * node_position(n, g)[0] as f32, 0.0]).collect();
        assert!(rigidity(&stretch, g, 1, 1.0, 1.0, &mut grad) > at_identity + 0.05);
    }
}
