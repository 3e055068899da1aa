#!/usr/bin/env python3
"""What kind of rotation error each image has: for a `congeal run` output against a rendered collection,
per image the rotation error, the axis of R_est R_true^T in the camera frame (x = the image's horizontal
axis, i.e. a tilt / elevation error), and estimated minus true camera elevation about the canonical up
axis (+y by default, the collection's canonical_frame.up_axis); then the elevation differences grouped by error band, and the errors grouped by where the true
camera stands: in front of the object, at its side or behind it (azimuth from the canonical front axis), low
(true elevation < 15 deg) or high.
Usage: scripts/bench/rotation_axes.py COLLECTION_DIR RUN_DIR"""
import json
import sys

import numpy as np


def axis_angle(r):
    angle = np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1, 1)))
    axis = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    n = np.linalg.norm(axis)
    return angle, axis / n if n > 1e-9 else axis


def axis_vector(name):
    """A canonical_frame axis name such as '+z' as a unit vector."""
    v = np.zeros(3)
    v["xyz".index(name[-1])] = -1.0 if name.startswith("-") else 1.0
    return v


def true_viewpoint(pose, frame):
    """Azimuth of the camera about the up axis, from the front axis towards the right axis, and its
    elevation (deg), in the collection's canonical frame."""
    pose = np.asarray(pose)
    centre = -pose[:3, :3].T @ pose[:3, 3]
    up, front = axis_vector(frame.get("up_axis", "+y")), axis_vector(frame.get("front_axis", "+z"))
    right = np.cross(up, front)
    az = np.degrees(np.arctan2(centre @ right, centre @ front))
    return az, np.degrees(np.arcsin(centre @ up / np.linalg.norm(centre)))


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    collection = json.load(open(f"{sys.argv[1]}/collection.json"))
    truth, frame = collection["images"], collection.get("canonical_frame", {})
    est = json.load(open(f"{sys.argv[2]}/result.json"))["images"]
    if len(truth) != len(est):
        sys.exit(f"{len(truth)} images in the collection, {len(est)} in the run (skipped images are not matched)")
    rows = []
    print("| image | error deg | error axis (camera x, y, z) | elevation est - true deg |")
    print("|---|---|---|---|")
    for i, (t, e) in enumerate(zip(truth, est)):
        r_true = np.asarray(t["camera_from_object"])[:3, :3]
        r_est = np.asarray(e["camera_from_object"])[:3, :3]
        angle, axis = axis_angle(r_est @ r_true.T)
        az_true, elev_true = true_viewpoint(t["camera_from_object"], frame)
        d_elev = true_viewpoint(e["camera_from_object"], frame)[1] - elev_true
        rows.append((angle, abs(axis[0]), d_elev, az_true, elev_true))
        print(f"| {i} | {angle:.1f} | {axis[0]:+.2f} {axis[1]:+.2f} {axis[2]:+.2f} | {d_elev:+.0f} |")
    print("\n| error band deg | images | axis within 26 / 35 deg of camera x | elevation est - true deg |")
    print("|---|---|---|---|")
    for lo, hi in [(0, 15), (15, 45), (45, 90), (90, 181)]:
        sel = [r for r in rows if lo <= r[0] < hi]
        tilt26 = sum(r[1] >= np.cos(np.radians(26)) for r in sel)
        tilt35 = sum(r[1] >= np.cos(np.radians(35)) for r in sel)
        print(f"| {lo}-{hi} | {len(sel)} | {tilt26} / {tilt35} | {' '.join(f'{r[2]:+.0f}' for r in sel)} |")
    print("\n| true camera (azimuth from the front axis, elevation) | images | median error deg | < 15 deg | > 90 deg |")
    print("|---|---|---|---|---|")
    for side, (a_lo, a_hi) in [("front", (0, 60)), ("side", (60, 120)), ("back", (120, 181))]:
        for band, (e_lo, e_hi) in [("low, < 15 deg", (-91, 15)), ("high, >= 15 deg", (15, 91))]:
            sel = [r[0] for r in rows if a_lo <= abs(r[3]) < a_hi and e_lo <= r[4] < e_hi]
            if sel:
                print(f"| {side} (|az| {a_lo}-{min(a_hi, 180)}), {band} | {len(sel)} | {np.median(sel):.1f} | "
                      f"{sum(e < 15 for e in sel)} | {sum(e > 90 for e in sel)} |")


if __name__ == "__main__":
    main()
