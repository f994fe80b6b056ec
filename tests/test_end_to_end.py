"""Edge and host as separate processes over loopback: a real video in, PNGs and two reports out."""

import json
import os

import cv2
import numpy as np
import pytest

from latentlink.edge.backends import open_backend
from latentlink.edge.preprocess import Preprocessor, to_image
from latentlink.edge.profile import load_profile
from latentlink.edge.sources import open_source

from .conftest import run_cli


def start_host(tmp_path, profile, *extra):
    import subprocess
    import sys
    import time

    from .conftest import ROOT

    ready = tmp_path / "host.address"
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "latentlink.host", "--listen", "127.0.0.1:0", "--ready-file", str(ready),
                             "--profile", profile, "--out", str(tmp_path / "frames"), "--report",
                             str(tmp_path / "host.json"), "--max-streams", "1"] + list(extra),
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "host did not start"
        time.sleep(0.05)
    return proc, ready.read_text().strip()


def expected_images(video, profile):
    """What the model decodes directly from the video's frames, without any network in between."""
    pre = Preprocessor(profile.input.width, profile.input.height, profile.input.fit)
    images = []
    with open_backend(profile.model.encoder, "encoder") as enc, open_backend(profile.model.decoder, "decoder") as dec, \
            open_source("file://" + video) as source:
        for frame, _ in source:
            latents, _ = enc.infer(pre(frame))
            images.append(to_image(dec.infer(latents.copy())[0]))
    return images


def stream_video(tmp_path, profile, video, name, *edge_args):
    """The video from an edge process to a host process; returns (edge process, edge report, host report)."""
    host, address = start_host(tmp_path, profile, *(["--accept-pickle"] if "pickle" in edge_args else []))
    edge = run_cli("latentlink.edge", "--source", "file://" + video, "--connect", address, "--name", name,
                   "--profile", profile, "--drop", "block", "--report", str(tmp_path / "edge.json"), *edge_args)
    host_out, _ = host.communicate(timeout=60)
    assert edge.returncode == 0, edge.stderr
    assert host.returncode == 0, host_out
    return edge, json.loads((tmp_path / "edge.json").read_text()), json.loads((tmp_path / "host.json").read_text())


def assert_host_saved_what_the_model_decodes(tmp_path, name, video, profile):
    saved = sorted(os.listdir(str(tmp_path / "frames" / name)))
    assert saved == ["{:06d}.png".format(i) for i in range(24)]
    expected = expected_images(video, load_profile(profile))
    assert len(expected) == 24
    for seq, image in enumerate(expected):
        assert np.array_equal(cv2.imread(str(tmp_path / "frames" / name / saved[seq])), image), seq


@pytest.mark.parametrize("serializer", ["framed", "pickle"])
def test_video_from_edge_process_to_host_process(tmp_path, tiny_profile, video_file, serializer):
    edge, edge_report, host_report = stream_video(tmp_path, tiny_profile, video_file, "clip",
                                                  "--serializer", serializer)
    assert edge_report["frames"] == 24 and edge_report["dropped"] == 0
    assert host_report["frames"] == 24 and host_report["dropped"] == 0 and host_report["failed"] == 0
    assert host_report["streams"]["clip"]["ended"]
    assert set(edge_report["stages"]) == {"capture", "preprocess", "encode", "gpu_to_cpu", "serialize", "send",
                                          "total"}
    assert edge_report["meta"]["role"] == "edge" and host_report["meta"]["role"] == "host"
    # Bits packing: 8 x 16 x 16 latents -> 256 bytes of payload, plus the header.
    if serializer == "framed":
        assert 256 < edge_report["bytes_per_frame"] < 256 + 200
    assert edge_report["bytes_per_frame"] == host_report["bytes_per_frame"]
    assert "encode" in edge.stdout and "budget" in edge.stdout  # the per-stage table
    assert_host_saved_what_the_model_decodes(tmp_path, "clip", video_file, tiny_profile)


def test_frames_dropped_by_policy_are_counted_on_both_sides(tmp_path, tiny_profile, photos_dir):
    # The host stops after 3 frames; the edge keeps capturing with drop=newest, a queue of 1 and a window of 1, so
    # frames are decoded, dropped by policy, or lost when the host goes away (the edge gives up 2 s later): never
    # unaccounted for. Lost frames under a dropping policy do not fail the run.
    host, address = start_host(tmp_path, tiny_profile, "--max-frames", "3")
    edge = run_cli("latentlink.edge", "--source", "file://" + photos_dir, "--loop", "--frames", "40", "--connect",
                   address, "--name", "live", "--profile", tiny_profile, "--drop", "newest", "--queue-size", "1",
                   "--window", "1", "--wait-for-host", "2", "--report", str(tmp_path / "edge.json"))
    host.communicate(timeout=60)
    assert edge.returncode == 0, edge.stderr
    report = json.loads((tmp_path / "edge.json").read_text())
    host_report = json.loads((tmp_path / "host.json").read_text())
    outcomes = report["outcomes"]
    assert report["captured"] == report["frames"] == sum(outcomes.values())
    assert outcomes["dropped"] == report["dropped"] and outcomes["dropped"] > 0
    # The host stops at 3 frames, or earlier when the edge ends first; the ack of its last frame may not make it out.
    assert 1 <= host_report["frames"] <= 3
    assert host_report["frames"] - 1 <= outcomes["decoded"] <= host_report["frames"]


def test_edge_with_an_entropy_coder_to_host(tmp_path, tiny_profile, video_file):
    edge, edge_report, host_report = stream_video(tmp_path, tiny_profile, video_file, "coded", "--entropy", "zlib")
    assert host_report["frames"] == 24 and host_report["failed"] == 0 and host_report["protocol_errors"] == 0
    assert list(edge_report["stages"]) == ["capture", "preprocess", "encode", "gpu_to_cpu", "serialize", "entropy",
                                           "send", "total"]
    assert all("entropy" in r["stages"] for r in edge_report["records"])
    assert edge_report["meta"]["entropy"] == "zlib"
    assert edge_report["bytes_per_frame"] == host_report["bytes_per_frame"]  # the compressed frame, both sides
    rows = [line.split()[0] for line in edge.stdout.splitlines() if line.strip()]
    assert rows.index("serialize") + 1 == rows.index("entropy") == rows.index("send") - 1  # the printed table

    assert_host_saved_what_the_model_decodes(tmp_path, "coded", video_file, tiny_profile)


def test_the_pickle_serializer_cannot_be_entropy_coded(tiny_profile, capsys):
    from latentlink.edge.__main__ import main

    assert main(["--source", "synthetic://", "--profile", tiny_profile, "--serializer", "pickle", "--entropy",
                 "zlib", "--frames", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --serializer pickle cannot be entropy-coded (entropy 'zlib')")
    assert "--entropy none" in err


def test_a_host_killed_mid_run_leaves_a_report_readable_to_its_last_frame(tmp_path, tiny_profile, video_file):
    """Records reach the report as frames are decoded: SIGKILL loses the summary line, never a decoded frame."""
    from latentlink.edge.profiler import load_report

    host, address = start_host(tmp_path, tiny_profile, "--max-streams", "2")  # still waiting after one stream
    try:
        edge = run_cli("latentlink.edge", "--source", "file://" + video_file, "--connect", address, "--name", "cut",
                       "--profile", tiny_profile, "--drop", "block", "--quiet")
        assert edge.returncode == 0, edge.stderr
    finally:
        host.kill()
        host.communicate(timeout=60)
    report = load_report(str(tmp_path / "host.json"))
    assert report["unfinished"] is True and report["frames"] == 24 and len(report["records"]) == 24
    assert sorted(r["seq"] for r in report["records"]) == list(range(24))
    assert report["meta"]["role"] == "host" and report["stages"]["decode"]["frames"] == 24
    printed = run_cli("latentlink", "report", str(tmp_path / "host.json"))
    assert printed.returncode == 0 and "note: report: unfinished" in printed.stdout
