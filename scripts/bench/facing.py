#!/usr/bin/env python3
"""Which way each posed object faces, checked against annotated keypoints (no ground-truth poses needed):
for every image of a run whose keypoints include a front part and a back part (from a pairs file with
`joints`, e.g. ../shared/data/real/dogs-dev/pairs.json), the sign of (front - back) along the image x axis
is compared with the same sign for the canonical +z (front) and -z (back) points projected with the run's
pose. "FLIP" = the pose faces the other way (a head-tail flip); images seen head-on (|dx| < 10 px) are skipped.
Also prints each image's initial candidate (azimuth / elevation), where flips usually start.
Usage: scripts/bench/facing.py RUN_DIR PAIRS_JSON [FRONT_JOINTS] [BACK_JOINTS]
  joints as comma lists; default 16,17,14,15 (nose, chin, ear bases) and 12,13 (tail) of StanfordExtra."""
import json
import sys

import numpy as np


def main():
    if len(sys.argv) not in (3, 5):
        sys.exit(__doc__)
    run, pairs = sys.argv[1], json.load(open(sys.argv[2]))
    front = [int(j) for j in (sys.argv[3] if len(sys.argv) > 3 else "16,17,14,15").split(",")]
    back = [int(j) for j in (sys.argv[4] if len(sys.argv) > 4 else "12,13").split(",")]
    keypoints = {}
    for p in pairs:
        for image, points in [(p["src"], p["points"]), (p["dst"], p.get("gt") or [])]:
            for j, q in zip(p.get("joints", []), points):
                if q is not None:
                    keypoints.setdefault(image, {})[j] = q
    result = json.load(open(f"{run}/result.json"))
    agree = checked = 0
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
        print(f"| {im['file']} | {image_dx:+.0f} | {pose_dx:+.0f} | {'ok' if same else 'FLIP'} | {start} |")
    print(f"\n{agree} of {checked} checked images face the right way")


if __name__ == "__main__":
    main()
