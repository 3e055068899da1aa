"""rclpy peer test of congeal_node's live mode: a rendered orbit of the duck (640x480, mask and
camera_info topics, one deliberate jump of the camera) is published frame by frame against a model
loaded with ~/load_model; every frame's ~/detections (vision_msgs), /tf (camera -> congeal/duck) and
~/pose are checked against the ground truth; ~/reset forces a re-initialisation; /diagnostics reports
rates, tracking state and latency; a burst of frames is skipped (newest wins), not queued. The node
starts without a parameters file (built-in CPU profile). A parameter of the wrong type is refused."""
import json, os, subprocess, sys, tempfile, time

import numpy as np
import rclpy
from congeal_msgs.srv import LoadModel
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped
from sensor_msgs.msg import Image, CameraInfo
from std_srvs.srv import Trigger
from tf2_msgs.msg import TFMessage
from vision_msgs.msg import Detection3DArray
from PIL import Image as PILImage

sys.path.insert(0, os.path.dirname(__file__))
from common import *  # noqa

CLI = os.path.join(ROOT, "target", "release", "congeal")
TEMPLATE = os.path.join(DEMO, "template.obj")
FRAMES, JUMP = 24, 14
RECOVERY = 3  # frames allowed to re-initialise after the jump


def render_orbit(out):
    subprocess.run([CLI, "render-orbit", TEMPLATE, "--out", out, "--frames", str(FRAMES), "--jumps", str(JUMP),
                    "--width", "640", "--height", "480"], check=True, stdout=subprocess.DEVNULL)
    meta = json.load(open(os.path.join(out, "orbit.json")))
    frames = []
    for f in meta["frames"]:
        frames.append({"rgb": np.array(PILImage.open(os.path.join(out, f["rgb"])).convert("RGB")),
                       "mask": np.array(PILImage.open(os.path.join(out, f["mask"])).convert("L")),
                       "K": np.array(f["K"]), "pose": np.array(f["camera_from_object"]), "jump": f["jump"]})
    return meta, frames


def wrong_type_is_refused(data_dir):
    proc = subprocess.run([NODE, "--ros-args", "-p", f"data_dir:={data_dir}", "-p", "slop:=1"],
                          capture_output=True, text=True, timeout=60)
    text = proc.stdout + proc.stderr
    check(proc.returncode != 0 and "slop" in text and "1.0" in text,
          f"slop:=1 (an integer) is refused with a clear message: rc {proc.returncode}, {text.strip()[-200:]}")


def main():
    data_dir = tempfile.mkdtemp(prefix="congeal-track-")
    wrong_type_is_refused(data_dir)
    meta, frames = render_orbit(os.path.join(data_dir, "orbit"))
    log = os.path.join(data_dir, "node.log")
    # No parameters file: the built-in defaults (fast profile on a CPU), tracking on by default.
    # Reliable inputs: 640x480 frames are often lost best-effort (see config/congeal_node.yaml).
    proc = subprocess.Popen([NODE, "--ros-args", "-p", f"data_dir:={data_dir}", "-p", "category:=duck",
                             "-p", "collect:=false", "-p", "input_reliability:=reliable"],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    rclpy.init()
    n = rclpy.create_node("congeal_track_peer")
    try:
        run(n, data_dir, meta, frames)
    finally:
        check(proc.poll() is None, "node still running at the end")
        proc.kill()
        proc.wait()
        n.destroy_node()
        rclpy.shutdown()
        if failures:
            print(open(log, errors="replace").read()[-4000:])
    print(f"{len(failures) == 0 and 'ALL PASSED' or 'FAILED: ' + '; '.join(failures)}")
    sys.exit(1 if failures else 0)


def publish(n, pubs, f, sec, frame_id="camera_optical"):
    img_pub, mask_pub, info_pub = pubs
    h, w = f["rgb"].shape[:2]
    img_pub.publish(image_msg(f["rgb"], "rgb8", sec, frame_id=frame_id))
    mask_pub.publish(image_msg(f["mask"], "mono8", sec, frame_id=frame_id))
    info_pub.publish(info_msg(f["K"], w, h, sec))


def run(n, data_dir, meta, frames):
    reliable = QoSProfile(depth=20, reliability=QoSReliabilityPolicy.RELIABLE)
    pubs = (n.create_publisher(Image, "/image", reliable), n.create_publisher(Image, "/mask", reliable),
            n.create_publisher(CameraInfo, "/camera_info", reliable))
    dets, tfs, diags, poses = {}, {}, [], {}
    n.create_subscription(Detection3DArray, "/congeal/detections",
                          lambda m: dets.setdefault(m.header.stamp.sec, m), 50)
    n.create_subscription(TFMessage, "/tf", lambda m: [tfs.setdefault(t.header.stamp.sec, t) for t in m.transforms], 100)
    n.create_subscription(DiagnosticArray, "/diagnostics", diags.append, 50)
    n.create_subscription(PoseStamped, "/congeal/pose", lambda m: poses.setdefault(m.header.stamp.sec, m), 50)
    load = n.create_client(LoadModel, "/congeal/load_model")
    reset = n.create_client(Trigger, "/congeal/reset")

    check(wait_for(lambda: all(p.get_subscription_count() > 0 for p in pubs), 15, n), "node subscribes to the inputs")
    r, _ = call(n, load, LoadModel.Request(category="duck", path=os.path.join(data_dir, "orbit", "model")), timeout=30)
    check(r.ok, f"~/load_model: {r.message}")

    # One frame at a time (each waits for its detection), so every frame is tracked and checked.
    errors, recovered_after = [], None
    bbox_size = np.array(meta["bbox_max"]) - np.array(meta["bbox_min"])
    for i, f in enumerate(frames):
        sec = 1000 + i
        timeout = 60 if i == 0 else 15  # the first frame computes the candidates' features
        publish(n, pubs, f, sec)
        wait_for(lambda: sec in dets and sec in tfs, timeout, n)
        if sec not in dets:
            check(False, f"detection for frame {i}")
            errors.append(float("inf"))
            continue
        d = dets[sec]
        ok = (len(d.detections) == 1 and d.header.frame_id == "camera_optical"
              and len(d.detections[0].results) == 1 and d.detections[0].results[0].hypothesis.class_id == "duck")
        if i == 0:
            check(ok, "Detection3DArray: one detection, class_id = category, the frame's header")
            h = d.detections[0].results[0]
            check(0.0 < h.hypothesis.score <= 1.0, f"score is the fit in (0, 1]: {h.hypothesis.score:.3f}")
            size = d.detections[0].bbox.size
            check(np.allclose([size.x, size.y, size.z], bbox_size, rtol=1e-3),
                  f"bbox size = the canonical bbox {bbox_size} ({size.x:.4f}, {size.y:.4f}, {size.z:.4f})")
        truth = f["pose"]
        p = dets[sec].detections[0].results[0].pose.pose
        err = rot_err_deg(quat_to_rot(p.orientation), truth[:3, :3])
        terr = np.linalg.norm(np.array([p.position.x, p.position.y, p.position.z]) - truth[:3, 3]) / np.linalg.norm(truth[:3, 3])
        errors.append(err)
        t = tfs.get(sec)
        if t is not None:
            tr = t.transform
            tf_err = rot_err_deg(quat_to_rot(tr.rotation), truth[:3, :3])
            same = abs(tf_err - err) < 1e-6 and abs(tr.translation.z - p.position.z) < 1e-9
            if i == 0:
                check(t.header.frame_id == "camera_optical" and t.child_frame_id == "congeal/duck" and same,
                      f"/tf camera_optical -> congeal/duck with the detection's pose ({t.header.frame_id} -> {t.child_frame_id})")
        else:
            check(False, f"/tf for frame {i}")
        if sec in poses:
            q = poses[sec].pose.orientation
            check(abs(rot_err_deg(quat_to_rot(q), truth[:3, :3]) - err) < 1e-6, f"~/pose = the detection's pose (frame {i})") if i == 0 else None
        if i >= JUMP and recovered_after is None and err <= 15.0:
            recovered_after = i - JUMP
        print(f"frame {i:2d}: rotation error {err:6.2f} deg, translation {terr:.3f}{' (jump)' if f['jump'] else ''}", flush=True)

    steady = [e for i, e in enumerate(errors) if not (JUMP <= i < JUMP + RECOVERY)]
    med = float(np.median(errors))
    check(med <= 5.0, f"median rotation error {med:.2f} deg <= 5")
    check(max(steady) <= 15.0, f"no frame > 15 deg outside the {RECOVERY} frames after the jump (max {max(steady):.2f})")
    check(recovered_after is not None and recovered_after < RECOVERY,
          f"re-initialised within {RECOVERY} frames of the jump (after {recovered_after})")

    # ~/reset: the next frame is re-initialised (the diagnostics say so) and still posed correctly.
    r, _ = call(n, reset, Trigger.Request())
    check(r.success, f"~/reset: {r.message}")
    f, sec = frames[-1], 2000
    publish(n, pubs, f, sec)
    got = wait_for(lambda: sec in dets, 20, n)
    state = lambda: [kv.value for a in diags for s in a.status if s.name == "congeal: tracking" for kv in s.values if kv.key == "state"]
    wait_for(lambda: any("reset" in v for v in state()), 3, n)
    err = rot_err_deg(quat_to_rot(dets[sec].detections[0].results[0].pose.pose.orientation), f["pose"][:3, :3]) if got else 1e9
    check(got and err <= 15.0 and any("reset" in v for v in state()),
          f"after ~/reset the frame is re-initialised ({state()[-1:]}) with error {err:.2f} deg")

    # A camera that leaves frame_id empty: tf2 refuses a transform without a parent, so no /tf, but the
    # detection and the pose are still published.
    sec = 2500
    publish(n, pubs, frames[-1], sec, frame_id="")
    got = wait_for(lambda: sec in dets and sec in poses, 20, n)
    wait_for(lambda: sec in tfs, 2, n)
    check(got and sec not in tfs, f"empty frame_id: detection and pose published ({got}), no /tf ({sec not in tfs})")

    # Burst: 15 frames back to back; the node skips what it cannot track (newest wins) and keeps up.
    for k in range(15):
        publish(n, pubs, frames[k % len(frames)], 3000 + k)
        rclpy.spin_once(n, timeout_sec=0.01)
    wait_for(lambda: 3014 in dets, 20, n)
    burst = [s for s in dets if s >= 3000]
    check(3014 in dets, f"the newest frame of a burst is tracked ({len(burst)} of 15 tracked)")

    # Diagnostics at 1 Hz with rates, drops, tracking state and latency.
    wait_for(lambda: False, 2.5, n)
    names = {s.name for a in diags for s in a.status}
    check({"congeal: inputs", "congeal: tracking", "congeal: jobs"} <= names, f"/diagnostics statuses: {sorted(names)}")
    values = {}
    for a in diags:
        for s in a.status:
            for kv in s.values:
                values.setdefault(kv.key, []).append(kv.value)
    rates = [float(v) for v in values.get("image_rate_hz", [])]
    lat = [float(v) for v in values.get("latency_median_ms", []) if v not in ("", "NaN", "nan")]
    skipped = [int(v) for v in values.get("tracking_skipped_newest_wins", [])]
    print(f"diagnostics: {len(diags)} arrays, max image rate {max(rates or [0]):.1f} Hz, latency median {lat[-1:]} ms, "
          f"skipped {skipped[-1:]}", flush=True)
    check(max(rates or [0]) > 0.5, "image rate reported")
    check(bool(lat) and lat[-1] > 0, f"tracking latency reported ({lat[-1:]} ms)")
    # Every burst frame is either tracked or skipped (a few may be lost in best-effort transport).
    check(bool(skipped) and skipped[-1] + len(burst) == 15,
          f"burst: {len(burst)} tracked + {skipped[-1:]} skipped newest-wins = 15, none queued")
    check(any(v.startswith("tracking") or v.startswith("reinit") for v in values.get("state", [])), "tracking state reported")


if __name__ == "__main__":
    main()
