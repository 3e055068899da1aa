"""Ingestion benchmark of congeal_node: 640x480 rgb8 + mono8 mask at RATE Hz for SECONDS; prints the
fraction of frames stored, dropped-frame warnings, write lag and peak memory.
Usage: source .ros/env.sh && python scripts/bench_ingest.py [RATE] [SECONDS] [best_effort|reliable]"""
import os, sys, tempfile, time

import numpy as np
import rclpy
from sensor_msgs.msg import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "ros"))
from common import SENSOR, count_frames, image_msg, rss_mib, start_node, wait_for  # noqa
from rclpy.qos import QoSProfile, QoSReliabilityPolicy

rate = float(sys.argv[1]) if len(sys.argv) > 1 else 30.0
seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
data_dir = tempfile.mkdtemp(prefix="congeal-bench-")
log = os.path.join(data_dir, "node.log")
reliability = sys.argv[3] if len(sys.argv) > 3 else "best_effort"
proc = start_node(data_dir, extra=(f"input_reliability:={reliability}",), log=log)
rclpy.init()
n = rclpy.create_node("congeal_bench_peer")
qos = SENSOR if reliability == "best_effort" else QoSProfile(depth=10, reliability=QoSReliabilityPolicy.RELIABLE)
img_pub = n.create_publisher(Image, "/image", qos)
mask_pub = n.create_publisher(Image, "/mask", qos)
wait_for(lambda: img_pub.get_subscription_count() > 0 and mask_pub.get_subscription_count() > 0, 15, n)
time.sleep(1.0)
rng = np.random.default_rng(0)
rgb = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
mask = np.zeros((480, 640), np.uint8)
mask[100:380, 200:440] = 255
total = int(rate * seconds)
peak = rss_mib(proc.pid)
t0 = time.time()
for i in range(total):
    stamp_ns = 10_000_000_000 + int(i * 1e9 / rate)  # stamps as a camera at RATE Hz would give
    sec, ns = stamp_ns // 1_000_000_000, stamp_ns % 1_000_000_000
    img_pub.publish(image_msg(rgb, "rgb8", sec, ns))
    mask_pub.publish(image_msg(mask, "mono8", sec, ns))
    target = t0 + (i + 1) / rate
    while time.time() < target:
        rclpy.spin_once(n, timeout_sec=max(0.0, target - time.time()))
    if i % int(rate) == 0:
        peak = max(peak, rss_mib(proc.pid))
sent_s = time.time() - t0
t1 = time.time()
wait_for(lambda: count_frames(data_dir, "duck") >= total, 30, n)
lag = time.time() - t1
stored = count_frames(data_dir, "duck")
drops = sum(1 for line in open(log, errors="replace") if "ingestion queue full" in line)
print(f"published {total} frames (640x480 rgb8 + mask) at {total / sent_s:.1f} Hz; stored {stored} "
      f"({100.0 * stored / total:.1f}%); queue-full warnings {drops}; last frame on disk {lag:.2f}s after the "
      f"last publish; peak RSS {peak:.0f} MiB; input QoS {reliability}")
proc.kill()
n.destroy_node()
rclpy.shutdown()
