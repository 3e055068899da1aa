#!/usr/bin/env python3
"""Peak memory of `congeal bag extract` against the bag's size.

Writes a bag of FRAMES camera frames (rgb8 WIDTHxHEIGHT images of noise, mono8 masks 2 ms later,
camera info), extracts it, and prints the bag's size, the extract's peak resident memory (the child's
ru_maxrss) and its wall time. Run with the ROS env sourced, after
`cargo build --release --features ros --bin congeal`:
    . .ros/env.sh && python scripts/bench/bag_memory.py [FRAMES] [WIDTH] [HEIGHT]
(defaults 60 1280 960; `CONGEAL_BIN` overrides the binary). Needs mcap-ros2-support and rosbags,
which `scripts/setup.sh --ros` installs.
"""
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("CONGEAL_BIN", str(ROOT / "target" / "release" / "congeal"))


def write_bag(path, frames, width, height):
    from mcap_ros2.writer import Writer
    from rosbags.typesys import Stores, get_typestore

    ts = get_typestore(Stores.ROS2_JAZZY)
    defs = {t: ts.generate_msgdef(t, ros_version=2)[0] for t in ["sensor_msgs/msg/Image", "sensor_msgs/msg/CameraInfo"]}
    rng = np.random.default_rng(0)
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 255
    f = width * 1.2
    k = [f, 0.0, width / 2, 0.0, f, height / 2, 0.0, 0.0, 1.0]
    with open(path, "wb") as out:
        w = Writer(out)
        s_img = w.register_msgdef("sensor_msgs/msg/Image", defs["sensor_msgs/msg/Image"])
        s_info = w.register_msgdef("sensor_msgs/msg/CameraInfo", defs["sensor_msgs/msg/CameraInfo"])
        for i in range(frames):
            t = (100 + i) * 10**9

            def hdr(dt=0):
                return {"stamp": {"sec": (t + dt) // 10**9, "nanosec": (t + dt) % 10**9}, "frame_id": "cam"}
            rgb = rng.integers(0, 256, (height, width, 3), np.uint8)
            w.write_message("/camera/image", s_img, {
                "header": hdr(), "height": height, "width": width, "encoding": "rgb8", "is_bigendian": 0,
                "step": 3 * width, "data": rgb.tobytes()}, log_time=t, publish_time=t)
            w.write_message("/camera/mask", s_img, {
                "header": hdr(2_000_000), "height": height, "width": width, "encoding": "mono8",
                "is_bigendian": 0, "step": width, "data": mask.tobytes()},
                log_time=t + 2_000_000, publish_time=t + 2_000_000)
            w.write_message("/camera/camera_info", s_info, {
                "header": hdr(), "height": height, "width": width, "distortion_model": "plumb_bob",
                "d": [0.0] * 5, "k": k, "r": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0],
                "p": [f, 0.0, width / 2, 0.0, 0.0, f, height / 2, 0.0, 0.0, 0.0, 1.0, 0.0], "binning_x": 0,
                "binning_y": 0, "roi": {"x_offset": 0, "y_offset": 0, "height": 0, "width": 0, "do_rectify": False}},
                log_time=t, publish_time=t)
        w.finish()


def main():
    args = [int(a) for a in sys.argv[1:]]
    frames, width, height = (args + [60, 1280, 960][len(args):])[:3]
    with tempfile.TemporaryDirectory(prefix="congeal-bagmem-") as tmp:
        bag = Path(tmp) / "frames.mcap"
        write_bag(bag, frames, width, height)
        size = bag.stat().st_size
        start = time.time()
        r = subprocess.run([BIN, "bag", "extract", str(bag), "--image-topic", "/camera/image", "--mask-topic",
                            "/camera/mask", "--camera-info-topic", "/camera/camera_info", "--out",
                            str(Path(tmp) / "out")], capture_output=True, text=True)
        wall = time.time() - start
        if r.returncode != 0:
            sys.exit(f"bag extract failed ({r.returncode}):\n{r.stderr[-2000:]}")
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
        written = len(list((Path(tmp) / "out" / "rgb").glob("*.png")))
        print(f"bag extract: {frames} frames of {width}x{height} ({written} written), bag {size / 2**20:.0f} MiB, "
              f"peak RSS {peak / 2**20:.0f} MiB ({peak / size:.2f} x the bag), {wall:.1f} s")


if __name__ == "__main__":
    main()
