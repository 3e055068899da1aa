"""rclpy peer test of congeal_node: publish the demo collection (images, masks, camera_info), run
~/congeal with the template shape, check ~/pose against the ground truth, ~/get_pose, ~/register,
~/save_model + ~/load_model, the Marker and NOCS messages, bad input, and that services keep
answering while a job runs."""
import json, os, sys, tempfile, time

import numpy as np
import rclpy
from congeal_msgs.msg import Status, CongealResult
from congeal_msgs.srv import Congeal, GetPose, Register, SaveModel, LoadModel, SetCollecting, TransferKeypoints
from geometry_msgs.msg import PoseStamped
from sensor_msgs.msg import Image, CameraInfo
from visualization_msgs.msg import Marker

sys.path.insert(0, os.path.dirname(__file__))
from common import *  # noqa



def main():
    data_dir = tempfile.mkdtemp(prefix="congeal-ros-")
    log = os.path.join(data_dir, "node.log")
    proc = start_node(data_dir, log=log)
    rclpy.init()
    n = rclpy.create_node("congeal_test_peer")
    try:
        run(n, proc, data_dir)
    finally:
        alive = proc.poll() is None
        check(alive, "node still running at the end")
        proc.kill()
        proc.wait()
        n.destroy_node()
        rclpy.shutdown()
        if failures:
            print(open(log, errors="replace").read()[-4000:])
    print(f"{len(failures) == 0 and 'ALL PASSED' or 'FAILED: ' + '; '.join(failures)}")
    sys.exit(1 if failures else 0)


def run(n, proc, data_dir):
    frames = load_demo()
    img_pub = n.create_publisher(Image, "/image", SENSOR)
    mask_pub = n.create_publisher(Image, "/mask", SENSOR)
    info_pub = n.create_publisher(CameraInfo, "/camera_info", SENSOR)
    poses, statuses, results, markers, nocs = [], [], [], [], []
    n.create_subscription(PoseStamped, "/congeal/pose", poses.append, 100)
    n.create_subscription(Status, "/congeal/status", statuses.append, 100)
    n.create_subscription(CongealResult, "/congeal/result", results.append, LATCHED)
    n.create_subscription(Marker, "/congeal/canonical_mesh", markers.append, LATCHED)
    n.create_subscription(Image, "/congeal/nocs", nocs.append, 20)
    congeal = n.create_client(Congeal, "/congeal/congeal")
    get_pose = n.create_client(GetPose, "/congeal/get_pose")
    register = n.create_client(Register, "/congeal/register")
    save = n.create_client(SaveModel, "/congeal/save_model")
    load = n.create_client(LoadModel, "/congeal/load_model")
    collect = n.create_client(SetCollecting, "/congeal/set_collecting")
    transfer = n.create_client(TransferKeypoints, "/congeal/transfer_keypoints")

    check(wait_for(lambda: img_pub.get_subscription_count() > 0 and mask_pub.get_subscription_count() > 0, 15, n),
          "node subscribes to image and mask")
    check(congeal.wait_for_service(timeout_sec=10), "~/congeal available")

    # Bad input first: nothing of it may be stored, and the node must survive it.
    bad = [image_msg(np.zeros((4, 4), np.uint16), "16UC1", 1),
           image_msg(np.zeros((4, 8), np.uint8), "yuv422", 2)]
    for m in bad:
        img_pub.publish(m)
        mask_pub.publish(image_msg(np.zeros((4, 4), np.uint8), "mono8", m.header.stamp.sec))
    # Mask of the wrong size, and camera_info with NaN.
    f0 = frames[0]
    img_pub.publish(image_msg(f0["rgb"], "rgb8", 3))
    mask_pub.publish(image_msg(np.zeros((10, 10), np.uint8), "mono8", 3))
    nan_info = info_msg(np.full((3, 3), np.nan), f0["rgb"].shape[1], f0["rgb"].shape[0], 4)
    info_pub.publish(nan_info)
    img_pub.publish(image_msg(f0["rgb"], "rgb8", 4))
    mask_pub.publish(image_msg(f0["mask"], "mono8", 4))
    # A good image with an empty mask.
    img_pub.publish(image_msg(f0["rgb"], "rgb8", 5))
    mask_pub.publish(image_msg(np.zeros_like(f0["mask"]), "mono8", 5))
    wait_for(lambda: False, 1.5, n)
    check(proc.poll() is None, "node survives bad encodings, wrong mask size, empty mask, NaN camera_info")
    # Only the good image at stamp 4 may be stored, and without the NaN intrinsics.
    meta = json.load(open(os.path.join(data_dir, "duck", "collection.json"))) if count_frames(data_dir) else {"images": []}
    bad_stored = [(im["stamp_sec"], "K" in im) for im in meta["images"]]
    check(all(stamp == 4 and not has_k for stamp, has_k in bad_stored),
          f"bad frames were not stored, NaN camera_info was not used ({bad_stored})")

    # The demo collection (BGR for half of the frames). Inputs use sensor-data QoS (best effort): on a
    # loaded machine a frame can be lost, so a frame that did not arrive is sent again.
    for i, f in enumerate(frames):
        sec = 100 + i
        h, w = f["rgb"].shape[:2]
        for attempt in range(4):
            before = count_frames(data_dir)
            info_pub.publish(info_msg(f["K"], w, h, sec))
            if i % 2:
                img_pub.publish(image_msg(np.ascontiguousarray(f["rgb"][:, :, ::-1]), "bgr8", sec))
            else:
                img_pub.publish(image_msg(f["rgb"], "rgb8", sec))
            mask_pub.publish(image_msg(f["mask"], "mono8", sec))
            if wait_for(lambda: count_frames(data_dir) > before, 3, n):
                break
            print(f"frame {i} not stored yet, sending it again", flush=True)
    stamps = stored_stamps(data_dir)
    check(all(100 + i in stamps for i in range(len(frames))), f"all {len(frames)} frames stored ({sorted(stamps)})")

    # The job.
    req = Congeal.Request(category="duck", shape="template", template_path=os.path.join(DEMO, "template.obj"))
    resp, _ = call(n, congeal, req)
    check(resp.accepted and resp.job_id != "", f"~/congeal accepted: {resp.message}")
    again, _ = call(n, congeal, req)
    check(not again.accepted and "already running" in again.message, f"second job refused: {again.message}")
    # Services answer quickly while the job runs.
    latencies = []
    for _ in range(5):
        r, dt = call(n, get_pose, GetPose.Request(category="duck"))
        latencies.append(dt)
        wait_for(lambda: False, 0.2, n)
    check(max(latencies) < 0.5, f"~/get_pose answers while a job runs (max {max(latencies):.3f}s)")
    done = wait_for(lambda: any(s.done for s in statuses), 300, n)
    check(done and any(s.ok for s in statuses if s.done), "job finished ok: " + (statuses[-1].message if statuses else "no status"))
    check(len([s for s in statuses if not s.done]) >= 1, f"status while running ({len(statuses)} messages)")
    running = [s.message for s in statuses if not s.done]
    check(any("ETA" in m and "images" in m for m in running),
          f"~/status.message says stage, images and ETA while running ({running[-1:] if running else 'none'})")
    # The NOCS images (large, reliable QoS) can trail the poses on a loaded machine: wait for them too.
    wait_for(lambda: {p.header.stamp.sec for p in poses} >= {100 + i for i in range(len(frames))}
             and results and markers and nocs, 20, n)

    # Poses against the ground truth, matched by stamp.
    errs = []
    for p in poses:
        i = p.header.stamp.sec - 100
        if 0 <= i < len(frames):
            errs.append(rot_err_deg(quat_to_rot(p.pose.orientation), frames[i]["pose"][:3, :3]))
            check(p.header.frame_id == "camera", "pose header frame is the camera's") if len(errs) == 1 else None
    med = float(np.median(errs)) if errs else float("inf")
    print(f"{len(poses)} poses received, {len(errs)} of the demo frames", flush=True)
    check(len(errs) >= len(frames) and med <= 15.0, f"~/pose for every image, median rotation error {med:.2f} deg")
    check(bool(results) and len(results[-1].images) >= len(frames), "~/result latched with every image")
    if markers:
        m = markers[-1]
        check(m.type == Marker.TRIANGLE_LIST and m.header.frame_id == "congeal/duck" and m.ns == "congeal/duck"
              and len(m.points) % 3 == 0
              and len(m.points) > 0 and len(m.colors) == len(m.points), f"Marker TRIANGLE_LIST ({len(m.points)} points)")
    else:
        check(False, "Marker received")
    if nocs:
        im = nocs[0]
        check(im.encoding == "32FC3" and im.step == im.width * 12 and len(im.data) == im.step * im.height
              and im.header.frame_id == "camera", "NOCS 32FC3 with the source header")
    else:
        check(False, "NOCS image received")

    # get_pose by stamp.
    r, _ = call(n, get_pose, GetPose.Request(category="duck", stamp=poses[0].header.stamp))
    check(r.found and r.pose.header.stamp == poses[0].header.stamp and r.fov_deg > 1, f"~/get_pose found: {r.message}")
    r, _ = call(n, get_pose, GetPose.Request(category="duck"))
    check(not r.found and r.message, "~/get_pose of an unknown stamp says why")

    # transfer: the object centre of image 0 lands on image 1's object; a background pixel has no match.
    m0, m1 = frames[0]["mask"], frames[1]["mask"]
    ys, xs = np.nonzero(m0 > 127)
    src = [float(xs.mean()), float(ys.mean()), 0.0, 0.0]
    r, _ = call(n, transfer, TransferKeypoints.Request(category="duck", src_stamp=poses[0].header.stamp.__class__(sec=100),
                                                       dst_stamp=poses[0].header.stamp.__class__(sec=101), points=src))
    ok = r.ok and len(r.valid) == 2 and r.valid[0] and not r.valid[1]
    if ok:
        u, v = int(round(r.points[0])), int(round(r.points[1]))
        ok = m1[v, u] > 127
    check(ok, f"~/transfer_keypoints: {list(r.valid)} {list(r.points)} {r.message}")
    # The other methods by name (2D features alone, the canonical shape alone, the bbox guess, which the node
    # answers without DINOv2); an unknown one is refused by name.
    for method in ["2d", "3d", "bbox"]:
        r, _ = call(n, transfer, TransferKeypoints.Request(category="duck", src_stamp=poses[0].header.stamp.__class__(sec=100),
                                                           dst_stamp=poses[0].header.stamp.__class__(sec=101), points=src,
                                                           method=method))
        ok = r.ok and len(r.valid) == 2 and r.valid[0] and not r.valid[1]
        if ok:
            u, v = int(round(r.points[0])), int(round(r.points[1]))
            ok = m1[v, u] > 127
        check(ok, f"~/transfer_keypoints method {method}: {list(r.valid)} {list(r.points)} {r.message}")
    r, _ = call(n, transfer, TransferKeypoints.Request(category="duck", src_stamp=poses[0].header.stamp.__class__(sec=100),
                                                       dst_stamp=poses[0].header.stamp.__class__(sec=101), points=src,
                                                       method="nearest"))
    check(not r.ok and "nearest" in r.message, f"~/transfer_keypoints refuses an unknown method: {r.message}")

    # register a known image against the model.
    f = frames[3]
    h, w = f["rgb"].shape[:2]
    req = Register.Request(category="duck", image=image_msg(f["rgb"], "rgb8", 500),
                           mask=image_msg(f["mask"], "mono8", 500), camera_info=info_msg(f["K"], w, h, 500))
    r, dt = call(n, register, req, timeout=60)
    err = rot_err_deg(quat_to_rot(r.pose.pose.orientation), f["pose"][:3, :3]) if r.ok else float("inf")
    check(r.ok and err < 20 and r.nocs.encoding == "32FC3" and r.nocs.width == w,
          f"~/register: ok={r.ok} error {err:.1f} deg in {dt:.2f}s {r.message}")
    r2, dt2 = call(n, register, req, timeout=60)
    print(f"register latency: first {dt:.3f}s, cached candidates {dt2:.3f}s", flush=True)
    bad_reg = Register.Request(category="duck", image=image_msg(np.zeros((4, 4), np.uint16), "16UC1", 1))
    r, _ = call(n, register, bad_reg)
    check(not r.ok and "16UC1" in r.message, f"~/register rejects a bad image: {r.message}")

    # save / load model.
    model_dir = os.path.join(data_dir, "saved_model")
    r, _ = call(n, save, SaveModel.Request(category="duck", path=model_dir))
    check(r.ok and os.path.exists(os.path.join(model_dir, "model.json")), f"~/save_model: {r.message}")
    r, _ = call(n, load, LoadModel.Request(category="other", path=model_dir))
    check(r.ok, f"~/load_model: {r.message}")
    # A loaded model's surface is published too (a model folder holds no mesh), in its own namespace.
    other = lambda: [m for m in markers if m.ns == "congeal/other" and m.header.frame_id == "congeal/other"]
    check(wait_for(lambda: bool(other()) and len(other()[-1].points) > 0, 20, n),
          f"~/canonical_mesh for the loaded model ({[m.ns for m in markers]})")
    r, _ = call(n, load, LoadModel.Request(category="other", path="/nonexistent"))
    check(not r.ok and "nonexistent" in r.message, f"~/load_model of a missing folder says why: {r.message}")
    r, _ = call(n, collect, SetCollecting.Request(category="../evil", collecting=True))
    check(not r.ok, f"~/set_collecting refuses a bad category: {r.message}")


if __name__ == "__main__":
    main()
