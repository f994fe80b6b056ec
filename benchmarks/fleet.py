"""Fleet throughput on this machine: the broker alone, edges -> gateway -> JetStream, and JetStream -> 1 and 2 decode
workers, in one run; prints a table (README: Fleets).

    python benchmarks/fleet.py                      # nano-504, 4 senders x 150 frames, 48 frames for the workers
    python benchmarks/fleet.py --frames 300 --worker-frames 96 --profile nano-1008

What each row measures (frames/s or messages/s, wall clock):

- ``broker publish`` / ``broker consume``: nats-server alone, one Python client (nats-py): ``--messages`` messages of
  ``--message-bytes`` bytes (15.9 KB: a nano-504 frame, bits packing, no entropy coding) published to a file-stored
  work-queue stream with up to 256 publishes awaiting their acknowledgement, then fetched in batches of 256 and
  each acknowledged (``ack_sync``: confirmed). The client, not the server, is the usual limit.
- ``gateway ingest``: ``--senders`` Python-API senders (``latentlink.Sender.send_latents``: ready latents, no encoder
  run, reliable delivery) in this process -> ``latentlink host --jetstream`` (batch 16) -> stored; from the first
  frame to the last acknowledgement (outcome ``stored``).
- ``triton decode service``: the decoder served by ``latentlink decode-service`` (Triton, dynamic batching, CPU
  here), loaded by ``--triton-clients`` threads for ``--triton-seconds`` (benchmarks/triton_decode.py): requests/s,
  the round trip (ms) and the mean dynamic batch (frames per decoder run).
- ``workers, N``: ``--worker-frames`` frames stored first, then N ``latentlink worker`` processes (ONNX Runtime on
  the CPU, batch 8, PNGs to a temporary folder) drain them; from the first frame acknowledged to the last (the
  workers' start-up, model load, is not counted).

Nothing here is a test: the figures depend on the machine and its load. The broker runs on loopback with a temporary
store (``nats-server -js``, Debian's 2.9.10 here).
"""

import argparse
import asyncio
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from latentlink.host import jetstream as fleet  # noqa: E402

ENV = dict(os.environ, PYTHONPATH=ROOT)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Broker(object):
    """nats-server -js on loopback, its store in ``folder``."""

    def __init__(self, folder):
        if shutil.which("nats-server") is None:
            sys.exit("nats-server is not installed (apt-get install nats-server)")
        self.port = free_port()
        self.url = "nats://127.0.0.1:{}".format(self.port)
        self.proc = subprocess.Popen(["nats-server", "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd",
                                      os.path.join(folder, "store")], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit("nats-server did not start")
                time.sleep(0.05)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(20)


# The broker alone.
async def broker_rates(url, messages, size):
    import nats
    from nats.js.api import RetentionPolicy, StorageType, StreamConfig

    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="BENCH", subjects=["bench.>"], retention=RetentionPolicy.WORK_QUEUE,
                                     storage=StorageType.FILE))
    payload = os.urandom(size)
    window = asyncio.Semaphore(256)

    async def one(i):
        async with window:
            await js.publish("bench.cam{}".format(i % 50), payload, headers={"Nats-Msg-Id": "b/{}".format(i)})

    started = time.perf_counter()
    await asyncio.gather(*[one(i) for i in range(messages)])
    publish_s = time.perf_counter() - started
    sub = await js.pull_subscribe("bench.>", durable="bench", stream="BENCH")
    got = 0
    started = time.perf_counter()
    while got < messages:
        batch = await sub.fetch(256, timeout=5)
        await asyncio.gather(*[msg.ack_sync() for msg in batch])
        got += len(batch)
    consume_s = time.perf_counter() - started
    await js.delete_stream("BENCH")
    await nc.close()
    return messages / publish_s, messages / consume_s


# Edges -> gateway.
def start_gateway(work, url, profile):
    ready = os.path.join(work, "gateway.address")
    log = open(os.path.join(work, "gateway.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "latentlink.host", "--listen", "127.0.0.1:0", "--jetstream", url,
                             "--profile", profile, "--batch-size", "16", "--ready-file", ready, "--quiet",
                             "--progress", "0"], cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    while not os.path.exists(ready):
        if proc.poll() is not None:
            sys.exit("the gateway did not start: see " + log.name)
        time.sleep(0.1)
    with open(ready) as f:
        return proc, f.read().strip()


def ingest(address, profile, senders, frames, tag):
    """``senders`` Python-API senders, ``frames`` ready latents each; returns (frames stored, seconds)."""
    from latentlink import Sender

    made = [Sender(address, name="{}{}".format(tag, i), profile=profile, entropy="none", delivery="reliable")
            for i in range(senders)]
    rng = np.random.default_rng(0)
    latents = (rng.random(made[0].latent_shape) > 0.5).astype("float32")
    barrier = threading.Barrier(senders + 1)
    summaries = [None] * senders

    def run(i):
        barrier.wait()
        for _ in range(frames):
            made[i].send_latents(latents)
        summaries[i] = made[i].close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(senders)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    stored = sum(s["outcomes"].get("stored", 0) for s in summaries)
    return stored, seconds, made[0].latent_shape


# JetStream -> workers.
async def purge(url):
    """Empty the frames' stream (the gateway row's frames are not the workers' to drain)."""
    import nats

    nc = await nats.connect(url)
    try:
        await nc.jetstream().purge_stream(fleet.STREAM)
    finally:
        await nc.close()


async def backlog(url):
    import nats

    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(fleet.STREAM)
        return info.state.messages
    finally:
        await nc.close()


def drain(work, url, profile, workers, total):
    """Start ``workers`` workers on a stream holding ``total`` frames; frames/s from the first acknowledged to the
    last (polled every 50 ms)."""
    out = os.path.join(work, "out-{}".format(workers))
    procs = [subprocess.Popen([sys.executable, "-m", "latentlink.host.worker", "--jetstream", url, "--profile",
                               profile, "--out", out, "--batch-size", "8", "--idle-exit", "3", "--quiet",
                               "--progress", "0"], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                              stderr=open(os.path.join(work, "worker-{}.log".format(workers)), "w"))
             for _ in range(workers)]
    first = None
    while True:
        left = asyncio.run(backlog(url))
        now = time.perf_counter()
        if first is None and left < total:
            first, first_left = now, left
        if left == 0:
            break
        if all(p.poll() is not None for p in procs):
            sys.exit("the workers stopped with {} frames left: see {}/worker-*.log".format(left, work))
        time.sleep(0.05)
    for proc in procs:
        proc.wait(120)
    written = sum(len(files) for _, _, files in os.walk(out))
    return written, (first_left / (now - first)) if now > first else float("nan")


# A decode service (Triton) beside the workers: what one batched service answers on the same machine.
def triton_rows(args):
    """Rows ``(what, rate, unit, note)`` of the Triton decode service (benchmarks/triton_decode.py's ``measure``: a
    service process, ``--triton-clients`` client threads for ``--triton-seconds``): requests/s, the round trip and
    the dynamic batch's mean size. None where PyTriton is not installed (the [triton] extra) or with
    ``--triton-seconds 0``."""
    if not args.triton_seconds:
        return []
    if importlib.util.find_spec("pytriton") is None:
        print("no Triton rows: PyTriton is not installed (pip install \".[triton]\")", file=sys.stderr)
        return []
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from triton_decode import measure

    got = measure(seconds=args.triton_seconds, clients=args.triton_clients, profile=args.profile,
                  decoder_path=os.path.join("profiles", "default", args.profile, "decoder.onnx"))
    note = "{} clients, CPU, {} errors".format(got["clients"], got["errors"])
    return [("triton decode service: requests", got["requests_per_s"], "req/s", note),
            ("triton decode service: round trip p50", got["round_trip_ms_p50"], "ms",
             "p95 {} ms; in-process decode {} ms".format(got["round_trip_ms_p95"], got["local_decode_ms_p50"])),
            ("triton decode service: mean dynamic batch", got["mean_batch"] or 0.0, "frames",
             "Triton's counters; service start {} s".format(got["start_s"]))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="nano-504")
    parser.add_argument("--senders", type=int, default=4, help="Python-API senders (edges) at once")
    parser.add_argument("--frames", type=int, default=150, help="frames per sender for the gateway row")
    parser.add_argument("--worker-frames", type=int, default=48, help="frames the workers drain, per row")
    parser.add_argument("--messages", type=int, default=2000, help="messages for the broker rows")
    parser.add_argument("--message-bytes", type=int, default=15900, help="bytes per message for the broker rows")
    parser.add_argument("--triton-seconds", type=float, default=10.0,
                        help="seconds of the Triton decode service's rows (0: none; needs the [triton] extra)")
    parser.add_argument("--triton-clients", type=int, default=8, help="client threads for the Triton rows")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="latentlink-fleet-")
    broker = Broker(work)
    rows = []
    gateway = None
    try:
        publish, consume = asyncio.run(broker_rates(broker.url, args.messages, args.message_bytes))
        rows.append(("broker publish (nats-py, 256 awaiting)", publish, "msg/s", "{:,} B messages, file store".format(
            args.message_bytes)))
        rows.append(("broker consume (fetch 256, ack_sync)", consume, "msg/s", "work queue"))
        gateway, address = start_gateway(work, broker.url, args.profile)
        stored, seconds, shape = ingest(address, args.profile, args.senders, args.frames, "cam")
        rows.append(("gateway ingest ({} senders -> stored)".format(args.senders), stored / seconds, "frames/s",
                     "{} frames of latents {}, reliable".format(stored, list(shape))))
        asyncio.run(purge(broker.url))
        for workers in (1, 2):
            ingest(address, args.profile, 1, args.worker_frames, "w{}-".format(workers))
            written, rate = drain(work, broker.url, args.profile, workers, args.worker_frames)
            rows.append(("workers: {} (decode + PNG)".format(workers), rate, "frames/s",
                         "{} frames written, ONNX Runtime CPU, batch 8".format(written)))
        rows.extend(triton_rows(args))
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(60)
        broker.stop()
    print("fleet throughput ({}, {} cores, {})".format(args.profile, os.cpu_count(), time.strftime("%Y-%m-%d")))
    print("{:<44} {:>10}  {:<9} {}".format("what", "rate", "unit", "note"))
    for what, rate, unit, note in rows:
        print("{:<44} {:>10,.1f}  {:<9} {}".format(what, rate, unit, note))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
