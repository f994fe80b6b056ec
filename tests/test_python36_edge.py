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


@pytest.mark.parametrize("serializer", ["framed", "pickle"])
def test_python36_edge_streams_to_this_host(tmp_path, tiny_profile, video_file, serializer):
    host, address = start_host(tmp_path, tiny_profile)
    edge = subprocess.run([PY36, "-m", "edge", "--source", "file://" + video_file, "--connect", address,
                           "--name", "nano", "--profile", tiny_profile, "--drop", "block", "--serializer",
                           serializer, "--report", str(tmp_path / "edge.json")],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                          timeout=120)
    host_out, _ = host.communicate(timeout=60)
    assert edge.returncode == 0, edge.stderr
    report = json.loads((tmp_path / "host.json").read_text())
    assert report["frames"] == 24 and report["failed"] == 0 and report["protocol_errors"] == 0
    assert report["streams"]["nano"]["ended"]
