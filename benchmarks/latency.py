"""Benchmark: glass-to-glass latency of a live edge feeding a host slower than it, protocol 2's window against
protocol 1's kernel buffers.

    python benchmarks/latency.py                          # a tiny model built here, 600 frames per run
    python benchmarks/latency.py --frames 1000 --decode-delay 0.01 --profile my-site.yaml

One edge (synthetic source, unpaced: it captures as fast as it encodes, ``--drop oldest``) and one host on
loopback. The host is slowed down with ``latentlink host --decode-delay`` (a knob for tests and benchmarks: it
sleeps after each decode) to a third of the edge's capture rate, measured first, unless ``--decode-delay`` says.
Two runs:

- protocol 2 with its window (``--window 4``, ``--queue-size 4``): at most 4 frames in flight and 4 queued, the
  rest dropped at the edge, so latency stays at a few decode times;
- "v1 behaviour" (``--protocol 1``): no window; frames pile up in the kernel's socket buffers, where no drop policy
  reaches them, and latency grows with every frame the host falls behind.

Latency is capture to decoded (glass to glass): from the edge's records for protocol 2 (host clock offset
estimated NTP-style), from the host's records for protocol 1 (same machine, same clock). Figures, not a test: both
processes share this machine's cores, and the numbers are for comparing the two behaviours, not absolute.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TINY = 64


def build_tiny_profile(folder):
    """A randomly initialised Lossy CAE at 64x64 exported to ONNX, like tests/conftest.py's; returns its profile."""
    import torch

    from latentlink.export.models import build_model, save_checkpoint
    from latentlink.export.onnx_export import export_onnx

    torch.manual_seed(0)
    model = build_model("lossy-cae", latent_channels=8, encoder_channels=16, decoder_channels=16)
    checkpoint = os.path.join(folder, "tiny.pt")
    save_checkpoint(checkpoint, model)
    export_onnx(model, TINY, TINY, os.path.join(folder, "onnx"), profile="tiny", checkpoint=checkpoint)
    profile = os.path.join(folder, "tiny.yaml")
    with open(profile, "w") as f:
        f.write("name: tiny\nmodel:\n  encoder: onnx/encoder.onnx\n  decoder: onnx/decoder.onnx\n"
                "input:\n  width: {0}\n  height: {0}\nbudget_ms: 33\n".format(TINY))
    return profile


def run(work, label, profile, frames, decode_delay, *edge_args):
    """One host and one edge; returns (edge report, host report)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    ready = os.path.join(work, label + ".address")
    host_json, edge_json = os.path.join(work, label + "-host.json"), os.path.join(work, label + "-edge.json")
    host = subprocess.Popen([sys.executable, "-m", "latentlink.host", "--listen", "127.0.0.1:0", "--ready-file",
                             ready, "--profile", profile, "--report", host_json, "--max-streams", "1", "--quiet",
                             "--decode-delay", str(decode_delay)], cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(ready):
            if host.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the host did not start")
            time.sleep(0.05)
        with open(ready) as f:
            address = f.read().strip()
        subprocess.run([sys.executable, "-m", "latentlink.edge", "--source", "synthetic://", "--frames",
                        str(frames), "--connect", address, "--name", "bench", "--profile", profile, "--drop",
                        "oldest", "--report", edge_json, "--quiet"] + list(edge_args), cwd=ROOT, env=env,
                       check=True, timeout=600)
        host.wait(timeout=600)
    finally:
        if host.poll() is None:
            host.kill()
    with open(edge_json) as f, open(host_json) as g:
        return json.load(f), json.load(g)


def edge_seconds(edge):
    """The edge's run, from its first capture until its last frame was acknowledged (protocol 2) or written to
    the socket (protocol 1)."""
    return edge["frames"] / edge["fps"] if edge["fps"] else 0.0


def latency_line(values):
    if not values:
        return "no frame decoded"
    values = np.array(values, dtype=np.float64)
    return "median {:8.1f}   p95 {:8.1f}   max {:8.1f}  ms  ({} frames)".format(
        np.median(values), np.percentile(values, 95), values.max(), len(values))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=600, help="frames each edge captures (default: %(default)s)")
    parser.add_argument("--decode-delay", type=float, default=None, metavar="SECONDS",
                        help="the host's extra time per frame (default: measured, so that the host runs at a third "
                             "of the edge's capture rate)")
    parser.add_argument("--profile", default=None,
                        help="profile name or YAML (default: a tiny 64x64 model built in a temporary folder; the "
                             "shipped nano-504 is too slow on a 2-core CPU)")
    args = parser.parse_args()
    print("machine: {} ({} cores), Python {}".format(platform.processor() or platform.machine(), os.cpu_count(),
                                                     platform.python_version()))
    with tempfile.TemporaryDirectory() as work:
        profile = args.profile or build_tiny_profile(work)
        delay = args.decode_delay
        if delay is None:
            edge, _ = run(work, "calibrate", profile, 300, 0.0)
            delay = 3.0 / edge["fps"]
            print("edge capture rate: {:.0f} fps (unpaced synthetic source, host keeping up) -> host decode delay "
                  "{:.1f} ms (a third of that rate)".format(edge["fps"], delay * 1000.0))
        else:
            print("host decode delay: {:.1f} ms per frame".format(delay * 1000.0))
        print("{} frames per run, --drop oldest, synthetic source, loopback\n".format(args.frames))

        edge, host = run(work, "v2", profile, args.frames, delay, "--window", "4", "--queue-size", "4")
        print("protocol 2, window 4, queue 4 (the edge ran {:.1f} s)".format(edge_seconds(edge)))
        print("  latency (edge records):  " + latency_line(
            [r["latency_ms"] for r in edge["records"] if r.get("latency_ms") is not None]))
        print("  latency (host records):  " + latency_line([r["latency_ms"] for r in host["records"]]))
        print("  edge outcomes: {} (captured {})".format(
            ", ".join("{} {}".format(k, v) for k, v in edge["outcomes"].items()), edge["captured"]))
        print("  host: {} frames decoded".format(host["frames"]))

        edge, host = run(work, "v1", profile, args.frames, delay, "--protocol", "1", "--queue-size", "4")
        print("\nprotocol 1 behaviour: no window, kernel buffers fill (the edge ran {:.1f} s)".format(
            edge_seconds(edge)))
        print("  latency (host records):  " + latency_line([r["latency_ms"] for r in host["records"]]))
        print("  edge outcomes: {} (captured {})".format(
            ", ".join("{} {}".format(k, v) for k, v in edge["outcomes"].items()), edge["captured"]))
        print("  host: {} frames decoded".format(host["frames"]))


if __name__ == "__main__":
    main()
