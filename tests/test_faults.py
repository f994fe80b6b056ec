"""Faults with the host and the edges as separate processes: kill -9, SIGSTOP, refusals, old peers.

Every test asserts exact outcomes, never timings: the edge's buckets (decoded, failed, refused, dropped, lost,
sent) add up to the frames it captured, and agree with what the host wrote (PNGs, its journal, its report).

The tiny model decodes a frame in about a millisecond, so the host is slowed down on purpose where a fault must
find frames in flight: ``latentlink host --decode-delay SECONDS`` (for tests and benchmarks only) sleeps after each
decode, inside the decode lock, like a slower decoder. The edge captures far faster than such a host decodes, so
its window of frames in flight is full whenever a fault strikes. A fault is injected at an observed state, never
after a sleep: so many PNGs written, a PNG count equal to the journal's lines while the host is stopped, the edge's
capture loop no longer using the CPU. Waits are bounded (``wait_for``); the ``procs`` fixture kills every process
a test started. One test runs the host in this process, where the moment of a takeover has to be exact.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from .conftest import ROOT, TINY

pytestmark = pytest.mark.timeout(120)

ENV = dict(os.environ, PYTHONPATH=ROOT)
WINDOW, QUEUE = 4, 2  # the edges' --window and --queue-size below (the host grants min(its 8, the edge's 4))


# Processes.
def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(procs, log, module, *args):
    """``python -m module args`` from the repository root: stdout to the file ``log``, stderr to ``log.err`` (the
    host's to ``log`` too)."""
    with open(str(log), "w") as out, open(str(log) + ".err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", module] + [str(a) for a in args], cwd=ROOT, env=ENV,
                                stdout=out, stderr=subprocess.STDOUT if module.endswith("host") else err)
    procs.append(proc)
    return proc


def start_host(procs, tmp_path, profile, label, port=0, *extra):
    """A host process listening on 127.0.0.1:``port`` (0: any); returns ``(process, "HOST:PORT")`` once it listens.
    Its report goes to ``<label>.json``, its log to ``<label>.log``."""
    ready = tmp_path / (label + ".address")
    proc = spawn(procs, tmp_path / (label + ".log"), "latentlink.host", "--listen", "127.0.0.1:{}".format(port),
                 "--ready-file", ready, "--profile", profile, "--report", tmp_path / (label + ".json"), "--quiet",
                 *extra)
    wait_for(lambda: ready.exists() or proc.poll() is not None, 60, "the host to listen")
    assert proc.poll() is None, (tmp_path / (label + ".log")).read_text()
    return proc, ready.read_text().strip()


def start_edge(procs, tmp_path, profile, address, name, label, *extra):
    """An edge process streaming to ``address`` as ``--name name``; report ``<label>.json``, stderr
    ``<label>.log.err``."""
    return spawn(procs, tmp_path / (label + ".log"), "latentlink.edge", "--connect", address, "--name", name,
                 "--profile", profile, "--report", tmp_path / (label + ".json"), "--quiet", *extra)


def finish(proc, timeout=60):
    """Wait for ``proc`` to exit (bounded); returns its exit status."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("{} did not finish within {} s".format(" ".join(proc.args[2:4]), timeout))


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for " + what
        time.sleep(0.01)


def report(tmp_path, label):
    return json.loads((tmp_path / (label + ".json")).read_text())


def stderr(tmp_path, label):
    return (tmp_path / (label + ".log.err")).read_text()


def pngs(out, stream):
    """The sequence numbers of the PNGs the host wrote for ``stream`` (each one a decode)."""
    folder = os.path.join(str(out), stream)
    return sorted(int(name[:-4]) for name in os.listdir(folder) if name.endswith(".png")) if os.path.isdir(
        folder) else []


def journal(out, stream):
    """The host's journal of ``stream``: ``(session, seq, outcome)`` per line."""
    path = os.path.join(str(out), ".latentlink", stream + ".delivered")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [(words[0], int(words[1]), words[2]) for words in (line.split() for line in f)]


def file_states(out, stream):
    """seq -> (inode, size, mtime_ns) of each PNG: any rewrite changes the mtime (and cv2 rewrites in place)."""
    folder = os.path.join(str(out), stream)
    states = {}
    for seq in pngs(out, stream):
        st = os.stat(os.path.join(folder, "{:06d}.png".format(seq)))
        states[seq] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return states


def stop(proc):
    """SIGSTOP ``proc`` and wait until the kernel says it is stopped (state T), so what it wrote is final."""
    proc.send_signal(signal.SIGSTOP)
    wait_for(lambda: process_state(proc.pid) in ("T", "t"), 10, "the process to stop")


def process_state(pid):
    with open("/proc/{}/stat".format(pid)) as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def proc_status(pid, key):
    """A ``/proc/<pid>/status`` value in kB (VmRSS, VmHWM)."""
    with open("/proc/{}/status".format(pid)) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AssertionError("no {} in /proc/{}/status".format(key, pid))


def main_thread_cpu_ticks(pid):
    """utime + stime of the process's main thread (the edge's capture loop), in clock ticks."""
    with open("/proc/{0}/task/{0}/stat".format(pid)) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def wait_until_capture_ends(edge, at_least_s=0.0, sample_s=0.25, timeout=60, on_sample=None):
    """Wait (at least ``at_least_s``) until the capture loop of the ``edge`` process ended: its main thread stopped
    using the CPU. Capturing and encoding unpaced synthetic frames keeps it busy (~100 clock ticks/s); once the
    frames are all captured it only waits for acknowledgements, so 4 samples in a row with at most 1 tick each
    mean capture is over. ``on_sample()`` is called at each sample."""
    started, last, idle = time.monotonic(), None, 0
    while True:
        if on_sample is not None:
            on_sample()
        ticks = main_thread_cpu_ticks(edge.pid)
        idle = idle + 1 if last is not None and ticks - last <= 1 else 0
        last = ticks
        if idle >= 4 and time.monotonic() - started >= at_least_s:
            return
        assert edge.poll() is None, "the edge ended while it was watched"
        assert time.monotonic() - started < timeout, "the edge was still capturing after {} s".format(timeout)
        time.sleep(sample_s)


def assert_buckets_add_up(edge_report, frames):
    outcomes = edge_report["outcomes"]
    assert edge_report["captured"] == edge_report["frames"] == frames
    assert sum(outcomes.values()) == frames, outcomes
    by_record = {}
    for record in edge_report["records"]:
        by_record[record["outcome"]] = by_record.get(record["outcome"], 0) + 1
    assert by_record == {k: v for k, v in outcomes.items() if v}, (by_record, outcomes)
    return outcomes


def seqs_with(edge_report, outcome):
    return sorted(r["seq"] for r in edge_report["records"] if r["outcome"] == outcome)


# 1. The host killed and restarted.
def test_host_killed_mid_stream_live_delivery(procs, tmp_path, tiny_profile):
    # Frames in flight when the host dies are lost, unless the restarted host's journal says they were decoded (its
    # ACCEPT lists them). The host handles a connection's frames one at a time: decode, write the PNG, append
    # "session seq decoded" to its journal, ACK. So a kill -9 at any instant leaves at most one PNG without its
    # journal line (killed between the two): the edge counts that frame lost, though its PNG exists.
    frames, out, port = 30, tmp_path / "frames", free_port()
    host, address = start_host(procs, tmp_path, tiny_profile, "host1", port, "--out", out, "--decode-delay", "0.05")
    edge = start_edge(procs, tmp_path, tiny_profile, address, "cam", "edge", "--source", "synthetic://",
                      "--frames", frames, "--drop", "block", "--window", WINDOW, "--queue-size", QUEUE)
    wait_for(lambda: len(pngs(out, "cam")) >= 5, 60, "5 frames decoded")
    host.kill()
    host.wait(timeout=10)
    first = pngs(out, "cam")  # what the killed host wrote: final now
    journaled = journal(out, "cam")
    states = file_states(out, "cam")
    assert 5 <= len(first) < frames
    assert [seq for _, seq, _ in journaled] == list(range(len(journaled)))  # one line per frame, in order
    assert len(first) - len(journaled) in (0, 1)  # at most the frame whose journal line the kill cut off
    host2, _ = start_host(procs, tmp_path, tiny_profile, "host2", port, "--out", out, "--max-streams", 1)
    status = finish(edge)
    assert finish(host2) == 0
    edge_report, host2_report = report(tmp_path, "edge"), report(tmp_path, "host2")
    outcomes = assert_buckets_add_up(edge_report, frames)
    assert outcomes["failed"] == outcomes["dropped"] == outcomes["refused"] == 0
    assert outcomes["decoded"] + outcomes["lost"] == frames
    stream = host2_report["streams"]["cam"]
    # Every frame either journaled by the killed host (acknowledged, or confirmed by the ACCEPT) or decoded by the
    # restarted one; the rest, in flight at the kill and never journaled, lost.
    assert outcomes["decoded"] == len(journaled) + stream["frames"] == len(journaled) + host2_report["frames"]
    decoded, lost = seqs_with(edge_report, "decoded"), seqs_with(edge_report, "lost")
    written = pngs(out, "cam")
    assert set(decoded) <= set(written)
    assert set(written) - set(decoded) <= set(lost)
    assert len(written) - len(decoded) == len(first) - len(journaled)  # the one PNG without a journal line, if any
    assert outcomes["lost"] <= WINDOW  # only frames in flight at the kill
    # The restarted host counts as gaps exactly the frames lost at the kill, not the first host's frames.
    assert stream["gaps"] == outcomes["lost"] and host2_report["dropped"] == outcomes["lost"]
    assert stream["ended"] and stream["duplicates"] == 0 and stream["failed"] == 0
    assert edge_report["reconnects"] == 1 and edge_report["connection_losses"] == 1
    after = file_states(out, "cam")
    assert {seq: after[seq] for seq in first} == states  # live delivery never sends a frame twice: no rewrite
    # Live delivery under --drop block: a lost frame fails the run, and says so.
    assert status == (1 if outcomes["lost"] else 0)
    if outcomes["lost"]:
        assert "{} of {} frames were lost".format(outcomes["lost"], frames) in stderr(tmp_path, "edge")


def freeze_between_frames(proc, out, stream, at_least):
    """SIGSTOP ``proc`` at an instant when every PNG it wrote has its journal line, and at least ``at_least`` do.

    Retried (SIGCONT, SIGSTOP) when it stopped between writing a PNG and journaling it: a kill there would make a
    frame's PNG be written again by the restarted host, which is right (the host cannot know the write finished)
    but is not what this test is about. Returns the PNGs written so far."""
    deadline = time.monotonic() + 60
    while True:
        stop(proc)
        written, journaled = pngs(out, stream), journal(out, stream)
        if len(written) >= at_least and written == [seq for _, seq, _ in journaled]:
            return written
        proc.send_signal(signal.SIGCONT)
        assert time.monotonic() < deadline, "the host never stopped between frames"
        time.sleep(0.005)


def test_host_killed_mid_stream_reliable_delivery(procs, tmp_path, tiny_profile):
    # Reliable: frames in flight at the kill are resent to the restarted host, which reads the journal, confirms in
    # its ACCEPT what the first host had decoded (those are not resent), and decodes the rest once. Every frame is
    # decoded and written exactly once.
    frames, out, port = 30, tmp_path / "frames", free_port()
    host, address = start_host(procs, tmp_path, tiny_profile, "host1", port, "--out", out, "--decode-delay", "0.05")
    edge = start_edge(procs, tmp_path, tiny_profile, address, "cam", "edge", "--source", "synthetic://",
                      "--frames", frames, "--delivery", "reliable", "--window", WINDOW, "--queue-size", QUEUE)
    first = freeze_between_frames(host, out, "cam", at_least=5)
    host.kill()
    host.wait(timeout=10)
    states = file_states(out, "cam")
    assert 5 <= len(first) < frames and first == list(range(len(first)))
    host2, _ = start_host(procs, tmp_path, tiny_profile, "host2", port, "--out", out, "--max-streams", 1)
    assert finish(edge) == 0, stderr(tmp_path, "edge")
    assert finish(host2) == 0
    edge_report, host2_report = report(tmp_path, "edge"), report(tmp_path, "host2")
    outcomes = assert_buckets_add_up(edge_report, frames)
    assert outcomes["decoded"] == frames and outcomes["lost"] == 0
    assert pngs(out, "cam") == list(range(frames))
    stream = host2_report["streams"]["cam"]
    assert len(first) + stream["frames"] == frames == len(first) + host2_report["frames"]
    assert stream["gaps"] == 0 and stream["duplicates"] == 0 and stream["ended"]
    after = file_states(out, "cam")
    assert {seq: after[seq] for seq in first} == states  # the first host's PNGs were not written again
    entries = journal(out, "cam")  # each frame journaled once, by one host or the other
    assert sorted(seq for _, seq, _ in entries) == list(range(frames))
    assert {(session, outcome) for session, _, outcome in entries} == {(edge_report["session"], "decoded")}
    assert edge_report["resent"] >= 1  # the window was full at the kill: frames the first host never handled
    assert edge_report["reconnects"] == 1


# 2. An edge killed; another edge on the same host goes on.
def test_edge_killed_mid_stream_other_stream_unaffected_and_restart_accepted(procs, tmp_path, tiny_profile):
    out = tmp_path / "frames"
    host, address = start_host(procs, tmp_path, tiny_profile, "host", 0, "--out", out, "--decode-delay", "0.02",
                               "--max-streams", 2)
    victim = start_edge(procs, tmp_path, tiny_profile, address, "victim", "victim", "--source", "synthetic://",
                        "--frames", 100000, "--drop", "block", "--window", WINDOW, "--queue-size", QUEUE)
    steady = start_edge(procs, tmp_path, tiny_profile, address, "steady", "steady", "--source", "synthetic://",
                        "--frames", 40, "--drop", "block", "--window", WINDOW, "--queue-size", QUEUE)
    wait_for(lambda: len(pngs(out, "victim")) >= 3 and len(pngs(out, "steady")) >= 1, 60, "both streams decoding")
    victim.kill()  # its window is full (the host is slower than the edge): frames in flight die with it
    victim.wait(timeout=10)
    again = start_edge(procs, tmp_path, tiny_profile, address, "victim", "again", "--source", "synthetic://",
                       "--frames", 10, "--drop", "block", "--window", WINDOW, "--queue-size", QUEUE)
    assert finish(again) == 0, stderr(tmp_path, "again")
    assert finish(steady) == 0, stderr(tmp_path, "steady")
    assert finish(host) == 0
    host_report = report(tmp_path, "host")
    # The other stream: one connection, never interrupted, every frame decoded.
    steady_report = report(tmp_path, "steady")
    assert assert_buckets_add_up(steady_report, 40)["decoded"] == 40
    assert steady_report["connection_losses"] == 0 and steady_report["reconnects"] == 0
    assert host_report["streams"]["steady"] == dict(host_report["streams"]["steady"], frames=40, gaps=0, failed=0,
                                                    duplicates=0, connections=1, sessions=1, ended=True)
    # The restarted edge: a new session, accepted on its first HELLO (the host saw the old connection closed).
    again_report = report(tmp_path, "again")
    assert assert_buckets_add_up(again_report, 10)["decoded"] == 10
    assert again_report["refused"] is None and again_report["connection_losses"] == 0
    assert again_report["reconnects"] == 0
    victim_stream = host_report["streams"]["victim"]
    assert victim_stream["connections"] == 2 and victim_stream["sessions"] == 2 and victim_stream["ended"]
    assert victim_stream["failed"] == 0 and victim_stream["duplicates"] == 0
    assert host_report["protocol_errors"] == 0
    assert pngs(out, "steady") == list(range(40))


# 3. The host frozen (SIGSTOP) while a live edge streams.
def test_host_stopped_live_edge_drops_oldest_and_stays_bounded(procs, tmp_path, tiny_profile):
    # While the host is stopped no ACK comes back, so the edge's window stays full (WINDOW frames in flight), its
    # queue holds QUEUE frames, and --drop oldest drops every other frame it captures. Structural consequence, with
    # no timing in it: the frames decoded after the stop are at most WINDOW + QUEUE (those in flight or queued when
    # capture ended, which it does during the stop), and they include the last QUEUE frames captured.
    frames, window, queue, out = 1200, 4, 4, tmp_path / "frames"
    host, address = start_host(procs, tmp_path, tiny_profile, "host", 0, "--out", out, "--max-streams", 1)
    edge = start_edge(procs, tmp_path, tiny_profile, address, "live", "edge", "--source", "synthetic://",
                      "--frames", frames, "--drop", "oldest", "--window", window, "--queue-size", queue)
    wait_for(lambda: len(pngs(out, "live")) >= 3, 60, "3 frames decoded")
    stop(host)
    before = pngs(out, "live")  # final while the host is stopped
    stopped_at = time.monotonic()
    rss = []  # the edge's VmRSS, sampled while the host is stopped
    wait_until_capture_ends(edge, at_least_s=5.0, on_sample=lambda: rss.append(proc_status(edge.pid, "VmRSS")))
    peak_kb = proc_status(edge.pid, "VmHWM")
    host.send_signal(signal.SIGCONT)
    assert finish(edge) == 0, stderr(tmp_path, "edge")
    assert finish(host) == 0
    edge_report, host_report = report(tmp_path, "edge"), report(tmp_path, "host")
    outcomes = assert_buckets_add_up(edge_report, frames)
    assert outcomes["lost"] == outcomes["failed"] == outcomes["refused"] == 0
    assert outcomes["dropped"] > 0 and outcomes["decoded"] + outcomes["dropped"] == frames
    decoded = seqs_with(edge_report, "decoded")
    assert pngs(out, "live") == decoded and host_report["frames"] == len(decoded)
    assert host_report["streams"]["live"]["gaps"] == outcomes["dropped"]
    after = sorted(set(decoded) - set(before))
    assert set(before) <= set(decoded) and min(after) > max(before)  # one connection: decoded in order
    assert len(after) <= window + queue, after
    assert set(range(frames - queue, frames)) <= set(after)  # the newest frames always get in
    # Memory, read from /proc while the host was stopped (VmHWM: the edge's peak since exec; the report's
    # peak_rss_mb comes from getrusage, whose ru_maxrss survives exec and so shows this pytest process's size).
    # Measured on a 2-core x86-64 machine: VmHWM 84 MiB, VmRSS up by 1.2 MiB over the stop (the per-frame timing
    # records of ~1000 frames: they are the report, kept on purpose). Bounds with a wide margin: 160 MiB peak,
    # 10 MiB growth. They catch gross growth (frames, images or buffers kept per captured frame); a queue of these
    # 400-byte latents would fit even in the margin, which is why the exact check is the structural one above.
    assert peak_kb < 160 * 1024, peak_kb
    assert max(rss) - rss[0] < 10 * 1024, rss


def test_frames_dropped_before_the_first_reaches_the_host_are_gaps(procs, tmp_path, tiny_profile):
    # The host is stopped before the edge connects: the kernel takes the connection and the HELLO, but no ACCEPT
    # comes, so the edge captures all its frames with nothing sent, and --drop oldest keeps only the last QUEUE.
    # Continued (well within the edge's 5 s handshake timeout), the host decodes exactly those: the edge counts
    # the others dropped, and the host, whose first frame is number frames - QUEUE, counts them as gaps.
    frames, out = 200, tmp_path / "frames"
    host, address = start_host(procs, tmp_path, tiny_profile, "host", 0, "--out", out, "--max-streams", 1)
    stop(host)
    edge = start_edge(procs, tmp_path, tiny_profile, address, "late", "edge", "--source", "synthetic://",
                      "--frames", frames, "--drop", "oldest", "--window", WINDOW, "--queue-size", QUEUE)
    wait_until_capture_ends(edge)
    host.send_signal(signal.SIGCONT)
    assert finish(edge) == 0, stderr(tmp_path, "edge")
    assert finish(host) == 0
    edge_report, host_report = report(tmp_path, "edge"), report(tmp_path, "host")
    outcomes = assert_buckets_add_up(edge_report, frames)
    assert outcomes == dict(outcomes, decoded=QUEUE, dropped=frames - QUEUE, lost=0)
    assert edge_report["reconnects"] == 0
    assert pngs(out, "late") == list(range(frames - QUEUE, frames))
    stream = host_report["streams"]["late"]
    assert stream == dict(stream, frames=QUEUE, gaps=frames - QUEUE, ended=True)


# 4. Refusals: another model, another shape.
def export_tiny(folder, seed, size, checkpoint=None):
    """A tiny model like conftest's ``tiny_profile`` from ``seed``, exported at ``size``; returns its profile path.
    ``checkpoint``: record that checkpoint's identity instead of saving this model's own."""
    torch = pytest.importorskip("torch")
    from latentlink.export.models import build_model, save_checkpoint
    from latentlink.export.onnx_export import export_onnx

    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    model = build_model("lossy-cae", latent_channels=8, encoder_channels=16, decoder_channels=16)
    if checkpoint is None:
        checkpoint = folder / "tiny.pt"
        save_checkpoint(checkpoint, model)
    export_onnx(model, size, size, folder / "onnx", profile="tiny", checkpoint=checkpoint)
    profile = folder / "tiny.yaml"
    profile.write_text("name: tiny\nmodel:\n  encoder: onnx/encoder.onnx\n  decoder: onnx/decoder.onnx\n"
                       "input:\n  width: {0}\n  height: {0}\nbudget_ms: 33\n"
                       "transport:\n  queue_size: 2\n  max_backoff_s: 0.5\n".format(size))
    return str(profile)


def test_mismatched_model_or_shape_is_refused(procs, tmp_path, tiny_profile):
    other_model = export_tiny(tmp_path / "seed1", 1, TINY)  # same shapes, another checkpoint
    # The same checkpoint as the host's decoder, exported at 32x32: 8x8 latents instead of 16x16.
    smaller = export_tiny(tmp_path / "small", 0, TINY // 2, checkpoint=os.path.join(os.path.dirname(tiny_profile),
                                                                                      "tiny.pt"))
    out = tmp_path / "frames"
    host, address = start_host(procs, tmp_path, tiny_profile, "host", 0, "--out", out)
    for label, profile, reason, words in (("model", other_model, "model_mismatch", ("checkpoint",)),
                                          ("shape", smaller, "shape_mismatch", ("shape", "[1, 8, 8, 8]"))):
        edge = start_edge(procs, tmp_path, profile, address, label, label, "--source", "synthetic://", "--frames",
                          5000, "--drop", "block")
        assert finish(edge) == 1
        err = stderr(tmp_path, label)
        assert "error: the host refused the stream" in err and all(w in err for w in words), err
        edge_report = report(tmp_path, label)
        assert edge_report["refused"]["reason"] == reason
        outcomes = edge_report["outcomes"]
        # Refused at the handshake: the edge stops capturing at once and every frame it did capture is refused.
        assert outcomes["refused"] == edge_report["captured"] == sum(outcomes.values())
        assert edge_report["captured"] < 5000 and edge_report["reconnects"] == 0
    host.send_signal(signal.SIGINT)
    assert finish(host) == 0
    assert not out.exists() or not any(name.endswith(".png") for _, _, names in os.walk(str(out)) for name in names)
    host_report = report(tmp_path, "host")
    assert host_report["frames"] == 0 and host_report["protocol_errors"] == 0


# 5. A second live session for the same name.
def test_second_session_with_a_live_name_is_refused(procs, tmp_path, tiny_profile):
    out = tmp_path / "frames"
    # 0.2 s per frame: the first edge's 30 frames take 6 s, so it is still live when the second starts (the
    # pipelined host overlaps decoding with writing, so 0.05 s left too little time on a fast machine).
    host, address = start_host(procs, tmp_path, tiny_profile, "host", 0, "--out", out, "--decode-delay", "0.2",
                               "--max-streams", 1)
    first = start_edge(procs, tmp_path, tiny_profile, address, "cam0", "a", "--source", "synthetic://", "--frames",
                       30, "--drop", "block", "--window", WINDOW, "--queue-size", QUEUE)
    wait_for(lambda: len(pngs(out, "cam0")) >= 2, 60, "the first edge's frames")
    second = start_edge(procs, tmp_path, tiny_profile, address, "cam0", "b", "--source", "synthetic://", "--frames",
                        5000, "--drop", "block")
    assert finish(second) == 1
    err = stderr(tmp_path, "b")
    assert "error: the host refused the stream" in err and "is live from" in err and "--name" in err, err
    b_report = report(tmp_path, "b")
    assert b_report["refused"]["reason"] == "name_in_use" and b_report["reconnects"] == 0
    assert b_report["outcomes"]["refused"] == b_report["captured"] < 5000
    assert finish(first) == 0, stderr(tmp_path, "a")
    assert finish(host) == 0
    a_report = report(tmp_path, "a")
    assert assert_buckets_add_up(a_report, 30)["decoded"] == 30 and a_report["connection_losses"] == 0
    stream = report(tmp_path, "host")["streams"]["cam0"]
    assert stream == dict(stream, frames=30, gaps=0, failed=0, connections=1, sessions=1, ended=True)
    assert pngs(out, "cam0") == list(range(30))


# 6. Protocol 1 peers.
def test_protocol_1_edge_to_this_host(procs, tmp_path, tiny_profile, photos_dir):
    host, address = start_host(procs, tmp_path, tiny_profile, "host", 0, "--max-streams", 1)
    edge = start_edge(procs, tmp_path, tiny_profile, address, "old", "edge", "--source", "file://" + photos_dir,
                      "--loop", "--frames", 20, "--drop", "block", "--protocol", 1)
    assert finish(edge) == 0, stderr(tmp_path, "edge")
    assert finish(host) == 0
    edge_report, host_report = report(tmp_path, "edge"), report(tmp_path, "host")
    outcomes = assert_buckets_add_up(edge_report, 20)
    assert outcomes == dict(dict.fromkeys(outcomes, 0), sent=20)  # protocol 1: written, their fate unknown
    assert host_report["frames"] == 20
    assert host_report["streams"]["old"] == dict(host_report["streams"]["old"], frames=20, gaps=0, failed=0,
                                                 connections=1, ended=True)


def test_protocol_2_edge_to_a_protocol_1_host(procs, tmp_path, tiny_profile):
    # An old host reads the fixed header, sees version 2 and closes: the edge tries NO_ANSWER_LIMIT times and stops.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    connections, done = [], threading.Event()

    def old_host():
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            with conn:
                conn.settimeout(5)
                got = b""
                while len(got) < 8:
                    chunk = conn.recv(8 - len(got))
                    if not chunk:
                        break
                    got += chunk
                connections.append(got)

    thread = threading.Thread(target=old_host, daemon=True)
    thread.start()
    try:
        edge = start_edge(procs, tmp_path, tiny_profile, "127.0.0.1:{}".format(server.getsockname()[1]), "new",
                          "edge", "--source", "synthetic://", "--frames", 5000, "--drop", "block")
        assert finish(edge) == 1
    finally:
        done.set()
        thread.join(5)
        server.close()
    err = stderr(tmp_path, "edge")
    assert "--protocol 1" in err and "upgrade the host" in err, err
    edge_report = report(tmp_path, "edge")
    assert edge_report["refused"]["reason"] == "no_answer"
    assert len(connections) == 3 and all(got[:4] == connections[0][:4] and got[4] == 2 for got in connections)
    outcomes = edge_report["outcomes"]
    assert outcomes["refused"] == edge_report["captured"] == sum(outcomes.values())


def test_new_session_takes_over_the_name_of_a_dead_edge_whose_backlog_the_host_still_decodes(tmp_path,
                                                                                              tiny_profile, caplog):
    # In one process, to make the moment exact: edge A's connection dies while the host is still decoding A's
    # backlog (decode delay 0.5 s per frame), so the stream name is still held by A's connection when edge B (a new
    # session, same name) says HELLO. The host sees A's peer closed (TCP CLOSE_WAIT), drops that connection and its
    # backlog, and accepts B at once, counting it as a second session of the stream.
    import logging

    import numpy as np

    from latentlink.edge.backends import open_backend
    from latentlink.edge.profile import load_profile
    from latentlink.edge.profiler import FrameTimer
    from latentlink.edge.protocol import frame_payload, pack_latents
    from latentlink.edge.sender import Sender
    from latentlink.host.server import Host

    caplog.set_level(logging.INFO, logger="latentlink.host")
    decoder = open_backend(load_profile(tiny_profile).model.decoder, "decoder").load()
    out = tmp_path / "frames"
    # batch_size=1: one frame decodes at a time, so frame 0 is written while 1 decodes and 2 waits in the queue.
    host = Host(decoder, out_dir=str(out), max_streams=1, decode_delay_s=0.5, batch_size=1)
    host.bind("127.0.0.1", 0)
    serving = threading.Thread(target=host.serve, daemon=True)
    serving.start()
    info = decoder.info
    hello = {"model_id": info.model_id, "shape": [int(d) for d in decoder.input_shape], "dtype": "float32",
             "packing": info.packing, "entropy": "none", "tiles": [int(t) for t in info.tiles]}

    def submit(sender, seq):
        latents = (np.random.RandomState(seq).random_sample(decoder.input_shape) > 0.5).astype(np.float32)
        timer = FrameTimer(seq)
        timer.extra["t_capture"] = time.time()
        assert sender.submit(frame_payload("cam", seq, time.time(), latents, info.packing,
                                           pack_latents(latents, info.packing), version=2), timer)

    a = b = None
    try:
        a = Sender(host.address, "cam", hello=hello, window=4, queue_size=4, drop="block")
        for seq in range(3):
            submit(a, seq)
        wait_for(lambda: pngs(out, "cam") == [0], 30, "frame 0 decoded")  # frame 1 is decoding now, 2 waits
        a.abort()  # the edge dies: its socket closes with frames 1 and 2 unacknowledged
        b = Sender(host.address, "cam", hello=hello, window=4, queue_size=4, drop="block")
        for seq in range(2):
            submit(b, seq)
        b.close()
        assert b.refusal is None and b.reconnects == 0 and b.connection_losses == 0
        assert b.counts == dict(b.counts, decoded=2, lost=0, refused=0)
        serving.join(30)
        assert not serving.is_alive()
    finally:
        for sender in (a, b):
            if sender is not None:
                sender.abort()
        host.stop()
        serving.join(10)
        decoder.close()
    assert any("dropping the stale connection" in r.getMessage() for r in caplog.records)  # the takeover path
    assert a.counts["decoded"] + a.counts["lost"] == 3
    stream = host.streams["cam"]
    assert (stream.connections, stream.sessions, stream.ended) == (2, 2, True)
