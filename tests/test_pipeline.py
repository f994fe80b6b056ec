"""The host's pipeline (receive -> decode queue -> batched decode -> write stage -> ACK) and its shutdown.

Shutdown and the exit code run the host as a separate process (signals, stdout, the report file); the pipeline's
batching and its queue bound run in this process, reading ``Host.snapshot()``. Exact outcomes only, no timings:
the tiny model decodes in about a millisecond, so ``decode_delay_s`` slows the host where frames must pile up.
"""

import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from .conftest import ROOT
from .test_faults import ENV, finish, pngs, report, start_edge, wait_for

pytestmark = pytest.mark.timeout(120)


# Shutdown, as a separate process.
def start_host(procs, tmp_path, profile, *extra):
    """A host process (with its table: no --quiet); returns ``(process, "HOST:PORT")`` once it listens. Its
    stdout and stderr go to host.log, its report to host.json."""
    ready = tmp_path / "host.address"
    with open(str(tmp_path / "host.log"), "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "latentlink.host", "--listen", "127.0.0.1:0", "--ready-file",
                                 str(ready), "--profile", profile, "--report", str(tmp_path / "host.json")]
                                + [str(a) for a in extra], cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    procs.append(proc)
    wait_for(lambda: ready.exists() or proc.poll() is not None, 60, "the host to listen")
    assert proc.poll() is None, (tmp_path / "host.log").read_text()
    return proc, ready.read_text().strip()


def host_log(tmp_path):
    return (tmp_path / "host.log").read_text()


def test_sigterm_finishes_the_frames_received_then_writes_the_report_and_the_table(procs, tmp_path, tiny_profile):
    out = tmp_path / "frames"
    host, address = start_host(procs, tmp_path, tiny_profile, "--out", out, "--decode-delay", "0.1")
    start_edge(procs, tmp_path, tiny_profile, address, "cam", "edge", "--source", "synthetic://", "--frames", 1000,
               "--drop", "block", "--window", 4)
    wait_for(lambda: len(pngs(out, "cam")) >= 3, 60, "frames decoded")
    host.send_signal(signal.SIGTERM)
    assert finish(host) == 0, host_log(tmp_path)
    log = host_log(tmp_path)
    assert "SIGTERM: stopping" in log and "Traceback" not in log, log
    assert "host (tiny, onnxruntime)" in log and "host: " in log and " frames decoded; 0 failed" in log, log
    summary = report(tmp_path, "host")
    assert not summary.get("unfinished") and summary["dropped_on_stop"] == 0  # the backlog was finished
    assert summary["frames"] == len(pngs(out, "cam")) == summary["streams"]["cam"]["frames"]


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_drops_the_backlog_but_still_writes_the_report_and_the_table(procs, tmp_path, tiny_profile,
                                                                                    second):
    out = tmp_path / "frames"
    # 1 s per frame and a window of 8: when the first frame is written, the others wait in the decode queue.
    host, address = start_host(procs, tmp_path, tiny_profile, "--out", out, "--decode-delay", "1", "--batch-size", 1)
    start_edge(procs, tmp_path, tiny_profile, address, "cam", "edge", "--source", "synthetic://", "--frames", 1000,
               "--drop", "block", "--window", 8)
    wait_for(lambda: len(pngs(out, "cam")) >= 1, 60, "a frame decoded")
    host.send_signal(signal.SIGTERM)
    wait_for(lambda: "stopping" in host_log(tmp_path), 30, "the first signal handled")
    host.send_signal(second)
    assert finish(host) == 0, host_log(tmp_path)
    log = host_log(tmp_path)
    assert "again: dropping the frames still queued" in log and "Traceback" not in log, log
    assert "host (tiny, onnxruntime)" in log and " frames decoded; 0 failed" in log, log
    summary = report(tmp_path, "host")
    assert not summary.get("unfinished")
    assert summary["frames"] == len(pngs(out, "cam")) < 8  # the queued frames were not decoded


def test_out_that_is_a_file_is_refused_at_start(tmp_path, tiny_profile):
    path = tmp_path / "frames.txt"
    path.write_text("not a folder")
    result = subprocess.run([sys.executable, "-m", "latentlink.host", "--profile", tiny_profile, "--out", str(path),
                             "--listen", "127.0.0.1:0"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "--out {}: a file of that name is in the way; give a folder".format(path) in result.stderr


def test_a_write_error_fails_the_frame_shows_in_the_summary_and_sets_exit_code_1(procs, tmp_path, tiny_profile):
    out = tmp_path / "frames"
    out.mkdir()
    (out / "cam").write_text("a file where the stream's folder goes: every PNG write fails")
    host, address = start_host(procs, tmp_path, tiny_profile, "--out", out, "--max-streams", 1)
    edge = start_edge(procs, tmp_path, tiny_profile, address, "cam", "edge", "--source", "synthetic://", "--frames",
                      3, "--drop", "block")
    finish(edge)
    assert finish(host) == 1, host_log(tmp_path)
    log = host_log(tmp_path)
    assert "host: 0 frames decoded; 3 failed (3 write errors)" in log and "exit code 1" in log, log
    summary = report(tmp_path, "host")
    assert (summary["failed"], summary["write_errors"], summary["frames"]) == (3, 3, 0)
    assert report(tmp_path, "edge")["outcomes"]["failed"] == 3


# The pipeline, in this process.
class Collect(object):
    """An output that keeps each frame's image, by (stream, seq)."""

    uri = "test://collect"

    def __init__(self):
        self.images = {}

    def write(self, frame):
        self.images[(frame.stream, frame.seq)] = frame.image.copy()


def stream_frames(host, names, frames):
    """Stream ``frames`` frames from each of ``names`` at once (protocol 2, windows of 8, one Sender each);
    returns the latents sent, by (stream, seq)."""
    from latentlink.edge.profiler import FrameTimer
    from latentlink.edge.protocol import frame_payload, pack_latents
    from latentlink.edge.sender import Sender

    decoder, info = host.decoder, host.decoder.info
    hello = {"model_id": info.model_id, "shape": [int(d) for d in decoder.input_shape], "dtype": "float32",
             "packing": info.packing, "entropy": "none", "tiles": [int(t) for t in info.tiles]}
    sent, errors = {}, []

    def run(name, index):
        try:
            sender = Sender(host.address, name, hello=hello, window=8, queue_size=8, drop="block")
            for seq in range(frames):
                state = np.random.RandomState(1000 * index + seq)
                latents = (state.random_sample(decoder.input_shape) > 0.5).astype(np.float32)
                sent[(name, seq)] = latents
                timer = FrameTimer(seq)
                assert sender.submit(frame_payload(name, seq, time.time(), latents, info.packing,
                                                   pack_latents(latents, info.packing), version=2), timer)
            sender.close()
            assert sender.counts["decoded"] == frames, sender.counts
        except Exception as exc:  # reported by the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(name, i)) for i, name in enumerate(names)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    return sent


def serve(tiny_profile, **options):
    from latentlink.edge.backends import open_backend
    from latentlink.edge.profile import load_profile
    from latentlink.host.server import Host

    decoder = open_backend(load_profile(tiny_profile).model.decoder, "decoder").load()
    host = Host(decoder, idle_timeout_s=10, frame_timeout_s=5, **options)
    host.bind("127.0.0.1", 0)
    thread = threading.Thread(target=host.serve, daemon=True)
    thread.start()
    return host, thread


def stop(host, thread):
    host.stop()
    thread.join(30)
    assert not thread.is_alive()
    host.decoder.close()


def test_the_decoder_takes_a_batch_and_gives_what_it_gives_one_frame_at_a_time(tiny_profile):
    from latentlink.edge.backends import open_backend
    from latentlink.edge.profile import load_profile

    with open_backend(load_profile(tiny_profile).model.decoder, "decoder") as decoder:
        assert decoder.max_batch > 1  # export onnx makes the decoder's batch axis dynamic
        frames = [(np.random.RandomState(i).random_sample(decoder.input_shape) > 0.5).astype(np.float32)
                  for i in range(5)]
        batched, timings = decoder.infer_batch(frames)
        assert len(batched) == 5 and set(timings) == {"run_ms", "copy_ms"}
        for latents, output in zip(frames, batched):
            alone, _ = decoder.infer(latents)
            np.testing.assert_allclose(output, alone, atol=1e-5)


def test_frames_of_several_streams_batched_give_the_images_of_one_at_a_time(tiny_profile):
    images = {}
    for batch_size in (1, 8):
        collect = Collect()
        # A slower decoder: frames of the 4 streams pile up in the queue, so batches of several happen.
        host, thread = serve(tiny_profile, outputs=[collect], batch_size=batch_size, decode_delay_s=0.02)
        try:
            sent = stream_frames(host, ["a", "b", "c", "d"], 12)
        finally:
            stop(host, thread)
        batches = host.snapshot()["batches"]
        if batch_size == 1:
            assert set(batches) == {1}
        else:
            assert max(batches) > 1, batches  # frames of several streams went through the decoder together
        assert sum(size * n for size, n in batches.items()) == len(sent) == 48
        images[batch_size] = collect.images
    assert set(images[1]) == set(images[8]) == set(sent)
    for key in sent:  # float batching may round differently: at most 1 level of 255
        difference = np.abs(images[1][key].astype(int) - images[8][key].astype(int))
        assert difference.max() <= 1, key


def test_the_decode_queue_stays_within_its_bound(tiny_profile):
    host, thread = serve(tiny_profile, queue_size=3, batch_size=2, decode_delay_s=0.02)
    depths, done = [], threading.Event()

    def watch():
        while not done.is_set():
            snapshot = host.snapshot()
            depths.append((snapshot["queue_depth"], snapshot["queue_capacity"]))
            time.sleep(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        stream_frames(host, ["a", "b", "c", "d", "e"], 10)  # 5 windows of 8: up to 40 frames could be in flight
    finally:
        done.set()
        watcher.join()
        stop(host, thread)
    assert depths and all(capacity == 3 for _, capacity in depths)
    assert max(depth for depth, _ in depths) <= 3
    assert host.snapshot()["frames"] == 50 and max(host.snapshot()["batches"]) <= 2


def test_a_frame_resent_while_in_flight_is_decoded_and_written_once(tiny_profile):
    """A reconnect of the same session resends the frames it had in flight: those still in the pipeline are not
    decoded again (the resend joins the frame's job, or finds its outcome); each frame is written exactly once."""
    from latentlink.edge.protocol import VERSION_2, frame_payload, pack_latents

    from .test_limits import Edge, latent

    collect = Collect()
    writes = []
    collect.write = lambda frame: writes.append((frame.stream, frame.seq))
    # 1 s per frame, one at a time: when frame 0 is written, frame 1 is decoding and frame 2 waits in the queue.
    host, thread = serve(tiny_profile, outputs=[collect], batch_size=1, decode_delay_s=1.0)
    first = second = None
    try:
        first = Edge(host.address, "cam").connect()
        for seq in range(3):
            first.send(frame_payload("cam", seq, time.time(), latent(seq), "bits", pack_latents(latent(seq), "bits"),
                                     version=VERSION_2))
        wait_for(lambda: ("cam", 0) in writes, 30, "frame 0 written")
        second = Edge(host.address, "cam")
        second.session = first.session  # the same edge run, reconnected: it takes the stream over at once
        second.connect()
        acks = [second.frame(seq) for seq in (1, 2)]
        assert [(a["seq"], a["outcome"]) for a in acks] == [(1, "decoded"), (2, "decoded")]
        assert sorted(writes) == [("cam", 0), ("cam", 1), ("cam", 2)]  # no frame written twice
        assert host.snapshot()["batches"] == {1: 3}  # ... nor decoded twice
    finally:
        for edge in (first, second):
            if edge is not None:
                edge.close()
        stop(host, thread)


def test_max_frames_lets_the_last_acknowledgement_out(procs, tmp_path, tiny_profile):
    """--max-frames 5 and an edge of 5 frames (without --wait-for-host): the host stops after the fifth, its ACK
    reaches the edge first, so the edge ends without reconnecting."""
    host, address = start_host(procs, tmp_path, tiny_profile, "--max-frames", 5, "--decode-delay", "0.05")
    edge = start_edge(procs, tmp_path, tiny_profile, address, "cam", "edge", "--source", "synthetic://", "--frames",
                      5, "--drop", "block", "--window", 4)
    assert finish(host) == 0, host_log(tmp_path)
    finish(edge)
    edge_report = report(tmp_path, "edge")
    assert edge_report["outcomes"]["decoded"] == 5 and edge_report["outcomes"].get("lost", 0) == 0, edge_report
    assert report(tmp_path, "host")["frames"] == 5
