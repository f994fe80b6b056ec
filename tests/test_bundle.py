"""`latentlink export bundle`: the archive that flashes a Nano, and its setup.sh run for real on Python 3.6.

The install test runs when LATENTLINK_PY36 names a Python 3.6 interpreter with numpy 1.19, PyYAML, OpenCV and
onnxruntime (.ci/run builds one when pyenv has 3.6), or when the checkout has that environment as .venv36/;
skipped otherwise.
"""

import io
import json
import os
import re
import shutil
import subprocess
import tarfile

import pytest

from .conftest import ROOT, run_cli
from .test_end_to_end import start_host

PY36 = os.environ.get("LATENTLINK_PY36") or (
    os.path.join(ROOT, ".venv36", "bin", "python") if os.path.exists(os.path.join(ROOT, ".venv36", "bin", "python"))
    else None)
FILES = ["README.txt", "SHA256SUMS", "bundle.env", "edge.env.example", "latentlink-edge.service",
         "profile/model/decoder.onnx", "profile/model/encoder.onnx", "profile/model/model.json",
         "profile/nano-504.yaml", "run-edge.sh", "setup.sh", "wheels/latentlink-0.1.0-py3-none-any.whl"]


def bundle(*args):
    return run_cli("latentlink.export", "bundle", *args, timeout=300)


def unpack(archive, folder):
    with tarfile.open(archive) as tar:
        tar.extractall(str(folder))
    return os.path.join(str(folder), "latentlink")


def test_bundle_holds_what_the_nano_needs_and_is_reproducible(tmp_path):
    first, second = (str(tmp_path / folder / "latentlink-nano-504.tar.gz") for folder in ("a", "b"))
    result = bundle("--profile", "nano-504", "--out", first)
    assert result.returncode == 0, result.stderr
    assert "encoder passed: latentlink export check encoder.onnx" in result.stdout
    assert bundle("--profile", "nano-504", "--out", second).returncode == 0
    with open(first, "rb") as a, open(second, "rb") as b:
        assert a.read() == b.read()  # same checkout and profile: the same bytes

    with tarfile.open(first) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names) and names[0] == "latentlink"
    assert sorted(m.name[len("latentlink/"):] for m in members if m.isfile()) == FILES
    assert {(m.uid, m.gid, m.mtime) for m in members} == {(0, 0, 315532800)}
    assert {m.name for m in members if m.mode & 0o111 and m.isfile()} == {"latentlink/setup.sh",
                                                                          "latentlink/run-edge.sh"}

    root = unpack(first, tmp_path / "x")
    from latentlink.edge.profile import load_profile

    profile = load_profile(os.path.join(root, "profile", "nano-504.yaml"))
    assert profile.model.encoder == os.path.join(root, "profile", "model", "encoder.onnx")
    assert subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=root).returncode == 0
    env = io.open(os.path.join(root, "bundle.env"), encoding="utf-8").read()
    assert "BUNDLE_ENCODER=profile/model/encoder.onnx\n" in env and "BUNDLE_PRECISION=fp16\n" in env
    readme = io.open(os.path.join(root, "README.txt"), encoding="utf-8").read()
    assert "sudo tar -xzf latentlink-nano-504.tar.gz -C /opt" in readme
    assert re.search("@[A-Z_]+@", readme) is None  # every placeholder filled in
    assert "latentlink host --listen 0.0.0.0:5760 --profile nano-504 --out frames/" in readme  # shipped: by name
    unit = io.open(os.path.join(root, "latentlink-edge.service"), encoding="utf-8").read().splitlines()
    for line in ("After=network-online.target nvargus-daemon.service", "Wants=network-online.target",
                 "User=latentlink", "EnvironmentFile=/etc/latentlink/edge.env",
                 "ExecStart=/opt/latentlink/run-edge.sh", "Restart=always", "RestartSec=5",
                 "RestartPreventExitStatus=2", "KillSignal=SIGINT", "WantedBy=multi-user.target"):
        assert line in unit


@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck is not installed (apt-get install shellcheck)")
def test_bundle_scripts_pass_shellcheck():
    folder = os.path.join(ROOT, "export", "bundle_files")
    result = subprocess.run(["shellcheck", os.path.join(folder, "setup.sh"), os.path.join(folder, "run-edge.sh")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_bundle_systemd_unit_verifies(tmp_path):
    """The unit as setup.sh installs it (the bundle's folder in place of /opt/latentlink) passes systemd's checks."""
    folder = os.path.join(ROOT, "export", "bundle_files")
    unit = io.open(os.path.join(folder, "latentlink-edge.service"), encoding="utf-8").read()
    (tmp_path / "latentlink-edge.service").write_text(unit.replace("/opt/latentlink", folder))
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "latentlink-edge.service")],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "latentlink-edge.service" not in result.stderr, result.stderr


def test_run_edge_reads_the_service_config_as_systemd_does_and_picks_the_newest_engine(tmp_path):
    """run-edge.sh with a stand-in for the venv's `latentlink` that prints its arguments: the settings come from
    the EnvironmentFile (values with spaces and quotes, comments), the encoder is the newest engine built from the
    bundle's encoder, else the ONNX file; no LATENTLINK_HOST is exit status 2 (the unit does not restart on it)."""
    archive = str(tmp_path / "b.tar.gz")
    assert bundle("--profile", "nano-504", "--out", archive, "--skip-check").returncode == 0
    root = unpack(archive, tmp_path)
    os.makedirs(os.path.join(root, "venv", "bin"))
    stub = os.path.join(root, "venv", "bin", "latentlink")
    with open(stub, "w") as f:
        f.write("#!/bin/sh\nprintf '[%s]' \"$@\"\n")
    os.chmod(stub, 0o755)
    config = tmp_path / "edge.env"
    config.write_text("# a comment\nLATENTLINK_HOST=10.0.0.5:5760\n  LATENTLINK_SOURCE=\"v4l2:///dev/video1\"\n"
                      "LATENTLINK_NAME='cam 2'\n;other comment\nLATENTLINK_EDGE_ARGS=--frames 5 --mapped\n"
                      "NOT_OURS=1\n")

    def run(**env):
        return subprocess.run([os.path.join(root, "run-edge.sh")], capture_output=True, text=True, timeout=60,
                              env=_clean_env(LATENTLINK_CONFIG=str(config), **env))

    def args(encoder):
        return ("[edge][--source][v4l2:///dev/video1][--connect][10.0.0.5:5760][--profile][{0}/profile/nano-504.yaml]"
                "[--encoder][{1}][--name][cam 2][--frames][5][--mapped]".format(root, encoder))

    result = run()
    assert result.returncode == 0 and result.stdout.endswith(args(root + "/profile/model/encoder.onnx")), result
    engines = os.path.join(root, "engines")
    os.makedirs(engines)
    for age, name in ((200, "encoder.aaaa.trt8.2.1.8.NVIDIA-Tegra-X1.fp16.engine"),
                      (100, "encoder.bbbb.trt8.0.1.6.NVIDIA-Tegra-X1.fp16.engine"),
                      (0, "decoder.cccc.trt8.2.1.8.NVIDIA-Tegra-X1.fp16.engine")):
        path = os.path.join(engines, name)
        open(path, "w").close()
        os.utime(path, (1e9 - age, 1e9 - age))
    assert run().stdout.endswith(args(engines + "/encoder.bbbb.trt8.0.1.6.NVIDIA-Tegra-X1.fp16.engine"))
    assert run(LATENTLINK_ENCODER="/x.engine").stdout.endswith(args("/x.engine"))

    config.write_text("LATENTLINK_SOURCE=csi://0\n")
    result = run()
    assert result.returncode == 2
    assert "LATENTLINK_HOST is not set: put LATENTLINK_HOST=HOST:PORT (the host's address) in " + str(config) in (
        result.stderr)


def test_bundle_refusals(tmp_path, tiny_profile):
    out = str(tmp_path / "b.tar.gz")
    result = bundle("--profile", "nano-9000", "--out", out)
    assert result.returncode == 2 and "error: no profile 'nano-9000' (shipped profiles: " in result.stderr

    result = bundle("--profile", "nano-504", "--out", str(tmp_path / "b.zip"))
    assert result.returncode == 2
    assert "the bundle is a gzipped tar; give a name ending in .tar.gz, e.g. --out latentlink-nano-504.tar.gz" in (
        result.stderr)

    (tmp_path / "file").write_text("not a folder")
    result = bundle("--profile", "nano-504", "--out", str(tmp_path / "file" / "b.tar.gz"))
    assert result.returncode == 2 and "is a file, so no folder can be made there" in result.stderr

    broken = tmp_path / "broken.yaml"
    broken.write_text(open(tiny_profile).read().replace("onnx/encoder.onnx", "missing/encoder.onnx"))
    result = bundle("--profile", str(broken), "--out", out)
    assert result.returncode == 2
    assert "profile tiny names the encoder {}, which does not exist; export the model with `latentlink export " \
           "onnx".format(tmp_path / "missing" / "encoder.onnx") in result.stderr
    assert not os.path.exists(out)

    # An encoder that `latentlink export check` rejects (here: not ONNX at all) is not bundled.
    shutil.copytree(os.path.join(os.path.dirname(tiny_profile), "onnx"), str(tmp_path / "bad"))
    (tmp_path / "bad" / "encoder.onnx").write_bytes(b"not an ONNX file")
    broken.write_text(open(tiny_profile).read().replace("onnx/", "bad/"))
    result = bundle("--profile", str(broken), "--out", out)
    assert result.returncode == 2 and "not a valid ONNX model" in result.stdout
    assert "the Nano's TensorRT would not build this encoder; fix the model, or pass --skip-check" in result.stderr
    assert not os.path.exists(out)


def _py36_facts():
    script = ("import sys, os, numpy\nprint(sys.version_info[:2] == (3, 6))\nprint(sys.base_prefix)\n"
              "print(os.path.dirname(os.path.dirname(numpy.__file__)))")
    out = subprocess.run([PY36, "-c", script], capture_output=True, text=True, cwd="/")
    if out.returncode:
        pytest.skip("{} lacks numpy: {}".format(PY36, out.stderr.strip()[-200:]))
    is_36, base_prefix, site = out.stdout.split("\n")[:3]
    assert is_36 == "True", "LATENTLINK_PY36={} is not Python 3.6".format(PY36)
    return os.path.join(base_prefix, "bin", "python3.6"), site


def _clean_env(**values):
    """What a fresh login or a systemd service has: no LANG (Python 3.6 then writes ASCII), no PYTHONPATH."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")}
    env.update(values)
    return env


FAKE_JETSON_HOOK = """# Imported at start-up through fake-jetson.pth: TensorRT and pycuda faked (tests/fake_tensorrt.py).
import sys

import fake_tensorrt

package, driver = fake_tensorrt.make_pycuda()
sys.modules.update({"pycuda": package, "pycuda.driver": driver,
                    "tensorrt": fake_tensorrt.make_tensorrt("8.2", driver=driver)})
"""


@pytest.mark.skipif(not PY36, reason="set LATENTLINK_PY36 to a Python 3.6 interpreter with numpy 1.19, PyYAML, "
                                     "OpenCV and onnxruntime (as .ci/run makes .venv36) to run")
@pytest.mark.parametrize("tensorrt", ["absent", "faked"])
def test_bundle_installs_on_python36_and_its_edge_streams_to_this_host(tmp_path, tiny_profile, tensorrt):
    """The Nano's procedure, from the tarball alone, with the parts that need a Jetson or root left out: setup.sh
    with LATENTLINK_APT=0 (no apt) and LATENTLINK_SERVICE=0 (no user, no unit). On the Nano setup.sh makes its venv
    with --system-site-packages over JetPack's Python, whose dist-packages hold OpenCV, PyYAML and TensorRT; here
    the venv is made first, over pyenv's Python 3.6, and a .pth line stands in for those packages:
    LATENTLINK_PY36's environment (numpy 1.19, OpenCV, PyYAML, ONNX Runtime, pip 21.3.1), which has no latentlink.
    setup.sh reuses that venv, installs the bundle's wheel into it and runs its benchmark against a host from this
    checkout; then run-edge.sh (the service's command) streams to a second host. Every frame must be decoded, and
    latentlink must be the one installed from the tarball.

    tensorrt="absent": the engine build is skipped, and said so; the edge runs the ONNX encoder in ONNX Runtime.
    tensorrt="faked": TensorRT 8.2 and pycuda are tests/fake_tensorrt.py, imported at the venv's start-up: setup.sh
    builds the engine through `latentlink export engine` (the engine cache), run-edge.sh picks it, and the edge
    runs it through the TensorRT backend (the fake executes the ONNX file in ONNX Runtime)."""
    base_python, system_site = _py36_facts()
    if tensorrt == "faked" and subprocess.run([PY36, "-c", "import onnx, onnxruntime"]).returncode:
        pytest.skip("the Python 3.6 environment has no onnx/onnxruntime (the fakes parse and run ONNX with them)")
    archive = str(tmp_path / "workstation" / "latentlink-tiny.tar.gz")
    result = bundle("--profile", tiny_profile, "--out", archive)
    assert result.returncode == 0, result.stderr
    nano = tmp_path / "nano"  # outside the checkout, so nothing can import the checkout's code by accident
    root = unpack(archive, nano)
    with io.open(os.path.join(root, "README.txt"), encoding="utf-8") as f:  # not shipped: the host reads the bundle's
        assert "--profile latentlink/profile/tiny.yaml --out frames/" in f.read()
    venv = os.path.join(root, "venv")
    subprocess.run([base_python, "-m", "venv", "--without-pip", venv], check=True)
    site = os.path.join(venv, "lib", "python3.6", "site-packages")
    with open(os.path.join(site, "jetpack-stand-in.pth"), "w") as f:
        f.write(system_site + "\n")
    if tensorrt == "faked":
        shutil.copy(os.path.join(ROOT, "tests", "fake_tensorrt.py"), site)
        with open(os.path.join(site, "fake_jetson.py"), "w") as f:
            f.write(FAKE_JETSON_HOOK)
        with open(os.path.join(site, "zz-fake-jetson.pth"), "w") as f:  # after the stand-in's line: numpy first
            f.write("import fake_jetson\n")

    host, address = start_host(tmp_path, tiny_profile)
    setup = subprocess.run([os.path.join(root, "setup.sh")], cwd=str(nano), capture_output=True, text=True,
                           timeout=600, env=_clean_env(LATENTLINK_APT="0", LATENTLINK_SERVICE="0",
                                                       LATENTLINK_PYTHON=base_python, LATENTLINK_BENCH_HOST=address,
                                                       LATENTLINK_BENCH_FRAMES="12"))
    host.communicate(timeout=60)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert "latentlink at {}/lib/python3.6/site-packages/latentlink/__init__.py".format(venv) in setup.stdout
    assert "OK: {}/profile/model/encoder.onnx".format(root) in setup.stdout  # export check, on the Nano side
    engines = sorted(os.listdir(os.path.join(root, "engines"))) if tensorrt == "faked" else []
    if tensorrt == "absent":
        assert "ENGINE BUILD SKIPPED: TensorRT and pycuda do not both import here" in setup.stdout
    else:
        assert len(engines) == 2 and engines[0].startswith("encoder.")  # and its sidecar, engines[1]
        assert engines[0].endswith(".trt8.2.1.8.Fake-GPU-9000.fp16.engine")
        assert "built {}/engines/{}".format(root, engines[0]) in setup.stdout
        assert "--encoder {}/engines/{}".format(root, engines[0]) in setup.stdout  # what run-edge.sh chose
    report = json.loads((tmp_path / "host.json").read_text())
    assert report["frames"] == 12 and report["failed"] == 0 and report["protocol_errors"] == 0
    bench = json.loads(open(os.path.join(root, "bench.json")).read())
    assert bench["outcomes"] == {"decoded": 12, "failed": 0, "refused": 0, "dropped": 0, "lost": 0}
    assert bench["meta"]["backend"] == ("onnxruntime" if tensorrt == "absent" else "tensorrt")

    where = subprocess.run([os.path.join(venv, "bin", "python"), "-c",
                            "import sys, latentlink; print(sys.version_info[:2], latentlink.__file__)"],
                           cwd=str(nano), capture_output=True, text=True, env=_clean_env(), check=True).stdout
    assert where.startswith("(3, 6) " + venv + "/")

    service = tmp_path / "service"
    service.mkdir()
    host, address = start_host(service, tiny_profile)
    edge = subprocess.run([os.path.join(root, "run-edge.sh")], cwd="/", capture_output=True, text=True, timeout=300,
                          env=_clean_env(LATENTLINK_HOST=address, LATENTLINK_SOURCE="synthetic://",
                                         LATENTLINK_NAME="cam0", LATENTLINK_CONFIG=str(service / "none.env"),
                                         LATENTLINK_EDGE_ARGS="--frames 6 --drop block --report {}".format(
                                             service / "edge.json")))
    host.communicate(timeout=60)
    assert edge.returncode == 0, edge.stdout + edge.stderr
    report = json.loads((service / "host.json").read_text())
    assert report["frames"] == 6 and report["failed"] == 0 and report["streams"]["cam0"]["ended"]
    assert json.loads((service / "edge.json").read_text())["outcomes"]["decoded"] == 6

    again = subprocess.run([os.path.join(root, "setup.sh")], cwd=str(nano), capture_output=True, text=True,
                           timeout=600, env=_clean_env(LATENTLINK_APT="0", LATENTLINK_SERVICE="0"))
    assert again.returncode == 0, again.stdout + again.stderr  # idempotent: the same steps, nothing new
    assert "reusing it (Python 3.6" in again.stdout
    assert "== benchmark\nskipped: set LATENTLINK_BENCH_HOST" in again.stdout
    if tensorrt == "faked":  # the engine cache: same ONNX, TensorRT and GPU, so the engine is reused
        assert "reusing {}/engines/{}".format(root, engines[0]) in again.stdout
        assert sorted(os.listdir(os.path.join(root, "engines"))) == engines
