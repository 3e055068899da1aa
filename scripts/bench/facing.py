#!/usr/bin/env python3
"""Which way each posed object faces, checked against annotated keypoints (no ground-truth poses needed):
for every image of a run whose keypoints include a front part and a back part (from a pairs file with
`joints`, e.g. ../shared/data/real/dogs-dev/pairs.json), the sign of (front - back) along the image x axis
is compared with the same sign for the canonical +z (front) and -z (back) points projected with the run's
pose. "FLIP" = the pose faces the other way (a head-tail flip); images seen head-on (|dx| < 10 px) are skipped.
Also prints each image's initial candidate (azimuth / elevation), where flips usually start.
With `--pred NAME=PRED_JSON ...` (transfer outputs on the same pairs file, e.g. real.sh's dogs.joint.json),
PCK of each method on the pairs whose two images were both checked and face the right way, and on the
rest: does a transfer method work once the poses face the right way? Then what a perfect choice among
the given methods would reach (upper bounds, they use the ground truth): the better method for each pair
(say 2D or joint per image pair), and any method right for each point.
Usage: scripts/bench/facing.py RUN_DIR PAIRS_JSON [FRONT_JOINTS BACK_JOINTS] [--pred NAME=PRED_JSON ...]
  joints as comma lists; default 16,17,14,15 (nose, chin, ear bases) and 12,13 (tail) of StanfordExtra."""
import json
import sys

import numpy as np


def correct_per_point(pairs, preds):
    """For each pair, one bool per annotated point: is the prediction within the pair's threshold."""
    out = []
    for pair, pred in zip(pairs, preds):
        if (pair["src"], pair["dst"]) != (pred["src"], pred["dst"]):
            sys.exit("facing.py: a --pred file does not follow the pairs file's order")
        out.append([p is not None and bool(np.hypot(p[0] - g[0], p[1] - g[1]) <= pair["thresh"])
                    for p, g in zip(pred.get("pred") or [], pair.get("gt") or []) if g is not None])
    return out


def pck_split(pairs, hits, good):
    """PCK (correct, total) from `correct_per_point` hits on pairs with both images in `good`, and on the others."""
    split = {True: [0, 0], False: [0, 0]}
    for pair, h in zip(pairs, hits):
        both = pair["src"] in good and pair["dst"] in good
        split[both][0] += sum(h)
        split[both][1] += len(h)
    return split


def main():
    args = sys.argv[1:]
    preds = []
    if "--pred" in args:
        at = args.index("--pred")
        preds = [a.split("=", 1) for a in args[at + 1:]]
        args = args[:at]
        if not preds or any(len(p) != 2 for p in preds):
            sys.exit(__doc__)
    if len(args) not in (2, 4):
        sys.exit(__doc__)
    run, pairs = args[0], json.load(open(args[1]))
    front = [int(j) for j in (args[2] if len(args) > 2 else "16,17,14,15").split(",")]
    back = [int(j) for j in (args[3] if len(args) > 3 else "12,13").split(",")]
    keypoints = {}
    for p in pairs:
        for image, points in [(p["src"], p["points"]), (p["dst"], p.get("gt") or [])]:
            for j, q in zip(p.get("joints", []), points):
                if q is not None:
                    keypoints.setdefault(image, {})[j] = q
    result = json.load(open(f"{run}/result.json"))
    agree = checked = 0
    facing_right = set()
    print("| image | keypoints front - back dx | pose front - back dx | | initial azimuth / elevation |")
    print("|---|---|---|---|---|")
    for im in result["images"]:
        k = keypoints.get(im["file"], {})
        f = [k[j][0] for j in front if j in k]
        b = [k[j][0] for j in back if j in k]
        pose = np.asarray(im["camera_from_object"])
        kmat = np.asarray(im["K"])

        def project(x):
            c = pose[:3, :3] @ x + pose[:3, 3]
            u = kmat @ c
            return u[0] / u[2]

        pose_dx = project(np.array([0.0, 0.0, 0.4])) - project(np.array([0.0, 0.0, -0.4]))
        init = im.get("init") or {}
        start = f"{init.get('azimuth_deg', float('nan')):.0f} / {init.get('elevation_deg', float('nan')):.0f}"
        if not f or not b:
            print(f"| {im['file']} | no front and back keypoints | {pose_dx:+.0f} | | {start} |")
            continue
        image_dx = np.mean(f) - np.mean(b)
        if abs(image_dx) < 10:
            print(f"| {im['file']} | {image_dx:+.0f} (head-on, skipped) | {pose_dx:+.0f} | | {start} |")
            continue
        checked += 1
        same = np.sign(image_dx) == np.sign(pose_dx)
        agree += int(same)
        if same:
            facing_right.add(im["file"])
        print(f"| {im['file']} | {image_dx:+.0f} | {pose_dx:+.0f} | {'ok' if same else 'FLIP'} | {start} |")
    print(f"\n{agree} of {checked} checked images face the right way")
    if preds:
        print("\n| method | PCK, both images face the right way (points) | PCK, other pairs (points) |")
        print("|---|---|---|")
        hits = [correct_per_point(pairs, json.load(open(path))) for _, path in preds]
        for (name, _), h in zip(preds, hits):
            split = pck_split(pairs, h, facing_right)
            cells = [f"{100 * c / t:.1f} ({t})" if t else "- (0)" for c, t in (split[True], split[False])]
            print(f"| {name} | {cells[0]} | {cells[1]} |")
        total = sum(len(h) for h in hits[0])
        if total and len(preds) > 1:
            per_pair = sum(max(sum(h[k]) for h in hits) for k in range(len(pairs)))
            per_point = sum(any(h[k][i] for h in hits) for k in range(len(pairs)) for i in range(len(hits[0][k])))
            names = " / ".join(n for n, _ in preds)
            print(f"\nupper bounds among {names} (use the ground truth): the better method per pair "
                  f"{100 * per_pair / total:.1f}, any method per point {100 * per_point / total:.1f} ({total} points)")


if __name__ == "__main__":
    main()
