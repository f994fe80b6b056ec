"""`latentlink demo`, the README's main job, on the shipped default model and real photos."""

import json
import os

from .conftest import run_cli


def test_demo_streams_photos_and_reports(tmp_path):
    result = run_cli("latentlink", "demo", "--frames", "4", "--out", str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    # A line per stage while it runs (it was silent until the tables), and what it wrote.
    for line in ("wrote 4 sample photos", "starting the host (nano-504", "host listening on 127.0.0.1:",
                 "starting the edge: 4 frames", "edge done; waiting for the host", "reports: ", "images: "):
        assert line in out, line
    assert out.index("starting the host") < out.index("host listening") < out.index("edge done") < out.index("PSNR")
    assert "\r" not in result.stderr  # no progress bar where stderr is not a terminal
    assert "edge 'demo'" in out and "host 'demo'" in out and "budget" in out  # both per-stage tables
    assert "bytes per frame" in out and "PSNR" in out
    edge = json.loads((tmp_path / "edge.json").read_text())
    host = json.loads((tmp_path / "host.json").read_text())
    assert edge["frames"] == host["frames"] == 4
    assert sorted(os.listdir(str(tmp_path / "frames" / "demo"))) == ["{:06d}.png".format(i) for i in range(4)]
    # nano-504 sends context-coded bits (its profile's transport.entropy): fewer than the 15876 bytes of packed bits
    # of a 504x504 frame (0.5 bpp), and timed as the edge's entropy stage.
    assert edge["stages"]["entropy"]["frames"] == 4
    assert 1000 < edge["bytes_per_frame"] < 15876
