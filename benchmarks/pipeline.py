"""Benchmark: edge -> host over loopback for each shipped profile; prints per-stage figures, wire bytes, memory.

    python benchmarks/pipeline.py                 # both profiles, 60 frames each
    python benchmarks/pipeline.py --frames 200 --profiles nano-504

Figures, not tests: it prints what it measured and the targets beside them, and never fails on a number (the
machines are noisy). Targets: a 1008x1008 frame at most 64 KiB + header on the wire; 33 ms per frame on the Nano
(CPU figures here are for comparison between changes, not Nano figures).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from latentlink.demo import write_sample_photos  # noqa: E402

WIRE_TARGET = 65536  # bytes of payload for a 1008x1008 frame (the seed's pickled float32 latents were 2 MB)


def run_profile(profile, frames, photos, work):
    env = dict(os.environ, PYTHONPATH=ROOT)
    ready = os.path.join(work, profile + ".address")
    host_report, edge_report = os.path.join(work, profile + "-host.json"), os.path.join(work, profile + "-edge.json")
    host = subprocess.Popen([sys.executable, "-m", "latentlink.host", "--listen", "127.0.0.1:0", "--ready-file", ready,
                             "--profile", profile, "--report", host_report, "--max-streams", "1", "--quiet"],
                            cwd=ROOT, env=env)
    while not os.path.exists(ready):
        time.sleep(0.05)
    address = open(ready).read().strip()
    subprocess.run([sys.executable, "-m", "latentlink.edge", "--source", "file://" + photos, "--loop", "--frames",
                    str(frames), "--connect", address, "--name", "bench", "--profile", profile, "--drop", "block",
                    "--report", edge_report, "--quiet"], cwd=ROOT, env=env, check=True)
    host.wait(timeout=600)
    return json.load(open(edge_report)), json.load(open(host_report))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profiles", default="nano-504,nano-1008")
    parser.add_argument("--frames", type=int, default=60)
    args = parser.parse_args()
    print("machine: {} ({} cores), Python {}".format(platform.processor() or platform.machine(), os.cpu_count(),
                                                     platform.python_version()))
    with tempfile.TemporaryDirectory() as work:
        photos = write_sample_photos(os.path.join(work, "photos"))
        for profile in args.profiles.split(","):
            edge, host = run_profile(profile, args.frames, photos, work)
            print("\n{}: {} frames, edge {} / host {} (ONNX Runtime, CPU)".format(
                profile, edge["frames"], edge["meta"]["backend"], host["meta"]["backend"]))
            print("{:<12} {:>10} {:>10}".format("stage", "median ms", "p95 ms"))
            for role, report in (("edge", edge), ("host", host)):
                for stage, stats in report["stages"].items():
                    print("{:<12} {:>10.2f} {:>10.2f}".format(role + "." + stage if stage == "total" else stage,
                                                             stats["median_ms"], stats["p95_ms"]))
            payload = edge["bytes_per_frame"]
            print("wire: {:,.0f} bytes/frame (header included); edge {:.1f} fps, host {:.1f} fps over loopback with "
                  "--drop block, sharing this machine's cores".format(payload, edge["fps"], host["fps"]))
            if profile.endswith("1008"):
                print("target: 1008x1008 frame <= {:,} bytes + header: {} ({:,.0f} bytes)".format(
                    WIRE_TARGET, "met" if payload <= WIRE_TARGET + 200 else "MISSED", payload))
            print("peak memory: edge {} MiB, host {} MiB".format(edge["meta"].get("peak_rss_mb"),
                                                               host["meta"].get("peak_rss_mb")))


if __name__ == "__main__":
    main()
