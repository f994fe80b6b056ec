"""The README's seed-style snippets, as they are printed there, against a real host and a real edge process.

The sender (a plain socket: 8-byte big-endian length + pickle.dumps(latents)) streams to `latentlink host
--accept-pickle-raw`, which must write the images its decoder makes of exactly those latents; the receiver reads
what `latentlink edge --serializer pickle-raw` sends and must get exactly the encoder's latents of every frame.
Only the address and the latent shape are changed, to this test's host and tiny model.
"""

import os
import re
import subprocess
import threading
import time

import cv2
import numpy as np
import pytest

from latentlink.edge.backends import open_backend
from latentlink.edge.preprocess import Preprocessor, to_image
from latentlink.edge.profile import load_profile
from latentlink.edge.profiler import load_report
from latentlink.edge.sources import open_source

from .conftest import ROOT, run_cli
from .test_end_to_end import start_host


def snippet(name):
    """The code block after ``<!-- seed-snippet: NAME -->`` in README.md."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        found = re.findall(r"<!-- seed-snippet: %s -->\n```python\n(.*?)```" % name, f.read(), flags=re.S)
    assert len(found) == 1, "README.md has %d '%s' snippets" % (len(found), name)
    return found[0]


def replace_once(code, pattern, replacement):
    code, n = re.subn(pattern, lambda _: replacement, code, flags=re.M)
    assert n == 1, pattern
    return code


def sender_code(address, shape):
    host, port = address.rsplit(":", 1)
    code = replace_once(snippet("sender"), r'^HOST, PORT = "[^"]+", 5760', 'HOST, PORT = "%s", %s' % (host, port))
    return replace_once(code, r"^SHAPE = \(1, 8, 126, 126\)", "SHAPE = %r" % (tuple(shape),))


def decoded_images(profile, latents):
    with open_backend(profile.model.decoder, "decoder") as decoder:
        return [to_image(decoder.infer(z.astype(np.float32))[0]) for z in latents]


def assert_host_wrote(tmp_path, host, profile, latents):
    try:
        host_out, _ = host.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # the stream never ended: the host did not take what the snippet sent
        host.kill()
        raise AssertionError("the host did not end the stream:\n" + host.communicate()[0])
    assert host.returncode == 0, host_out
    report = load_report(str(tmp_path / "host.json"))
    (stream, stats), = report["streams"].items()
    assert re.match(r"raw-127\.0\.0\.1-\d+\Z", stream), stream
    assert stats["frames"] == len(latents) and stats["ended"] and stats["gaps"] == 0
    assert report["failed"] == 0 and report["protocol_errors"] == 0
    assert [r["seq"] for r in report["records"]] == list(range(len(latents)))
    assert all(r["latency_ms"] is None for r in report["records"])  # no capture time in a plain pickle
    folder = tmp_path / "frames" / stream
    assert sorted(os.listdir(str(folder))) == ["{:06d}.png".format(i) for i in range(len(latents))]
    for seq, image in enumerate(decoded_images(profile, latents)):
        assert np.array_equal(cv2.imread(str(folder / "{:06d}.png".format(seq))), image), seq
    assert "--accept-pickle-raw: connections of 8-byte lengths and pickles" in host_out


def test_the_readme_sender_streams_to_a_host_with_accept_pickle_raw(tmp_path, tiny_profile):
    host, address = start_host(tmp_path, tiny_profile, "--accept-pickle-raw")
    profile = load_profile(tiny_profile)
    with open_backend(profile.model.decoder, "decoder") as decoder:
        shape = tuple(decoder.input_shape)
    namespace = {"__name__": "snippet"}
    exec(compile(sender_code(address, shape), "README.md:sender", "exec"), namespace)  # noqa: S102 (our README)
    assert len(namespace["latents"]) == 8
    assert_host_wrote(tmp_path, host, profile, namespace["latents"])


def test_the_readme_sender_on_python36(tmp_path, tiny_profile):
    """The same snippet on the Nano's Python 3.6 + numpy 1.19: pickle protocol 3, numpy 1.x's module names."""
    from .test_report_views import python36

    py36 = python36()
    host, address = start_host(tmp_path, tiny_profile, "--accept-pickle-raw")
    profile = load_profile(tiny_profile)
    with open_backend(profile.model.decoder, "decoder") as decoder:
        shape = tuple(decoder.input_shape)
    saved = str(tmp_path / "latents.npy")
    code = sender_code(address, shape) + "\nnp.save(%r, np.stack(latents))\n" % saved
    done = subprocess.run([py36, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert_host_wrote(tmp_path, host, profile, list(np.load(saved)))


def test_the_readme_receiver_reads_what_an_edge_sends_with_pickle_raw(tmp_path, tiny_profile, video_file):
    code = replace_once(snippet("receiver"), r'^server = socket\.create_server\(\("0\.0\.0\.0", 5760\)\)',
                        'server = socket.create_server(("127.0.0.1", 0))')
    namespace = {"__name__": "snippet"}
    errors = []

    def receive():
        try:
            exec(compile(code, "README.md:receiver", "exec"), namespace)  # noqa: S102 (our README)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while "server" not in namespace:
        assert not errors and time.monotonic() < deadline, errors
        time.sleep(0.01)
    port = namespace["server"].getsockname()[1]
    edge = run_cli("latentlink.edge", "--source", "file://" + video_file, "--connect", "127.0.0.1:%d" % port,
                   "--profile", tiny_profile, "--drop", "block", "--serializer", "pickle-raw", "--report",
                   str(tmp_path / "edge.json"))
    thread.join(30)
    namespace["server"].close()
    assert edge.returncode == 0, edge.stderr
    assert not errors and not thread.is_alive(), errors
    report = load_report(str(tmp_path / "edge.json"))
    assert report["outcomes"] == {"decoded": 0, "failed": 0, "refused": 0, "dropped": 0, "lost": 0, "sent": 24}
    assert report["serializer"] == "pickle-raw" and report["protocol"] == 1 and "latency" not in report
    received = namespace["received"]
    assert len(received) == 24
    # Exactly the encoder's latents of each frame, in order, as the edge would have packed them for its host.
    profile = load_profile(tiny_profile)
    pre = Preprocessor(profile.input.width, profile.input.height, profile.input.fit)
    with open_backend(profile.model.encoder, "encoder") as encoder, open_source("file://" + video_file) as source:
        for seq, (frame, _) in enumerate(source):
            expected, _ = encoder.infer(pre(frame))
            assert received[seq].dtype == expected.dtype and np.array_equal(received[seq], expected), seq
    # The wire bytes: each frame's 8-byte length and its pickle, nothing else.
    sizes = [r["bytes"] for r in report["records"]]
    import pickle

    assert sizes == [8 + len(pickle.dumps(z, protocol=3)) for z in received]
