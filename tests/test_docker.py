"""docker/: what can be checked without a Docker engine (there is none where these run).

The Dockerfiles and the compose file are read as text and checked against the repository: every COPY source
exists, every package setup.py installs is copied, the compose service builds from a real Dockerfile, its port and
command agree with the image's, the commands the files show parse with the real CLI, and the Jetson image never
pip-installs a PyPI OpenCV or ONNX Runtime and pins numpy 1.19.4.
"""

import glob
import json
import os
import re
import runpy
import shlex

import pytest
import setuptools
import yaml
from packaging.requirements import Requirement

from .conftest import ROOT

DOCKER = os.path.join(ROOT, "docker")
DOCKERFILES = ["Dockerfile.host", "Dockerfile.jetson"]
COMPOSE = os.path.join(DOCKER, "compose.yaml")
# PyPI distributions that must never reach the Jetson image: no GStreamer (breaks the CSI camera), or no wheel.
FORBIDDEN_ON_JETSON = re.compile(r"^(opencv(-contrib)?-python(-headless)?|onnxruntime(-gpu)?)$")


def instructions(name):
    """[(INSTRUCTION, arguments)] of docker/NAME, continuation lines joined and comment lines dropped."""
    result, current = [], ""
    with open(os.path.join(DOCKER, name)) as f:
        for line in f:
            stripped = line.strip()
            if stripped.startswith("#") or not stripped:
                continue  # Docker drops comment lines, also inside a continued instruction
            if stripped.endswith("\\"):
                current += stripped[:-1] + " "
                continue
            current += stripped
            keyword, _, args = current.partition(" ")
            result.append((keyword.upper(), args.strip()))
            current = ""
    assert not current, "{} ends inside a continued instruction".format(name)
    return result


def exec_form(args):
    """The list of a JSON-form instruction (ENTRYPOINT ["a", "b"])."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def single(name, keyword):
    found = [args for kw, args in instructions(name) if kw == keyword]
    assert len(found) == 1, "{}: expected one {}, found {}".format(name, keyword, len(found))
    return found[0]


def shell_commands(run_args):
    """The simple commands of a RUN line, as word lists (split at &&, ||, ; and |)."""
    commands, words = [], []
    for word in shlex.split(run_args):
        if word in ("&&", "||", ";", "|"):
            commands.append(words)
            words = []
        else:
            words.append(word)
    commands.append(words)
    return [c for c in commands if c]


def pip_installs(name):
    """Argument lists of every `pip install` / `pip3 install` / `python3 -m pip install` in docker/NAME."""
    result = []
    for keyword, args in instructions(name):
        if keyword != "RUN":
            continue
        for words in shell_commands(args):
            for i, word in enumerate(words[:-1]):
                if os.path.basename(word) in ("pip", "pip3") and words[i + 1] == "install":
                    result.append(words[i + 2:])
                    break
    return result


def requirements_of(pip_args):
    """The requirement arguments of one pip install (flags dropped; local paths kept as they are)."""
    return [a for a in pip_args if not a.startswith("-")]


def compose():
    with open(COMPOSE) as f:
        return yaml.safe_load(f)


def option(argv, flag):
    assert flag in argv, "{} not in {}".format(flag, argv)
    return argv[argv.index(flag) + 1]


def port_of(address):
    host, _, port = address.rpartition(":")
    assert host and port.isdigit(), address
    return int(port)


def setup_kwargs():
    """What setup.py passes to setup(), without installing anything."""
    captured = {}
    cwd = os.getcwd()
    original = setuptools.setup
    setuptools.setup = lambda **kwargs: captured.update(kwargs)
    try:
        os.chdir(ROOT)  # setup.py reads README.md from the working directory, as pip runs it
        runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="__main__")
    finally:
        setuptools.setup = original
        os.chdir(cwd)
    assert captured, "setup.py did not call setuptools.setup"
    return captured


# The compose file.

def test_compose_parses_and_builds_the_host_from_an_existing_dockerfile():
    service = compose()["services"]["host"]
    context = os.path.normpath(os.path.join(DOCKER, service["build"]["context"]))
    assert os.path.isdir(context)
    assert context == ROOT, "the Dockerfiles COPY paths relative to the repository root"
    dockerfile = os.path.join(context, service["build"]["dockerfile"])
    assert os.path.isfile(dockerfile)
    assert os.path.basename(dockerfile) == "Dockerfile.host"


def test_compose_port_matches_the_host_image():
    service = compose()["services"]["host"]
    cmd = exec_form(single("Dockerfile.host", "CMD"))
    image_port = port_of(option(cmd, "--listen"))
    assert single("Dockerfile.host", "EXPOSE").split() == [str(image_port)]
    published = [str(p) for p in service["ports"]]
    assert len(published) == 1
    host_port, _, container_port = published[0].rpartition(":")
    assert host_port and int(container_port) == image_port
    # The compose command replaces the image's CMD: it must listen on every interface, on the same port.
    listen = option(service["command"], "--listen")
    assert port_of(listen) == image_port
    assert listen.rpartition(":")[0] == "0.0.0.0"


def test_compose_command_is_a_valid_host_command_writing_into_the_volume():
    from latentlink.host.__main__ import get_args_parser

    assert exec_form(single("Dockerfile.host", "ENTRYPOINT")) == ["latentlink", "host"]
    service = compose()["services"]["host"]
    args = get_args_parser().parse_args(service["command"])  # exits (fails the test) on an unknown flag
    mounts = [volume.split(":")[1] for volume in service["volumes"]]
    assert args.out and all(out in mounts for out in args.out)  # --out may be repeated (outputs as URIs)
    assert args.report and os.path.dirname(args.report) in mounts, "the report would be lost with the container"
    # `docker compose down` sends stop_signal; SIGINT and SIGTERM both make the host finish and write its report.
    assert service.get("stop_signal") in ("SIGINT", "SIGTERM")


def test_compose_commented_edge_example_parses_with_the_edge_cli():
    from latentlink.edge.__main__ import get_args_parser

    with open(COMPOSE) as f:
        lines = f.read().splitlines()
    start = [i for i, line in enumerate(lines) if line.startswith("#  edge:")]
    assert len(start) == 1
    uncommented = "\n".join(line[1:] for line in lines[start[0]:] if line.startswith("#"))
    edge = yaml.safe_load("services:\n" + uncommented)["services"]["edge"]
    assert edge["image"] == "latentlink-jetson" and edge["runtime"] == "nvidia"
    assert edge["command"][0] == "edge"
    args = get_args_parser().parse_args(edge["command"][1:])
    assert args.source == "csi://0"
    assert "/tmp/argus_socket:/tmp/argus_socket" in edge["volumes"]


# Both Dockerfiles.

@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_copy_source_exists(name):
    copies = [args for keyword, args in instructions(name) if keyword in ("COPY", "ADD")]
    assert copies
    for args in copies:
        words = exec_form(args) if args.startswith("[") else shlex.split(args)
        assert not any(w.startswith("--from") for w in words), "multi-stage COPY: extend this test"
        sources = [w for w in words if not w.startswith("--")][:-1]
        assert sources, args
        for source in sources:
            assert glob.glob(os.path.join(ROOT, source)), "{}: COPY source {!r} does not exist".format(name, source)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_every_package_setup_py_installs_is_copied(name):
    copied = set()
    for keyword, args in instructions(name):
        if keyword == "COPY":
            copied.update(os.path.normpath(w) for w in shlex.split(args)[:-1] if not w.startswith("--"))
    kwargs = setup_kwargs()
    # The folder each installed package comes from: package_dir maps latentlink.edge to edge/, and so on.
    folders = {kwargs["package_dir"].get(".".join(package.split(".")[:2]), package).split(".")[0]
               for package in kwargs["packages"]}
    needed = folders | {"setup.py", "README.md"}
    assert needed <= copied, "{} does not COPY {}".format(name, sorted(needed - copied))
    # ... including the model files the profiles package ships.
    for pattern in kwargs["package_data"]["latentlink.profiles"]:
        assert glob.glob(os.path.join(ROOT, "profiles", pattern)), pattern


# The Jetson image.

def test_jetson_image_base_and_entrypoint():
    assert single("Dockerfile.jetson", "FROM") == "nvcr.io/nvidia/l4t-base:r32.7.1"
    assert exec_form(single("Dockerfile.jetson", "ENTRYPOINT")) == ["latentlink"]


def test_jetson_image_never_pip_installs_opencv_or_onnxruntime():
    installs = pip_installs("Dockerfile.jetson")
    assert installs
    for pip_args in installs:
        for requirement in requirements_of(pip_args):
            if requirement.startswith("."):  # the project itself: must not pull setup.py's dependencies
                assert "--no-deps" in pip_args, pip_args
                continue
            name = Requirement(requirement).name.lower()
            assert not FORBIDDEN_ON_JETSON.match(name), "Dockerfile.jetson pip-installs {}".format(requirement)


def test_jetson_image_pins_numpy_1_19_4():
    numpy = [r for args in pip_installs("Dockerfile.jetson") for r in requirements_of(args)
             if not r.startswith(".") and Requirement(r).name.lower() == "numpy"]
    assert numpy == ["numpy==1.19.4"], "numpy 1.19.5 dies with 'Illegal instruction' on Jetson"


def test_jetson_image_takes_opencv_from_apt():
    apt = [w for _, args in [i for i in instructions("Dockerfile.jetson") if i[0] == "RUN"]
           for words in shell_commands(args) if words[:2] == ["apt-get", "install"] for w in words]
    assert any(w.split("=")[0] in ("libopencv-python", "python3-opencv") for w in apt)


def test_jetson_header_run_commands_parse_with_the_edge_cli():
    from latentlink.edge.__main__ import get_args_parser
    from latentlink.export.__main__ import get_args_parser as export_parser

    with open(os.path.join(DOCKER, "Dockerfile.jetson")) as f:
        header = []
        for line in f:
            if not line.startswith("#"):
                break
            header.append(line[1:].strip())
    commands = re.findall(r"docker run [^\n]*", re.sub(r"\\\n", " ", "\n".join(header)))
    edge_runs = 0
    for command in commands:
        words = shlex.split(command)
        image = words.index("latentlink-jetson")
        if "--entrypoint" in words[:image]:
            continue
        assert "--runtime" in words[:image] and option(words, "--runtime") == "nvidia", command
        if words[image + 1] == "export":  # the engine build: the same mounted folder the edge runs read
            args = export_parser().parse_args(words[image + 2:])
            assert args.command == "engine" and "{}:{}".format("$PWD/engines", args.out) in command.replace(
                '"', ""), command
            continue
        assert words[image + 1] == "edge", command
        args = get_args_parser().parse_args(words[image + 2:])
        # The image has no ONNX Runtime: its edge encodes with an engine from the mounted folder.
        assert args.encoder.startswith("/engines/") and args.encoder.endswith(".engine"), command
        assert "$PWD/engines:/engines" in command.replace('"', ""), command
        if args.source.startswith("csi://"):
            assert "/tmp/argus_socket:/tmp/argus_socket" in words[:image], command
        if args.source.startswith("v4l2://"):
            assert option(words, "--device") == args.source[len("v4l2://"):], command
        edge_runs += 1
    assert edge_runs >= 2, commands


def test_setup_py_keeps_pypi_opencv_and_onnxruntime_off_aarch64():
    """Even `pip install .[edge]` on the Nano must not pull a PyPI OpenCV or ONNX Runtime."""
    kwargs = setup_kwargs()
    jetson = {"platform_machine": "aarch64", "python_version": "3.6", "python_full_version": "3.6.9",
              "sys_platform": "linux", "platform_system": "Linux"}
    for text in list(kwargs["install_requires"]) + list(kwargs["extras_require"]["edge"]):
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate(dict(jetson, extra="edge")):
            continue
        assert not FORBIDDEN_ON_JETSON.match(requirement.name.lower()), text
    # ... while a PC still gets them with the edge extra.
    pc = dict(jetson, platform_machine="x86_64", extra="edge")
    names = {Requirement(t).name.lower() for t in kwargs["extras_require"]["edge"]
             if Requirement(t).marker is None or Requirement(t).marker.evaluate(pc)}
    assert {"onnxruntime", "opencv-python-headless"} <= names
