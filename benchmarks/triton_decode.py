"""Benchmark: a decode service (``latentlink decode-service``, Triton) under N concurrent clients.

    python benchmarks/triton_decode.py                                   # the shipped nano-504 decoder, 8 clients, 20 s
    python benchmarks/triton_decode.py --decoder model.onnx --clients 1 4 16 --seconds 30 --device cuda

It starts the service as its own process on free loopback ports (as ``latentlink decode-service`` runs on a GPU
machine), times how long it takes to be ready, then runs N client threads, each a host's ``triton://`` decoder
(host/triton_backend.py) sending one frame per request, back to back, for the given seconds: Triton's dynamic
batcher joins the concurrent requests into decoder runs. It reports the round trip (ms, p50 and p95: request,
queue, decoding, response), the requests/s served, and the mean dynamic batch, from Triton's own Prometheus
counters (``nv_inference_count / nv_inference_exec_count`` over the measured window). The latents are random +-1
values of the decoder's shape (a decoder's cost does not depend on them). Figures, not tests: it never fails on a
number. The clients run in this process, on the same machine as the service: on a small CPU-only machine they
compete with the decoder for cores.
"""

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from latentlink.host.triton_backend import open_decoder  # noqa: E402

DEFAULT_DECODER = os.path.join("profiles", "default", "nano-504", "decoder.onnx")  # from the repository root


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(decoder_path, port, metrics_port, work, extra):
    """The service process (its own process group) and its start time in seconds, once its models are ready."""
    ready = os.path.join(work, "ready")
    log = open(os.path.join(work, "service.log"), "w")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "latentlink", "decode-service", "--decoder", decoder_path,
                             "--listen", "127.0.0.1:{}".format(port), "--metrics", "127.0.0.1:{}".format(metrics_port),
                             "--ready-file", ready] + list(extra),
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, PYTHONPATH=ROOT, PYTRITON_HOME=os.path.join(work, "pytriton")))
    while not os.path.exists(ready):
        if proc.poll() is not None or time.perf_counter() - started > 300:
            stop_service(proc)
            raise SystemExit("decode-service did not start:\n" + open(log.name).read()[-3000:])
        time.sleep(0.05)
    return proc, time.perf_counter() - started


def stop_service(proc):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def triton_counts(metrics_port, model):
    """(requests, decoder runs) so far, from Triton's Prometheus counters for ``model``."""
    text = urllib.request.urlopen("http://127.0.0.1:{}/metrics".format(metrics_port), timeout=10).read().decode()

    def counter(name):
        match = re.search(r'^{}\{{model="{}",version="1"\}} (\S+)$'.format(name, re.escape(model)), text, re.M)
        return float(match.group(1)) if match else 0.0

    return counter("nv_inference_count"), counter("nv_inference_exec_count")


def measure(decoder_path=DEFAULT_DECODER, seconds=20.0, clients=8, device=None, max_batch=16, profile="nano-504"):
    """Start a service for ``decoder_path`` (on ``device``: the service's --device; ``profile``: a .pt's input size),
    load it with ``clients`` threads for ``seconds``; returns a dict:
    ``start_s`` (service start to ready, s), ``requests``, ``requests_per_s``, ``round_trip_ms_p50`` / ``p95``,
    ``mean_batch`` (frames per decoder run, Triton's counters), ``errors`` (requests that failed),
    ``local_decode_ms_p50`` (one frame decoded in this process with ONNX Runtime / the file's backend, no service)."""
    from latentlink.edge.backends import open_backend
    from latentlink.edge.profile import load_profile

    size = load_profile(profile).input
    extra = ["--max-batch", str(max_batch), "--profile", profile] + (["--device", device] if device else [])
    path = decoder_path if os.path.exists(decoder_path) else os.path.join(ROOT, decoder_path)  # the default: ROOT's
    path = os.path.abspath(path)
    # the same frame decoded in this process, without the service, for comparison
    with open_backend(path, "decoder", device=device, input_size=(size.height, size.width)) as local:
        latents = np.where(np.random.default_rng(0).random(local.input_shape) < 0.5, -1.0, 1.0).astype(np.float32)
        local_ms = []
        for _ in range(6):
            start = time.perf_counter()
            local.infer(latents)
            local_ms.append((time.perf_counter() - start) * 1000.0)
    work = tempfile.mkdtemp(prefix="latentlink-triton-bench-")
    port, metrics_port = free_port(), free_port()
    proc, start_s = start_service(path, port, metrics_port, work, extra)
    spec = "triton://127.0.0.1:{}/decoder".format(port)
    try:
        decoders = [open_decoder(spec).load() for _ in range(clients)]
        for decoder in decoders:
            decoder.infer(latents)  # connections open, and the service warm, before the clock starts
        times, errors = [[] for _ in decoders], [0]
        begin = threading.Event()

        def client(decoder, out):
            begin.wait()
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    decoder.infer(latents)
                except Exception:  # counted, never fatal to the benchmark
                    errors[0] += 1
                    continue
                out.append((time.perf_counter() - start) * 1000.0)

        threads = [threading.Thread(target=client, args=(d, t)) for d, t in zip(decoders, times)]
        for thread in threads:
            thread.start()
        before = triton_counts(metrics_port, "decoder")
        started = time.perf_counter()
        deadline = started + seconds
        begin.set()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        after = triton_counts(metrics_port, "decoder")
        for decoder in decoders:
            decoder.close()
    finally:
        stop_service(proc)
        shutil.rmtree(work, ignore_errors=True)
    all_ms = np.array([ms for t in times for ms in t])
    runs = after[1] - before[1]
    return {"decoder": decoder_path, "clients": clients, "device": device or "cpu", "max_batch": max_batch,
            "seconds": round(elapsed, 1),
            "start_s": round(start_s, 2), "requests": int(all_ms.size), "errors": errors[0],
            "requests_per_s": round(all_ms.size / elapsed, 2),
            "round_trip_ms_p50": round(float(np.percentile(all_ms, 50)), 1) if all_ms.size else None,
            "round_trip_ms_p95": round(float(np.percentile(all_ms, 95)), 1) if all_ms.size else None,
            "mean_batch": round((after[0] - before[0]) / runs, 2) if runs else None,
            "local_decode_ms_p50": round(float(np.median(local_ms[1:])), 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--decoder", default=DEFAULT_DECODER, help="decoder model file (default: nano-504's ONNX)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per run (default: %(default)s)")
    parser.add_argument("--clients", type=int, nargs="+", default=[8], help="concurrent clients; several: one run "
                        "(and one service start) each (default: 8)")
    parser.add_argument("--device", help="the service's --device (cuda: a GPU; default the CPU)")
    parser.add_argument("--max-batch", type=int, default=16, help="the service's --max-batch (default: %(default)s)")
    parser.add_argument("--profile", default="nano-504", help="a .pt decoder's input size (default: %(default)s)")
    args = parser.parse_args(argv)
    for clients in args.clients:
        result = measure(args.decoder, args.seconds, clients, args.device, args.max_batch, args.profile)
        print("{clients} clients, {seconds} s: {requests_per_s} requests/s ({requests} requests, {errors} errors); "
              "round trip p50 {round_trip_ms_p50} ms, p95 {round_trip_ms_p95} ms; mean dynamic batch {mean_batch} "
              "frames; service started in {start_s} s; in-process decoding {local_decode_ms_p50} ms/frame ({decoder}, "
              "{device})".format(**result), flush=True)


if __name__ == "__main__":
    main()
