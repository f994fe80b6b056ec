"""Tests of edge.profiler: FrameTimer, summarize, reports and the table. Must run on Python 3.6 too."""

import io
import json
import os
import warnings
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from latentlink.edge.errors import ConfigError
from latentlink.edge.profiler import (EDGE_STAGES, HOST_STAGES, BAR_WIDTH, FrameTimer, format_report, format_table,
                           load_report, main, summarize, write_report)

STAT_KEYS = ["min_ms", "median_ms", "mean_ms", "p95_ms", "p99_ms", "max_ms"]
TOP_KEYS = ["frames", "budget_ms", "over_budget", "fps", "t200_s", "bytes_per_frame", "dropped", "stages"]


class FakeClock(object):
    """A clock (seconds) that advances by the given steps, one per call."""

    def __init__(self, *readings):
        self.readings = list(readings)

    def __call__(self):
        return self.readings.pop(0)


def rec(seq, **stages):
    return {"seq": seq, "stages": stages}


# --- FrameTimer -----------------------------------------------------------------------------------------------------

def test_frame_timer_accumulates_repeated_stages_and_add():
    t = FrameTimer(7, clock=FakeClock(1.0, 1.002, 2.0, 2.0005, 3.0, 3.010))
    with t.stage("capture"):
        pass
    with t.stage("encode"):
        pass
    with t.stage("capture"):
        pass
    t.add("gpu_to_cpu", 1.5)
    t.add("gpu_to_cpu", np.float32(0.5))
    assert t.stages["capture"] == pytest.approx(2.0 + 10.0)
    assert t.stages["encode"] == pytest.approx(0.5)
    assert t.stages["gpu_to_cpu"] == pytest.approx(2.0)
    assert type(t.stages["gpu_to_cpu"]) is float


def test_frame_timer_record_shape():
    t = FrameTimer(3)
    with t.stage("capture"):
        pass
    t.add("send", 0.25)
    t.extra["bytes"] = 1234
    t.extra["seq"] = 99  # cannot override the frame's own fields
    r = t.record()
    assert list(r) == ["seq", "stages", "bytes"]
    assert r["seq"] == 3 and r["bytes"] == 1234
    assert set(r["stages"]) == {"capture", "send"}
    assert r["stages"]["capture"] >= 0.0 and r["stages"]["send"] == 0.25
    json.dumps(r)


def test_frame_timer_real_clock_and_exception_still_recorded():
    t = FrameTimer(0)
    with pytest.raises(KeyError):
        with t.stage("encode"):
            raise KeyError("boom")
    assert t.stages["encode"] >= 0.0
    with t.stage("encode"):  # the stage was closed by the exception
        pass
    with pytest.raises(RuntimeError):
        with t.stage("a"):
            t.stage("b")


# --- summarize ------------------------------------------------------------------------------------------------------

def test_summarize_known_numbers():
    # capture: 1..5 ms; encode: 10, 20, 30, 40, missing (not counted); totals: 11, 22, 33, 44, 5
    records = [rec(i, capture=float(i + 1), encode=10.0 * (i + 1)) for i in range(4)] + [rec(4, capture=5.0)]
    for r, b in zip(records, [100, 200, 300]):
        r["bytes"] = b
    s = summarize(records, ("capture", "encode"), budget_ms=33.0, wall_s=2.0, dropped=1)
    assert list(s) == TOP_KEYS
    assert list(s["stages"]) == ["capture", "encode", "total"]
    assert s["frames"] == 5
    assert s["budget_ms"] == 33.0 and isinstance(s["budget_ms"], float)
    assert s["over_budget"] == 1  # 44 > 33; 33 is not over
    assert s["fps"] == 2.5
    assert s["t200_s"] == 80.0
    assert s["bytes_per_frame"] == 200.0
    assert s["dropped"] == 1
    cap = s["stages"]["capture"]
    assert list(cap) == STAT_KEYS + ["frames"]
    assert cap == {"min_ms": 1.0, "median_ms": 3.0, "mean_ms": 3.0, "p95_ms": 4.8, "p99_ms": 4.96, "max_ms": 5.0,
                   "frames": 5}
    enc = s["stages"]["encode"]  # 10, 20, 30, 40: the fifth frame never ran it
    assert enc == {"min_ms": 10.0, "median_ms": 25.0, "mean_ms": 25.0, "p95_ms": 38.5, "p99_ms": 39.7, "max_ms": 40.0,
                   "frames": 4}
    tot = s["stages"]["total"]  # 5, 11, 22, 33, 44
    assert tot == {"min_ms": 5.0, "median_ms": 22.0, "mean_ms": 23.0, "p95_ms": 41.8, "p99_ms": 43.56, "max_ms": 44.0,
                   "frames": 5}
    for stats in s["stages"].values():
        assert all(type(v) is float for k, v in stats.items() if k != "frames")


def test_summarize_rounds_to_3_decimals_and_merges_extra_last():
    records = [rec(0, a=1.23456), rec(1, a=2.0)]
    s = summarize(records, ["a"], 33, wall_s=3.0, extra={"notes": {"a": "x"}, "stream": "cam0"})
    assert list(s) == TOP_KEYS + ["notes", "stream"]
    assert s["stages"]["a"]["min_ms"] == 1.235
    assert s["fps"] == 0.667 and s["t200_s"] == 300.0
    assert s["stream"] == "cam0" and s["notes"] == {"a": "x"}
    with pytest.raises(ValueError):
        summarize(records, ["a"], 33, 1.0, extra={"frames": 3})
    with pytest.raises(ValueError):
        summarize(records, ["a", "total"], 33, 1.0)


def test_summarize_empty_and_zero_wall_give_zeros_without_warnings():
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        s = summarize([], EDGE_STAGES, 33.0, wall_s=0.0)
        s2 = summarize([rec(0, capture=1.0)], EDGE_STAGES, 33.0, wall_s=0.0)
    assert list(s) == TOP_KEYS
    assert s["frames"] == 0 and s["over_budget"] == 0
    assert s["fps"] == 0.0 and s["t200_s"] == 0.0 and s["bytes_per_frame"] == 0.0
    assert list(s["stages"]) == list(EDGE_STAGES) + ["total"]
    for stats in s["stages"].values():
        assert stats == dict(dict.fromkeys(STAT_KEYS, 0.0), frames=0)
    assert s2["frames"] == 1 and s2["fps"] == 0.0 and s2["t200_s"] == 0.0
    json.dumps(s, allow_nan=False)


times = st.floats(min_value=0.0, max_value=1e4, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(times, min_size=3, max_size=3), min_size=1, max_size=30))
def test_summarize_stats_are_ordered(rows):
    records = [rec(i, **dict(zip("abc", row))) for i, row in enumerate(rows)]
    s = summarize(records, "abc", 33.0, wall_s=1.0)
    for stats in s["stages"].values():
        assert stats["min_ms"] <= stats["median_ms"] <= stats["p95_ms"] <= stats["p99_ms"] <= stats["max_ms"]
        assert stats["min_ms"] <= stats["mean_ms"] <= stats["max_ms"]


# --- reports --------------------------------------------------------------------------------------------------------

def _summary():
    records = [rec(i, receive=1.0 + i, deserialize=0.5, decode=20.0 + 5 * i, write=2.0) for i in range(4)]
    for r in records:
        r["bytes"] = 15987
    s = summarize(records, HOST_STAGES, 33.0, wall_s=0.2, extra={"notes": {"decode": "CPU"}})
    return s, records


def test_write_and_load_report_round_trip(tmp_path):
    s, records = _summary()
    records[0]["np"] = np.float32(1.5)  # numpy scalars are written as plain numbers
    path = tmp_path / "sub" / "dir" / "host.json"
    write_report(path, s, records, meta={"role": "host", "stream": "cam0"})
    assert os.listdir(str(path.parent)) == ["host.json"]  # no temp file left behind
    raw = json.loads(path.read_text())
    assert list(raw)[:len(TOP_KEYS)] == TOP_KEYS
    report = load_report(str(path))
    for key, value in s.items():
        assert report[key] == value  # the summary is at the top level
    assert report["kind"] == "latentlink-report" and report["version"] == 1
    assert report["meta"] == {"role": "host", "stream": "cam0"}
    assert len(report["records"]) == 4 and report["records"][0]["np"] == 1.5
    write_report(str(path), s, [], meta=None)  # overwrite in place
    assert load_report(path)["meta"] == {} and load_report(path)["records"] == []


@pytest.mark.parametrize("where, bad, fragment", [
    ("records[0].latency_ms", float("nan"), "is nan, which JSON cannot hold"),
    ("records[0].latency_ms", float("-inf"), "is -inf, which JSON cannot hold"),
    ("dropped", 2 ** 63 - 1, "is 9223372036854775807, beyond the integers JSON readers hold exactly"),
    ("streams.cam.gaps", np.int64(-2 ** 60), "is -1152921504606846976, beyond"),
    ("meta.backend", object(), "cannot be written to a report"),
])
def test_a_report_with_a_value_json_cannot_hold_is_refused_and_nothing_is_written(tmp_path, where, bad, fragment):
    records = [rec(0, decode=1.0)]
    summary = dict(summarize(records, HOST_STAGES, 33.0, 1.0), streams={"cam": {"gaps": 0}})
    meta = {"backend": "onnxruntime"}
    top, _, rest = where.partition(".")
    if top == "records[0]":
        records[0][rest] = bad
    elif top == "streams":
        summary["streams"]["cam"]["gaps"] = bad
    elif top == "meta":
        meta["backend"] = bad
    else:
        summary[top] = bad
    path = tmp_path / "report.json"
    with pytest.raises(ValueError) as info:
        write_report(str(path), summary, records, meta)
    assert str(info.value).startswith("report.%s is " % where) and fragment in str(info.value)
    assert os.listdir(str(tmp_path)) == []  # not even a temporary file


def test_every_report_written_is_strict_json(tmp_path):
    def refuse(name):
        raise ValueError(name)

    records = [dict(rec(0, decode=1.0), latency_ms=12.5), rec(1, decode=np.float32(2.0))]
    summary = summarize(records, HOST_STAGES, 33.0, 1.0, dropped=np.int64(3), extra={"failed": 2 ** 53})
    write_report(str(tmp_path / "r.json"), summary, records, {"role": "host"})
    report = json.loads((tmp_path / "r.json").read_text(), parse_constant=refuse)
    assert report["dropped"] == 3 and report["failed"] == 2 ** 53 and report["latency"]["frames"] == 1


def test_load_report_errors(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError) as e:
        load_report(missing)
    assert str(missing) in str(e.value) and "latentlink edge --report FILE.json" in str(e.value)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError) as e:
        load_report(bad)
    assert str(bad) in str(e.value) and "not JSON" in str(e.value)
    other = tmp_path / "other.json"
    for content in ([1, 2], {"frames": 3}, {"kind": "something-else"}):
        other.write_text(json.dumps(content))
        with pytest.raises(ConfigError) as e:
            load_report(other)
        assert str(other) in str(e.value) and "latentlink host --report FILE.json" in str(e.value)
    other.write_text(json.dumps({"kind": "latentlink-report", "version": 1}))
    with pytest.raises(ConfigError, match="damaged"):
        load_report(other)
    with pytest.raises(ConfigError):
        load_report(tmp_path)  # a directory


# --- table ----------------------------------------------------------------------------------------------------------

def test_format_table_rows_budget_and_notes():
    s, _ = _summary()
    text = format_table(s, title="host 'cam0'")
    lines = text.splitlines()
    assert lines[0] == "host 'cam0'"
    assert lines[1].split()[:3] == ["stage", "frames", "median"]
    rows = [line.split()[0] for line in lines[2:2 + len(HOST_STAGES) + 2]]
    assert rows == list(HOST_STAGES) + ["total", "budget"]
    assert "33.00" in lines[2 + len(HOST_STAGES) + 1] and "100.0%" in lines[2 + len(HOST_STAGES) + 1]
    assert "over budget: 2 of 4 frames (50.0%)" in text  # totals 23.5, 29.5, 35.5, 41.5
    assert "fps 20.0 \u00b7 T200 10.00 s \u00b7 15,987 bytes/frame on the wire \u00b7 dropped 0" in text
    assert "note: decode: CPU" in text
    assert len({line.index("%") for line in lines[2:2 + len(HOST_STAGES) + 2]}) == 1  # aligned columns


def test_format_table_bar_capped_for_stage_over_budget():
    records = [rec(0, capture=2.0, encode=100.0)]
    s = summarize(records, ["capture", "encode"], 33.0, wall_s=1.0)
    lines = format_table(s).splitlines()
    bars = {line.split()[0]: line.split("%")[-1].strip() for line in lines[1:4]}
    assert bars["encode"] == "#" * BAR_WIDTH and bars["total"] == "#" * BAR_WIDTH
    assert bars["capture"] == "#"  # 6.1 % of 20 chars
    assert "303.0%" in lines[2]
    assert "over budget: 1 of 1 frames (100.0%)" in format_table(s)
    assert "over budget: 0 of 0 frames (0.0%)" in format_table(summarize([], ["a"], 0.0, 0.0))


def test_format_report_title_from_meta(tmp_path):
    s, records = _summary()
    path = str(tmp_path / "r.json")
    write_report(path, s, records, meta={"role": "edge", "stream": "cam0", "profile": "nano-504",
                                         "backend": "onnxruntime"})
    assert format_report(load_report(path)).splitlines()[0] == "edge 'cam0' (nano-504, onnxruntime)"
    write_report(path, s, records)
    assert format_report(load_report(path)).splitlines()[0].startswith("stage")


# --- main -----------------------------------------------------------------------------------------------------------

def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_main_exit_codes(tmp_path):
    s, records = _summary()
    good = str(tmp_path / "host.json")
    write_report(good, s, records, meta={"role": "host"})
    code, out, err = _run([good])
    assert code == 0 and "total" in out and "over budget" in out and err == ""
    code, out, err = _run(["report", good, good])
    assert code == 0 and out.count("over budget") == 2
    bad = str(tmp_path / "missing.json")
    code, out, err = _run([good, bad])
    assert code == 2 and "over budget" in out
    assert err.startswith("error: ") and bad in err
    with pytest.raises(SystemExit) as e:
        _run([])
    assert e.value.code == 2


def test_cuda_event_times_sit_beside_the_wall_clock_not_in_the_total():
    records = []
    for seq in range(4):
        timer = FrameTimer(seq)
        timer.add("capture", 2.0)
        timer.add_backend_timings("encode", "gpu_to_cpu", {"run_ms": 10.0 + seq, "copy_ms": 1.0,
                                                           "run_gpu_ms": 8.0 + seq, "copy_gpu_ms": 0.5})
        records.append(timer.record())
    assert records[0]["gpu_stages"] == {"encode": 8.0, "gpu_to_cpu": 0.5}
    summary = summarize(records, EDGE_STAGES, 33.0, 1.0)
    assert summary["stages"]["total"]["median_ms"] == 14.5  # wall clock only: 2 + 11.5 + 1
    assert summary["gpu_stages"]["encode"]["median_ms"] == 9.5
    assert set(summary["gpu_stages"]) == {"encode", "gpu_to_cpu"}
    table = format_table(summary).splitlines()
    assert "CUDA med" in table[0]
    encode = next(line for line in table if line.startswith("encode"))
    capture = next(line for line in table if line.startswith("capture"))
    assert encode.split()[2:6] == ["11.50", "12.85", "13.00", "9.50"] and capture.split()[5] == "-"


def test_host_decode_adds_copy_and_cuda_time_to_one_stage():
    timer = FrameTimer(0)
    timer.add_backend_timings("decode", None, {"run_ms": 5.0, "copy_ms": 1.0, "run_gpu_ms": 4.0, "copy_gpu_ms": 0.5})
    assert timer.record() == {"seq": 0, "stages": {"decode": 6.0}, "gpu_stages": {"decode": 4.5}}
    cpu = FrameTimer(1)
    cpu.add_backend_timings("decode", None, {"run_ms": 5.0, "copy_ms": 1.0})
    assert "gpu_stages" not in cpu.record()
    assert "CUDA" not in format_table(summarize([cpu.record()], ("decode",), 33.0, 1.0))


def test_the_entropy_stage_prints_between_serialize_and_send_and_old_reports_still_load(tmp_path):
    records = [{"seq": i, "stages": dict((s, 1.0) for s in EDGE_STAGES), "bytes": 90} for i in range(3)]
    rows = [line.split()[0] for line in format_table(summarize(records, EDGE_STAGES, 33.0, 1.0)).splitlines()]
    assert rows[1:9] == ["capture", "preprocess", "encode", "gpu_to_cpu", "serialize", "entropy", "send", "total"]
    # A report written before the entropy stage existed (or by a run without a coder) has no such row.
    old_stages = [s for s in EDGE_STAGES if s != "entropy"]
    path = str(tmp_path / "old.json")
    write_report(path, summarize(records, old_stages, 33.0, 1.0), records, {"role": "edge"})
    table = format_report(load_report(path))
    assert "serialize" in table and "entropy" not in table
