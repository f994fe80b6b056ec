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
    raw = json.loads(path.read_text())  # one JSON document, as before reports were streamed
    assert list(raw)[:4] == ["kind", "version", "started", "records"]  # the records were written first
    assert list(raw)[4:4 + len(TOP_KEYS)] == TOP_KEYS and list(raw)[-1] == "meta"
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
    code, out, err = _run([])  # one line, like every command's usage errors
    assert code == 2 and err.startswith("error: ") and "FILE.json" in err and len(err.strip().splitlines()) == 1


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


# --- bounded aggregates -----------------------------------------------------------------------------------------------

def _exact_stats(values):
    lo, hi = min(values), max(values)
    p50, p95, p99 = np.percentile(np.array(values), [50.0, 95.0, 99.0])
    return {"min_ms": lo, "median_ms": p50, "mean_ms": sum(values) / len(values), "p95_ms": p95, "p99_ms": p99,
            "max_ms": hi}


def _assert_within_the_bound(stats, values):
    """Percentiles within 1 % (the histogram's bucket width / 2) plus the rounding to 1 us; the rest exact."""
    exact = _exact_stats(values)
    for key in ("min_ms", "max_ms", "mean_ms"):
        assert stats[key] == pytest.approx(round(exact[key], 3), abs=1e-3), key
    for key in ("median_ms", "p95_ms", "p99_ms"):
        assert abs(stats[key] - exact[key]) <= 0.01 * abs(exact[key]) + 0.002, (key, stats[key], exact[key])


def test_distribution_is_exact_up_to_exact_values_then_a_fixed_histogram_within_one_percent():
    from latentlink.edge.profiler import EXACT_VALUES, HISTOGRAM_BUCKETS, Distribution

    values = list(np.random.RandomState(0).lognormal(mean=2.0, sigma=1.5, size=20000))  # 0.01 ms to minutes
    d = Distribution()
    for v in values[:EXACT_VALUES]:
        d.add(v)
    assert d.exact
    exact = _exact_stats(values[:EXACT_VALUES])
    assert d.stats() == dict((k, round(float(v), 3)) for k, v in exact.items())  # numpy's own percentiles
    for v in values[EXACT_VALUES:]:
        d.add(v)
    assert not d.exact and d.count == len(values)
    assert d._values is None and d._buckets.shape == (HISTOGRAM_BUCKETS,)  # the memory it keeps, whatever the count
    _assert_within_the_bound(d.stats(), values)
    shuffled = Distribution()  # deterministic: the order of the values does not matter
    for v in np.random.RandomState(1).permutation(values):
        shuffled.add(v)
    assert shuffled.stats() == pytest.approx(d.stats(), abs=1e-3)
    assert shuffled.stats()["median_ms"] == d.stats()["median_ms"]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.one_of(times, st.floats(min_value=-1.0, max_value=0.01)), min_size=1, max_size=200))
def test_histogram_percentiles_are_within_the_documented_bound(values):
    from unittest import mock

    from latentlink.edge import profiler

    with mock.patch.object(profiler, "EXACT_VALUES", 0):  # the histogram from the first value
        d = profiler.Distribution()
        for v in values:
            d.add(v)
    assert not d.exact
    stats = d.stats()
    assert stats["min_ms"] <= stats["median_ms"] <= stats["p95_ms"] <= stats["p99_ms"] <= stats["max_ms"]
    if min(values) >= 0.0:  # negative values share the first bucket with those under 1 us: no relative bound there
        _assert_within_the_bound(stats, values)


def test_summary_of_a_long_run_is_bounded_and_matches_the_records():
    """5,000 frames: the streamed aggregate and the exact figures agree to the documented bound; counts exact."""
    from latentlink.edge.profiler import FrameStats

    rng = np.random.RandomState(2)
    records = [{"seq": i, "stages": {"capture": float(rng.uniform(1, 9)), "encode": float(rng.gamma(4.0, 10.0))},
                "bytes": 1000 + i % 7, "latency_ms": float(rng.uniform(50, 500))} for i in range(5000)]
    stats = FrameStats(("capture", "encode"), 33.0)
    for r in records:
        stats.add(r)
    s = stats.summary(wall_s=100.0)
    assert s == summarize(records, ("capture", "encode"), 33.0, 100.0)  # one code path
    totals = [r["stages"]["capture"] + r["stages"]["encode"] for r in records]
    assert s["frames"] == s["stages"]["total"]["frames"] == 5000
    assert s["over_budget"] == sum(t > 33.0 for t in totals)
    assert s["bytes_per_frame"] == round(sum(r["bytes"] for r in records) / 5000.0, 3)
    _assert_within_the_bound(s["stages"]["encode"], [r["stages"]["encode"] for r in records])
    _assert_within_the_bound(s["stages"]["total"], totals)
    _assert_within_the_bound(s["latency"], [r["latency_ms"] for r in records])


def test_odd_times_never_break_a_distribution():
    from latentlink.edge.profiler import EXACT_VALUES, Distribution

    d = Distribution()
    for v in [1.0] * EXACT_VALUES + [float("inf"), 1e12, -5.0, 0.0, float("nan")]:
        d.add(v)
    stats = d.stats()
    assert stats["min_ms"] == -5.0 and abs(stats["median_ms"] - 1.0) <= 0.01 and d.count == EXACT_VALUES + 5


def test_frame_timer_says_while_a_stage_is_open():
    t = FrameTimer(0)
    assert not t.timing
    with t.stage("send"):
        assert t.timing and "send" not in t.stages
    assert not t.timing and "send" in t.stages


# --- reports written as the run goes ----------------------------------------------------------------------------------

def _host_records(n):
    return [{"seq": i, "stages": {"receive": 1.0, "deserialize": 0.5, "decode": 20.0 + i, "write": 2.0},
             "stream": "cam0", "bytes": 900, "latency_ms": 50.0 + i} for i in range(n)]


def test_report_writer_appends_each_record_as_it_comes_and_ends_one_json_document(tmp_path):
    from latentlink.edge.profiler import ReportWriter

    path = tmp_path / "run" / "host.json"
    records = _host_records(3)
    writer = ReportWriter(str(path), HOST_STAGES, 33.0, meta={"role": "host", "profile": "tiny"})
    for i, r in enumerate(records):
        writer.add(r)
        assert path.read_text().count("\n") == 2 + i  # on disk at once: the header line and a line per record
    running = load_report(str(path))  # while the run goes on: the records so far, summarized
    assert running["unfinished"] is True and running["frames"] == 3 and running["fps"] == 0.0
    assert running["records"] == records and running["meta"] == {"role": "host", "profile": "tiny"}
    assert "unfinished" in running["notes"]["report"] and "3 complete records" in running["notes"]["report"]
    assert list(running["stages"]) == list(HOST_STAGES) + ["total"]
    summary = summarize(records, HOST_STAGES, 33.0, 0.1, extra={"streams": {"cam0": {"frames": 3}}})
    writer.finish(summary, meta={"role": "host", "profile": "tiny", "peak_rss_mb": 99.0})
    writer.add(records[0])  # a connection thread finishing late: ignored, the file is complete
    raw = json.loads(path.read_text())  # one JSON document: json.load reads it like the reports before
    assert raw["frames"] == 3 and raw["records"] == records and raw["meta"]["peak_rss_mb"] == 99.0
    assert raw["started"] == {"stages": list(HOST_STAGES), "budget_ms": 33.0,
                              "meta": {"role": "host", "profile": "tiny"}}
    report = load_report(str(path))
    assert "unfinished" not in report and report["records"] == records
    for key, value in summary.items():
        assert report[key] == value
    light = load_report(str(path), records=False)  # what `latentlink report` reads: the records are not parsed
    assert "records" not in light and light["frames"] == 3
    assert format_report(light) == format_report(report)


def test_a_report_cut_anywhere_reads_up_to_its_last_complete_record(tmp_path):
    """Every length a killed writer can leave: the records whose line is complete, summarized."""
    records = _host_records(4)
    path = tmp_path / "host.json"
    write_report(str(path), summarize(records, HOST_STAGES, 33.0, 1.0), records, {"role": "host"})
    data = path.read_bytes()
    lines = data.splitlines(True)
    header = len(lines[0])
    cut = tmp_path / "cut.json"
    for size in range(header, len(data)):
        cut.write_bytes(data[:size])
        report = load_report(str(cut))
        complete = sum(1 for line in data[header:size].splitlines(True) if line.endswith(b"\n")
                       and not line.startswith(b"]"))
        assert report["unfinished"] is True and report["frames"] == complete, size
        assert report["records"] == records[:complete]
        assert report["stages"]["decode"]["max_ms"] == (20.0 + complete - 1 if complete else 0.0)
        assert report["meta"] == {"role": "host"}
    cut.write_bytes(data[:header - 1])  # not even the header: nothing to read
    with pytest.raises(ConfigError, match="not JSON"):
        load_report(str(cut))


def test_a_report_whose_writer_is_killed_is_readable(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from .conftest import ROOT

    path = tmp_path / "edge.json"
    script = ("import sys, time\n"
              "from latentlink.edge.profiler import ReportWriter, EDGE_STAGES\n"
              "w = ReportWriter(sys.argv[1], EDGE_STAGES, 33.0, {'role': 'edge', 'stream': 'cam0'})\n"
              "for i in range(10 ** 9):\n"
              "    w.add({'seq': i, 'stages': {'capture': 1.0, 'encode': 30.0}, 'bytes': 100, 'outcome': "
              "'dropped' if i % 2 else 'decoded'})\n"
              "    time.sleep(0.001)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        deadline = time.monotonic() + 30
        while not path.exists() or path.read_text().count("\n") < 50:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    report = load_report(str(path))
    assert report["unfinished"] and report["frames"] >= 49 and report["frames"] == len(report["records"])
    assert report["dropped"] == report["frames"] // 2  # the records' outcomes
    assert [r["seq"] for r in report["records"]] == list(range(report["frames"]))
    code, out, err = _run([str(path)])
    assert code == 0 and err == ""
    assert out.splitlines()[0] == "edge 'cam0'" and "note: report: unfinished" in out


def test_reports_written_whole_by_earlier_versions_still_load(tmp_path):
    s, records = _summary()
    report = dict(s, kind="latentlink-report", version=1, meta={"role": "host"}, records=records)
    path = tmp_path / "old.json"
    path.write_text(json.dumps(report, indent=1) + "\n")  # what write_report wrote before reports were streamed
    assert load_report(str(path)) == report
    assert "records" not in load_report(str(path), records=False)
    code, out, _ = _run([str(path)])
    assert code == 0 and "over budget: 2 of 4 frames" in out


def test_a_damaged_or_foreign_streamed_report_is_refused(tmp_path):
    from latentlink.edge.profiler import ReportWriter

    path = tmp_path / "r.json"
    writer = ReportWriter(str(path), HOST_STAGES, 33.0)
    for r in _host_records(3):
        writer.add(r)
    writer.close()
    lines = path.read_text().splitlines(True)
    (tmp_path / "bad.json").write_text(lines[0] + lines[1] + ",{broken\n" + lines[3])
    with pytest.raises(ConfigError, match="damaged.*line 3"):
        load_report(str(tmp_path / "bad.json"))
    (tmp_path / "v9.json").write_text(lines[0].replace('"version": 1', '"version": 9') + lines[1])
    with pytest.raises(ConfigError, match="version 9"):
        load_report(str(tmp_path / "v9.json"))
    with pytest.raises(ConfigError, match="cannot write the report"):
        ReportWriter(str(path / "under-a-file.json"), HOST_STAGES, 33.0)


def test_a_report_that_cannot_be_written_further_does_not_stop_the_run(caplog):
    from latentlink.edge.profiler import ReportWriter

    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux)")
    writer = ReportWriter("/dev/full", HOST_STAGES, 33.0)  # every write fails: disk full
    writer.add(_host_records(1)[0])
    writer.finish(summarize([], HOST_STAGES, 33.0, 0.0))
    assert isinstance(writer.error, OSError)
    assert caplog.text.count("cannot write the report /dev/full") == 1
