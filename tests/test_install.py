"""Each role's install line (README: Install) in a fresh virtual environment, as a user runs it.

Slow (pip installs from the package index): skipped unless LATENTLINK_INSTALL_CHECK=1, which .ci/run sets for its
own step. The edge's line (`pip install ".[edge]"`) must give a working `latentlink edge`, and `latentlink train`
must then say to install the [export] extra; the host's (`pip install ".[host]"`) must run the README's demo and
say which extra `eval` and `train` need. The export role's install is the development environment these tests
run in (`[dev]` holds `[export]`).
"""

import os
import shutil
import subprocess
import sys
import time

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.skipif(os.environ.get("LATENTLINK_INSTALL_CHECK") != "1",
                                reason="installs into fresh virtual environments: LATENTLINK_INSTALL_CHECK=1")

# What `pip install .` reads: setup.py, the README (the long description) and the packages.
SOURCES = ("setup.py", "README.md", "edge", "host", "export", "profiles", "latentlink")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A copy of the checkout's sources: pip builds in the source folder (build/, *.egg-info), not in ROOT."""
    folder = tmp_path_factory.mktemp("source")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in SOURCES:
        path = os.path.join(ROOT, name)
        if os.path.isdir(path):
            shutil.copytree(path, str(folder / name), ignore=ignore)
        else:
            shutil.copy(path, str(folder / name))
    return str(folder)


def install(tmp_path_factory, source, extra):
    """A fresh virtual environment (no system site-packages) with ``pip install ".[extra]"``; returns its bin."""
    venv = str(tmp_path_factory.mktemp("venv-" + extra))
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    bin_dir = os.path.join(venv, "bin")
    result = subprocess.run([os.path.join(bin_dir, "pip"), "install", "-q", ".[{}]".format(extra)], cwd=source,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr
    print("[{}]: fresh venv and pip install in {:.0f} s".format(extra, time.monotonic() - started))
    return bin_dir


def latentlink(bin_dir, *args, cwd=None, timeout=300):
    """The installed `latentlink` command, outside the checkout and without PYTHONPATH."""
    env = dict((k, v) for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV"))
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return subprocess.run([os.path.join(bin_dir, "latentlink")] + list(args), cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def python_api_imports(bin_dir, name, cwd):
    """``from latentlink import NAME`` in the installed package; the Sender must bring nothing of the host's."""
    env = dict((k, v) for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV"))
    code = ("import sys; from latentlink import {}; "
            "assert not [m for m in sys.modules if m.startswith('latentlink.host')] or {!r} == 'Receiver'").format(
                name, name)
    result = subprocess.run([os.path.join(bin_dir, "python"), "-c", code], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def says_install(result, extra, package):
    line = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "{} is not installed".format(package) in line and 'pip install ".[{}]"'.format(extra) in line, line


def test_the_edge_role(tmp_path_factory, source, tmp_path):
    bin_dir = install(tmp_path_factory, source, "edge")
    result = latentlink(bin_dir, "edge", "--help", cwd=str(tmp_path))
    assert result.returncode == 0 and "usage: latentlink edge" in result.stdout, result.stderr
    # It runs: the shipped model on a test pattern, no host (it gives up waiting after a second).
    result = latentlink(bin_dir, "edge", "synthetic://", "--frames", "2", "--wait-for-host", "1", cwd=str(tmp_path))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "capture" in result.stdout and "encode" in result.stdout  # its stage table
    python_api_imports(bin_dir, "Sender", str(tmp_path))
    says_install(latentlink(bin_dir, "train", "--data", str(tmp_path), "--out", "m.pt", cwd=str(tmp_path)),
                 "export", "PyTorch")
    (tmp_path / "m.pt").write_bytes(b"")  # a checkpoint from the workstation; PyTorch is what is missing here
    says_install(latentlink(bin_dir, "export", "onnx", "--checkpoint", "m.pt", "--profile", "nano-504", "--out",
                            "o", cwd=str(tmp_path)), "export", "PyTorch")


def test_the_host_role(tmp_path_factory, source, tmp_path):
    bin_dir = install(tmp_path_factory, source, "host")
    result = latentlink(bin_dir, "host", "--help", cwd=str(tmp_path))
    assert result.returncode == 0 and "usage: latentlink host" in result.stdout, result.stderr
    # The README's first line: `pip install ".[host]" && latentlink demo`.
    result = latentlink(bin_dir, "demo", cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PSNR" in result.stdout and (tmp_path / "latentlink-demo" / "edge.json").is_file()
    python_api_imports(bin_dir, "Receiver", str(tmp_path))
    photos = str(tmp_path / "latentlink-demo" / "photos")
    says_install(latentlink(bin_dir, "eval", "--photos", photos, cwd=str(tmp_path)), "export", "PyTorch")
    says_install(latentlink(bin_dir, "train", "--data", photos, "--out", "m.pt", cwd=str(tmp_path)), "export",
                 "PyTorch")
