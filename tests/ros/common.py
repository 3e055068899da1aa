"""Shared helpers for the rclpy peer tests of congeal_node."""
import json, math, os, signal, subprocess, sys, time

import numpy as np
import rclpy
from rclpy.qos import QoSProfile, QoSDurabilityPolicy, QoSReliabilityPolicy, qos_profile_sensor_data
from PIL import Image as PILImage
from sensor_msgs.msg import Image, CameraInfo

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
NODE = os.path.join(ROOT, "target", "release", "congeal_node")
DEMO = os.path.join(ROOT, "demo", "duck")


failures = []


def check(cond, what):
    """Prints a PASS/FAIL line and records failures (the scripts exit non-zero if any)."""
    print(("PASS " if cond else "FAIL ") + what, flush=True)
    if not cond:
        failures.append(what)


def start_node(data_dir, extra=(), log=None):
    args = [NODE, "--ros-args", "-p", f"data_dir:={data_dir}", "-p", "category:=duck",
            "-p", f"config:={os.path.join(ROOT, 'config', 'fast.yaml')}", "-p", "slop:=0.01"]
    for a in extra:
        args += ["-p", a]
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)


def load_demo():
    meta = json.load(open(os.path.join(DEMO, "collection.json")))
    frames = []
    for im in meta["images"]:
        rgb = np.array(PILImage.open(os.path.join(DEMO, im["rgb"])).convert("RGB"))
        mask = np.array(PILImage.open(os.path.join(DEMO, im["mask"])).convert("L"))
        frames.append({"rgb": rgb, "mask": mask, "K": np.array(im["K"]), "pose": np.array(im["camera_from_object"]),
                       "file": im["rgb"]})
    return frames


def image_msg(arr, encoding, sec, nanosec=0, frame_id="camera"):
    m = Image()
    m.header.stamp.sec, m.header.stamp.nanosec, m.header.frame_id = sec, nanosec, frame_id
    m.height, m.width = arr.shape[0], arr.shape[1]
    m.encoding = encoding
    ch = 1 if arr.ndim == 2 else arr.shape[2]
    m.step = arr.shape[1] * ch * arr.itemsize
    m.data = arr.tobytes()
    return m


def info_msg(K, w, h, sec, nanosec=0):
    c = CameraInfo()
    c.header.stamp.sec, c.header.stamp.nanosec, c.header.frame_id = sec, nanosec, "camera"
    c.width, c.height = w, h
    c.k = [float(v) for v in np.asarray(K).reshape(-1)]
    return c


def quat_to_rot(q):
    x, y, z, w = q.x, q.y, q.z, q.w
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def rot_err_deg(a, b):
    c = (np.trace(a.T @ b) - 1) / 2
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))


def wait_for(pred, timeout, node=None, step=0.05):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if node is not None:
            rclpy.spin_once(node, timeout_sec=step)
        else:
            time.sleep(step)
        if pred():
            return True
    return pred()


def call(node, client, req, timeout=10.0):
    assert client.wait_for_service(timeout_sec=timeout), f"service {client.srv_name} not available"
    fut = client.call_async(req)
    t0 = time.time()
    rclpy.spin_until_future_complete(node, fut, timeout_sec=timeout)
    assert fut.done(), f"service {client.srv_name} did not answer within {timeout}s"
    return fut.result(), time.time() - t0


def wait_alive(node, client, request, timeout=30.0):
    """After a restart, DDS may still advertise the killed node's endpoints for a while: wait until a
    request is really answered (only a live node answers)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if client.wait_for_service(timeout_sec=1.0):
            fut = client.call_async(request)
            rclpy.spin_until_future_complete(node, fut, timeout_sec=2.0)
            if fut.done() and fut.result() is not None:
                return True
    return False


def rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def count_frames(data_dir, category="duck"):
    p = os.path.join(data_dir, category, "collection.json")
    try:
        return len(json.load(open(p))["images"])
    except (OSError, ValueError, KeyError):
        return 0


def stored_stamps(data_dir, category="duck"):
    p = os.path.join(data_dir, category, "collection.json")
    try:
        return {im["stamp_sec"] for im in json.load(open(p))["images"]}
    except (OSError, ValueError, KeyError):
        return set()


LATCHED = QoSProfile(depth=1, durability=QoSDurabilityPolicy.TRANSIENT_LOCAL, reliability=QoSReliabilityPolicy.RELIABLE)
SENSOR = qos_profile_sensor_data
