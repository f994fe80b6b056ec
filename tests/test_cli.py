import json
import os
import subprocess
import sys

import pytest

from latentlink.cli import COMMANDS, main

from .conftest import run_cli


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, _, _ in COMMANDS:
        assert name in out
    assert "latentlink demo" in out


def test_no_command_prints_the_usage_and_exits_2(capsys):
    assert main([]) == 2  # a usage error, as argparse's: not 0, which scripts would take for success
    captured = capsys.readouterr()
    assert captured.out == "" and "usage: latentlink <command>" in captured.err


def test_unknown_command(capsys):
    assert main(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err


@pytest.mark.parametrize("command", [name for name, _, _ in COMMANDS])
def test_every_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and "latentlink " + command in out


@pytest.mark.parametrize("package", ["latentlink.edge", "latentlink.host", "latentlink.export"])
def test_python_dash_m(package):
    result = run_cli(package, "--help")
    assert result.returncode == 0 and "usage" in result.stdout


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["edge", "--source", "cam0", "--profile", "nano-504"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "unknown source 'cam0'" in err
    assert main(["host", "--profile", "nano-999"]) == 2
    assert "no profile 'nano-999'" in capsys.readouterr().err


def test_report_prints_the_stage_table(tmp_path, capsys):
    from latentlink.edge.profiler import EDGE_STAGES, summarize, write_report

    records = [{"seq": i, "stages": {s: 1.0 + i for s in EDGE_STAGES}, "bytes": 100} for i in range(5)]
    path = str(tmp_path / "edge.json")
    write_report(path, summarize(records, EDGE_STAGES, 33.0, 1.0), records, {"role": "edge", "stream": "cam"})
    assert main(["report", path]) == 0
    out = capsys.readouterr().out
    assert "capture" in out and "over budget" in out
    assert json.load(open(path))["frames"] == 5


def test_installed_names_are_under_latentlink(tmp_path):
    """Outside the checkout only latentlink.* exists: no top-level edge/host/export to collide with other packages."""
    code = ("import importlib.util as u, latentlink.edge.protocol, latentlink.host.server, latentlink.profiles; "
            "print([u.find_spec(n) is None for n in ('edge', 'host', 'export', 'profiles')])")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[True, True, True, True]"
    result = subprocess.run([sys.executable, "-m", "latentlink.edge", "--help"], cwd=str(tmp_path), env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0 and "usage: latentlink edge" in result.stdout
