"""The edge on the Nano's Python 3.6 + numpy 1.19, sending to a host on this Python + numpy 2.

Runs when LATENTLINK_PY36 names a Python 3.6 interpreter with numpy 1.19, PyYAML, OpenCV and onnxruntime
installed (.ci/run builds one when pyenv has 3.6); skipped otherwise.
"""

import json
import os
import subprocess

import pytest

from .conftest import ROOT
from .test_end_to_end import start_host

PY36 = os.environ.get("LATENTLINK_PY36")
pytestmark = pytest.mark.skipif(not PY36, reason="set LATENTLINK_PY36 to a Python 3.6 interpreter to run")


def test_interpreter_is_the_nano_one():
    out = subprocess.run([PY36, "-c", "import sys, numpy; print(sys.version_info[:2], numpy.__version__)"],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("(3, 6)") and "1.19" in out


@pytest.mark.parametrize("serializer, entropy, protocol", [
    ("framed", "none", "2"), ("pickle", "none", "2"), ("framed", "zstd", "2"), ("framed", "lz4", "2"),
    ("framed", "none", "1"), ("framed", "zlib", "1")])
def test_python36_edge_streams_to_this_host(tmp_path, tiny_profile, video_file, serializer, entropy, protocol):
    """Protocol 2 (acknowledged, every frame accounted for) and protocol 1 (an old edge: the host still serves it).
    Also the entropy coders across versions: zstandard 0.20 / lz4 3.1 on the edge, the newest here."""
    host, address = start_host(tmp_path, tiny_profile, *(["--accept-pickle"] if serializer == "pickle" else []))
    edge = subprocess.run([PY36, "-m", "latentlink.edge", "--source", "file://" + video_file, "--connect", address,
                           "--name", "nano", "--profile", tiny_profile, "--drop", "block", "--serializer",
                           serializer, "--entropy", entropy, "--protocol", protocol,
                           "--report", str(tmp_path / "edge.json")],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=120)
    host_out, _ = host.communicate(timeout=60)
    assert edge.returncode == 0, edge.stderr
    report = json.loads((tmp_path / "host.json").read_text())
    assert report["frames"] == 24 and report["failed"] == 0 and report["protocol_errors"] == 0
    assert report["streams"]["nano"]["ended"]
    edge_report = json.loads((tmp_path / "edge.json").read_text())
    assert ("entropy" in edge_report["stages"]) == (entropy != "none")
    if protocol == "2":  # acknowledged: the edge knows each frame was decoded, and how long it took
        assert edge_report["outcomes"] == {"decoded": 24, "failed": 0, "refused": 0, "dropped": 0, "lost": 0}
        assert edge_report["end_acknowledged"] and edge_report["latency"]["frames"] == 24
    else:  # no acknowledgements: written to the socket is all the edge can know
        assert edge_report["outcomes"]["sent"] == 24 and "latency" not in edge_report


def test_python36_edge_codes_with_the_context_model_for_this_host(tmp_path, tiny_context_profile, video_file):
    """--entropy context: the tables' coder on Python 3.6 + numpy 1.19, decoded here bit for bit (the host
    saves what the model decodes from the edge's own latents; any difference would be another image)."""
    from .test_end_to_end import assert_host_saved_what_the_model_decodes

    host, address = start_host(tmp_path, tiny_context_profile)
    edge = subprocess.run([PY36, "-m", "latentlink.edge", "--source", "file://" + video_file, "--connect", address,
                           "--name", "nano", "--profile", tiny_context_profile, "--drop", "block", "--entropy",
                           "context", "--report", str(tmp_path / "edge.json")],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=120)
    host.communicate(timeout=60)
    assert edge.returncode == 0, edge.stderr
    report = json.loads((tmp_path / "host.json").read_text())
    assert report["frames"] == 24 and report["failed"] == 0 and report["protocol_errors"] == 0
    assert_host_saved_what_the_model_decodes(tmp_path, "nano", video_file, tiny_context_profile)


PY36_ENGINE_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from tests import fake_tensorrt
package, driver = fake_tensorrt.make_pycuda()
sys.modules.update({{"pycuda": package, "pycuda.driver": driver,
                    "tensorrt": fake_tensorrt.make_tensorrt({api!r}, driver=driver)}})
from latentlink.export.__main__ import main as export_main
assert export_main(["check", {onnx!r}]) == 0
assert export_main(["engine", {onnx!r}, "--out", {out!r}]) == 0
import glob
engine = glob.glob({out!r} + "/*.engine")[0]
from latentlink.edge.__main__ import main as edge_main
code = edge_main(["--source", "synthetic://", "--connect", {address!r}, "--name", "nano", "--profile", {profile!r},
                  "--encoder", engine, "--frames", "6", "--drop", "block", "--report", {report!r}] + {extra!r})
assert not driver._state.stack and driver._state.contexts_alive == 0
sys.exit(code)
"""


@pytest.mark.parametrize("api, extra", [("8.2", []), ("10", ["--mapped"])])
def test_python36_engine_build_and_tensorrt_edge_against_fakes(tmp_path, tiny_profile, api, extra):
    """`latentlink export check/engine` and the TensorRT edge on Python 3.6 + numpy 1.19, with TensorRT and pycuda
    faked (tests/fake_tensorrt.py): the Nano's interpreter runs every line of the TensorRT path we can run here."""
    check = subprocess.run([PY36, "-c", "import onnx, onnxruntime"], capture_output=True)
    if check.returncode:
        pytest.skip("the Python 3.6 environment has no onnx/onnxruntime (the fakes parse and run ONNX with them)")
    import shutil

    from latentlink.edge.profile import load_profile

    onnx_dir = tmp_path / "model"
    shutil.copytree(os.path.dirname(load_profile(tiny_profile).model.encoder), str(onnx_dir))
    host, address = start_host(tmp_path, tiny_profile)
    script = PY36_ENGINE_SCRIPT.format(root=ROOT, api=api, onnx=str(onnx_dir / "encoder.onnx"),
                                       out=str(tmp_path / "engines"), address=address, profile=tiny_profile,
                                       report=str(tmp_path / "edge.json"), extra=extra)
    edge = subprocess.run([PY36, "-c", script], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=120)
    host.communicate(timeout=60)
    assert edge.returncode == 0, edge.stdout + edge.stderr
    assert "built " in edge.stdout and "CUDA med" in edge.stdout
    edge_report = json.loads((tmp_path / "edge.json").read_text())
    assert edge_report["meta"]["backend"] == "tensorrt" and set(edge_report["gpu_stages"]) == {"encode", "gpu_to_cpu"}
    report = json.loads((tmp_path / "host.json").read_text())
    assert report["frames"] == 6 and report["failed"] == 0 and report["streams"]["nano"]["ended"]
    assert edge_report["outcomes"]["decoded"] == 6


def run_py36_edge(address, profile, source, report, *args):
    return subprocess.run([PY36, "-m", "latentlink.edge", "--source", source, "--connect", address, "--name", "nano",
                           "--profile", profile, "--drop", "block", "--report", report] + list(args),
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("mode", ["tls", "token"])
def test_python36_edge_with_credentials_streams_to_this_host(tmp_path, tiny_profile, video_file, mode):
    """TLS through Python 3.6's ssl module (its own name check, the two threads sharing one TLS connection through
    TLSSocket) and the token handshake, against this host; the keys made on this side by `latentlink keys`."""
    pytest.importorskip("cryptography")
    from latentlink import keys

    folder, token = str(tmp_path / "keys"), str(tmp_path / "token.txt")
    keys.init(folder, ["127.0.0.1"])
    keys.issue_edge(folder, "nano")
    keys.write_token(token)
    options = ["--tls", folder] if mode == "tls" else ["--token-file", token]
    host, address = start_host(tmp_path, tiny_profile, *options)
    edge = run_py36_edge(address, tiny_profile, "file://" + video_file, str(tmp_path / "edge.json"), *options)
    host_out, _ = host.communicate(timeout=60)
    assert edge.returncode == 0, edge.stderr
    report = json.loads((tmp_path / "host.json").read_text())
    assert report["frames"] == 24 and report["failed"] == 0 and report["streams"]["nano"]["ended"]
    edge_report = json.loads((tmp_path / "edge.json").read_text())
    assert edge_report["outcomes"] == {"decoded": 24, "failed": 0, "refused": 0, "dropped": 0, "lost": 0}


def test_python36_edge_refuses_a_host_certificate_for_another_name_and_a_wrong_token(tmp_path, tiny_profile):
    """Python 3.6 checks the host's name after the handshake (ssl.CertificateError, not 3.7's verify error): the edge
    still stops at once with a message that names the address; the host's log says the edge hung up on it."""
    pytest.importorskip("cryptography")
    from latentlink import keys

    folder, token, wrong = str(tmp_path / "keys"), str(tmp_path / "token.txt"), str(tmp_path / "wrong.txt")
    keys.init(folder, ["example.invalid"])
    keys.issue_edge(folder, "nano")
    keys.write_token(token)
    keys.write_token(wrong)
    host, address = start_host(tmp_path, tiny_profile, "--tls", folder, "--token-file", token)
    edge = run_py36_edge(address, tiny_profile, "synthetic://", str(tmp_path / "edge.json"), "--frames", "2",
                         "--tls", folder, "--token-file", token)
    assert edge.returncode == 1
    assert "error: stopped (tls): the host's certificate is not valid for '127.0.0.1'" in edge.stderr
    host.terminate()
    assert "closed the connection right after the TLS handshake" in host.communicate(timeout=60)[0]

    keys.issue_host(folder, ["127.0.0.1"])  # now the name is right, and the token wrong
    (tmp_path / "second").mkdir()
    host, address = start_host(tmp_path / "second", tiny_profile, "--tls", folder, "--token-file", token)
    edge = run_py36_edge(address, tiny_profile, "synthetic://", str(tmp_path / "edge.json"), "--frames", "2",
                         "--tls", folder, "--token-file", wrong)
    assert edge.returncode == 1
    assert "error: stopped (host_not_authenticated): the host at {} does not know this edge's token".format(
        address) in edge.stderr
    host.terminate()
    assert "its --token-file holds another token than this host's" in host.communicate(timeout=60)[0]
