"""``latentlink eval --video``: the model against H.264/H.265 (ffmpeg's x264 and x265) on a clip's frames.

Needs ffmpeg with libx264 on PATH (CI: ``apt-get install -y ffmpeg``); skipped with that reason without it.
"""

import json
import os
import shutil
import subprocess

import pytest

from latentlink.edge.profile import load_profile

needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None,
                                  reason="ffmpeg/ffprobe not installed (apt-get install -y ffmpeg)")


def probe_frames(stream):
    """``[(picture type, packet bytes)]`` of a raw stream, read by ffprobe."""
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_frames", "-show_entries",
                          "frame=pict_type,pkt_size", "-of", "json", str(stream)], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    return [(f["pict_type"], int(f["pkt_size"])) for f in json.loads(out)["frames"]]


@needs_ffmpeg
def test_eval_video_reports_the_real_stream_sizes_of_x264(tiny_profile, video_file, tmp_path, capsys):
    from latentlink.cli import main

    out, streams = tmp_path / "video.json", tmp_path / "streams"
    assert main(["eval", "--video", video_file, "--frames", "8", "--profile", tiny_profile, "--codecs", "jpeg,x264",
                 "--preset", "ultrafast", "--streams", str(streams), "--json", str(out), "--threads", "1",
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "tiny: 8 frames from" in printed and "x264-intra" in printed and "x264-lowdelay" in printed
    document = json.loads(out.read_text())
    model = document["models"][0]
    assert len(model["results"]) == 8 and model["results"][0]["photo"] == "clip.avi#0000"
    assert model["bytes"] == sum(r["model"]["bytes"] for r in model["results"])  # wire frames, headers included
    for name, key_frames in (("x264-intra", 8), ("x264-lowdelay", 1)):
        point = model["video"][name]
        stream = streams / "model" / (name + ".h264")
        assert point["stream"] == str(stream)
        # The rate is the stream's real size: the file ffmpeg wrote, and the sum of its packets as ffprobe reads it.
        assert point["bytes"] == os.path.getsize(stream)
        frames = probe_frames(stream)
        assert len(frames) == 8 and sum(size for _, size in frames) == point["bytes"]
        assert point["bpp"] == pytest.approx(8.0 * point["bytes"] / (8 * 64 * 64))
        # all-intra: every frame a key frame; low-delay: one, then P-frames (no B-frames)
        assert [t for t, _ in frames].count("I") == key_frames and "B" not in [t for t, _ in frames]
        assert point["bytes"] <= model["bytes"] or point["crf"] == 51  # within the model's bytes for the clip
        assert len(point["per_frame_psnr"]) == 8 and point["psnr"] == pytest.approx(
            sum(point["per_frame_psnr"]) / 8)
        assert 10 < point["psnr"] < 60


@needs_ffmpeg
def test_x264_at_budget_is_the_lowest_crf_within_the_budget(tiny_profile, video_file):
    from latentlink.export.evaluate import fitted_frames, image_metrics, read_video_frames
    from latentlink.export.video_codecs import at_budget, encode_frames

    frames = fitted_frames(read_video_frames(video_file, 6), load_profile(tiny_profile))
    budget = encode_frames(frames, "x264", "lowdelay", 30, preset="ultrafast")[0]
    point = at_budget(frames, "x264", "lowdelay", budget, image_metrics, preset="ultrafast")
    assert point["bytes"] <= budget and point["crf"] <= 30
    assert encode_frames(frames, "x264", "lowdelay", point["crf"] - 1, preset="ultrafast")[0] > budget


def test_video_codecs_need_a_clip(photos_dir, capsys):
    from latentlink.cli import main

    assert main(["eval", "--photos", photos_dir, "--codecs", "jpeg,x265"]) == 2
    assert "--codecs x265: video codecs need a clip: give --video CLIP" in capsys.readouterr().err


def test_a_missing_ffmpeg_is_one_line_with_the_fix(tiny_profile, video_file, capsys, monkeypatch):
    from latentlink.cli import main

    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert main(["eval", "--video", video_file, "--profile", tiny_profile, "--codecs", "x264"]) == 2
    assert "need ffmpeg" in capsys.readouterr().err


def test_eval_checkpoints_measures_several_models_as_one_curve(tiny_profile, photos_dir, tmp_path, capsys):
    from pathlib import Path

    from latentlink.cli import main

    folder = Path(tiny_profile).parent  # the tiny model's checkpoint, and its ONNX export of the same weights
    out, plot = tmp_path / "models.json", tmp_path / "rd.png"
    assert main(["eval", "--photos", photos_dir, "--profile", tiny_profile, "--checkpoints", str(folder / "tiny.pt"),
                 str(folder / "onnx"), "--codecs", "jpeg", "--json", str(out), "--plot", str(plot), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "tiny (" in printed and "onnx (" in printed  # a table per model, then one line each
    models = json.loads(out.read_text())["models"]
    assert [m["name"] for m in models] == ["tiny", "onnx"]
    assert models[0]["decoder"].endswith("tiny.pt") and models[1]["decoder"].endswith("decoder.onnx")
    # The same weights through PyTorch and ONNX Runtime: the same frame sizes, nearly the same pictures.
    assert models[0]["bytes"] == models[1]["bytes"]
    assert models[0]["point"]["psnr"] == pytest.approx(models[1]["point"]["psnr"], abs=0.1)
    assert plot.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("args, expected", [
    (["--video", "{tmp}/missing.avi"], "--video {tmp}/missing.avi: no such file"),
    (["--photos", "{photos}", "--streams", "{tmp}/s"], "--streams keeps the video codecs' streams: it needs --video"),
    (["--photos", "{photos}", "--checkpoints", "{tmp}/a.pt", "--encoder", "{tmp}/a.pt"],
     "--checkpoints gives each model's encoder and decoder"),
    (["--photos", "{photos}", "--video", "{tmp}/v.avi"], "argument --video: not allowed with argument --photos"),
])
def test_eval_refuses_bad_video_and_model_options(args, expected, photos_dir, tmp_path, capsys):
    from latentlink.cli import main

    paths = {"tmp": str(tmp_path), "photos": photos_dir}
    assert main(["eval"] + [a.format(**paths) for a in args]) == 2
    assert expected.format(**paths) in capsys.readouterr().err
