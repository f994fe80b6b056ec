"""`latentlink demo`, the README's main job, on the shipped default model and real photos."""

import json
import os

from .conftest import run_cli


def test_demo_streams_photos_and_reports(tmp_path):
    result = run_cli("latentlink", "demo", "--frames", "4", "--out", str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "edge 'demo'" in out and "host 'demo'" in out and "budget" in out  # both per-stage tables
    assert "bytes per frame" in out and "PSNR" in out
    edge = json.loads((tmp_path / "edge.json").read_text())
    host = json.loads((tmp_path / "host.json").read_text())
    assert edge["frames"] == host["frames"] == 4
    assert sorted(os.listdir(str(tmp_path / "frames" / "demo"))) == ["{:06d}.png".format(i) for i in range(4)]
    # 504x504 at 0.5 bpp: 15876 bytes of packed bits plus the frame header.
    assert 15876 < edge["bytes_per_frame"] < 15876 + 200
