import json

import pytest

from latentlink.cli import COMMANDS, main

from .conftest import run_cli


def test_top_level_help_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name, _, _ in COMMANDS:
        assert name in out
    assert "latentlink demo" in out


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


@pytest.mark.parametrize("package", ["edge", "host", "export"])
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
    from edge.profiler import EDGE_STAGES, summarize, write_report

    records = [{"seq": i, "stages": {s: 1.0 + i for s in EDGE_STAGES}, "bytes": 100} for i in range(5)]
    path = str(tmp_path / "edge.json")
    write_report(path, summarize(records, EDGE_STAGES, 33.0, 1.0), records, {"role": "edge", "stream": "cam"})
    assert main(["report", path]) == 0
    out = capsys.readouterr().out
    assert "capture" in out and "over budget" in out
    assert json.load(open(path))["frames"] == 5
