"""congeal_node under stress: a flood of 1000 images at 100 Hz (memory stays bounded, services keep
answering, the ingestion queue drops the oldest), kill -9 while accumulating and while a job runs,
restart: the collection on disk is intact and the job can be rerun; after one more restart a late subscriber
gets the restored result and mesh (latched). A `category` that cannot name a folder is refused at start-up.
SIGINT with frames still queued writes them before the node exits."""
import json, os, signal, subprocess, sys, tempfile, time

import numpy as np
import rclpy
from congeal_msgs.msg import CongealResult, Status
from congeal_msgs.srv import Congeal, GetPose
from sensor_msgs.msg import Image
from visualization_msgs.msg import Marker
from diagnostic_msgs.msg import DiagnosticArray

sys.path.insert(0, os.path.dirname(__file__))
from common import *  # noqa



def collection_ok(data_dir, category):
    p = os.path.join(data_dir, category, "collection.json")
    meta = json.load(open(p))  # must parse: the index is written atomically
    for im in meta["images"]:
        for key in ("rgb", "mask"):
            if key in im:
                assert os.path.exists(os.path.join(data_dir, category, im[key])), im[key]
    return len(meta["images"])


def bad_values_are_refused(data_dir):
    for param, name in (("category:=../escape", "category"), ("collect_period:=-1.0", "collect_period")):
        proc = subprocess.run([NODE, "--ros-args", "-p", f"data_dir:={data_dir}", "-p", param],
                              capture_output=True, text=True, timeout=60)
        text = proc.stdout + proc.stderr
        check(proc.returncode != 0 and f"`{name}`" in text,
              f"{param} is refused at start-up, naming the parameter: rc {proc.returncode}, {text.strip()[-200:]}")


def main():
    data_dir = tempfile.mkdtemp(prefix="congeal-stress-")
    log = os.path.join(data_dir, "node.log")
    bad_values_are_refused(data_dir)
    rclpy.init()
    n = rclpy.create_node("congeal_stress_peer")
    img_pub = n.create_publisher(Image, "/image", SENSOR)
    mask_pub = n.create_publisher(Image, "/mask", SENSOR)
    get_pose = n.create_client(GetPose, "/congeal/get_pose")
    congeal = n.create_client(Congeal, "/congeal/congeal")
    statuses = []
    n.create_subscription(Status, "/congeal/status", statuses.append, 100)
    frames = load_demo()

    # The flood and the first kill go into category `flood`; the restarts collect `duck`.
    proc = start_node(data_dir, extra=("category:=flood",), log=log)
    try:
        check(wait_for(lambda: img_pub.get_subscription_count() > 0, 15, n), "node up")
        base_rss = rss_mib(proc.pid)
        # Flood: 1000 640x480 rgb8 images + masks at 100 Hz.
        rgb = np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)
        mask = np.zeros((480, 640), np.uint8)
        mask[100:380, 200:440] = 255
        peak = base_rss
        worst = 0.0
        t0 = time.time()
        for i in range(1000):
            sec, ns = 1000 + i // 100, (i % 100) * 10_000_000
            img_pub.publish(image_msg(rgb, "rgb8", sec, ns))
            mask_pub.publish(image_msg(mask, "mono8", sec, ns))
            if i % 100 == 0:
                _, dt = call(n, get_pose, GetPose.Request(category="duck"))
                worst = max(worst, dt)
                peak = max(peak, rss_mib(proc.pid))
            target = t0 + (i + 1) / 100.0
            while time.time() < target:
                rclpy.spin_once(n, timeout_sec=max(0.0, target - time.time()))
        wait_for(lambda: False, 3, n)
        peak = max(peak, rss_mib(proc.pid))
        stored = count_frames(data_dir, "flood")
        print(f"flood: {stored} of 1000 frames stored, RSS {base_rss:.0f} -> peak {peak:.0f} MiB, "
              f"worst service latency {worst:.3f}s", flush=True)
        check(proc.poll() is None, "node survives the flood")
        check(peak - base_rss < 400, f"memory bounded during the flood (+{peak - base_rss:.0f} MiB)")
        check(worst < 1.0, f"services answer during the flood ({worst:.3f}s)")
        check(stored > 0, "frames stored during the flood")

        # kill -9 while accumulating.
        for i in range(40):
            img_pub.publish(image_msg(rgb, "rgb8", 2000 + i))
            mask_pub.publish(image_msg(mask, "mono8", 2000 + i))
            rclpy.spin_once(n, timeout_sec=0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        try:
            flood = collection_ok(data_dir, "flood")
            check(flood >= stored, f"collection intact after kill -9 while accumulating ({flood} frames)")
        except Exception as e:  # noqa
            check(False, f"collection intact after kill -9 while accumulating: {e}")
            flood = 0
        before = 0

        # Restart: the collection is kept and grows; then kill -9 during a job, restart, rerun.
        proc = start_node(data_dir, log=log)
        check(wait_alive(n, get_pose, GetPose.Request(category="duck")), "node restarts")
        wait_for(lambda: False, 2.0, n)  # let the new subscriptions discover our publishers
        for i, f in enumerate(frames):
            for attempt in range(4):  # best-effort inputs: resend a frame that was lost
                img_pub.publish(image_msg(f["rgb"], "rgb8", 3000 + i))
                mask_pub.publish(image_msg(f["mask"], "mono8", 3000 + i))
                if wait_for(lambda: 3000 + i in stored_stamps(data_dir), 3, n):
                    break
        check(wait_for(lambda: count_frames(data_dir) >= before + len(frames), 20, n),
              f"the restarted node collects new frames ({count_frames(data_dir)} >= {before + len(frames)})")
        req = Congeal.Request(category="duck", shape="template", template_path=os.path.join(DEMO, "template.obj"))
        resp, _ = call(n, congeal, req)
        check(resp.accepted, f"job started: {resp.message}")
        wait_for(lambda: any(not s.done for s in statuses), 20, n)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        check(collection_ok(data_dir, "duck") >= len(frames) and collection_ok(data_dir, "flood") == flood,
              "collections intact after kill -9 during a job")
        proc = start_node(data_dir, log=log)
        check(wait_alive(n, get_pose, GetPose.Request(category="duck")), "node restarts after the killed job")
        statuses.clear()
        resp, _ = call(n, congeal, req)
        check(resp.accepted, f"the job can be rerun: {resp.message}")
        check(wait_for(lambda: any(s.done and s.ok for s in statuses), 300, n), "the rerun job finishes ok")
        # One more restart: the node latches the restored run again, so a late subscriber (RViz, a
        # planner started later) gets the result and the mesh without a new job.
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc = start_node(data_dir, log=log)
        check(wait_alive(n, get_pose, GetPose.Request(category="duck")), "node restarts after the rerun")
        results, markers = [], []
        n.create_subscription(CongealResult, "/congeal/result", results.append, LATCHED)
        n.create_subscription(Marker, "/congeal/canonical_mesh", markers.append, LATCHED)
        check(wait_for(lambda: any(r.category == "duck" and len(r.images) >= len(frames) for r in results), 20, n),
              f"the restored result is latched for a late subscriber ({[r.category for r in results]})")
        check(wait_for(lambda: any(m.ns == "congeal/duck" and len(m.points) > 0 for m in markers), 20, n),
              f"the restored mesh is latched, one namespace per category ({[m.ns for m in markers]})")
        proc.kill()
        proc.wait()

        # Ctrl-C right after the node has accepted every frame: all are on disk when it has exited, and
        # it exits 0 (it was killed before, rc -2). Reliable inputs, so every frame published reaches
        # the node; the signal comes once /diagnostics says each is stored or waiting to be
        # (`ingest_pending`). How many were still waiting depends on timing (often one or two); that the
        # shutdown waits for queued and in-progress frames is checked without timing in node.rs's
        # `drain_waits_for_queued_and_in_progress_entries`.
        diags = []
        n.create_subscription(DiagnosticArray, "/diagnostics", diags.append, 50)

        def pending():
            for d in reversed(diags):
                for st in d.status:
                    if st.name == "congeal: inputs":
                        return int({kv.key: kv.value for kv in st.values}.get("ingest_pending", 0))
            return 0

        proc = start_node(data_dir, extra=("category:=bye", "input_reliability:=reliable"), log=log)
        check(wait_alive(n, get_pose, GetPose.Request(category="bye")), "node up for the shutdown test")
        reliable = QoSProfile(depth=10, reliability=QoSReliabilityPolicy.RELIABLE)
        img_rel = n.create_publisher(Image, "/image", reliable)
        mask_rel = n.create_publisher(Image, "/mask", reliable)
        wait_for(lambda: img_rel.get_subscription_count() > 0 and mask_rel.get_subscription_count() > 0, 15, n)
        wait_for(lambda: False, 1.0, n)
        big = np.random.default_rng(1).integers(0, 255, (960, 1280, 3), dtype=np.uint8)
        big_mask = np.zeros((960, 1280), np.uint8)
        big_mask[200:760, 300:980] = 255
        small_rgb = np.random.default_rng(2).integers(0, 255, (120, 160, 3), dtype=np.uint8)
        small_mask = np.zeros((120, 160), np.uint8)
        small_mask[30:90, 40:120] = 255
        sent = 8
        for i in range(sent):
            img_rel.publish(image_msg(big, "rgb8", 5000 + i))
            mask_rel.publish(image_msg(big_mask, "mono8", 5000 + i))
            wait_for(lambda: False, 0.03, n)
        diags.clear()
        accepted = wait_for(lambda: count_frames(data_dir, "bye") + pending() >= sent, 30, n)
        at_signal = count_frames(data_dir, "bye")
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        stored = count_frames(data_dir, "bye")
        check(accepted and rc == 0 and stored == sent,
              f"SIGINT writes the queued frames before exiting (all accepted: {accepted}; rc {rc}; "
              f"{at_signal} on disk at the signal, {stored} of {sent} after)")

        # collect_period: frames every 0.2 s of stamps, one kept per second; the rest are counted.
        proc = start_node(data_dir, extra=("category:=period", "input_reliability:=reliable", "collect_period:=1.0"),
                          log=log)
        check(wait_alive(n, get_pose, GetPose.Request(category="period")), "node up for the collect_period test")
        wait_for(lambda: img_rel.get_subscription_count() > 0 and mask_rel.get_subscription_count() > 0, 15, n)
        wait_for(lambda: False, 1.0, n)
        diags.clear()
        for k in range(11):
            sec, ns = divmod(6000 * 10**9 + k * 200_000_000, 10**9)
            img_rel.publish(image_msg(small_rgb, "rgb8", sec, ns))
            mask_rel.publish(image_msg(small_mask, "mono8", sec, ns))
            wait_for(lambda: False, 0.05, n)

        def skipped():
            for d in reversed(diags):
                for st in d.status:
                    if st.name == "congeal: inputs":
                        return int({kv.key: kv.value for kv in st.values}.get("collect_skipped_period", -1))
            return -1
        wait_for(lambda: skipped() == 8 and len(stored_stamps(data_dir, "period")) == 3, 20, n)
        check(stored_stamps(data_dir, "period") == {6000, 6001, 6002} and skipped() == 8,
              f"collect_period 1 s keeps one frame per second of stamps (stored {sorted(stored_stamps(data_dir, 'period'))}, "
              f"{skipped()} counted as skipped)")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        n.destroy_node()
        rclpy.shutdown()
        if failures:
            print(open(log, errors="replace").read()[-3000:])
    print("ALL PASSED" if not failures else "FAILED: " + "; ".join(failures))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
