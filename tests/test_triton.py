"""The decode service (``latentlink decode-service``, Triton through PyTriton) and the host's ``triton://`` decoder.

The service runs as its own process on a free port with the shipped default decoder, as a GPU machine would serve
it; the host's frames travel to it and back. Behaviour only (what is decoded, counted and said), never timings:
benchmarks/triton_decode.py measures those.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from latentlink.edge.backends import open_backend, read_model_info
from latentlink.edge.errors import BackendError, ConfigError
from latentlink.host.triton_backend import RemoteModelInfo, open_decoder, parse_spec

from .conftest import ROOT, run_cli

DECODER = os.path.join(ROOT, "profiles", "default", "nano-504", "decoder.onnx")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(tmp_path, port, *extra):
    """``latentlink decode-service`` in its own process group (Triton's server and stubs die with it); returns
    the process once its models are ready."""
    pytest.importorskip("pytriton", reason="PyTriton is not installed: pip install \".[triton]\" for decode-service")
    ready = tmp_path / "service-{}.address".format(port)
    if ready.exists():
        ready.unlink()  # a restart on the same port: wait for the new service's file
    log = open(str(tmp_path / "service-{}.log".format(port)), "w")
    # PyTriton's workspace (a copy of Triton's server, and its Unix sockets: a short path) of its own, removed by
    # stop_service even after a SIGKILL, which leaves it behind (Triton's /tmp/folderXXXXXX copies of the two
    # models, 300 kB each, stay: Triton names them itself, ignoring TMPDIR)
    home = tempfile.mkdtemp(prefix="pytriton-")
    proc = subprocess.Popen([sys.executable, "-m", "latentlink", "decode-service", "--decoder", DECODER, "--listen",
                             "127.0.0.1:{}".format(port), "--ready-file", str(ready), "--threads", "1"] + list(extra),
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, PYTHONPATH=ROOT, PYTRITON_HOME=home))
    proc.home = home
    deadline = time.monotonic() + 180  # a loaded 2-core machine: Triton, its Python stubs and the model
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_service(proc)
            pytest.fail("decode-service did not start:\n" + open(log.name).read()[-3000:])
        time.sleep(0.2)
    return proc


def stop_service(proc, sig=signal.SIGTERM):
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except OSError:
            pass
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    shutil.rmtree(proc.home, ignore_errors=True)


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """triton://127.0.0.1:PORT/decoder, serving the shipped default decoder for the module's tests."""
    port = free_port()
    proc = start_service(tmp_path_factory.mktemp("service"), port)
    yield "triton://127.0.0.1:{}/decoder".format(port)
    stop_service(proc)
    assert proc.returncode == 0  # SIGTERM: a clean stop


def binary_latents(n, shape, seed=0):
    """``n`` latents of the decoder's shape, +-1 as the binarizing encoder makes them."""
    rng = np.random.default_rng(seed)
    return [np.where(rng.random(shape) < 0.5, -1.0, 1.0).astype(np.float32) for _ in range(n)]


def test_the_service_decodes_as_onnx_runtime_does_and_describes_its_model(service):
    local_info = read_model_info(DECODER)
    with open_decoder(service) as remote, open_backend(DECODER, "decoder") as local:
        assert remote.name == "triton"
        assert isinstance(remote.info, RemoteModelInfo)
        assert remote.input_shape == local.input_shape == (1, 8, 126, 126)
        assert remote.info.model_id == local_info.model_id
        assert remote.info.identity("context") == local_info.identity("context")  # the entropy tables came along
        assert remote.service["max_batch"] == 16 and remote.service["output_shape"] == [3, 504, 504]
        latents = binary_latents(3, remote.input_shape)
        got, timings = remote.infer_batch(latents)
        want, _ = local.infer_batch(latents)
        assert len(got) == 3 and "run_ms" in timings
        for g, w in zip(got, want):
            assert g.shape == w.shape == (1, 3, 504, 504) and g.dtype == np.float32
            np.testing.assert_allclose(g, w, atol=1e-4)
        single, _ = remote.infer(latents[1])
        np.testing.assert_allclose(single, want[1], atol=1e-4)
        with pytest.raises(BackendError, match="expected"):
            remote.infer(np.zeros((1, 8, 63, 63), np.float32))


def test_wrong_addresses_and_names_are_clear_errors(service):
    host, port, _ = parse_spec(service)
    with pytest.raises(BackendError, match=r"has no model 'nope'.*--model-name"):
        open_decoder("triton://{}:{}/nope".format(host, port))
    closed = free_port()
    with pytest.raises(BackendError, match=r"no decode service at http://127.0.0.1:{}.*latentlink decode-service"
                       .format(closed)):
        open_decoder("triton://127.0.0.1:{}/decoder".format(closed))
    for bad in ("triton://127.0.0.1/decoder", "triton://127.0.0.1:99999/decoder", "triton://h:1/a b"):
        with pytest.raises(ConfigError, match="triton://HOST:PORT/MODEL"):
            open_decoder(bad)
    with pytest.raises(ConfigError, match="the service decides"):
        open_decoder(service, device="cuda")
    run = run_cli("latentlink", "host", "--decoder", "triton://127.0.0.1:{}/decoder".format(closed), "--listen",
                  "127.0.0.1:0")
    assert run.returncode == 2 and "no decode service at http://127.0.0.1:{}".format(closed) in run.stderr


def start_host(tmp_path, decoder, streams):
    ready = tmp_path / "host.address"
    proc = subprocess.Popen([sys.executable, "-m", "latentlink", "host", "--listen", "127.0.0.1:0", "--ready-file",
                             str(ready), "--decoder", decoder, "--out", str(tmp_path / "frames"), "--report",
                             str(tmp_path / "host.json"), "--max-streams", str(streams)],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "host did not start"
        time.sleep(0.05)
    return proc, ready.read_text().strip()


def send(address, photos_dir, name, tmp_path, *extra):
    return run_cli("latentlink", "edge", "--source", "file://" + photos_dir, "--connect", address, "--name", name,
                   "--drop", "block", "--report", str(tmp_path / (name + ".json")), *extra, timeout=300)


def test_a_host_process_decodes_an_edges_frames_through_the_service(service, tmp_path, photos_dir):
    host, address = start_host(tmp_path, service, 1)
    # context coding: the host decodes the frames with the entropy tables the service sent
    edge = send(address, photos_dir, "cam0", tmp_path, "--entropy", "context")
    out, _ = host.communicate(timeout=300)
    assert edge.returncode == 0, edge.stderr
    assert host.returncode == 0, out
    assert sorted(os.listdir(str(tmp_path / "frames" / "cam0"))) == ["{:06d}.png".format(i) for i in range(4)]
    report = json.loads((tmp_path / "host.json").read_text())
    assert report["meta"]["backend"] == "triton"
    assert report["frames"] == 4 and report.get("failed", 0) == 0
    edge_report = json.loads((tmp_path / "cam0.json").read_text())
    assert edge_report["outcomes"] == {"decoded": 4, "failed": 0, "refused": 0, "dropped": 0, "lost": 0}


def test_the_python_api_receiver_decodes_through_the_service(service, photos_dir):
    import cv2

    from latentlink import Receiver, Sender

    with Receiver("127.0.0.1:0", decoder=service, max_streams=1) as hub:
        with Sender(hub.address, name="api") as sender:
            sender.send_image(cv2.imread(os.path.join(photos_dir, "coffee.png")))
        name, image = hub.recv_image(timeout=120)
    assert name == "api" and image.shape == (504, 504, 3) and image.dtype == np.uint8


def test_a_killed_service_fails_the_frames_with_a_reason_and_the_host_stays_up(tmp_path, photos_dir):
    port = free_port()
    spec = "triton://127.0.0.1:{}/decoder".format(port)
    service = start_service(tmp_path, port)
    try:
        host, address = start_host(tmp_path, spec, 2)
        stop_service(service, signal.SIGKILL)  # the GPU machine gone: no goodbye
        failed = send(address, photos_dir, "cam0", tmp_path)
        service = start_service(tmp_path, port)  # back: the same host decodes the next edge's frames
        decoded = send(address, photos_dir, "cam1", tmp_path)
        out, _ = host.communicate(timeout=300)
    finally:
        stop_service(service)
    assert host.returncode == 1, out  # frames failed: exit code 1, after the summary (no crash)
    assert "4 frames decoded; 4 failed" in out, out
    report = json.loads((tmp_path / "host.json").read_text())
    streams = report["streams"]
    assert streams["cam0"]["frames"] == 0 and streams["cam0"]["failed"] == 4
    assert streams["cam1"]["frames"] == 4 and streams["cam1"]["failed"] == 0
    assert out.count("failed to decode: no decode service at http://127.0.0.1:{} (connection refused)".format(
        port)) == 4, out
    assert sorted(os.listdir(str(tmp_path / "frames" / "cam1"))) == ["{:06d}.png".format(i) for i in range(4)]
    assert decoded.returncode == 0, decoded.stderr
    outcomes = json.loads((tmp_path / "cam0.json").read_text())["outcomes"]
    assert outcomes["failed"] == 4 and outcomes["decoded"] == 0, (failed.stdout, failed.stderr)
    assert json.loads((tmp_path / "cam1.json").read_text())["outcomes"]["decoded"] == 4


# --- a hostile or broken service: the client's checks, against a fake one (no PyTriton needed) ----------------------
class FakeService(object):
    """A loopback HTTP server answering each path with a canned (status, headers, body)."""

    def __init__(self, answers):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                status, headers, body = answers.get(self.path, (404, {}, b'{"error": "unknown model"}'))
                self.send_response(status)
                headers = dict({"Content-Length": str(len(body))}, **headers)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.handle_error = lambda request, address: None  # a client that stopped reading an oversized answer
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.spec = "triton://127.0.0.1:{}/decoder".format(self.server.server_address[1])

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def info_answer(model=None, entropy=None, service=None, wrap=True):
    """The ``decoder-info`` model's answer as Triton's JSON carries it."""
    info = {"format": "latentlink-decode-service", "version": 1, "model": model or read_model_info(DECODER).data,
            "entropy": entropy, "service": service or {"output_shape": [3, 504, 504]}}
    text = json.dumps(info) if wrap else info
    return (200, {}, json.dumps({"outputs": [{"name": "info", "datatype": "BYTES", "shape": [1],
                                              "data": [text]}]}).encode())


@pytest.mark.parametrize("answer, error, message", [
    ((200, {}, b"<html>not Triton</html>"), ConfigError, "not a latentlink decode service's answer"),
    (info_answer(wrap=False), ConfigError, "not a latentlink decode service's answer"),
    ((200, {}, json.dumps({"outputs": [{"data": [json.dumps({"format": "other", "version": 1})]}]}).encode()),
     ConfigError, "format 'other'"),
    (info_answer(model=dict(read_model_info(DECODER).data, input_shape=[1, 3, 10 ** 6, 10 ** 6])), ConfigError,
     "not an NCHW shape"),
    (info_answer(model=dict(read_model_info(DECODER).data, bits_per_pixel="many")), ConfigError,
     "not a latentlink model description"),
    (info_answer(model=dict(read_model_info(DECODER).data, packing="gzip")), ConfigError, "packing 'gzip'"),
    ((200, {"Content-Length": str(10 ** 10)}, b"{}"), BackendError, "more than"),
    ((500, {}, b'{"error": "out of memory"}'), BackendError, "out of memory"),
])
def test_a_service_that_answers_nonsense_about_its_model_is_a_clear_error(answer, error, message):
    fake = FakeService({"/v2/models/decoder-info/infer": answer})
    try:
        with pytest.raises(error, match=message):
            open_decoder(fake.spec)
    finally:
        fake.close()


def test_context_coded_frames_need_the_services_tables_and_bad_tables_are_refused():
    fake = FakeService({"/v2/models/decoder-info/infer": info_answer(entropy=None)})
    try:
        with pytest.raises(ConfigError, match="has none"):
            open_decoder(fake.spec).info.context_model()
    finally:
        fake.close()
    fake = FakeService({"/v2/models/decoder-info/infer": info_answer(entropy='{"format": "latentlink-entropy"}')})
    try:
        with pytest.raises(ConfigError, match="its entropy tables"):
            open_decoder(fake.spec).info.context_model()
    finally:
        fake.close()


def decoded_answer(shape, data=None):
    header = json.dumps({"outputs": [{"name": "image", "datatype": "FP32", "shape": list(shape),
                                      "parameters": {"binary_data_size": 4 * int(np.prod(shape))}}]}).encode()
    body = np.zeros(shape, np.float32).tobytes() if data is None else data
    return (200, {"Inference-Header-Content-Length": str(len(header))}, header + body)


@pytest.mark.parametrize("answer, message", [
    (decoded_answer((1, 3, 504, 504)), None),
    (decoded_answer((1, 3, 252, 252)), r"malformed answer .*\[1, 3, 252, 252\] \(expected FP32 \[1, 3, 504, 504\]\)"),
    (decoded_answer((1, 3, 504, 504), data=b"\0" * 100), "malformed answer"),
    (decoded_answer((1, 3, 504, 504), data=b"\0" * (4 * 3 * 504 * 504 + 10 ** 6)), "more than"),
    ((400, {}, b'{"error": "input latents: wrong shape"}'), "refused 1 frame.*wrong shape"),
])
def test_a_service_that_answers_nonsense_to_a_frame_fails_that_frame_clearly(answer, message):
    fake = FakeService({"/v2/models/decoder-info/infer": info_answer(), "/v2/models/decoder/ready": (200, {}, b""),
                        "/v2/models/decoder/infer": answer})
    try:
        with open_decoder(fake.spec) as decoder:
            latents = np.ones(decoder.input_shape, np.float32)
            if message is None:
                assert decoder.infer(latents)[0].shape == (1, 3, 504, 504)
            else:
                with pytest.raises(BackendError, match=message):
                    decoder.infer(latents)
    finally:
        fake.close()
