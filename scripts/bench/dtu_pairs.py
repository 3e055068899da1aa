#!/usr/bin/env python3
"""Keypoint-transfer pairs with ground truth for a calibrated real set (shared/data/real/dtu-house): a rigid
object photographed for real, the case the paper's transfer claim is about (SPair-71k: rigid categories only).
Source points are random mask pixels; each is lifted onto the set's template (the visual hull of the masks
under the calibrated cameras) with the source camera, projected with the target camera, and kept when that
surface point is visible there (depth test against the template seen from the target) and lands on the
target's mask. The hull fills concavities, so a point there can be off by a few pixels, far below the PCK@0.1
radius (a tenth of the mask bbox's larger side: ~60 px here).
Writes the pairs file `congeal transfer --pairs` and `congeal eval --pairs` read ({src, dst, points, gt}, plus
`angle_deg` between the two cameras and the PCK@0.1 `radius` in pixels, which they ignore).
`--check-nocs` checks the construction on a rendered collection whose template is the rendered instance (e.g.
duck, with `--depth-tolerance 0.002` for its metre units): each ground-truth point against the projection of the
source pixel's NOCS (read at 8 bits) with the target camera.
Usage: scripts/bench/dtu_pairs.py COLLECTION_DIR OUT.json [--pairs 150] [--points 20] [--seed 0] [--check-nocs]"""
import argparse
import json
import os

import numpy as np
from PIL import Image


def load_obj(path):
    verts, faces = [], []
    with open(path) as f:
        for line in f:
            if line.startswith("v "):
                verts.append([float(x) for x in line.split()[1:4]])
            elif line.startswith("f "):
                faces.append([int(t.split("/")[0]) - 1 for t in line.split()[1:4]])
    return np.array(verts), np.array(faces)


def sample_surface(verts, faces, n, rng):
    a, b, c = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    pick = rng.choice(len(faces), n, p=area / area.sum())
    u, v = rng.random(n), rng.random(n)
    flip = u + v > 1
    u[flip], v[flip] = 1 - u[flip], 1 - v[flip]
    return a[pick] + u[:, None] * (b[pick] - a[pick]) + v[:, None] * (c[pick] - a[pick])


class View:
    """The template seen from one calibrated camera: per pixel the nearest surface sample and its depth."""

    def __init__(self, image, root, points):
        self.w, self.h = image["width"], image["height"]
        self.pose = np.array(image["camera_from_object"], dtype=float)
        self.k = np.array(image["K"], dtype=float)
        self.mask = np.array(Image.open(os.path.join(root, image["mask"])).convert("L")) >= 128
        uv, z = self.project(points)
        px = np.round(uv).astype(int)
        ok = (z > 0) & (px[:, 0] >= 0) & (px[:, 1] >= 0) & (px[:, 0] < self.w) & (px[:, 1] < self.h)
        idx = np.nonzero(ok)[0]
        flat = px[idx, 1] * self.w + px[idx, 0]
        order = np.lexsort((z[idx], flat))
        flat, idx = flat[order], idx[order]
        first = np.ones(len(flat), bool)
        first[1:] = flat[1:] != flat[:-1]
        self.depth = np.full(self.w * self.h, np.inf)
        self.nearest = np.full(self.w * self.h, -1)
        self.depth[flat[first]] = z[idx[first]]
        self.nearest[flat[first]] = idx[first]

    def project(self, points):
        cam = points @ self.pose[:3, :3].T + self.pose[:3, 3]
        z = cam[:, 2]
        uv = (cam @ self.k.T)[:, :2] / np.maximum(z, 1e-9)[:, None]
        return uv, z


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("collection")
    ap.add_argument("out")
    ap.add_argument("--pairs", type=int, default=150)
    ap.add_argument("--points", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=3_000_000, help="surface samples of the template")
    ap.add_argument("--depth-tolerance", type=float, default=0.02, help="visibility test, object units")
    ap.add_argument("--check-nocs", action="store_true", help="compare with the collection's NOCS maps")
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    spec = json.load(open(os.path.join(a.collection, "collection.json")))
    verts, faces = load_obj(os.path.join(a.collection, spec["template"]["obj"]))
    points = sample_surface(verts, faces, a.samples, rng)
    images = spec["images"]
    views = [View(im, a.collection, points) for im in images]
    out = []
    tries = 0
    while len(out) < a.pairs and tries < 50 * a.pairs:
        tries += 1
        s, d = rng.choice(len(images), 2, replace=False)
        vs, vd = views[s], views[d]
        # Source pixels on the mask that see the template.
        ys, xs = np.nonzero(vs.mask)
        cand = rng.permutation(len(xs))
        src, gt = [], []
        for c in cand[: 40 * a.points]:
            i = vs.nearest[ys[c] * vs.w + xs[c]]
            if i < 0:
                continue
            uv, z = vd.project(points[i : i + 1])
            u, v = uv[0]
            pu, pv = int(round(u)), int(round(v))
            if not (0 <= pu < vd.w and 0 <= pv < vd.h) or not vd.mask[pv, pu]:
                continue
            if z[0] > vd.depth[pv * vd.w + pu] + a.depth_tolerance:
                continue
            src.append([float(xs[c]), float(ys[c])])
            gt.append([float(u), float(v)])
            if len(src) == a.points:
                break
        if len(src) < a.points // 2:
            continue
        ys, xs = np.nonzero(vd.mask)
        relative = vs.pose[:3, :3] @ vd.pose[:3, :3].T
        angle = float(np.degrees(np.arccos(np.clip((np.trace(relative) - 1) / 2, -1, 1))))
        out.append({"src": images[s]["rgb"], "dst": images[d]["rgb"], "points": src, "gt": gt,
                    # Extra fields (ignored by congeal): the angle between the two cameras, and the PCK@0.1
                    # radius (a tenth of the target mask bbox's larger side, as `congeal eval` uses).
                    "angle_deg": angle, "radius": 0.1 * float(max(np.ptp(xs), np.ptp(ys)) + 1)})
    json.dump(out, open(a.out, "w"), indent=1)
    n = sum(len(p["points"]) for p in out)
    print(f"{len(out)} pairs, {n} points with ground truth: {a.out}")
    if a.check_nocs:
        check_nocs(spec, a.collection, out, views)


def check_nocs(spec, root, pairs, views):
    """Pixel distance between each ground-truth point and the projected NOCS of its source pixel."""
    lo = np.array(spec["canonical_frame"]["bbox_min"])
    hi = np.array(spec["canonical_frame"]["bbox_max"])
    index = {im["rgb"]: i for i, im in enumerate(spec["images"])}
    dist, radius = [], []
    for p in pairs:
        s, d = index[p["src"]], index[p["dst"]]
        nocs = np.array(Image.open(os.path.join(root, spec["images"][s]["nocs"])).convert("RGB")) / 255.0
        ys, xs = np.nonzero(views[d].mask)
        side = max(np.ptp(xs), np.ptp(ys)) + 1
        for q, g in zip(p["points"], p["gt"]):
            x = lo + nocs[int(q[1]), int(q[0])] * (hi - lo)
            uv, _ = views[d].project(x[None, :])
            dist.append(float(np.hypot(*(uv[0] - np.array(g)))))
            radius.append(0.1 * side)
    dist, radius = np.array(dist), np.array(radius)
    print(f"vs NOCS: median {np.median(dist):.2f} px, 95 % {np.percentile(dist, 95):.2f} px, "
          f"{100 * np.mean(dist > radius):.1f} % beyond the PCK@0.1 radius")


if __name__ == "__main__":
    main()
