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
