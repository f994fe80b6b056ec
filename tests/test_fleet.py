"""A fleet as separate processes: edges -> a gateway (``latentlink host --jetstream``) -> NATS JetStream -> decode
workers (``latentlink worker``), with faults: a worker killed -9, the broker restarted, the gateway restarted.

Every test asserts exact outcomes, never timings: each edge's report says every frame ``stored`` (none lost), the
PNGs written are exactly the frames sent (one file per frame), and the workers' marks bucket holds exactly one
``written`` mark per frame. Faults are injected at an observed state (so many PNGs written, a worker's report with
records), never after a sleep. The gateway (``--decode-delay``, here the time of its forward step) and the workers
(``--decode-delay``) are slowed down on purpose, so that a fault finds frames in flight. Each test starts its own
nats-server (tests/nats_server.py) and is skipped, with the reason, without nats-server or nats-py.
"""

import asyncio
import os
import signal

import pytest

from latentlink.host import jetstream as fleet

from .nats_server import nats_server  # noqa: F401 (a fixture)
from .nats_server import free_port
from .test_faults import finish, report, spawn, wait_for

pytestmark = pytest.mark.timeout(300)
FRAMES = 20  # per edge


# Processes.
def start_gateway(procs, tmp_path, profile, url, port, label, *extra):
    """A gateway on 127.0.0.1:``port``, storing frames in JetStream at ``url``; returns it once it listens."""
    ready = tmp_path / (label + ".address")
    if ready.exists():
        ready.unlink()
    proc = spawn(procs, tmp_path / (label + ".log"), "latentlink.host", "--listen", "127.0.0.1:{}".format(port),
                 "--jetstream", url, "--ready-file", ready, "--profile", profile, "--quiet", *extra)
    wait_for(lambda: ready.exists() or proc.poll() is not None, 90, "the gateway to listen")
    assert proc.poll() is None, (tmp_path / (label + ".log")).read_text()
    return proc


def start_worker(procs, tmp_path, profile, url, label, *extra):
    """A worker writing PNGs to ``tmp_path/out``, report ``<label>.json``, log ``<label>.log.err``."""
    return spawn(procs, tmp_path / (label + ".log"), "latentlink.host.worker", "--jetstream", url, "--profile",
                 profile, "--out", tmp_path / "out", "--report", tmp_path / (label + ".json"), "--ack-wait", "2",
                 "--batch-size", "4", "--progress", "0", "--quiet", *extra)


def start_edges(procs, tmp_path, profile, port, count):
    return [spawn(procs, tmp_path / "edge{}.log".format(i), "latentlink.edge", "--connect", "127.0.0.1:{}".format(port),
                  "--name", "cam{}".format(i), "--profile", profile, "--source", "synthetic://", "--frames", FRAMES,
                  "--delivery", "reliable", "--report", tmp_path / "edge{}.json".format(i), "--quiet")
            for i in range(count)]


@pytest.fixture
def procs():
    started = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# What the fleet did.
def pngs(tmp_path):
    """{stream: sorted sequence numbers of its PNGs} (temporary files of a killed writer are not frames)."""
    out = tmp_path / "out"
    found = {}
    for stream in sorted(os.listdir(str(out))) if out.is_dir() else []:
        if not stream.startswith("."):
            found[stream] = sorted(int(name[:-4]) for name in os.listdir(str(out / stream))
                                   if name.endswith(".png") and not name.startswith("."))
    return found


def png_count(tmp_path):
    return sum(len(seqs) for seqs in pngs(tmp_path).values())


def broker_state(url, keys=()):
    """``(status, marks)``: ``latentlink fleet status``'s dict, and {key: value} of the marks of ``keys`` (None: no
    mark), with ``None: number of marks in the bucket``."""
    import nats
    from nats.js.errors import BucketNotFoundError, KeyNotFoundError

    from latentlink.host import jetstream as fleet
    from latentlink.host.fleet import read_status

    async def marks():
        nc = await nats.connect(url)
        try:
            try:
                kv = await nc.jetstream().key_value(fleet.MARKS)
            except BucketNotFoundError:  # no worker started yet
                return {None: 0}
            found = {None: (await kv.status()).values}
            for key in keys:
                try:
                    found[key] = (await kv.get(key)).value.decode()
                except KeyNotFoundError:
                    found[key] = None
            return found
        finally:
            await nc.close()

    return asyncio.run(read_status(url)), asyncio.run(marks())


def claims_of(url, pid):
    """How many frames the worker process ``pid`` holds now: marks ``claimed <host>-<pid>-<random>`` (not yet
    ``written``) in the marks bucket (host/worker.py names itself so)."""
    import nats
    from nats.js.errors import BucketNotFoundError, NoKeysError

    async def count():
        nc = await nats.connect(url)
        try:
            try:
                kv = await nc.jetstream().key_value(fleet.MARKS)
                keys = await kv.keys()
            except (BucketNotFoundError, NoKeysError):
                return 0
            values = [(await kv.get(key)).value.decode() for key in keys]
            return sum(value.startswith("claimed ") and "-{}-".format(pid) in value for value in values)
        finally:
            await nc.close()

    return asyncio.run(count())


def drained(url):
    """True once the broker holds no frame, and none is delivered and unacknowledged."""
    status, _ = broker_state(url)
    consumers = status["consumers"].values()
    return status["stream"]["messages"] == 0 and all(c["pending"] == 0 and c["ack_pending"] == 0 for c in consumers)


def check_delivered(tmp_path, url, edges):
    """Each edge: every frame stored, none lost; the PNGs and the marks: each frame exactly once."""
    for i in range(edges):
        summary = report(tmp_path, "edge{}".format(i))
        assert summary["outcomes"] == {"decoded": 0, "failed": 0, "refused": 0, "dropped": 0, "lost": 0,
                                       "stored": FRAMES}, summary["outcomes"]
    assert pngs(tmp_path) == {"cam{}".format(i): list(range(FRAMES)) for i in range(edges)}
    wait_for(lambda: drained(url), 60, "the broker to hold no frame")
    keys = [fleet.mark_key("cam{}".format(i), report(tmp_path, "edge{}".format(i))["session"], seq)
            for i in range(edges) for seq in range(FRAMES)]
    _, marks = broker_state(url, keys)
    assert marks.pop(None) == edges * FRAMES  # no other mark in the bucket
    assert marks == dict.fromkeys(keys, "written")
    return marks


def stop_all(*procs):
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    return [finish(proc) for proc in procs]


# The faults.
def test_worker_killed_mid_run(procs, tmp_path, tiny_profile, nats_server):  # noqa: F811
    """4 edges -> gateway -> 2 workers; one worker is killed -9 while it holds frames: the other one gets them after
    the ack-wait, and every frame is written exactly once."""
    url, port = nats_server.url, free_port()
    gateway = start_gateway(procs, tmp_path, tiny_profile, url, port, "gateway")
    doomed = start_worker(procs, tmp_path, tiny_profile, url, "worker-a", "--decode-delay", "0.1")
    survivor = start_worker(procs, tmp_path, tiny_profile, url, "worker-b", "--decode-delay", "0.02")
    edges = start_edges(procs, tmp_path, tiny_profile, port, 4)
    # Killed once it wrote a few frames of its own (its report has records) and while it holds frames it claimed
    # and has not written (the bucket says so: a batch takes it 0.4 s to decode), so that they must be redelivered.
    wait_for(lambda: _records(tmp_path / "worker-a.json") >= 3 or doomed.poll() is not None, 120,
             "worker a to write frames")
    wait_for(lambda: claims_of(url, doomed.pid) > 0 or doomed.poll() is not None, 120,
             "worker a to hold claimed frames")
    doomed.kill()
    doomed.wait()
    assert png_count(tmp_path) < 4 * FRAMES, "the fault came too late: every frame was written already"
    assert [finish(edge, 120) for edge in edges] == [0, 0, 0, 0]
    wait_for(lambda: png_count(tmp_path) == 4 * FRAMES, 120, "every frame to be written")
    check_delivered(tmp_path, url, 4)
    assert stop_all(survivor, gateway) == [0, 0]
    summary = report(tmp_path, "worker-b")
    assert summary["redelivered"] >= 1 and summary["failed"] == 0 and summary["terminated"] == 0, summary
    # The survivor wrote every frame the dead one had not: the dead worker's count is the rest.
    assert summary["written"] + _records(tmp_path / "worker-a.json") >= 4 * FRAMES


def test_broker_restarted_mid_run(procs, tmp_path, tiny_profile, nats_server):  # noqa: F811
    """The broker restarted (SIGTERM, then started on the same store, as systemctl restart does) while edges stream
    under --delivery reliable: the gateway retries until the broker is back, the edges wait, the worker reconnects:
    nothing is lost or written twice. (After a kill -9 of nats-server 2.9.10, frames acknowledged just before it
    may come back into the stream below the consumer's acknowledged floor, never delivered again: the README says
    so. They were written; only the "drained" check here would fail.)"""
    url, port = nats_server.url, free_port()
    gateway = start_gateway(procs, tmp_path, tiny_profile, url, port, "gateway", "--decode-delay", "0.05")
    worker = start_worker(procs, tmp_path, tiny_profile, url, "worker", "--decode-delay", "0.02")
    edges = start_edges(procs, tmp_path, tiny_profile, port, 2)
    wait_for(lambda: png_count(tmp_path) >= 5, 120, "frames to be written")
    nats_server.stop()
    assert png_count(tmp_path) < 2 * FRAMES, "the fault came too late: every frame was written already"
    # Down until the gateway's publishes timed out (it retries; the edges' windows are full and they wait).
    wait_for(lambda: "JetStream did not take" in (tmp_path / "gateway.log").read_text(), 60,
             "the gateway to find the broker gone")
    nats_server.start()
    assert [finish(edge, 180) for edge in edges] == [0, 0]
    wait_for(lambda: png_count(tmp_path) == 2 * FRAMES, 120, "every frame to be written")
    check_delivered(tmp_path, url, 2)
    assert stop_all(worker, gateway) == [0, 0]
    assert report(tmp_path, "worker")["failed"] == 0


def test_gateway_restarted_mid_run(procs, tmp_path, tiny_profile, nats_server):  # noqa: F811
    """The gateway killed -9 and started again on its port: the edges reconnect and resend what was not
    acknowledged; what the broker had already is dropped by its duplicate window (Nats-Msg-Id), so every frame is
    stored and written once."""
    url, port = nats_server.url, free_port()
    first = start_gateway(procs, tmp_path, tiny_profile, url, port, "gateway1", "--decode-delay", "0.05")
    worker = start_worker(procs, tmp_path, tiny_profile, url, "worker")
    edges = start_edges(procs, tmp_path, tiny_profile, port, 4)
    wait_for(lambda: broker_state(url)[0]["stream"]["messages"] + png_count(tmp_path) >= 8, 120,
             "frames to be stored")
    first.kill()
    first.wait()
    assert png_count(tmp_path) < 4 * FRAMES, "the fault came too late: every frame was written already"
    second = start_gateway(procs, tmp_path, tiny_profile, url, port, "gateway2", "--report", tmp_path / "gateway2.json")
    assert [finish(edge, 180) for edge in edges] == [0, 0, 0, 0]
    wait_for(lambda: png_count(tmp_path) == 4 * FRAMES, 120, "every frame to be written")
    check_delivered(tmp_path, url, 4)
    assert stop_all(worker, second) == [0, 0]
    assert sum(report(tmp_path, "edge{}".format(i))["reconnects"] for i in range(4)) >= 1


def test_bad_messages_are_terminated(procs, tmp_path, tiny_profile, nats_server):  # noqa: F811
    """Hostile bytes published straight into the stream are terminated with a log line; the worker goes on and
    decodes the good frame published after them."""
    import nats
    import numpy as np

    from latentlink.edge.backends import open_backend
    from latentlink.edge.profile import load_profile
    from latentlink.edge.protocol import frame_payload

    url = nats_server.url
    worker = start_worker(procs, tmp_path, tiny_profile, url, "worker", "--idle-exit", "3")
    shape = open_backend(load_profile(tiny_profile).model.decoder, "decoder").load().input_shape
    good = frame_payload("cam0", 0, 1.0, np.zeros(shape, "float32"), "float32", np.zeros(shape, "<f4").tobytes(),
                         version=2)
    headers = {"Latentlink-Session": "00ff00ff", "Latentlink-Offset": "0", "Latentlink-Received": "1"}
    bad = [(b"", headers), (b"LLNK\x02\x04\xff\xff" + b"x" * 100, headers), (good[:-1], headers),
           (good, dict(headers, **{"Latentlink-Session": "../../etc"})), (good, dict(headers, **{
               "Latentlink-Offset": "nan"})), (b"\x00" * 5000, None)]

    async def publish():
        nc = await nats.connect(url)
        js = nc.jetstream()
        await fleet.ensure_stream(js)
        for data, hdrs in bad:
            await js.publish(fleet.subject("cam0"), data, headers=hdrs)
        await js.publish(fleet.subject("cam1"), good, headers=headers)  # a frame of cam0 on cam1's subject
        await js.publish(fleet.subject("cam0"), good, headers=headers)
        await nc.close()

    asyncio.run(publish())
    assert finish(worker, 120) == 0
    summary = report(tmp_path, "worker")
    assert (summary["terminated"], summary["written"], summary["failed"]) == (len(bad) + 1, 1, 0), summary
    assert pngs(tmp_path) == {"cam0": [0]}
    assert "terminated" in (tmp_path / "worker.log.err").read_text()


def _records(path):
    """Records in a report being written (one line each, after the head)."""
    try:
        with open(str(path)) as f:
            return max(0, sum(1 for _ in f) - 1)
    except OSError:
        return 0



# Without a broker.
def test_progressive_and_lossless_streams_through_the_fleet(procs, tmp_path, nats_server):  # noqa: F811
    """A progressive model's edge (2 of 3 iterations, context-coded) and a lossless edge -> a gateway -> a worker:
    the worker checks and decodes the progressive codes with the tables of their first k iterations, and rebuilds
    the lossless frames bit for bit without the decoder."""
    torch = pytest.importorskip("torch")
    import cv2
    import numpy as np

    from latentlink.edge.preprocess import Preprocessor, to_image
    from latentlink.edge.progressive import open_progressive
    from latentlink.export.__main__ import main as export_main
    from latentlink.export.models import build_model, save_checkpoint
    from latentlink.export.onnx_export import export_progressive

    size, frames = 64, 3
    torch.manual_seed(0)
    model = build_model("progressive", iterations=3, channels=16, state_channels=8)
    save_checkpoint(str(tmp_path / "tiny.pt"), model)
    export_progressive(model, size, size, str(tmp_path / "model"), checkpoint=str(tmp_path / "tiny.pt"), quiet=True)
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.RandomState(1)
    images = [cv2.GaussianBlur(rng.randint(0, 256, (size, size, 3)).astype(np.uint8), (9, 9), 3)
              for _ in range(frames)]
    for seq, image in enumerate(images):
        cv2.imwrite(str(photos / "{}.png".format(seq)), image)
    assert export_main(["entropy", "--checkpoint", str(tmp_path / "tiny.pt"), "--photos", str(photos), "--out",
                        str(tmp_path / "model")]) == 0  # the per-iteration tables of --entropy context
    profile = tmp_path / "progressive.yaml"
    profile.write_text("name: tiny-progressive\nmodel:\n  encoder: model/encoder_step.onnx\n  decoder: "
                       "model/decoder_step.onnx\ninput:\n  width: {0}\n  height: {0}\nbudget_ms: 33\n".format(size))
    url, port = nats_server.url, free_port()
    gateway = start_gateway(procs, tmp_path, profile, url, port, "gateway")
    worker = start_worker(procs, tmp_path, profile, url, "worker")
    common = ["--connect", "127.0.0.1:{}".format(port), "--profile", profile, "--source", "file://" + str(photos),
              "--frames", frames, "--delivery", "reliable", "--quiet"]
    edges = [spawn(procs, tmp_path / "edge0.log", "latentlink.edge", "--name", "cam0", "--rate", "fixed",
                   "--iterations", 2, "--entropy", "context", "--report", tmp_path / "edge0.json", *common),
             spawn(procs, tmp_path / "edge1.log", "latentlink.edge", "--name", "cam1", "--lossless", "med",
                   "--report", tmp_path / "edge1.json", *common)]
    assert [finish(edge, 120) for edge in edges] == [0, 0]
    for i in range(2):
        assert report(tmp_path, "edge{}".format(i))["outcomes"]["stored"] == frames
    wait_for(lambda: png_count(tmp_path) == 2 * frames, 120, "every frame to be written")
    assert pngs(tmp_path) == {"cam0": list(range(frames)), "cam1": list(range(frames))}
    with open_progressive(str(tmp_path / "model"), "encoder") as codec:
        for seq, image in enumerate(images):
            codes, _ = codec.encode(Preprocessor(size, size)(image), 2)
            expected = to_image(codec.decode(codes)[0])
            assert np.array_equal(cv2.imread(str(tmp_path / "out" / "cam0" / "{:06d}.png".format(seq))), expected)
            lossless = cv2.imread(str(tmp_path / "out" / "cam1" / "{:06d}.png".format(seq)))
            assert np.array_equal(lossless, image)
    assert stop_all(worker, gateway) == [0, 0]
    assert report(tmp_path, "worker")["failed"] == 0


def test_compose_fleet_services_parse_with_their_clis():
    """docker/compose.yaml's fleet profile: the gateway's command is a host command with --jetstream, the workers'
    a worker command writing into their volume, both at the broker service."""
    import yaml

    from latentlink.host.__main__ import get_args_parser as host_parser
    from latentlink.host.worker import get_args_parser as worker_parser

    from .conftest import ROOT

    with open(os.path.join(ROOT, "docker", "compose.yaml")) as f:
        services = yaml.safe_load(f)["services"]
    assert all(services[name]["profiles"] == ["fleet"] for name in ("nats", "gateway", "worker"))
    assert "-js" in services["nats"]["command"]
    gateway = host_parser().parse_args(services["gateway"]["command"])
    assert gateway.jetstream == "nats://nats:4222" and not gateway.out
    assert services["worker"]["entrypoint"] == ["latentlink", "worker"]
    worker = worker_parser().parse_args(services["worker"]["command"])
    assert worker.jetstream == "nats://nats:4222"
    assert worker.out == ["/frames"] and "./frames:/frames" in services["worker"]["volumes"]


def test_a_gateway_refuses_what_only_a_decoder_does(capsys):
    """A gateway decodes nothing: --out and the like are refused with the fix; a URL without its scheme too."""
    from latentlink.host.__main__ import main

    assert main(["--jetstream", "nats://127.0.0.1:1", "--out", "frames"]) == 2
    assert "give --out to the workers" in capsys.readouterr().err
    assert main(["--jetstream", "127.0.0.1:4222"]) == 2
    assert "nats://HOST:PORT" in capsys.readouterr().err


def test_frame_messages_round_trip_and_subjects_never_collide():
    import numpy as np

    from latentlink.edge.errors import ProtocolError
    from latentlink.edge.protocol import frame_payload, parse_meta

    payload = np.packbits(np.ones(64, "uint8")).tobytes()
    wire = frame_payload("a.b", 7, 12.5, np.ones((1, 1, 8, 8), "float32"), "bits", payload, version=2)
    meta = parse_meta(wire[8:-len(payload)], 0)
    assert fleet.frame_message(meta, payload) == wire  # byte for byte what the edge sent
    assert fleet.parse_frame_message(wire, 1 << 20) == (meta, payload)
    for bad in (wire[:-1], wire + b"x", wire[:7], b"LLNK\x01\x00\x00\x02{}"):
        with pytest.raises(ProtocolError):
            fleet.parse_frame_message(bad, 1 << 20)
    assert fleet.subject("a.b") == "latentlink.frames.a=b" != fleet.subject("a_b")
    assert fleet.mark_key("a.b", "00ff", 3) == "a=b.00ff.3"
