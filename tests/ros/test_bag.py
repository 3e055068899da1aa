"""End-to-end test of `congeal bag extract` / `congeal bag write` (MCAP, ROS 2 CDR).

Run with the ROS env sourced, after `cargo build --release --features ros --bin congeal`:
    . .ros/env.sh && python tests/ros/test_bag.py [--keep]
(`CONGEAL_BIN` overrides the binary.) Writes a bag from demo/duck with mcap-ros2-support (images,
masks, camera info, ground-truth poses, plus an unrelated topic and one corrupt image message),
extracts it, runs the tiny pipeline on the extracted collection and on demo/duck, evaluates, writes
the run as a bag and reads it back with rosbags and with mcap_ros2. Prints PASS/FAIL lines; exits
non-zero on any failure. Needs no PIL: PNGs are decoded with zlib + numpy.
"""
import json, math, os, shutil, struct, subprocess, sys, tempfile, zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("CONGEAL_BIN", str(ROOT / "target" / "release" / "congeal"))
DEMO = ROOT / "demo" / "duck"
CONFIG = ROOT / "config" / "tiny.yaml"
TEMPLATE = DEMO / "template.obj"

FAILS = []


def check(name, ok, detail=""):
    print(f"{'PASS' if ok else 'FAIL'}: {name}{(' - ' + str(detail)) if detail else ''}", flush=True)
    if not ok:
        FAILS.append(name)
    return ok


def read_png(path):
    """8-bit grey/RGB/RGBA non-interlaced PNG -> uint8 array (H, W[, C])."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    pos, idat = 8, b""
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    assert depth == 8 and interlace == 0 and ctype in (0, 2, 6), (path, depth, ctype, interlace)
    ch = {0: 1, 2: 3, 6: 4}[ctype]
    raw = zlib.decompress(idat)
    stride = w * ch
    out = np.zeros((h, stride), np.uint8)
    prev = np.zeros(stride, np.int32)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int32)
        if f == 0:
            cur = line
        elif f == 1:
            cur = np.cumsum(line.reshape(w, ch), axis=0).reshape(-1) % 256
        elif f == 2:
            cur = (line + prev) % 256
        else:
            cur = line.tolist()
            p = prev.tolist()
            for i in range(stride):
                a = cur[i - ch] if i >= ch else 0
                b = p[i]
                if f == 3:
                    cur[i] = (cur[i] + ((a + b) >> 1)) & 255
                else:
                    c = p[i - ch] if i >= ch else 0
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                    pr = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                    cur[i] = (cur[i] + pr) & 255
            cur = np.array(cur, np.int32)
        out[y] = cur
        prev = cur
    return out.reshape(h, w, ch) if ch > 1 else out.reshape(h, w)


def sh(args, **kw):
    print("$ " + " ".join(map(str, args)), flush=True)
    env = dict(os.environ, RUST_BACKTRACE="0")
    r = subprocess.run(list(map(str, args)), capture_output=True, text=True, env=env, **kw)
    if r.returncode != 0:
        print(r.stdout[-3000:], r.stderr[-3000:], sep="\n")
    return r


def msgdefs():
    from rosbags.typesys import Stores, get_typestore
    ts = get_typestore(Stores.ROS2_JAZZY)
    return {t: ts.generate_msgdef(t, ros_version=2)[0] for t in
            ["sensor_msgs/msg/Image", "sensor_msgs/msg/CameraInfo", "geometry_msgs/msg/PoseStamped",
             "std_msgs/msg/String"]}


def quat_from_matrix(R):
    """(x, y, z, w) from a rotation matrix (Shepperd)."""
    t = np.trace(R)
    if t > 0:
        s = math.sqrt(t + 1.0) * 2
        return ((R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s, 0.25 * s)
    i = int(np.argmax(np.diag(R)))
    j, k = (i + 1) % 3, (i + 2) % 3
    s = math.sqrt(1.0 + R[i, i] - R[j, j] - R[k, k]) * 2
    q = [0.0, 0.0, 0.0]
    q[i] = 0.25 * s
    q[j] = (R[j, i] + R[i, j]) / s
    q[k] = (R[k, i] + R[i, k]) / s
    w = (R[k, j] - R[j, k]) / s
    return (q[0], q[1], q[2], w)


def stamp_of(i):
    return 100 + i, 5000 + i  # sec, nanosec


def write_input_bag(path, meta):
    from mcap_ros2.writer import Writer
    defs = msgdefs()
    with open(path, "wb") as f:
        w = Writer(f)
        s_img = w.register_msgdef("sensor_msgs/msg/Image", defs["sensor_msgs/msg/Image"])
        s_info = w.register_msgdef("sensor_msgs/msg/CameraInfo", defs["sensor_msgs/msg/CameraInfo"])
        s_pose = w.register_msgdef("geometry_msgs/msg/PoseStamped", defs["geometry_msgs/msg/PoseStamped"])
        s_str = w.register_msgdef("std_msgs/msg/String", defs["std_msgs/msg/String"])
        for i, im in enumerate(meta["images"]):
            rgb = read_png(DEMO / im["rgb"])
            mask = read_png(DEMO / im["mask"])
            sec, ns = stamp_of(i)
            t = sec * 10**9 + ns

            def hdr(dt_ns=0):
                s, n = divmod(t + dt_ns, 10**9)
                return {"stamp": {"sec": s, "nanosec": n}, "frame_id": "duck_cam"}
            h, wd = rgb.shape[:2]
            # Images as bgr8 to exercise the conversion.
            w.write_message("/camera/image", s_img, {
                "header": hdr(), "height": h, "width": wd, "encoding": "bgr8", "is_bigendian": 0,
                "step": wd * 3, "data": rgb[:, :, ::-1].tobytes()}, log_time=t, publish_time=t)
            w.write_message("/camera/mask", s_img, {
                "header": hdr(2_000_000), "height": h, "width": wd, "encoding": "mono8", "is_bigendian": 0,
                "step": wd, "data": mask.tobytes()}, log_time=t + 2_000_000, publish_time=t + 2_000_000)
            K = np.array(im["K"], float)
            w.write_message("/camera/camera_info", s_info, {
                "header": hdr(), "height": h, "width": wd, "distortion_model": "plumb_bob",
                "d": [0.0] * 5, "k": K.reshape(-1).tolist(), "r": np.eye(3).reshape(-1).tolist(),
                "p": np.hstack([K, np.zeros((3, 1))]).reshape(-1).tolist(), "binning_x": 0, "binning_y": 0,
                "roi": {"x_offset": 0, "y_offset": 0, "height": 0, "width": 0, "do_rectify": False}},
                log_time=t, publish_time=t)
            P = np.array(im["camera_from_object"], float)
            qx, qy, qz, qw = quat_from_matrix(P[:3, :3])
            w.write_message("/gt/pose", s_pose, {
                "header": hdr(1_000_000),
                "pose": {"position": {"x": P[0, 3], "y": P[1, 3], "z": P[2, 3]},
                         "orientation": {"x": qx, "y": qy, "z": qz, "w": qw}}},
                log_time=t + 1_000_000, publish_time=t + 1_000_000)
            w.write_message("/chatter", s_str, {"data": f"frame {i}"}, log_time=t, publish_time=t)
        w.finish()


def add_corrupt_message(src, dst):
    """Copies the bag and adds one undecodable message on /camera/image."""
    from mcap.reader import make_reader
    from mcap.writer import Writer as McapWriter
    with open(src, "rb") as f, open(dst, "wb") as g:
        r = make_reader(f)
        w = McapWriter(g)
        w.start(profile="ros2", library="test_bag")
        schemas, chans = {}, {}
        for schema, channel, msg in r.iter_messages():
            if schema.id not in schemas:
                schemas[schema.id] = w.register_schema(schema.name, schema.encoding, schema.data)
            if channel.id not in chans:
                chans[channel.id] = w.register_channel(channel.topic, channel.message_encoding, schemas[schema.id])
            w.add_message(chans[channel.id], msg.log_time, msg.data, msg.publish_time)
            if channel.topic == "/camera/image" and "corrupt" not in chans:
                chans["corrupt"] = True
                w.add_message(chans[channel.id], msg.log_time + 500_000_000, b"\x00\x01\x00\x00\xff\xff\xff\x7f garbage",
                              msg.log_time + 500_000_000)
        w.finish()


def rot_deg(A, B):
    R = np.array(A)[:3, :3].T @ np.array(B)[:3, :3]
    return math.degrees(math.acos(max(-1.0, min(1.0, (np.trace(R) - 1) / 2))))


def main():
    keep = "--keep" in sys.argv
    tmp = Path(tempfile.mkdtemp(prefix="congeal-bag-"))
    meta = json.loads((DEMO / "collection.json").read_text())
    n = len(meta["images"])
    try:
        plain = tmp / "plain.mcap"
        write_input_bag(plain, meta)
        bag = tmp / "in.mcap"
        add_corrupt_message(plain, bag)
        check("input bag written", bag.is_file(), f"{bag.stat().st_size} bytes")

        coll = tmp / "extracted"
        r = sh([BIN, "bag", "extract", bag, "--image-topic", "/camera/image", "--mask-topic", "/camera/mask",
                "--camera-info-topic", "/camera/camera_info", "--pose-topic", "/gt/pose", "--category", "toy",
                "--out", coll, "--slop", "0.01",
                "--bbox", ",".join(map(str, meta["canonical_frame"]["bbox_min"] + meta["canonical_frame"]["bbox_max"]))])
        if not check("bag extract exits 0", r.returncode == 0):
            return
        print(r.stdout)
        rep = json.loads(r.stdout[:r.stdout.rindex("}") + 1])
        check("extract report counts", (rep["images"], rep["with_mask"], rep["with_camera_info"], rep["with_pose"]) == (n, n, n, n), rep)
        check("corrupt message reported", any("/camera/image" in s and "decode" in s for s in rep["skipped"]), rep["skipped"])
        check("unused topic reported", any("/chatter" in s for s in rep["skipped"]), rep["skipped"])
        c = json.loads((coll / "collection.json").read_text())
        ims = c["images"]
        check(f"collection has {n} images", len(ims) == n, len(ims))
        check("every image has mask and K", all("mask" in e and "K" in e for e in ims))
        kerr = max(np.abs(np.array(e["K"]) - np.array(m["K"])).max() for e, m in zip(ims, meta["images"]))
        check("K equals the demo's", kerr < 1e-9, kerr)
        px_ok = all(np.array_equal(read_png(coll / e["rgb"]), read_png(DEMO / m["rgb"])) and
                    np.array_equal(read_png(coll / e["mask"]) >= 128, read_png(DEMO / m["mask"]) >= 128)
                    for e, m in zip(ims, meta["images"]))
        check("pixels and masks round-trip (bgr8 -> rgb)", px_ok)
        perr = max(np.abs(np.array(e["camera_from_object"]) - np.array(m["camera_from_object"])).max()
                   for e, m in zip(ims, meta["images"]))
        check("ground-truth poses round-trip", perr < 1e-9, perr)
        check("stamps and frame ids stored",
              all((e["stamp_sec"], e["stamp_nanosec"], e["frame_id"]) == (*stamp_of(i), "duck_cam") for i, e in enumerate(ims)))
        r2 = sh([BIN, "bag", "extract", bag, "--image-topic", "/camera/image", "--out", coll])
        check("extract refuses to overwrite a collection", r2.returncode != 0 and "already" in r2.stderr, r2.stderr.strip()[-200:])
        # --period thins a recording by stamps (frames are 1 s apart here): 2.5 s keeps frames 0, 3 and 6.
        r2 = sh([BIN, "bag", "extract", bag, "--image-topic", "/camera/image", "--mask-topic", "/camera/mask",
                 "--out", tmp / "thin", "--slop", "0.01", "--period", "2.5"])
        thin_secs = []
        if r2.returncode == 0:
            thin_secs = [e["stamp_sec"] for e in json.loads((tmp / "thin" / "collection.json").read_text())["images"]]
        check("--period 2.5 keeps one frame per 2.5 s of stamps", thin_secs == [stamp_of(i)[0] for i in (0, 3, 6)]
              and "within --period" in r2.stdout, f"{thin_secs} {r2.stderr.strip()[-200:]}")
        r2 = sh([BIN, "bag", "extract", bag, "--image-topic", "/camera/image", "--out", tmp / "neg", "--period", "-1"])
        check("--period -1 is refused", r2.returncode != 0 and "--period" in r2.stderr, r2.stderr.strip()[-200:])
        r2 = sh([BIN, "bag", "extract", tmp / "missing.mcap", "--image-topic", "/x", "--out", tmp / "x"])
        check("missing bag is a clear error", r2.returncode != 0 and "missing.mcap" in r2.stderr and "panick" not in r2.stderr)
        # A recording cut off mid-way (no footer, the last chunk incomplete): what was recorded before
        # the cut is extracted, and the cut is reported.
        data = bag.read_bytes()
        (tmp / "cut.mcap").write_bytes(data[:int(len(data) * 0.7)])
        r2 = sh([BIN, "bag", "extract", tmp / "cut.mcap", "--image-topic", "/camera/image", "--mask-topic", "/camera/mask",
                 "--out", tmp / "cut", "--slop", "0.01"])
        cut_ok = r2.returncode == 0 and "panick" not in r2.stderr
        if cut_ok:
            rep2 = json.loads(r2.stdout[:r2.stdout.rindex("}") + 1])
            cut_ok = 0 < rep2["images"] < n and any("stopped" in s for s in rep2["skipped"])
        check("a cut-off bag yields the frames before the cut", cut_ok, (r2.stdout + r2.stderr).strip()[-300:])
        # A corrupted record the mcap reader panics on (an attachment without room for its CRC): the read
        # stops there with an error, not a crash (exit code 101).
        rec = lambda op, body: bytes([op]) + struct.pack("<Q", len(body)) + body
        (tmp / "att.mcap").write_bytes(b"\x89MCAP0\r\n" + rec(0x01, struct.pack("<II", 0, 0))
                                       + rec(0x09, struct.pack("<QQIIQ", 0, 0, 0, 0, 0)))
        r2 = sh([BIN, "bag", "extract", tmp / "att.mcap", "--image-topic", "/x", "--out", tmp / "att"])
        check("a corrupted record ends the read with an error, not a crash", r2.returncode == 1 and "no decodable" in r2.stderr,
              f"rc {r2.returncode}: {r2.stderr.strip()[-200:]}")
        (tmp / "junk.mcap").write_bytes(b"not an mcap file at all")
        r2 = sh([BIN, "bag", "extract", tmp / "junk.mcap", "--image-topic", "/x", "--out", tmp / "y"])
        check("junk bag is a clear error", r2.returncode != 0 and "panick" not in r2.stderr, r2.stderr.strip()[-200:])

        run = tmp / "run"
        r = sh([BIN, "run", coll, "--out", run, "--config", CONFIG, "--template", TEMPLATE])
        if not check("congeal run on the extracted collection", r.returncode == 0):
            return
        res = json.loads((run / "result.json").read_text())
        check(f"run posed {n} images", len(res["images"]) == n, len(res["images"]))

        r = sh([BIN, "eval", coll, run])
        if check("congeal eval on the extracted collection", r.returncode == 0, r.stderr.strip()[-300:]):
            ev = json.loads(r.stdout)
            check(f"eval uses the bag's ground truth for {n} images", ev.get("n_evaluated") == n, ev.get("n_evaluated"))

        run_demo = tmp / "run_demo"
        r = sh([BIN, "run", DEMO, "--out", run_demo, "--config", CONFIG, "--template", TEMPLATE])
        if check("congeal run on demo/duck", r.returncode == 0):
            res_d = {im["file"]: im for im in json.loads((run_demo / "result.json").read_text())["images"]}
            # Extracted image i (stamp order) is demo image i (file names differ: 001 vs 005, ...).
            demo_of = {e["rgb"]: m["rgb"] for e, m in zip(ims, meta["images"])}
            diffs = [rot_deg(im["camera_from_object"], res_d[demo_of[im["file"]]]["camera_from_object"])
                     for im in res["images"] if demo_of.get(im["file"]) in res_d]
            med = float(np.median(diffs)) if diffs else float("nan")
            check("extracted vs demo: median rotation difference < 5 deg", len(diffs) == n and med < 5.0,
                  f"median {med:.3f} deg, max {max(diffs):.3f} deg over {len(diffs)}")

        out = tmp / "out.mcap"
        r = sh([BIN, "bag", "write", run, "--collection", coll, "--out", out])
        if not check("bag write exits 0", r.returncode == 0):
            return
        print(r.stdout)
        expect = {e["rgb"]: (e["stamp_sec"], e["stamp_nanosec"]) for e in ims}
        want_stamps = sorted(expect[im["file"]] for im in res["images"])
        want_pose = {expect[im["file"]]: np.array(im["camera_from_object"]) for im in res["images"]}

        # rosbags (schemas parsed from the bag's own message definitions).
        from rosbags.highlevel import AnyReader
        got = {"/congeal/pose": [], "/congeal/nocs": []}
        with AnyReader([out]) as reader:
            types = {c.topic: c.msgtype for c in reader.connections}
            for conn, _t, raw in reader.messages():
                got[conn.topic].append(reader.deserialize(raw, conn.msgtype))
        check("rosbags: topic types", types == {"/congeal/pose": "geometry_msgs/msg/PoseStamped",
                                                "/congeal/nocs": "sensor_msgs/msg/Image"}, types)
        poses, nocs = got["/congeal/pose"], got["/congeal/nocs"]
        check(f"rosbags: {n} PoseStamped", len(poses) == n, len(poses))
        check(f"rosbags: {n} Image", len(nocs) == n, len(nocs))
        st = sorted((m.header.stamp.sec, m.header.stamp.nanosec) for m in poses)
        check("rosbags: pose stamps match the collection", st == want_stamps, st[:3])
        check("rosbags: frame ids", all(m.header.frame_id == "duck_cam" for m in poses + nocs))
        ok = True
        for m in poses:
            P = want_pose[(m.header.stamp.sec, m.header.stamp.nanosec)]
            q = quat_from_matrix(P[:3, :3])
            o, p = m.pose.orientation, m.pose.position
            ok &= abs(abs(np.dot(q, (o.x, o.y, o.z, o.w))) - 1) < 1e-6 and np.allclose(P[:3, 3], (p.x, p.y, p.z), atol=1e-9)
        check("rosbags: poses equal result.json", ok)
        ok = True
        for m in nocs:
            ok &= m.encoding == "32FC3" and m.step == m.width * 12 and len(m.data) == m.step * m.height
            arr = np.frombuffer(bytes(m.data), "<f4").reshape(m.height, m.width, 3)
            fin = np.isfinite(arr).all(axis=2)
            ok &= fin.any() and (~fin).any() and float(arr[fin].min()) >= 0 and float(arr[fin].max()) <= 1
        check("rosbags: NOCS images are 32FC3 in [0,1] with NaN background", ok)
        check("rosbags: nocs stamps match", sorted((m.header.stamp.sec, m.header.stamp.nanosec) for m in nocs) == want_stamps)

        # mcap_ros2 reader.
        from mcap_ros2.reader import read_ros2_messages
        cnt = {"/congeal/pose": 0, "/congeal/nocs": 0}
        st2, enc = [], set()
        for m in read_ros2_messages(str(out)):
            cnt[m.channel.topic] += 1
            if m.channel.topic == "/congeal/pose":
                st2.append((m.ros_msg.header.stamp.sec, m.ros_msg.header.stamp.nanosec))
            else:
                enc.add(m.ros_msg.encoding)
            check_schema = m.schema.encoding == "ros2msg" and m.channel.message_encoding == "cdr"
            if not check_schema:
                break
        check("mcap_ros2: schema encoding ros2msg, message encoding cdr", check_schema)
        check(f"mcap_ros2: {n} PoseStamped + {n} Image", cnt == {"/congeal/pose": n, "/congeal/nocs": n}, cnt)
        check("mcap_ros2: stamps and encoding", sorted(st2) == want_stamps and enc == {"32FC3"}, (st2[:2], enc))
    finally:
        if keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"{'FAIL' if FAILS else 'PASS'}: test_bag ({len(FAILS)} failure(s){': ' + ', '.join(FAILS) if FAILS else ''})")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # a crash is a failure, reported as such
        import traceback
        traceback.print_exc()
        FAILS.append(f"exception: {e}")
        print(f"FAIL: test_bag crashed: {e}")
    sys.exit(1 if FAILS else 0)
