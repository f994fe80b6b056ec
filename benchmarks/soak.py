"""Soak: many frames through an edge and a host on loopback; does their memory stay flat?

    python benchmarks/soak.py                      # 100,000 frames, without and then with --report
    python benchmarks/soak.py --frames 5000        # a quick check
    python benchmarks/soak.py --frames 3000 --at 1000,3000 --reports off --json   (what tests/test_memory.py runs)

The host is a `python -m latentlink.host` process (no --out: decoding only). The edge is this process: the real
pipeline (`run_edge`: preprocess, encode, pack, the sender's window and acknowledgements, the per-frame accounting
and, with --report, the report writer) fed one pre-made frame over and over, so that the frames go as fast as the
two processes can move them. The model is a tiny Lossy CAE exported at 64x64 (8x16x16 binary latents, 256 bytes a
frame): a fast stand-in, so that what grows per frame is the pipeline's, not the model's. Exporting it needs torch
and onnx; --profile takes an existing profile instead (tests pass their own tiny one).

Printed: VmRSS (resident memory, MiB, from /proc/PID/status) of the edge and the host after the first frame, at
10 % and 50 % of the frames and at the end (after the host acknowledged the last frame), and frames per second.
A figure, not a test: tests/test_memory.py asserts a bound on a short run.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from latentlink.edge.backends import open_backend  # noqa: E402
from latentlink.edge.pipeline import edge_stages, run_edge  # noqa: E402
from latentlink.edge.profile import load_profile  # noqa: E402
from latentlink.edge.profiler import ReportWriter, load_report  # noqa: E402

SIZE = 64  # pixels: the tiny model's input


def rss_mib(pid):
    """Resident memory of process ``pid`` in MiB (VmRSS), or None once it has exited."""
    try:
        with open("/proc/{}/status".format(pid)) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        return None
    return None


class RepeatedFrame(object):
    """A source that returns the same frame ``frames`` times, and samples the edge's and the host's memory when
    frame number ``n`` (counting from 1) in ``at`` is read: a frame source is what the pipeline calls once per
    frame, so no hook into the pipeline is needed."""

    uri = description = "repeated frame"

    def __init__(self, frame, at, host_pid):
        self.frame, self.at, self.host_pid = frame, set(at), host_pid
        self.read_count = 0
        self.samples = []  # (frame number, edge MiB, host MiB)
        self.started = None

    def read(self):
        self.read_count += 1
        if self.read_count in self.at:
            self.sample(self.read_count)
        if self.read_count == 1:
            self.started = time.perf_counter()
        return self.frame, time.time()

    def sample(self, n):
        self.samples.append((n, rss_mib(os.getpid()), rss_mib(self.host_pid)))


def tiny_profile(folder):
    """Export a tiny randomly initialised Lossy CAE at 64x64 and write its profile; returns the profile's path.
    In a child process: torch loaded here would add some 200 MiB to the edge's memory figures."""
    code = "import sys; sys.path.insert(0, {!r}); import soak; soak.export_tiny({!r})".format(
        os.path.dirname(os.path.abspath(__file__)), folder)
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), check=True)
    return os.path.join(folder, "tiny.yaml")


def export_tiny(folder):
    import torch

    from latentlink.export.models import build_model, save_checkpoint
    from latentlink.export.onnx_export import export_onnx

    torch.manual_seed(0)
    model = build_model("lossy-cae", latent_channels=8, encoder_channels=16, decoder_channels=16)
    save_checkpoint(os.path.join(folder, "tiny.pt"), model)
    export_onnx(model, SIZE, SIZE, os.path.join(folder, "onnx"), profile="tiny",
                checkpoint=os.path.join(folder, "tiny.pt"))
    with open(os.path.join(folder, "tiny.yaml"), "w") as f:
        f.write("name: tiny\nmodel:\n  encoder: onnx/encoder.onnx\n  decoder: onnx/decoder.onnx\n"
                "input:\n  width: {0}\n  height: {0}\nbudget_ms: 33\n".format(SIZE))


def start_host(profile, work, report):
    ready = os.path.join(work, "host.address")
    if os.path.exists(ready):
        os.remove(ready)
    command = [sys.executable, "-m", "latentlink.host", "--listen", "127.0.0.1:0", "--ready-file", ready,
               "--profile", profile, "--threads", "1", "--quiet"] + (["--report", report] if report else [])
    log = open(os.path.join(work, "host.log"), "w")  # its log lines, shown only if it fails
    host = subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=log,
                            stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 120
    while not os.path.exists(ready):
        if host.poll() is not None or time.monotonic() > deadline:
            host.kill()
            with open(os.path.join(work, "host.log")) as f:
                raise SystemExit("the host did not start (exit code {}):\n{}".format(host.returncode, f.read()))
        time.sleep(0.05)
    with open(ready) as f:
        host_port = f.read().strip().rsplit(":", 1)
    return host, (host_port[0], int(host_port[1]))


def soak(profile_path, frames, at, work, with_report):
    """One run; returns a dict of what it measured."""
    profile = load_profile(profile_path)
    edge_report = os.path.join(work, "edge.json") if with_report else None
    host_report = os.path.join(work, "host.json") if with_report else None
    host, address = start_host(profile_path, work, host_report)
    try:
        frame = np.random.RandomState(0).randint(0, 256, (profile.input.height, profile.input.width, 3),
                                                 dtype=np.uint8)
        source = RepeatedFrame(frame, [n for n in at if n < frames], host.pid)
        with open_backend(profile.model.encoder, "encoder", threads=1) as encoder:
            writer = None
            if with_report:
                writer = ReportWriter(edge_report, edge_stages("none"), profile.budget_ms, {"role": "edge"})
            summary = run_edge(source, encoder, profile, address, "soak", frames=frames, drop="block", window=8,
                               queue_size=4, on_record=writer.add if writer else None, status_every_s=3600.0)
            if writer:
                writer.finish(summary, {"role": "edge", "stream": "soak"})
        wall_s = time.perf_counter() - source.started
        source.sample(frames)  # everything acknowledged: the host decoded the last frame
    finally:
        host.send_signal(signal.SIGINT)  # the host writes its summary and exits
        try:
            code = host.wait(timeout=120)
        except subprocess.TimeoutExpired:
            host.kill()
            host.wait()
            code = "none: still running 120 s after SIGINT, killed"
        if code != 0:
            with open(os.path.join(work, "host.log")) as f:
                raise SystemExit("the host exited with code {}; its log:\n{}".format(code, f.read()[-20000:]))
    result = {"frames": frames, "report": with_report, "samples": source.samples, "fps": frames / wall_s,
              "outcomes": summary["outcomes"]}
    if with_report:
        edge_loaded, host_loaded = load_report(edge_report, records=False), load_report(host_report, records=False)
        result["report_frames"] = [edge_loaded["frames"], host_loaded["frames"]]
        result["report_mib"] = [os.path.getsize(edge_report) / 2.0 ** 20, os.path.getsize(host_report) / 2.0 ** 20]
    return result


def print_result(result):
    frames = result["frames"]
    print("\n{} --report: {:,} frames at {:,.0f} frames/s (edge: {})".format(
        "with" if result["report"] else "without", frames, result["fps"],
        ", ".join("{:,} {}".format(n, k) for k, n in result["outcomes"].items())))
    print("{:>10} {:>14} {:>14}".format("frame", "edge RSS MiB", "host RSS MiB"))
    for n, edge, host in result["samples"]:
        print("{:>10,} {:>14.1f} {:>14.1f}".format(n, edge, host))
    (n0, edge0, host0), (n1, edge1, host1) = result["samples"][0], result["samples"][-1]
    print("{:>10} {:>+14.1f} {:>+14.1f}   (frame {:,} to frame {:,})".format("growth", edge1 - edge0, host1 - host0,
                                                                           n0, n1))
    if result["report"]:
        print("reports: edge {:.1f} MiB, host {:.1f} MiB on disk; {:,} / {:,} frames read back".format(
            result["report_mib"][0], result["report_mib"][1], *result["report_frames"]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=100000, help="frames per run (default: %(default)s)")
    parser.add_argument("--at", help="frame numbers to sample memory at (default: 1, 10 %%, 50 %%, end)")
    parser.add_argument("--reports", default="off,on", help="runs without (off) and/or with (on) --report")
    parser.add_argument("--profile", help="a profile with a small model (default: export a tiny one; needs torch)")
    parser.add_argument("--json", action="store_true", help="print the measurements as one JSON line instead")
    args = parser.parse_args(argv)
    at = sorted(set(int(n) for n in args.at.split(","))) if args.at else \
        sorted(set([1, max(1, args.frames // 10), max(1, args.frames // 2), args.frames]))
    results = []
    with tempfile.TemporaryDirectory() as work:
        profile = args.profile or tiny_profile(work)
        if not args.json:
            print("soak: {:,} frames of {}x{} through a tiny model (ONNX Runtime, 1 thread each), edge (this "
                  "process) -> host process on loopback, --drop block, window 8; Python {}, {} cores".format(
                      args.frames, SIZE, SIZE, sys.version.split()[0], os.cpu_count()))
        for mode in args.reports.split(","):
            result = soak(profile, args.frames, at, work, mode == "on")
            results.append(result)
            if not args.json:
                print_result(result)
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
