"""The Python API: a Sender process streaming to a Receiver in this process, every frame accounted for on both sides.

The Sender runs in its own interpreter (``python -c SENDER_SCRIPT``), as it would on a Jetson; tests/
test_python36_edge.py runs the same script on Python 3.6. No timing is asserted: behaviour and exact counts only.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from latentlink import Receiver, Sender
from latentlink.edge.errors import ConfigError
from latentlink.host.api import ReceiverClosed, ReceiverError

from .conftest import ROOT, TINY

SIZES = [(80, 96), (480, 640), (50, 31), (64, 64)]  # (height, width): any size goes, fitted by the profile
# Python 3.6-compatible on purpose (no f-strings): tests/test_python36_edge.py runs it on the Nano's interpreter.
SENDER_SCRIPT = r"""
import json, sys
import numpy as np
from latentlink import Sender

args = json.loads(sys.argv[1])
rng = np.random.RandomState(0)
with Sender(args["address"], name=args["name"], profile=args["profile"], **args["options"]) as sender:
    for i in range(args["frames"]):
        if args["latents"]:
            sender.send_latents(rng.rand(*sender.latent_shape) > 0.5)  # booleans: converted to float32
        else:
            h, w = args["sizes"][i % len(args["sizes"])]
            sender.send_image(rng.randint(0, 256, (h, w, 3)).astype(np.uint8))
print(json.dumps(sender.summary))
"""


def start_sender(address, profile, frames, name="cam", latents=False, python=sys.executable, **options):
    args = {"address": address, "name": name, "profile": profile, "frames": frames, "latents": latents,
            "sizes": SIZES, "options": options}
    return subprocess.Popen([python, "-c", SENDER_SCRIPT, json.dumps(args)], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True)


def sender_summary(proc):
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def assert_accounted(summary):
    """Every frame the Sender was handed ended in exactly one outcome."""
    assert summary["captured"] == sum(summary["outcomes"].values()), summary["outcomes"]


def take_all(receiver, proc, limit=None):
    """Frames from ``receiver`` until it stops (or ``limit`` frames); fails at once if the sender process fails."""
    frames = []
    while limit is None or len(frames) < limit:
        try:
            frames.append(receiver.recv(timeout=1.0))
        except TimeoutError:
            assert proc.poll() in (None, 0), proc.communicate()[1]
        except ReceiverClosed:
            break
    return frames


def latent_shape(profile):
    from latentlink.edge.backends import read_model_info
    from latentlink.edge.profile import load_profile

    return tuple(read_model_info(load_profile(profile).model.encoder).latent_shape)


def test_images_of_any_size_arrive_in_order_and_both_summaries_agree(tiny_profile, tmp_path):
    with Receiver("127.0.0.1:0", profile=tiny_profile, max_streams=1, out=str(tmp_path / "frames"),
                  report=str(tmp_path / "host.json")) as receiver:
        proc = start_sender(receiver.address, tiny_profile, 12, drop="block", report=str(tmp_path / "edge.json"))
        frames = list(receiver)  # ends when the stream ends (max_streams=1)
        host = receiver.close()
    edge = sender_summary(proc)
    assert [(f.stream, f.seq) for f in frames] == [("cam", i) for i in range(12)]
    shape = latent_shape(tiny_profile)
    for frame in frames:
        assert frame.image.shape == (TINY, TINY, 3) and frame.image.dtype == np.uint8
        assert frame.latents.shape == shape
        assert abs(frame.t_capture - time.time()) < 3600 and frame.bytes > 0
        assert {"receive", "deserialize", "decode"} <= set(frame.timings)
    assert edge["captured"] == 12 and edge["outcomes"] == {"decoded": 12, "failed": 0, "refused": 0, "dropped": 0,
                                                           "lost": 0}
    assert edge["end_acknowledged"] and edge["stages"]["preprocess"]["frames"] == 12
    assert host["frames"] == 12 and host["failed"] == 0 and host["streams"]["cam"]["ended"]
    assert host["receiver"] == {"delivered": 12, "undelivered": 0}
    assert len(os.listdir(str(tmp_path / "frames" / "cam"))) == 12  # out= saves PNGs too
    from latentlink.edge.profiler import load_report

    assert load_report(str(tmp_path / "edge.json"), records=False)["outcomes"]["decoded"] == 12
    assert load_report(str(tmp_path / "host.json"), records=False)["frames"] == 12


def test_recv_image_and_send_latents(tiny_profile):
    """imagezmq's two calls, and latents sent as the encoder's output arrive exactly as sent."""
    shape = latent_shape(tiny_profile)
    rng = np.random.RandomState(0)  # the sender script's draws
    sent = [(rng.rand(*shape) > 0.5).astype(np.float32) for _ in range(5)]
    with Receiver("127.0.0.1:0", profile=tiny_profile, max_streams=1) as receiver:
        proc = start_sender(receiver.address, tiny_profile, 5, name="z", latents=True, drop="block")
        received = [receiver.recv_image(timeout=60) for _ in range(5)]
        frames = take_all(receiver, proc)
        host = receiver.close()
    edge = sender_summary(proc)
    assert frames == [] and [name for name, _ in received] == ["z"] * 5
    assert all(image.shape == (TINY, TINY, 3) for _, image in received)
    assert edge["outcomes"]["decoded"] == 5 and edge["stages"]["preprocess"]["frames"] == 0
    assert host["frames"] == 5 and host["receiver"]["delivered"] == 5
    with pytest.raises(ReceiverClosed):
        receiver.recv()
    # The latents the host decoded are the ones sent (packed and unpacked on the way).
    with Receiver("127.0.0.1:0", profile=tiny_profile, max_streams=1) as receiver:
        proc = start_sender(receiver.address, tiny_profile, 5, name="z", latents=True, drop="block")
        frames = take_all(receiver, proc)
    sender_summary(proc)
    assert len(frames) == 5
    for frame, latents in zip(frames, sent):
        np.testing.assert_array_equal(frame.latents, latents)


def test_callback_form_and_an_error_in_the_callback(tiny_profile):
    got = []
    with Receiver("127.0.0.1:0", profile=tiny_profile, max_streams=1, on_frame=got.append) as receiver:
        proc = start_sender(receiver.address, tiny_profile, 6, drop="block")
        assert receiver.wait(timeout=120)
        host = receiver.close()
        with pytest.raises(ConfigError, match="on_frame"):
            next(iter(receiver))
    assert sender_summary(proc)["outcomes"]["decoded"] == 6
    assert [f.seq for f in got] == list(range(6)) and host["receiver"]["delivered"] == 6

    def fails(frame):
        if frame.seq == 2:
            raise ValueError("application bug at frame 2")

    receiver = Receiver("127.0.0.1:0", profile=tiny_profile, on_frame=fails, queue_size=1)
    proc = start_sender(receiver.address, tiny_profile, 20, drop="block", wait_for_host_s=2.0)
    with pytest.raises(ReceiverError, match="on_frame failed: ValueError: application bug at frame 2") as caught:
        receiver.wait(timeout=120)
    assert isinstance(caught.value.__cause__, ValueError)
    receiver.close()  # already told: no second raise
    edge = sender_summary(proc)
    assert_accounted(edge)
    assert edge["captured"] == 20 and edge["outcomes"]["lost"] > 0


@pytest.mark.parametrize("drop", ["block", "newest"])
def test_a_slow_consumer_with_a_small_queue_slows_the_edge_instead_of_growing_memory(tiny_profile, drop):
    """Frames decoded and not yet taken never exceed the queue; under block every frame arrives, under newest the
    edge drops what did not fit, and every frame is in exactly one bucket."""
    queue_size, frames = 2, 30
    with Receiver("127.0.0.1:0", profile=tiny_profile, max_streams=1, queue_size=queue_size) as receiver:
        proc = start_sender(receiver.address, tiny_profile, frames, drop=drop, window=2, queue_size=1)
        taken, most_waiting = [], 0
        for frame in receiver:
            taken.append(frame.seq)
            snapshot = receiver.snapshot()
            most_waiting = max(most_waiting, snapshot["frames"] - len(taken))
            assert snapshot["queued"] <= queue_size
            time.sleep(0.05)  # the slow application
        host = receiver.close()
    edge = sender_summary(proc)
    assert_accounted(edge)
    assert most_waiting <= queue_size
    assert edge["window"] == 2 and edge["outcomes"]["decoded"] == len(taken) == host["frames"]
    assert taken == sorted(taken)
    if drop == "block":
        assert taken == list(range(frames))
    else:
        assert edge["outcomes"]["decoded"] + edge["outcomes"]["dropped"] == frames


def test_receiver_closing_mid_stream_every_frame_is_accounted_for_by_the_sender(tiny_profile):
    receiver = Receiver("127.0.0.1:0", profile=tiny_profile, queue_size=2)
    proc = start_sender(receiver.address, tiny_profile, 40, drop="block", wait_for_host_s=1.0)
    taken = take_all(receiver, proc, limit=5)
    host = receiver.close()
    edge = sender_summary(proc)
    assert [f.seq for f in taken] == list(range(5))
    assert_accounted(edge)
    assert edge["captured"] == 40 and edge["outcomes"]["lost"] > 0 and edge["gave_up"]
    assert host["receiver"]["delivered"] == 5
    assert host["frames"] == 5 + host["receiver"]["undelivered"]
    # The host queues a frame, then acknowledges it: the application may take frame 4 before its ACK is sent, and
    # the close then cut that ACK off (the edge counts it lost; seen here under load). ACKs are never invented.
    assert 4 <= edge["outcomes"]["decoded"] <= host["frames"]
    with pytest.raises(ReceiverClosed):
        receiver.recv()


def test_bad_arguments_say_what_is_wrong(tiny_profile, tmp_path):
    with Sender("127.0.0.1:9", name="bad", profile=tiny_profile, wait_for_host_s=0.5) as sender:
        with pytest.raises(ConfigError, match=r"HxWx3 uint8 BGR image .* shape \[4, 4\]"):
            sender.send_image(np.zeros((4, 4), np.uint8))
        with pytest.raises(ConfigError, match="of shape {}".format(list(sender.latent_shape)).replace("[", r"\[")):
            sender.send_latents(np.zeros((1, 2, 3, 4), np.float32))
    assert sender.summary["captured"] == 0
    with pytest.raises(ConfigError, match="reliable delivery never drops"):
        Sender("127.0.0.1:9", profile=tiny_profile, delivery="reliable", drop="oldest")
    with pytest.raises(ConfigError, match="queue_size"):
        Receiver("127.0.0.1:0", profile=tiny_profile, queue_size=0)
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="out"):
        Receiver("127.0.0.1:0", profile=tiny_profile, out=str(tmp_path / "file"))


def test_the_edge_imports_no_host_code_for_the_sender():
    code = ("import sys, latentlink; from latentlink import Sender; "
            "assert not [m for m in sys.modules if m.startswith('latentlink.host')], sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), check=True)


def api_snippet(name, *replacements):
    """The code block after ``<!-- api-snippet: NAME -->`` in README.md, each (old, new) replaced exactly once."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        found = re.findall(r"<!-- api-snippet: %s -->\n```python\n(.*?)```" % name, f.read(), flags=re.S)
    assert len(found) == 1, "README.md has %d '%s' snippets" % (len(found), name)
    code = found[0]
    for old, new in replacements:
        assert code.count(old) == 1, old
        code = code.replace(old, new)
    return code


def free_address():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return "127.0.0.1:%d" % s.getsockname()[1]


def test_readme_two_lines_run_as_printed():
    """The README's imagezmq-style lines, with the shipped default profile; only the addresses are changed."""
    address = free_address()
    code = api_snippet("two-lines", ("192.168.1.20:5760", address), ("0.0.0.0:5760", address))
    namespace = {"image": np.random.RandomState(0).randint(0, 256, (480, 640, 3)).astype(np.uint8)}
    try:
        exec(code, namespace)
    finally:
        for name in ("sender", "hub"):  # the sender first: it ends its stream while the host still listens
            if name in namespace:
                namespace[name].close()
    assert namespace["name"] == "cam0" and namespace["image"].shape == (504, 504, 3)
    assert namespace["sender"].summary["outcomes"]["decoded"] == 1


def test_readme_receiver_and_sender_snippets_print_what_they_say(tmp_path, video_file):
    """The fuller snippets, each in its own process, the default profile; the address and the clip are changed.
    What they print must be what the README's comments say."""
    address = free_address()
    receiver_code = api_snippet("receiver", ("0.0.0.0:5760", address))
    sender_code = api_snippet("sender", ("192.168.1.20:5760", address), ('"clip.mp4"', repr(video_file)))
    env = dict(os.environ, PYTHONPATH=ROOT)
    receiver = subprocess.Popen([sys.executable, "-c", receiver_code], cwd=str(tmp_path), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    sender = subprocess.run([sys.executable, "-c", sender_code], cwd=str(tmp_path), env=env, capture_output=True,
                            text=True, timeout=240)
    out, err = receiver.communicate(timeout=120)
    assert sender.returncode == 0 and receiver.returncode == 0, sender.stderr + err
    said = re.search(r"# (24 \{'delivered'.*)", receiver_code).group(1)
    assert out.splitlines()[-1] == said
    said = re.search(r"^# (24 \{'decoded'.*)", sender_code, flags=re.M).group(1)
    assert sender.stdout.splitlines()[-1] == said
    assert len(list(tmp_path.glob("cam0-*.png"))) == 24 and (tmp_path / "edge.json").exists()


def test_a_failure_in_the_host_thread_is_raised_in_the_application(tiny_profile, monkeypatch):
    from latentlink.host.server import Host

    def broken_serve(self):
        raise RuntimeError("the accept loop broke")

    monkeypatch.setattr(Host, "serve", broken_serve)
    receiver = Receiver("127.0.0.1:0", profile=tiny_profile)
    with pytest.raises(ReceiverError, match="host thread failed: RuntimeError: the accept loop broke") as caught:
        next(iter(receiver))
    assert isinstance(caught.value.__cause__, RuntimeError)
    receiver.close()  # already raised: not again
    receiver = Receiver("127.0.0.1:0", profile=tiny_profile)
    receiver._thread.join(10)
    with pytest.raises(ReceiverError, match="accept loop broke"):  # never told: close() says it
        receiver.close()


def test_a_sender_with_another_model_is_refused_and_says_why(tiny_profile):
    with Receiver("127.0.0.1:0", profile=tiny_profile) as receiver:
        with Sender(receiver.address, name="other", wait_for_host_s=5) as sender:  # the default model, not tiny
            image = np.zeros((120, 160, 3), np.uint8)
            while not sender.stopped:
                sender.send_image(image)
            assert sender.send_image(image) is False
    summary = sender.summary
    assert summary["refused"]["reason"] in ("model_mismatch", "shape_mismatch"), summary["refused"]
    assert_accounted(summary)
    # >= 1: the refusal may arrive before the loop's first frame (then only the last send_image is captured)
    assert summary["outcomes"]["refused"] == summary["captured"] >= 1


def test_on_frame_may_close_the_receiver(tiny_profile):
    seen, summaries = [], []

    def enough(frame):
        seen.append(frame.seq)
        if frame.seq == 3:
            summaries.append(receiver.close())

    receiver = Receiver("127.0.0.1:0", profile=tiny_profile, on_frame=enough, queue_size=1)
    proc = start_sender(receiver.address, tiny_profile, 20, drop="block", wait_for_host_s=1.0)
    assert receiver.wait(timeout=120)
    edge = sender_summary(proc)
    assert seen == [0, 1, 2, 3] and summaries[0]["receiver"]["delivered"] == 4
    assert receiver.close() is summaries[0]
    assert_accounted(edge)
    # Frame 3 is queued before its ACK is sent: the close from on_frame(3) may cut that ACK off (seen here under load).
    assert edge["captured"] == 20 and edge["outcomes"]["decoded"] >= 3
