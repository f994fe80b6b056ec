"""The DnCNN-style post-filter: its shapes, training, the host stage it runs as, the refusal of a filter trained for
another model, and `latentlink eval --postfilter`."""

import json
import os

import cv2
import numpy as np
import pytest

from latentlink.edge.profiler import HOST_STAGES, host_stages

from .conftest import TINY, run_cli
from .test_end_to_end import assert_host_saved_what_the_model_decodes, start_host, stream_video

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")


def tiny_model_id(profile):
    from latentlink.edge.backends import read_model_info
    from latentlink.edge.profile import load_profile

    return read_model_info(load_profile(profile).model.decoder).model_id


def write_filter(path, trained_for, **hparams):
    """A fresh (untrained) filter: its last layer starts at zero, so it is the identity."""
    from latentlink.export.postfilter import build_postfilter, export_filter

    torch.manual_seed(0)
    export_filter(build_postfilter(**hparams), str(path), trained_for, {"codec": "test"})
    return str(path)


@pytest.mark.parametrize("hparams", [{}, {"depth": 3, "width": 8, "unshuffle": 1}])
def test_the_filter_keeps_the_shape_and_starts_as_the_identity(hparams):
    from latentlink.export.postfilter import build_postfilter

    model = build_postfilter(**hparams).eval()
    x = torch.rand(2, 3, 48, 80)
    with torch.no_grad():
        y = model(x)
    assert y.shape == x.shape
    assert torch.equal(y, x)  # the residual's last layer starts at zero
    torch.nn.init.normal_(model.body[-1].weight, std=0.1)
    with torch.no_grad():
        assert not torch.equal(model(x), x)


def test_the_onnx_filter_takes_any_batch_and_frame_size(tmp_path):
    from latentlink.host.postfilter import PostFilter, read_filter_info

    path = write_filter(tmp_path / "pf.onnx", "a" * 64)
    info = read_filter_info(path)
    assert info["trained_for"] == "a" * 64 and info["multiple_of"] == 2 and info["opset"] == 13
    assert (tmp_path / "pf.json").is_file()
    runner = PostFilter(path, info)
    for shape in ((1, 3, 64, 64), (3, 3, 48, 80)):
        frames = np.random.default_rng(0).random(shape, dtype=np.float32)
        restored = runner.run([frames[i:i + 1] for i in range(shape[0])])
        assert [r.shape for r in restored] == [(1,) + shape[1:]] * shape[0]
        # the identity, on the 8-bit rounded input
        assert np.allclose(np.concatenate(restored), np.round(frames * 255) / 255, atol=1e-6)
    images = np.random.default_rng(1).integers(0, 256, (2, 40, 56, 3), dtype=np.uint8)
    assert np.array_equal(runner.run_images(images), images)
    with pytest.raises(Exception, match="multiples of 2"):
        runner.check_frame(63, 64)


def test_tiled_frames_are_filtered_whole_and_given_back_as_tiles(tmp_path):
    from latentlink.edge.tiles import join_tiles
    from latentlink.host.postfilter import PostFilter, read_filter_info

    path = write_filter(tmp_path / "pf.onnx", "a" * 64)
    runner = PostFilter(path, read_filter_info(path))
    tiles = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)  # 2x2 tiles of a 64x64 frame
    restored = runner.run([tiles, tiles], tiles=(2, 2))
    assert [r.shape for r in restored] == [(4, 3, 32, 32)] * 2
    assert np.allclose(join_tiles(restored[0], (2, 2)), np.round(join_tiles(tiles, (2, 2)) * 255) / 255, atol=1e-6)


def test_train_postfilter_writes_a_filter_for_the_profile_model(tmp_path, tiny_profile, photos_dir):
    out = tmp_path / "pf" / "postfilter.onnx"
    run = run_cli("latentlink", "train-postfilter", "--data", photos_dir, "--profile", tiny_profile, "--out",
                  str(out), "--steps", "3", "--crop", "32", "--batch-size", "2", "--threads", "1", timeout=300)
    assert run.returncode == 0, run.stderr
    info = json.loads((tmp_path / "pf" / "postfilter.json").read_text())
    assert info["trained_for"] == tiny_model_id(tiny_profile)
    assert info["codec"] == "model" and info["steps"] == 3 and info["frame"] == [TINY, TINY]
    assert len(info["train_photos"]) + len(info["val_photos"]) == 4
    assert "wrote {}".format(out) in run.stdout
    jpeg = tmp_path / "jpeg.onnx"
    run = run_cli("latentlink", "train-postfilter", "--codec", "jpeg", "--data", photos_dir, "--profile", tiny_profile,
                  "--out", str(jpeg), "--steps", "2", "--crop", "32", "--batch-size", "2", "--threads", "1",
                  timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "jpeg.json").read_text())["trained_for"] == "jpeg"
    assert "trained for JPEG" in run.stdout


def test_host_process_runs_the_filter_as_its_own_stage(tmp_path, tiny_profile, video_file):
    path = write_filter(tmp_path / "pf.onnx", tiny_model_id(tiny_profile))
    host, address = start_host(tmp_path, tiny_profile, "--postfilter", path, "--threads", "1")
    edge = run_cli("latentlink.edge", "--source", "file://" + video_file, "--connect", address, "--name", "clip",
                   "--profile", tiny_profile, "--drop", "block")
    host_out, _ = host.communicate(timeout=60)
    assert edge.returncode == 0, edge.stderr
    assert host.returncode == 0, host_out
    report = json.loads((tmp_path / "host.json").read_text())
    assert report["frames"] == 24 and report["failed"] == 0 and report["dropped"] == 0
    assert list(report["stages"]) == ["receive", "deserialize", "decode", "postfilter", "write", "total"]
    assert report["stages"]["postfilter"]["frames"] == 24
    assert all("postfilter" in r["stages"] for r in report["records"])
    assert report["meta"]["postfilter"] == path
    rows = [line.split()[0] for line in host_out.splitlines() if line.strip()]
    assert rows.index("decode") + 1 == rows.index("postfilter") == rows.index("write") - 1  # the printed table
    # The identity filter: exactly what the model decodes, through the whole pipeline
    assert_host_saved_what_the_model_decodes(tmp_path, "clip", video_file, tiny_profile)


def test_a_host_without_a_filter_has_no_such_stage(tmp_path, tiny_profile, video_file):
    _, _, report = stream_video(tmp_path, tiny_profile, video_file, "plain")
    assert report["frames"] == 24
    assert "postfilter" not in report["stages"]
    assert host_stages(None) == tuple(s for s in HOST_STAGES if s != "postfilter")
    assert host_stages(object()) == HOST_STAGES


@pytest.mark.parametrize("trained_for, said", [("jpeg", "trained for JPEG"), ("0" * 64, "trained for checkpoint 000000000000")])
def test_a_filter_for_another_model_is_refused_at_startup(tmp_path, tiny_profile, trained_for, said):
    path = write_filter(tmp_path / "other.onnx", trained_for)
    run = run_cli("latentlink", "host", "--profile", tiny_profile, "--listen", "127.0.0.1:0", "--postfilter", path)
    assert run.returncode == 2
    assert run.stderr.startswith("error: post-filter {} was {}".format(path, said)), run.stderr
    assert "train one for it with `latentlink train-postfilter`" in run.stderr
    assert "listening" not in run.stderr


def test_a_filter_without_its_metadata_is_refused(tmp_path, tiny_profile):
    path = write_filter(tmp_path / "pf.onnx", tiny_model_id(tiny_profile))
    os.remove(str(tmp_path / "pf.json"))
    run = run_cli("latentlink", "host", "--profile", tiny_profile, "--listen", "127.0.0.1:0", "--postfilter", path)
    assert run.returncode == 2 and "its metadata {} is missing".format(tmp_path / "pf.json") in run.stderr


def test_eval_reports_each_filter_with_and_without(tmp_path, tiny_profile, photos_dir):
    model = write_filter(tmp_path / "model.onnx", tiny_model_id(tiny_profile))
    jpeg = write_filter(tmp_path / "jpeg.onnx", "jpeg")
    run = run_cli("latentlink", "eval", "--photos", photos_dir, "--profile", tiny_profile, "--codecs", "jpeg",
                  "--postfilter", model, "--jpeg-postfilter", jpeg, "--json", str(tmp_path / "eval.json"),
                  "--threads", "1", "--quiet", timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("post-filter"))
    model_row, jpeg_row = lines[header + 1].split(), lines[header + 2].split()
    assert model_row[0] == "model" and jpeg_row[0] == "jpeg"
    assert model_row[1] == model_row[2] and model_row[3] == "+0.00"  # the identity filter gains nothing
    rows = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert len(rows) == 4
    for row in rows:
        assert row["model+postfilter"]["psnr"] == pytest.approx(row["model"]["psnr"])
        assert row["jpeg+postfilter"]["psnr"] == pytest.approx(row["jpeg"]["psnr"])
        assert row["model+postfilter"]["postfilter_time"] > 0
    # each filter checked against its codec: the JPEG filter is refused for the model, and the reverse
    for option, path in (("--postfilter", jpeg), ("--jpeg-postfilter", model)):
        run = run_cli("latentlink", "eval", "--photos", photos_dir, "--profile", tiny_profile, "--codecs", "jpeg",
                      option, path, "--quiet")
        assert run.returncode == 2 and "error: post-filter {} was trained for".format(path) in run.stderr


def test_the_filter_improves_what_it_was_trained_on(tmp_path):
    """A few hundred steps on JPEG-compressed crops of a real photo: the filter must gain, not merely run."""
    data = pytest.importorskip("skimage.data")
    from latentlink.export.postfilter import psnr_db, train_filter

    rgb = cv2.resize(data.astronaut(), (256, 256), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 10])
    degraded = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]
    torch.set_num_threads(1)
    model, facts = train_filter(degraded[None], rgb[None], degraded[None], rgb[None], steps=300, batch_size=8,
                                crop=32, lr=2e-3, hparams={"depth": 4, "width": 16}, log=lambda line: None)
    assert facts["val_filtered_psnr_db"] > facts["val_psnr_db"] + 0.2
    assert facts["val_psnr_db"] == pytest.approx(psnr_db(degraded, rgb), abs=1e-3)
