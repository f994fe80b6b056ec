"""What a newcomer's first hour tripped over, working now: habits from other tools, silent runs, photo folders with
a bad file, help that reads well. (The refusals of bad input are in test_bad_inputs.py.)"""

import logging
import os
import socket
import subprocess
import sys

import pytest

from latentlink.cli import COMMANDS, main
from latentlink.edge.errors import ConfigError

from .conftest import ROOT, run_cli

DEFAULT = os.path.join(ROOT, "profiles", "default", "nano-504")


# Habits.

def test_the_edge_takes_its_input_first_as_jetson_inference_does():
    from latentlink.edge.__main__ import check_args, get_args_parser

    parser = get_args_parser()
    for argv in (["csi://0"], ["--source", "csi://0"], ["csi://0", "--source", "csi://0"]):
        args = parser.parse_args(argv)
        check_args(parser, args)
        assert args.source == "csi://0"


@pytest.mark.parametrize("option, text, expected", [
    ("--listen", "5760", "127.0.0.1:5760"),  # a bare number is a port, on the default address
    ("--listen", "0.0.0.0:5760", "0.0.0.0:5760"),
    ("--listen", "[::1]:5761", "[::1]:5761"),
    ("--listen", "localhost", "localhost:5760"),  # a bare name keeps the default port
])
def test_a_bare_port_means_that_port_on_the_default_address(option, text, expected):
    from latentlink.host.__main__ import get_args_parser

    args = get_args_parser().parse_args([option, text])
    assert args.listen == expected
    from latentlink.edge.__main__ import get_args_parser as edge_parser

    assert edge_parser().parse_args(["synthetic://", "--connect", text]).connect == expected


def test_help_says_what_a_bare_port_means(capsys):
    for command in ("host", "edge"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "a bare PORT means 127.0.0.1:PORT" in " ".join(capsys.readouterr().out.split())


def test_the_host_says_when_a_jetson_cannot_reach_it(caplog):
    from latentlink.host.__main__ import loopback_note

    with caplog.at_level(logging.INFO, logger="latentlink.host"):
        loopback_note("127.0.0.1:5760")
    message = caplog.records[-1].getMessage()
    assert "127.0.0.1 only" in message and "a Jetson on the network cannot" in message
    assert "--listen 0.0.0.0:5760" in message
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="latentlink.host"):
        loopback_note("0.0.0.0:5760")
        loopback_note("127.0.0.1:0")  # scripts and the demo, on one machine
    assert not caplog.records


def test_a_real_host_on_loopback_logs_the_note(tmp_path):
    """The start-up log of a real `latentlink host`, stopped by --max-frames after no frame: killed once ready."""
    ready = tmp_path / "ready"
    env = dict(os.environ, PYTHONPATH=ROOT)
    host = subprocess.Popen([sys.executable, "-m", "latentlink.host", "--listen", "127.0.0.1:{}".format(free_port()),
                             "--ready-file", str(ready), "--quiet"], cwd=ROOT, env=env, stderr=subprocess.PIPE,
                            text=True)
    try:
        for _ in range(600):
            if ready.exists() or host.poll() is not None:
                break
            subprocess.run(["sleep", "0.05"])
    finally:
        host.kill()
    err = host.communicate()[1]
    assert "a Jetson on the network cannot" in err and "--listen 0.0.0.0:" in err


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_name_that_does_not_resolve_fails_at_once_a_temporary_failure_only_warns(monkeypatch, caplog):
    from latentlink.edge.cli import check_resolvable

    def fails(code):
        def getaddrinfo(*args, **kwargs):
            raise socket.gaierror(code, "from the test")
        return getaddrinfo

    monkeypatch.setattr(socket, "getaddrinfo", fails(socket.EAI_NONAME))
    with pytest.raises(ConfigError, match="--connect cam-hots:5760: the name 'cam-hots' does not resolve"):
        check_resolvable("--connect", "cam-hots:5760")
    monkeypatch.setattr(socket, "getaddrinfo", fails(socket.EAI_AGAIN))  # no network yet: the edge retries
    with caplog.at_level(logging.WARNING):
        check_resolvable("--connect", "cam-host:5760")
    assert "does not resolve yet" in caplog.records[-1].getMessage()


def test_an_encoder_and_a_decoder_are_told_apart(tmp_path):
    from latentlink.edge.backends import check_role, declared_role, open_backend

    assert declared_role(os.path.join(DEFAULT, "encoder.onnx")) == "encoder"
    assert declared_role(os.path.join(DEFAULT, "decoder.onnx")) == "decoder"
    assert declared_role(os.path.join(ROOT, "profiles", "default", "lossy-cae.pt")) is None  # both halves
    # An engine: its sidecar names the ONNX file it was built from, whatever the engine file is called.
    engine = tmp_path / "cam.fp16.engine"
    engine.write_bytes(b"")
    (tmp_path / "cam.fp16.engine.json").write_text(
        '{"model": "m", "input_shape": [1, 8, 4, 4], "latent_shape": [1, 3, 16, 16], "packing": "bits", '
        '"encoder": "encoder.onnx", "decoder": "decoder.onnx", "onnx": "/models/decoder.onnx"}')
    assert declared_role(str(engine)) == "decoder"
    with pytest.raises(ConfigError, match="is a decoder, not an encoder: pass it to the host"):
        check_role(str(engine), "encoder")
    with pytest.raises(ConfigError, match="is an encoder, not a decoder: pass it to the edge"):
        open_backend(os.path.join(DEFAULT, "encoder.onnx"), "decoder")


def test_latentlink_alone_prints_the_usage_and_exits_2():
    result = run_cli("latentlink", timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("usage: latentlink <command>")


# Help.

@pytest.mark.parametrize("argv", [[name] for name, _, _ in COMMANDS] + [
    ["export", sub] for sub in ("onnx", "check", "engine", "compare", "bundle")])
def test_help_descriptions_are_sentences(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv + ["--help"])
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    description = lines[lines.index("") + 1]  # the line after the usage
    assert description[:1].isupper(), description


def test_train_help_shows_every_default_and_keeps_its_examples(capsys):
    pytest.importorskip("torch")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for option, default in (("--steps", "20000"), ("--batch-size", "8"), ("--crop", "128"), ("--lr", "0.0005"),
                            ("--val-split", "0.15"), ("--val-every", "1000"), ("--loss", "mse"),
                            ("--model", "lossy-cae"), ("--stochastic-fraction", "0.25"), ("--device", "cpu"),
                            ("--scales", "504,1008")):
        assert "(default: {})".format(default) in out.split(option + " ", 2)[-1].split(" --")[0], option
    assert "(default: None)" not in out and "(default: False)" not in out
    assert "example: latentlink train --data data/train data/extra" in out


# Training and export.

@pytest.mark.parametrize("steps", [1, 2, 19, 20, 21, 40, 1000])
def test_the_learning_rate_schedule_runs_for_any_number_of_steps(steps):
    """--steps 20 divided by zero in OneCycleLR: a warm-up of exactly one step."""
    torch = pytest.importorskip("torch")
    from latentlink.export.train import lr_scheduler

    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = lr_scheduler(optimizer, 1e-3, steps)
    rates = []
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert max(rates) <= 1e-3 * (1 + 1e-9) and rates[-1] < 1e-3


def test_every_step_count_up_to_2000_builds_its_schedule():
    torch = pytest.importorskip("torch")
    from latentlink.export.train import lr_scheduler

    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    for steps in range(1, 2001):
        lr_scheduler(optimizer, 1e-3, steps)


def test_train_20_steps_skips_an_unreadable_photo_and_names_what_it_wrote(photos_dir, tmp_path, capsys):
    pytest.importorskip("torch")
    import shutil

    data = tmp_path / "data"
    shutil.copytree(photos_dir, str(data))
    (data / "broken.png").write_bytes(b"not a png")
    (data / "clip.mp4").write_bytes(b"")
    out = tmp_path / "m.pt"
    assert main(["train", "--data", str(data), "--out", str(out), "--steps", "20", "--crop", "32", "--scales", "64",
                 "--val-every", "10", "--threads", "1", "--hparam", "encoder_channels=8", "--hparam",
                 "decoder_channels=8"]) == 0
    captured = capsys.readouterr()
    assert "warning: skipping it: cannot decode image" in captured.err and "broken.png" in captured.err
    assert "1 video(s) under" in captured.err and "clip.mp4" in captured.err
    assert "1 unreadable file(s) skipped" in captured.out
    assert "step 10: validation PSNR" in captured.out and "wrote {}".format(out) in captured.out
    assert out.is_file() and (tmp_path / "m.best.pt").is_file()


def test_export_onnx_at_a_height_and_width(tmp_path, capsys):
    pytest.importorskip("torch")
    out = tmp_path / "onnx"
    assert main(["export", "onnx", "--checkpoint", os.path.join(ROOT, "profiles", "default", "lossy-cae.pt"),
                 "--height", "64", "--width", "96", "--out", str(out)]) == 0
    assert "[1, 3, 64, 96]" in capsys.readouterr().out and (out / "encoder.onnx").is_file()


# Eval.

def test_eval_skips_an_unreadable_photo_counts_it_and_names_its_json(tiny_profile, photos_dir, tmp_path, capsys):
    pytest.importorskip("torch")
    import shutil

    photos = tmp_path / "photos"
    shutil.copytree(photos_dir, str(photos))
    (photos / "zz-broken.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "r.json"
    assert main(["eval", "--photos", str(photos), "--profile", tiny_profile, "--codecs", "jpeg", "--json",
                 str(out)]) == 0
    captured = capsys.readouterr()
    assert "warning: skipping it: cannot decode image" in captured.err and "zz-broken.jpg" in captured.err
    assert "tiny: 5 photos from" in captured.out  # the line before the work
    assert "4 photos (1 unreadable skipped)" in captured.out and "wrote {}".format(out) in captured.out


def run_with_a_terminal_for_stderr(args):
    """Run ``python -m args`` with stderr on a pseudo-terminal, as in a shell; returns (status, stdout, stderr)."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    env = dict(os.environ, PYTHONPATH=ROOT)
    process = subprocess.Popen([sys.executable, "-m"] + args, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the terminal closed (Linux: EIO)
            break
        if not chunk:
            break
        chunks.append(chunk)
    out = process.stdout.read().decode()
    process.wait(timeout=300)
    os.close(master)
    return process.returncode, out, b"".join(chunks).decode(errors="replace")


def test_eval_shows_progress_on_a_terminal_and_not_elsewhere(tiny_profile, photos_dir, tmp_path):
    pytest.importorskip("torch")
    args = ["latentlink", "eval", "--photos", photos_dir, "--profile", tiny_profile, "--codecs", "jpeg",
            "--plot", str(tmp_path / "rd.png")]
    status, out, err = run_with_a_terminal_for_stderr(args)
    assert status == 0, out + err
    assert "photos:" in err and "jpeg sweep:" in err and "\r" in err  # the bars, redrawn in place
    quiet_status, _, quiet_err = run_with_a_terminal_for_stderr(args + ["--quiet"])
    assert quiet_status == 0 and "photos:" not in quiet_err
    piped = run_cli(*args, timeout=300)
    assert piped.returncode == 0 and "photos:" not in piped.stderr and "\r" not in piped.stderr
    assert "rate-distortion curves: jpeg at 11 qualities over 4 photos" in piped.stdout


# Sources.

def test_a_refused_rtsp_stream_is_one_line_without_ffmpegs_own(tmp_path):
    """FFmpeg printed '[tcp @ 0x...] Connection to tcp://... failed' before the edge's message."""
    result = run_cli("latentlink", "edge", "rtsp://127.0.0.1:{}/stream".format(free_port()), "--frames", "1",
                     timeout=60)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: could not open network stream 'rtsp://127.0.0.1:")


def test_videos_under_an_image_folder_are_named(tmp_path, capsys):
    from latentlink.export.data import list_images

    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "walk.MOV").write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["a.png"]
    err = capsys.readouterr().err
    assert "1 video(s) under" in err and "walk.MOV" in err and "save them as images first" in err


def test_export_onnx_shows_its_steps_on_a_terminal(tmp_path):
    pytest.importorskip("torch")
    status, out, err = run_with_a_terminal_for_stderr([
        "latentlink", "export", "onnx", "--checkpoint", os.path.join(ROOT, "profiles", "default", "lossy-cae.pt"),
        "--height", "64", "--width", "64", "--out", str(tmp_path)])
    assert status == 0, out + err
    assert "export onnx: encoder" in err and "export onnx: parity with PyTorch" in err
    assert "wrote {}/encoder.onnx".format(tmp_path) in out


def test_ctrl_c_before_a_command_handles_it_is_one_line_not_a_traceback(capsys):
    from latentlink.edge.cli import run_main

    def loading_a_model(argv):
        raise KeyboardInterrupt

    assert run_main(loading_a_model, []) == 130
    assert capsys.readouterr().err == "interrupted\n"
