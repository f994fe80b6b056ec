"""Bad input to every command is refused: a non-zero exit, one line that names the option (and the value, the rule
and the fix), and never a traceback. The table holds the findings of a newcomer's first hour and their neighbours.

Each row runs in this process through ``latentlink.cli.main`` (what the ``latentlink`` command runs); a few run as
real processes below, as a user would start them.
"""

import os
import socket
import subprocess
import sys

import pytest

from latentlink.cli import main

from .conftest import ROOT, run_cli

DEFAULT = os.path.join(ROOT, "profiles", "default", "nano-504")
ENCODER, DECODER = os.path.join(DEFAULT, "encoder.onnx"), os.path.join(DEFAULT, "decoder.onnx")
CHECKPOINT = os.path.join(ROOT, "profiles", "default", "lossy-cae.pt")

# (command line, what the one line must say). {photos}: a folder of 4 photos; {tmp}: an empty folder; {file}: a
# file where a folder is wanted; {foreign}: a PyTorch file that is not a latentlink checkpoint; {junk}: not even
# that; {encoder}/{decoder}/{checkpoint}: the shipped default model.
TRAIN = "train --data {photos} --out {tmp}/model.pt "
ONNX = "export onnx --checkpoint {checkpoint} --out {tmp}/onnx "
CASES = [
    # latentlink itself
    ("", "usage: latentlink <command>"),
    ("fly", "unknown command 'fly'"),
    # edge
    ("edge --threads -2 synthetic://", "argument --threads: got -2; expected a whole number >= 0 (0: one per core)"),
    ("edge", "no input: give it first, e.g. `latentlink edge csi://0`, or as --source csi://0"),
    ("edge csi://0 --source v4l2:///dev/video0", "two inputs: csi://0 and --source v4l2:///dev/video0"),
    ("edge synthetic:// --frames 0", "argument --frames: got 0; expected a whole number >= 1"),
    ("edge synthetic:// --queue-size -1", "argument --queue-size: got -1"),
    ("edge synthetic:// --window 0", "argument --window: got 0"),
    ("edge synthetic:// --wait-for-host -1", "argument --wait-for-host: got -1; expected a number >= 0"),
    ("edge synthetic:// --wait-for-host nan", "argument --wait-for-host: got nan"),
    ("edge synthetic:// --connect host:99999", "argument --connect: got 'host:99999'; expected HOST:PORT"),
    ("edge synthetic:// --connect nohost:5760", "--connect nohost:5760: the name 'nohost' does not resolve"),
    ("edge synthetic:// --encoder {decoder}", "--encoder {decoder} is a decoder, not an encoder: pass it to the host"),
    ("edge synthetic:// --encoder {tmp}/missing.onnx", "--encoder {tmp}/missing.onnx: no such file"),
    ("edge synthetic:// --encoder {photos}/coffee.png", "not a model file latentlink runs"),
    ("edge synthetic:// --report {file}/edge.json", "--report {file}/edge.json: {file} is a file"),
    ("edge synthetic:// --spool {file} --delivery reliable", "--spool {file}: a file of that name is in the way"),
    ("edge synthetic:// --profile nano-999", "no profile 'nano-999'"),
    ("edge csi://0 --loop", "--loop restarts files, folders and images at their end; csi://0 has no end"),
    # host
    ("host --listen :99999", "argument --listen: got ':99999'; expected HOST:PORT with a port from 0 to 65535"),
    ("host --listen nohost:5760", "--listen nohost:5760: the name 'nohost' does not resolve"),
    ("host --threads -1", "argument --threads: got -1"),
    ("host --postfilter {tmp}/pf.onnx", "--postfilter {tmp}/pf.onnx: no such file"),
    ("host --max-frames 0", "argument --max-frames: got 0"),
    ("host --idle-timeout 0", "argument --idle-timeout: got 0; expected a number > 0"),
    ("host --window 0", "argument --window: got 0"),
    ("host --decoder {encoder}", "--decoder {encoder} is an encoder, not a decoder: pass it to the edge"),
    ("host --out {file}", "--out {file}: a file of that name is in the way"),
    ("host --report {tmp}", "--report {tmp}: that is a folder; give a file name"),
    ("host --decoder triton://127.0.0.1/decoder", "a decode service is triton://HOST:PORT/MODEL"),
    ("host --decoder triton://127.0.0.1:1/decoder", "no decode service at http://127.0.0.1:1 (connection refused)"),
    ("host --decoder triton://127.0.0.1:1/decoder --device cuda", "the service decides where its decoder runs"),
    ("worker", "the following arguments are required: --jetstream"),
    ("worker --jetstream http://x", "bad --jetstream 'http://x': give the NATS server as nats://HOST:PORT"),
    ("worker --jetstream nats://127.0.0.1:1 --decoder nope.onnx", "--decoder nope.onnx: no such file"),
    ("worker --jetstream nats://127.0.0.1:1 --batch-size 0", "argument --batch-size: got 0"),
    ("fleet status", "the following arguments are required: --jetstream"),
    ("fleet status --jetstream foo://x", "bad --jetstream 'foo://x': give the NATS server as nats://HOST:PORT"),
    ("decode-service --listen 127.0.0.1:0", "--listen 127.0.0.1:0: Triton needs a fixed port"),
    ("decode-service --listen 127.0.0.1:1 --profile progressive-504",
     "a progressive model's decoder, which the decode service does not serve"),
    ("decode-service --decoder {encoder}", "--decoder {encoder} is an encoder, not a decoder"),
    ("decode-service --model-name a/b", "argument --model-name: 'a/b': letters, digits"),
    ("decode-service --max-batch 0", "argument --max-batch: got 0"),
    # train
    (TRAIN + "--steps 0", "argument --steps: got 0; expected a whole number >= 1"),
    (TRAIN + "--steps -4", "argument --steps: got -4"),
    (TRAIN + "--steps many", "argument --steps: got 'many'"),
    (TRAIN + "--lr -1", "argument --lr: got -1; expected a number > 0"),
    (TRAIN + "--batch-size 0", "argument --batch-size: got 0; expected a whole number >= 1"),
    (TRAIN + "--val-split 1.5", "argument --val-split: got 1.5; expected a number >= 0 and < 1"),
    (TRAIN + "--val-split 0.99", "--val-split 0.99 holds out all 4 photos, leaving none to train on"),
    (TRAIN + "--crop 0", "argument --crop: got 0"),
    (TRAIN + "--scales 504,x", "argument --scales: got '504,x'"),
    (TRAIN + "--stochastic-fraction 2", "argument --stochastic-fraction: got 2; expected a number >= 0 and <= 1"),
    (TRAIN + "--bit-usage -1", "argument --bit-usage: got -1"),
    (TRAIN + "--clip-grad -1", "argument --clip-grad: got -1"),
    (TRAIN + "--val-every 0", "argument --val-every: got 0"),
    (TRAIN + "--threads -1", "argument --threads: got -1"),
    (TRAIN + "--latent-channels 0", "argument --latent-channels: got 0"),
    (TRAIN + "--tiles 0x2", "argument --tiles: bad tile grid '0x2'"),
    (TRAIN + "--device bogus", "--device 'bogus': expected cpu, cuda or cuda:N"),
    (TRAIN + "--resume {tmp}/missing.pt", "--resume {tmp}/missing.pt: no such file"),
    (TRAIN + "--resume {checkpoint} --hparam decoder_blocks=3", "--resume continues a checkpoint as it is"),
    (TRAIN + "--resume {checkpoint} --model crae", "--resume continues a checkpoint as it is"),
    (TRAIN + "--resume {checkpoint} --latent-channels 4", "--resume continues a checkpoint as it is"),
    (TRAIN + "--init-from {foreign}", "is a PyTorch file but not a latentlink checkpoint"),
    ("train --data {tmp}/missing --out {tmp}/model.pt", "--data {tmp}/missing: no such folder"),
    ("train --data {photos} --out {file}/model.pt", "--out {file}/model.pt: {file} is a file"),
    ("train-postfilter --data {tmp}/missing --out {tmp}/pf.onnx", "--data {tmp}/missing: no such folder"),
    ("train-postfilter --data {photos} --out {tmp}/pf.pt", "--out {tmp}/pf.pt: the filter is written as ONNX"),
    # export
    (ONNX + "--height -8 --width 64", "argument --height: got -8; expected a whole number >= 1"),
    (ONNX + "--height 64 --width 0", "argument --width: got 0"),
    (ONNX + "--profile nano-504 --height 720 --width 1280", "--profile nano-504 and --height and --width both give"),
    (ONNX + "--height 64", "the input size is missing (only --height)"),
    (ONNX + "--profile nano-504 --tiles 2y2", "argument --tiles: bad tile grid '2y2'"),
    ("export onnx --checkpoint {foreign} --out {tmp}/onnx --profile nano-504",
     "is a PyTorch file but not a latentlink checkpoint: it has no 'model', 'hparams', 'state_dict'"),
    ("export onnx --checkpoint {junk} --out {tmp}/onnx --profile nano-504", "is not a latentlink checkpoint"),
    ("export onnx --checkpoint {tmp}/missing.pt --out {tmp}/onnx --profile nano-504", "--checkpoint {tmp}/missing.pt"),
    ("export check {tmp}/missing.onnx", "export check {tmp}/missing.onnx: no such file"),
    ("export engine --int8 --trtexec", "INT8 refused"),
    ("export engine --int8", "INT8 refused"),
    ("export engine --workspace 8 --trtexec", "argument --workspace: got 8; expected a whole number >= 16"),
    ("export engine {tmp}/missing.onnx --trtexec", "export engine {tmp}/missing.onnx: no such file"),
    ("export engine --trtexec --out {file}", "--out {file}: a file of that name is in the way"),
    ("export compare {encoder} {decoder}", "B {decoder} is a decoder, not an encoder"),
    ("export compare {encoder} {tmp}/missing.onnx", "B {tmp}/missing.onnx: no such file"),
    ("export compare {encoder} {encoder} --count 0", "argument --count: got 0"),
    ("export compare {encoder} {encoder} --atol -1", "argument --atol: got -1"),
    ("export compare {encoder} {encoder} --max-flipped 2", "argument --max-flipped: got 2"),
    ("export compare {encoder} {encoder} --json {tmp}", "--json {tmp}: that is a folder"),
    ("export", "the following arguments are required"),
    # eval
    ("eval --photos {tmp}/missing", "--photos {tmp}/missing: no such folder"),
    ("eval --photos {photos} --size 64", "argument --size: got '64'; expected WIDTHxHEIGHT in pixels"),
    ("eval --photos {photos} --size 0x64", "argument --size: got '0x64'"),
    ("eval --photos {photos} --codecs jpeg,gif", "argument --codecs: got 'jpeg,gif'"),
    ("eval --photos {photos} --encoder {decoder}", "--encoder {decoder} is a decoder, not an encoder"),
    ("eval --photos {photos} --decoder {checkpoint}x", "--decoder {checkpoint}x: no such file"),
    ("eval --photos {photos} --json {tmp}", "--json {tmp}: that is a folder"),
    ("eval --photos {photos} --compressai {file}", "--compressai {file}: a file of that name is in the way"),
    ("eval --photos {photos} --entropy brotli", "argument --entropy: invalid choice: 'brotli'"),
    ("eval --photos {photos} --codecs webp --jpeg-postfilter {file}", "add jpeg to --codecs"),
    ("eval --photos {photos} --postfilter {tmp}/pf.onnx", "--postfilter {tmp}/pf.onnx: no such file"),
    # report
    ("report {tmp}/missing.json", "report file '{tmp}/missing.json' does not exist"),
    ("report {file}", "is not JSON"),
    ("report", "the following arguments are required: FILE.json"),
    # demo
    ("demo --frames 0", "argument --frames: got 0; expected a whole number >= 1"),
    ("demo --frames -3", "argument --frames: got -3"),
    ("demo --timeout 0", "argument --timeout: got 0"),
    ("demo --photos {tmp}/missing", "--photos {tmp}/missing: no such folder"),
    ("demo --out {file}", "--out {file}: a file of that name is in the way"),
    ("demo --profile nano-999", "no profile 'nano-999'"),
    ("keys", "the following arguments are required"),
    ("keys edge", "the following arguments are required: dir, name"),
    ("keys edge {tmp} ../x", "bad stream name"),
    ("keys init {tmp}/ca --days 0", "argument --days: got 0; expected a whole number >= 1"),
]


@pytest.fixture
def paths(tmp_path, photos_dir):
    torch = pytest.importorskip("torch")
    empty = tmp_path / "empty"
    empty.mkdir()
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder, not JSON")
    foreign = tmp_path / "foreign.pt"
    torch.save({"encoder.weight": torch.zeros(2)}, str(foreign))  # another project's bare state_dict
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    return {"photos": photos_dir, "tmp": str(empty), "file": str(a_file), "foreign": str(foreign),
            "junk": str(junk), "encoder": ENCODER, "decoder": DECODER, "checkpoint": CHECKPOINT}


def no_such_host(host, *args, **kwargs):
    if host == "nohost":
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    return REAL_GETADDRINFO(host, *args, **kwargs)


REAL_GETADDRINFO = socket.getaddrinfo


def run_in_process(argv, capsys):
    try:
        status = main(argv)
    except SystemExit as exc:  # only argparse's own exits (`latentlink report`): everything else returns
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_refused(status, out, err, expected, usage_first=False):
    assert status not in (0, None), (out, err)
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    if usage_first:
        assert lines[0].startswith("usage:")
        lines = lines[1:]
    if expected.startswith("usage:"):  # `latentlink` alone: the usage is the message
        assert lines[0].startswith(expected)
        return
    assert len(lines) == 1, err
    assert expected in lines[0], lines[0]
    assert lines[0].startswith(("error: ", "latentlink ")), lines[0]


class ReachedTheWork(Exception):
    """A bad input got past every check: the command started its real work (a camera, a server, a training run)."""


@pytest.fixture
def tripwires(monkeypatch):
    """Where each command's work starts: a row that gets there fails at once, instead of streaming, serving or
    training until the test times out."""
    import types

    import latentlink.demo
    import latentlink.edge.__main__
    import latentlink.host.__main__
    import latentlink.host.decode_service
    import latentlink.host.triton_backend

    def reached(*args, **kwargs):
        raise ReachedTheWork("the bad input was not refused")

    monkeypatch.setattr(latentlink.edge.__main__, "open_source", reached)
    # the host's decoders open through open_decoder: a model file's backend there; a triton:// one is the real client
    monkeypatch.setattr(latentlink.host.triton_backend, "open_model", reached)
    monkeypatch.setattr(latentlink.host.decode_service, "open_backend", reached)
    monkeypatch.setattr(latentlink.demo, "subprocess", types.SimpleNamespace(
        Popen=reached, TimeoutExpired=subprocess.TimeoutExpired))
    pytest.importorskip("torch")
    import latentlink.export.compare
    import latentlink.export.evaluate
    import latentlink.export.onnx_export
    import latentlink.export.train

    monkeypatch.setattr(latentlink.export.train, "lr_scheduler", reached)  # after every check of train
    monkeypatch.setattr(latentlink.export.onnx_export, "export_onnx", reached)
    monkeypatch.setattr(latentlink.export.evaluate, "evaluate", reached)
    monkeypatch.setattr(latentlink.export.compare, "compare_backends", reached)


@pytest.mark.parametrize("line, expected", CASES, ids=[line or "(nothing)" for line, _ in CASES])
def test_bad_input_is_refused_in_one_line(line, expected, paths, tripwires, capsys, monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)  # 'nohost' fails alike with or without a network
    argv = [word.format(**paths) for word in line.split()]
    status, out, err = run_in_process(argv, capsys)
    assert_refused(status, out, err, expected.format(**paths))


def test_every_command_has_rows_and_an_extra():
    from latentlink.cli import COMMANDS
    from latentlink.edge.cli import COMMANDS as EXTRAS

    assert set(module for _, module, _ in COMMANDS) == set(EXTRAS)

    commands = set(line.split()[0] for line, _ in CASES if line)
    assert commands >= set(name for name, _, _ in COMMANDS)
    subcommands = set(line.split()[1] for line, _ in CASES if line.startswith("export "))
    assert subcommands >= {"onnx", "check", "engine", "compare"}


@pytest.mark.parametrize("args, expected", [
    (["latentlink", "train", "--data", "d", "--out", "o.pt", "--steps", "0"], "argument --steps: got 0"),
    (["latentlink", "edge", "synthetic://", "--threads", "-2", "--frames", "1", "--wait-for-host", "2"],
     "argument --threads: got -2"),
    (["latentlink", "export", "onnx", "--checkpoint", CHECKPOINT, "--height", "-8", "--width", "64", "--out", "o"],
     "argument --height: got -8"),
    (["latentlink.host", "--listen", "host:port"], "argument --listen: got 'host:port'"),
    (["latentlink.edge", "--source", "synthetic://", "--connect", "nohost.invalid:5760", "--frames", "1",
      "--wait-for-host", "5"], "the name 'nohost.invalid' does not resolve"),
    (["latentlink"], "usage: latentlink <command>"),
])
def test_bad_input_in_a_real_process(args, expected):
    """As a user starts them: `python -m latentlink ...` (the console script's code) and `python -m latentlink.host`.
    (.invalid is a name no DNS resolves, RFC 6761. --frames and --wait-for-host bound an edge that was not refused.)"""
    result = run_cli(*args, timeout=60)
    assert_refused(result.returncode, result.stdout, result.stderr, expected)
    assert result.returncode == 2


@pytest.mark.parametrize("command, module, extra", [
    ("train", "torch", "export"), ("eval", "torch", "export"), ("export", "onnx", "export"),
    ("host", "cv2", "host"), ("edge", "cv2", "edge"), ("demo", "skimage", "host"),
])
def test_a_missing_package_names_the_extra_that_brings_it(command, module, extra, photos_dir, tmp_path):
    """As after `pip install ".[host]"` (no PyTorch) or `.[edge]`: one line naming the package and the extra, also
    for imports deep inside a command (eval imports PyTorch only to score the first photo)."""
    argv = {"train": ["train", "--data", photos_dir, "--out", str(tmp_path / "m.pt")],
            "eval": ["eval", "--photos", photos_dir, "--codecs", "jpeg"],
            "export": ["export", "check", ENCODER],
            "host": ["host", "--listen", "127.0.0.1:0", "--max-frames", "1"],
            "edge": ["edge", "synthetic://", "--frames", "1"],
            "demo": ["demo", "--out", str(tmp_path / "demo"), "--frames", "1"]}[command]
    code = ("import sys; sys.modules[{!r}] = None; from latentlink.cli import main; sys.exit(main({!r}))"
            .format(module, argv))
    result = _run_code(code)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: latentlink {}: ".format(command)) and "is not installed" in line, line
    assert "needs the [{}] extra: ".format(extra) in line and 'pip install ".[{}]"'.format(extra) in line
    if extra == "export":
        assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in line


def _run_code(code):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_a_bug_in_latentlink_is_not_called_a_missing_package(monkeypatch):
    """Only packages that are not installed get the install advice: an ImportError of latentlink's own keeps its
    traceback (the first version of the advice blamed the [export] extra for a misspelt import of ours)."""
    from latentlink.edge.cli import run_main

    def broken(argv):
        from latentlink.edge import no_such_module  # noqa: F401

    broken.__module__ = "latentlink.export.train"
    with pytest.raises(ImportError):
        run_main(broken, [])
