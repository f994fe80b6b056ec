"""Benchmark: a progressive model's iterations per frame, fixed against following the link, when the link slows down
partway.

    python benchmarks/adaptive_rate.py --profile progressive.yaml --plot docs/adaptive-rate.png
    python benchmarks/adaptive_rate.py --double          # the tests' stand-in model: the mechanism, not a codec
    python benchmarks/adaptive_rate.py --double --fault stop --slow 3    # the host stopped (SIGSTOP) for 3 s

One edge process streams photos (``--photos``, looped, paced at ``--fps`` like a camera) live to one host process on
loopback, through a TCP proxy in this process that carries the edge's bytes at full speed for ``--before`` seconds,
then at ``--slow-fraction`` of the bytes per second that full-quality frames need (K iterations at ``--fps``) for
``--slow`` seconds, then at full speed again for ``--after`` seconds (a link that degrades, then recovers: what the
rate controller is for; a host that decodes slower per frame is no case for fewer bytes). ``--fault stop``: the host
process is stopped (SIGSTOP) for the ``--slow`` seconds instead, then continued (SIGCONT). Two runs, the same frames:

- ``--rate fixed``: every frame gets the model's K iterations;
- ``--rate adaptive``: each frame's iterations follow the link (edge/rate.py), from 1 to K.

Per run and phase: frames captured, decoded and dropped (live delivery, ``--drop oldest``), latency (capture to
decoded, ms, the edge's records), iterations and bytes per frame, and PSNR (dB) of the host's PNGs against the same
source frames preprocessed as the edge does. ``--plot``: iterations, latency and PSNR per frame over time.
Figures, not a test: the processes share this machine's cores.
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


class ThrottledProxy(object):
    """A TCP proxy for one connection at a time: edge -> host at ``rate`` bytes/s (None: as fast as it goes), host
    -> edge unthrottled. ``t_first``: when the edge's first byte arrived (time.monotonic())."""

    CHUNK = 1024  # bytes forwarded at a time: a throttled frame trickles as it would on a slow link

    def __init__(self, upstream):
        self.upstream = upstream
        self.rate = None
        self.t_first = None
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(4)
        self.address = "127.0.0.1:{}".format(self.server.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                edge, _ = self.server.accept()
            except OSError:
                return
            edge.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # little hidden queue before the throttle
            host = socket.create_connection(self.upstream)
            for args in ((edge, host, True), (host, edge, False)):
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    def _pump(self, src, dst, throttled):
        try:
            while True:
                data = src.recv(self.CHUNK if throttled else 65536)
                if not data:
                    break
                if throttled and self.t_first is None:
                    self.t_first = time.monotonic()
                dst.sendall(data)
                rate = self.rate if throttled else None
                if rate:
                    time.sleep(len(data) / float(rate))
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.server.close()


def shrink_photos(folder, out, size):
    """Copies of the images in ``folder`` at most ``size`` pixels a side (PNG, same names and order) in ``out``."""
    import cv2

    os.makedirs(out, exist_ok=True)
    for name in sorted(os.listdir(folder)):
        image = cv2.imread(os.path.join(folder, name))
        if image is None:
            continue
        scale = min(1.0, float(size) / max(image.shape[:2]))
        if scale < 1.0:
            image = cv2.resize(image, (int(round(image.shape[1] * scale)), int(round(image.shape[0] * scale))),
                               interpolation=cv2.INTER_AREA)
        cv2.imwrite(os.path.join(out, os.path.splitext(name)[0] + ".png"), image)
    return out


def source_frames(photos, profile):
    """The source's frames as the edge sees them after preprocessing: BGR uint8 images, in the source's order."""
    from latentlink.edge.preprocess import Preprocessor, to_image
    from latentlink.edge.sources import open_source

    pre = Preprocessor(profile.input.width, profile.input.height, profile.input.fit)
    frames = []
    with open_source("file://" + photos) as source:
        while True:
            got = source.read()
            if got is None:
                return frames
            frames.append(to_image(pre(got[0])))


def full_rate_bytes(profile, encoder_path, photos, entropy):
    """Bytes on the wire of one full-quality frame (K iterations) of the first photo, and K."""
    from latentlink.edge.preprocess import Preprocessor
    from latentlink.edge.protocol import VERSION_2, code_latents, frame_payload
    from latentlink.edge.rate import open_model
    from latentlink.edge.sources import open_source

    with open_source("file://" + photos) as source:
        frame = source.read()[0]
    with open_model(encoder_path, "encoder") as encoder:
        k = encoder.max_iterations
        codes, _ = encoder.encode(Preprocessor(profile.input.width, profile.input.height, profile.input.fit)(frame),
                                  k)
        context = encoder.context_model(k) if entropy == "context" else None
        payload = code_latents(codes, "bits", entropy, context)
        return len(frame_payload("cam", 0, 0.0, codes, "bits", payload, entropy, VERSION_2, iterations=k)), k


def run(work, label, args, profile_path, rate_args, slow_rate):
    """One host, the proxy and one edge; returns the edge's report, and the time the slow phase began (s from the
    edge's first byte; frame seq is captured at seq / fps)."""
    command = [sys.executable, "-m", "tests.progressive_double"] if args.double else [sys.executable, "-m"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    ready = os.path.join(work, label + ".address")
    host = subprocess.Popen(command + ["host" if args.double else "latentlink.host", "--listen", "127.0.0.1:0",
                                       "--ready-file", ready, "--profile", profile_path, "--out",
                                       os.path.join(work, label), "--report", os.path.join(work, label + "-host.json"),
                                       "--max-streams", "1", "--quiet", "--progress", "0", "--threads",
                                       str(args.threads)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(
                                work, label + "-host.log"), "w"))
    try:
        while not os.path.exists(ready):
            if host.poll() is not None:
                raise SystemExit("the host did not start: see {}".format(os.path.join(work, label + "-host.log")))
            time.sleep(0.1)
        with open(ready) as f:
            host_address = f.read().strip().rsplit(":", 1)
        proxy = ThrottledProxy((host_address[0], int(host_address[1])))
        frames = int(round(args.fps * (args.before + args.slow + args.after)))
        edge_cmd = command + ["edge" if args.double else "latentlink.edge", "--source", "file://" + args.photos,
                              "--loop", "--fps", str(args.fps), "--frames", str(frames), "--connect", proxy.address,
                              "--threads", str(args.threads),
                              "--profile", profile_path, "--name", "cam", "--report",
                              os.path.join(work, label + ".json"), "--quiet", "--drop", "oldest"] + rate_args
        if args.entropy:
            edge_cmd += ["--entropy", args.entropy]
        edge = subprocess.Popen(edge_cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=open(os.path.join(work, label + "-edge.log"), "w"))
        while proxy.t_first is None and edge.poll() is None:
            time.sleep(0.01)
        t0 = proxy.t_first or time.monotonic()
        time.sleep(max(0.0, t0 + args.before - time.monotonic()))
        if args.fault == "stop":
            host.send_signal(signal.SIGSTOP)
        else:
            proxy.rate = slow_rate
        time.sleep(max(0.0, t0 + args.before + args.slow - time.monotonic()))
        proxy.rate = None
        if args.fault == "stop":
            host.send_signal(signal.SIGCONT)
        status = edge.wait(args.before + args.slow + args.after + 300)
        host.wait(60)
        proxy.close()
        if status not in (0, 1):
            raise SystemExit("the edge failed: see {}".format(os.path.join(work, label + "-edge.log")))
    finally:
        if host.poll() is None:
            host.send_signal(signal.SIGCONT)
            host.kill()
    with open(os.path.join(work, label + ".json")) as f:
        return json.load(f)


def per_frame(report, out, references, fps):
    """Per frame, in seq order: (seconds, iterations, bytes, outcome, latency ms or None, PSNR dB or None)."""
    import cv2

    from latentlink.edge.preprocess import psnr

    rows = []
    for record in sorted(report["records"], key=lambda r: r["seq"]):
        seq = record["seq"]
        png = os.path.join(out, "cam", "{:06d}.png".format(seq))
        quality = None
        if record.get("outcome") == "decoded" and os.path.exists(png):
            quality = psnr(references[seq % len(references)], cv2.imread(png))
        rows.append((seq / float(fps), record.get("iterations"), record.get("bytes"), record.get("outcome"),
                     record.get("latency_ms"), quality))
    return rows


def phase_table(label, rows, args):
    """One line per phase: frames, decoded, dropped, latency p50/p95, iterations, bytes, PSNR."""
    bounds = (("before", 0.0, args.before), ("slow", args.before, args.before + args.slow),
              ("after", args.before + args.slow, 1e9), ("all", 0.0, 1e9))
    lines = []
    for phase, lo, hi in bounds:
        part = [r for r in rows if lo <= r[0] < hi]
        decoded = [r for r in part if r[3] == "decoded"]
        latency = [r[4] for r in decoded if r[4] is not None]
        psnrs = [r[5] for r in decoded if r[5] is not None and np.isfinite(r[5])]
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {:.2f} | {:,.0f} | {} |".format(
            label, phase, len(part), len(decoded), sum(r[3] == "dropped" for r in part),
            "{:.0f}".format(np.percentile(latency, 50)) if latency else "-",
            "{:.0f}".format(np.percentile(latency, 95)) if latency else "-",
            np.mean([r[1] for r in part]) if part else 0.0, np.mean([r[2] for r in part]) if part else 0.0,
            "{:.2f}".format(np.mean(psnrs)) if psnrs else "-"))
    return lines


def plot(path, runs, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    for label, rows in runs:
        t = [r[0] for r in rows]
        axes[0].plot(t, [r[1] for r in rows], label=label)
        dec = [r for r in rows if r[4] is not None]
        axes[1].plot([r[0] for r in dec], [r[4] for r in dec], ".", markersize=3, label=label)
        good = [r for r in rows if r[5] is not None]
        axes[2].plot([r[0] for r in good], [r[5] for r in good], ".", markersize=3, label=label)
    for ax, name in zip(axes, ("iterations per frame", "latency (ms)", "PSNR (dB)")):
        ax.axvspan(args.before, args.before + args.slow, color="0.9")
        ax.set_ylabel(name)
        ax.legend(loc="best")
    axes[1].set_yscale("log")
    axes[2].set_xlabel("capture time (s); shaded: " + ("the host stopped (SIGSTOP)" if args.fault == "stop" else
                       "the link at {:.0%} of full-quality frames' rate".format(args.slow_fraction)))
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", help="the progressive model's profile (model.json with \"progressive\")")
    parser.add_argument("--double", action="store_true",
                        help="the tests' stand-in progressive model (tests/progressive_double.py) at 256x256: "
                             "measures the mechanism; its PSNR is a cell average's, not a codec's")
    parser.add_argument("--photos", default=os.path.join(ROOT, "data", "holdout"), help="source folder (looped)")
    parser.add_argument("--fps", type=float, default=10.0, help="frames per second (default: %(default)s)")
    parser.add_argument("--before", type=float, default=6.0, help="seconds at full speed first (default: %(default)s)")
    parser.add_argument("--slow", type=float, default=12.0, help="seconds of the slow link (default: %(default)s)")
    parser.add_argument("--after", type=float, default=8.0, help="seconds at full speed after (default: %(default)s)")
    parser.add_argument("--fault", choices=("link", "stop"), default="link",
                        help="link: the proxy slows the link (default); stop: the host is stopped (SIGSTOP)")
    parser.add_argument("--slow-fraction", type=float, default=0.3,
                        help="the slow link's bytes/s as a fraction of full-quality frames' (default: %(default)s)")
    parser.add_argument("--entropy", default=None, help="the edge's --entropy (default: the profile's)")
    parser.add_argument("--min-iterations", type=int, default=1, help="adaptive: --min-iterations (default: 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="the edge's and the host's --threads (default: %(default)s: on a small shared machine, "
                             "ONNX Runtime's spinning threads would slow both more than they help)")
    parser.add_argument("--source-size", type=int, default=640,
                        help="the photos are first shrunk to at most this many pixels a side (default: %(default)s), "
                             "so that reading them keeps up with --fps as a camera would; 0: as they are")
    parser.add_argument("--plot", help="write iterations, latency and PSNR per frame over time to this PNG")
    parser.add_argument("--keep", help="keep the runs' reports and PNGs in this folder")
    args = parser.parse_args(argv)
    if not args.double and not args.profile:
        parser.error("give --profile (a progressive model's) or --double")
    work = args.keep or tempfile.mkdtemp(prefix="adaptive-rate-")
    os.makedirs(work, exist_ok=True)
    if args.source_size:
        args.photos = shrink_photos(args.photos, os.path.join(work, "photos"), args.source_size)
    if args.double:
        from tests import progressive_double

        progressive_double.install()
        profile_path = progressive_double.write_model(os.path.join(work, "double"), iterations=8, size=256,
                                                      queue_size=4)
    else:
        from latentlink.edge.profile import resolve_profile_path

        profile_path = resolve_profile_path(args.profile)  # a shipped profile's name, or a YAML file
    from latentlink.edge.profile import load_profile

    profile = load_profile(profile_path)
    entropy = args.entropy or profile.transport.entropy
    frame_bytes, k = full_rate_bytes(profile, profile.model.encoder, args.photos, entropy)
    slow_rate = args.slow_fraction * frame_bytes * args.fps
    references = source_frames(args.photos, profile)
    fault = ("the host is stopped" if args.fault == "stop" else "the slow link carries {:,.0f} bytes/s ({:.0%})".format(
        slow_rate, args.slow_fraction))
    print("{}: K = {} iterations, {:,} bytes per full-quality frame ({}), {:g} fps: {:,.0f} bytes/s at full "
          "quality; {} from {:g} s to {:g} s of {:g} s".format(
              "double" if args.double else profile.name, k, frame_bytes, entropy, args.fps, frame_bytes * args.fps,
              fault, args.before, args.before + args.slow, args.before + args.slow + args.after))
    runs, table = [], []
    for label, rate_args in (("fixed", ["--rate", "fixed"]),
                             ("adaptive", ["--rate", "adaptive", "--min-iterations", str(args.min_iterations)])):
        report = run(work, label, args, profile_path, rate_args, slow_rate)
        rows = per_frame(report, os.path.join(work, label), references, args.fps)
        runs.append((label, rows))
        table += phase_table(label, rows, args)
        print("{}: {} captured, outcomes {}; the edge ran at {:.1f} fps (asked {:g}){}".format(
            label, report["captured"], report["outcomes"], report["fps"], args.fps,
            "" if report["fps"] >= 0.9 * args.fps else ": it could not keep up, so the phases (seq / fps) are off"))
    print("| rate | phase | frames | decoded | dropped | latency p50 ms | latency p95 ms | iterations/frame | "
          "bytes/frame | PSNR dB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(table))
    if args.plot:
        plot(args.plot, runs, args)
        print("plot: {}".format(args.plot))
    print("reports and PNGs: {}".format(work))


if __name__ == "__main__":
    main()
