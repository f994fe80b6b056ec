"""The README's first lines are the two commands that matter; CI must run the very same test command."""

import os
import re

from .conftest import ROOT


def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    commands = [line for line in read("README.md").splitlines()[:8] if line.startswith("python3 -m venv")]
    assert len(commands) == 2
    demo, tests = commands
    assert demo.endswith("latentlink demo")
    assert tests in read(".ci/run").splitlines()


def test_every_path_in_the_layout_table_exists():
    table = read("README.md").split("## Layout", 1)[1].split("##", 1)[0]
    paths = re.findall(r"^\| `([^`]+)`", table, flags=re.M)
    assert paths
    for path in paths:
        assert os.path.exists(os.path.join(ROOT, path)), path


def test_every_train_and_export_command_in_the_readme_parses():
    """The recipes are commands users paste: each must name options that exist, with values they accept."""
    import shlex

    import pytest

    pytest.importorskip("torch")
    from latentlink.export.__main__ import get_args_parser as export_parser
    from latentlink.export.train import get_args_parser as train_parser

    text = read("README.md").replace("\\\n", " ")
    commands = re.findall(r"^latentlink (train|export onnx) (.+?)(?:\s+#.*)?$", text, flags=re.M)
    assert len(commands) >= 8
    for kind, rest in commands:
        args = [a for a in shlex.split(rest) if a != "..."]
        if kind == "train":
            args = ["--data", "d", "--out", "o.pt"] + args if "--data" not in args else args
            train_parser().parse_args(args)
        else:
            export_parser().parse_args(["onnx"] + args)
