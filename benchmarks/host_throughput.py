"""Benchmark: the host's decoded frames/s with 1, 4 and 8 concurrent streams, serial against pipelined + batched.

    python benchmarks/host_throughput.py                      # nano-504, 48 frames per configuration
    python benchmarks/host_throughput.py --frames 96 --streams 1 4 8 16 --profile nano-1008

Real latents, recorded once: real photos (data/holdout from scripts/get_photos.sh, else the demo's sample photos) encoded by the
profile's shipped encoder and packed as an edge packs them. They are replayed by N client threads, each a protocol-2
``Sender`` with a window of 8, so the edges cost nothing and the host is the bottleneck. The host runs in this
process with the profile's decoder, real decoding (no --decode-delay) and real PNG writes into a temporary folder:

- ``serial``: ``Host(pipeline=False)``: each connection's thread decodes and writes its own frames one at a time
  under one lock (what the host did before the pipeline);
- ``pipelined, batch 1``: the decode queue, one decode stage and two writers, one frame per decoder run: what the
  overlap of receiving, decoding and writing alone gives;
- ``pipelined, batch N``: the same, batching across streams (``--batch-size``, 4: the host's default) through the
  shipped decoder's dynamic batch axis (one decoder run per batch).

Per backend found: ONNX Runtime on the CPU always; ONNX Runtime's CUDA execution provider and PyTorch on CUDA (FP16)
only where present (it says plainly when none is). Figures, not tests: it prints what it measured, and never fails
on a number. Keep runs short on shared machines (48 frames per configuration: about a minute here).
"""

import argparse
import glob
import os
import platform
import shutil
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from latentlink.edge.backends import open_backend  # noqa: E402
from latentlink.edge.preprocess import Preprocessor  # noqa: E402
from latentlink.edge.profile import load_profile  # noqa: E402
from latentlink.edge.profiler import FrameTimer  # noqa: E402
from latentlink.edge.protocol import frame_payload, pack_latents  # noqa: E402
from latentlink.edge.sender import Sender  # noqa: E402
from latentlink.host.server import Host  # noqa: E402

PHOTOS = os.path.join(ROOT, "data", "holdout")  # scripts/get_photos.sh data
WINDOW = 8


def record_latents(profile, photos):
    """The photos' latents (packed payload arrays) through the shipped encoder: a list of float32 arrays."""
    paths = sorted(glob.glob(os.path.join(photos, "*.jpg")) + glob.glob(os.path.join(photos, "*.png")))
    if not paths:
        raise SystemExit("no photos in {}".format(photos))
    with open_backend(profile.model.encoder, "encoder") as encoder:
        prep = Preprocessor(profile.input.width, profile.input.height, tiles=encoder.info.tiles)
        latents = []
        for path in paths:
            output, _ = encoder.infer(prep(cv2.imread(path)))
            latents.append(np.array(output, dtype=np.float32))
    return latents


def run(decoder, latents, streams, frames, pipeline, batch_size, work):
    """Stream ``frames`` frames (split over ``streams`` clients) through one host; returns (frames/s, mean batch)."""
    info = decoder.info
    out = tempfile.mkdtemp(dir=work)
    host = Host(decoder, out_dir=out, pipeline=pipeline, batch_size=batch_size, window=WINDOW, progress_s=0,
                idle_timeout_s=60, frame_timeout_s=30, max_connections_per_peer=64)  # every client is 127.0.0.1
    host.bind("127.0.0.1", 0)
    serving = threading.Thread(target=host.serve, daemon=True)
    serving.start()
    hello = {"model_id": info.model_id, "shape": [int(d) for d in decoder.input_shape], "dtype": "float32",
             "packing": info.packing, "entropy": "none", "tiles": [int(t) for t in info.tiles]}
    per_stream = [frames // streams + (1 if i < frames % streams else 0) for i in range(streams)]
    payloads = {}  # packed once per (stream, seq), before the clock starts
    for index, count in enumerate(per_stream):
        name = "s{}".format(index)
        for seq in range(count):
            array = latents[(index + seq) % len(latents)]
            payloads[(name, seq)] = (array, pack_latents(array, info.packing))
    errors = []

    def client(name, count):
        try:
            sender = Sender(host.address, name, hello=hello, window=WINDOW, queue_size=WINDOW, drop="block")
            for seq in range(count):
                array, packed = payloads[(name, seq)]
                sender.submit(frame_payload(name, seq, time.time(), array, info.packing, packed, version=2),
                              FrameTimer(seq))
            sender.close()  # returns once every frame is acknowledged
            if sender.counts["decoded"] != count:
                errors.append("{}: {}".format(name, sender.counts))
        except Exception as exc:  # reported below
            errors.append("{}: {}".format(name, exc))

    clients = [threading.Thread(target=client, args=("s{}".format(i), n)) for i, n in enumerate(per_stream)]
    started = time.perf_counter()
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    wall = time.perf_counter() - started
    snapshot = host.snapshot()
    host.stop()
    serving.join()
    if errors:
        raise SystemExit("clients failed: {}".format("; ".join(errors)))
    batches = snapshot["batches"]
    mean = sum(size * n for size, n in batches.items()) / float(max(1, sum(batches.values())))
    return snapshot["frames"] / wall, mean


def gpu_backends(profile):
    """(label, open_backend arguments) for the GPU backends present; prints what is not."""
    found = []
    from latentlink.edge.backends.onnxruntime_backend import available_providers

    providers = available_providers()
    if "CUDAExecutionProvider" in providers:
        found.append(("onnxruntime-cuda", dict(path=profile.model.decoder, device="cuda")))
    else:
        print("ONNX Runtime: no CUDAExecutionProvider in this build ({}): no ONNX Runtime GPU rows".format(
            ", ".join(providers)))
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if cuda:
        # The checkpoint the profile's decoder was exported from (model.json names it, beside the ONNX files).
        from latentlink.edge.backends.base import read_model_info

        checkpoint = os.path.join(os.path.dirname(profile.model.decoder), "..",
                                  read_model_info(profile.model.decoder).data["checkpoint"])
        found.append(("pytorch-cuda-fp16", dict(path=checkpoint,
                                                device="cuda", precision="fp16",
                                                input_size=(profile.input.height, profile.input.width))))
    else:
        print("PyTorch: no CUDA GPU found: no PyTorch GPU rows")
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="nano-504")
    parser.add_argument("--frames", type=int, default=48, help="frames per configuration (default: %(default)s)")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--batch-size", type=int, default=4, help="the pipelined host's (default: %(default)s)")
    args = parser.parse_args(argv)
    profile = load_profile(args.profile)
    work = tempfile.mkdtemp(prefix="latentlink-throughput-")
    photos = PHOTOS
    if not os.path.isdir(photos):
        from latentlink.demo import write_sample_photos

        photos = os.path.join(work, "photos")
        write_sample_photos(photos)
    print("recording latents: {} through {} ...".format(photos, profile.model.encoder), flush=True)
    latents = record_latents(profile, photos)
    print("{} ({} cores), Python {}; profile {}; {} frames per configuration; {} real photos' latents".format(
        platform.processor() or platform.machine(), os.cpu_count(), platform.python_version(), profile.name,
        args.frames, len(latents)))
    cpu = dict(path=profile.model.decoder)
    rows = [("onnxruntime-cpu", "serial (batch 1, inline)", cpu, False, 1),
            ("onnxruntime-cpu", "pipelined, batch 1", cpu, True, 1),
            ("onnxruntime-cpu", "pipelined, batch {}".format(args.batch_size), cpu, True, args.batch_size)]
    for label, options in gpu_backends(profile):
        rows.append((label, "serial (batch 1, inline)", options, False, 1))
        rows.append((label, "pipelined, batch {}".format(args.batch_size), options, True, args.batch_size))
    print("| backend | path | streams | decoded frames/s | mean batch (frames) | vs serial |")
    print("|---|---|---|---|---|---|")
    results = {}
    decoders = []
    try:
        for backend, what, options, pipeline, batch in rows:
            options = dict(options)
            decoders.append(open_backend(options.pop("path"), "decoder", **options).load())
        # Interleaved (each stream count through every configuration in turn), so that a shared machine's load
        # drifting during the run weighs on all of them alike.
        for streams in args.streams:
            for (backend, what, _, pipeline, batch), decoder in zip(rows, decoders):
                fps, mean = run(decoder, latents, streams, args.frames, pipeline, batch, work)
                results[(backend, what, streams)] = fps
                serial = results.get((backend, "serial (batch 1, inline)", streams))
                print("| {} | {} | {} | {:.2f} | {:.1f} | {} |".format(
                    backend, what, streams, fps, mean, "{:.2f}x".format(fps / serial) if serial else "-"),
                    flush=True)
    finally:
        for decoder in decoders:
            decoder.close()
        shutil.rmtree(work, ignore_errors=True)  # the PNGs written

if __name__ == "__main__":
    main()
