"""Memory does not grow with the frames: an edge and a host streaming for a while, their RSS read from /proc.

Not a timing test: it counts frames, and bounds what the processes hold, not how fast they go.
"""

import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT

# Growth allowed from frame 1,000 to frame 6,000, per process (MiB). Measured on this project's 2-core machine:
# 0.0-0.2 MiB when it is quiet, single steps of up to 0.9 MiB when other jobs load it (the allocator's high-water
# mark after a stall). Keeping something per frame fails it: put back, the host's list of records (Host.records)
# grew the host by 3.9 MiB over these 5,000 frames, the edge's list of every FrameTimer the edge by 5.4 MiB.
GROWTH_BOUND_MIB = 1.5


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc (Linux)")
def test_edge_and_host_memory_stays_flat_while_frames_stream(tiny_profile):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "soak.py"), "--frames", "6000", "--at",
                             "1000,6000", "--reports", "on", "--profile", tiny_profile, "--json"],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    run, = json.loads(result.stdout.strip().splitlines()[-1])
    assert run["outcomes"]["decoded"] == 6000 and run["report_frames"] == [6000, 6000]  # every frame, written
    (first, edge_before, host_before), (last, edge_after, host_after) = run["samples"]
    assert (first, last) == (1000, 6000)
    assert edge_after - edge_before < GROWTH_BOUND_MIB, run["samples"]
    assert host_after - host_before < GROWTH_BOUND_MIB, run["samples"]


def test_the_edge_hands_over_each_frame_once_settled_and_holds_only_unsettled_ones(tiny_profile):
    """run_edge keeps no list of frames: while it runs, each frame's record comes out once the host acknowledged
    it, so at most window + queue frames (and the one being captured) are held at any time."""
    import threading

    import numpy as np

    from latentlink.edge.backends import open_backend
    from latentlink.edge.pipeline import run_edge
    from latentlink.edge.profile import load_profile
    from latentlink.host.server import Host

    profile = load_profile(tiny_profile)
    window, queue_size, frames = 3, 2, 300
    records, held = [], []

    class Source(object):
        """One frame over and over; notes how many captured frames have no record yet."""
        captured = 0

        def read(self):
            held.append(self.captured - len(records))
            self.captured += 1
            return np.zeros((profile.input.height, profile.input.width, 3), np.uint8), 0.0

    with open_backend(profile.model.decoder, "decoder") as decoder, \
            open_backend(profile.model.encoder, "encoder") as encoder:
        host = Host(decoder, max_streams=1)
        address = host.bind("127.0.0.1", 0)
        thread = threading.Thread(target=host.serve, daemon=True)
        thread.start()
        try:
            summary = run_edge(Source(), encoder, profile, address, "held", frames=frames, drop="block",
                               window=window, queue_size=queue_size, on_record=records.append)
            thread.join(30)
        finally:
            host.stop()
    assert summary["outcomes"]["decoded"] == summary["frames"] == frames
    assert sorted(r["seq"] for r in records) == list(range(frames))
    assert all(r["outcome"] == "decoded" and "t_capture" not in r and "send" in r["stages"] for r in records)
    assert max(held) <= window + queue_size + 1, max(held)
