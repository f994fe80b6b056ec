"""`latentlink report --plot/--csv` (latentlink/report_views.py): the figure's panels, the CSV, the join by seq, the
titles with the source; and the profiler on the Nano's Python 3.6, which has no matplotlib."""

import csv
import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest

from latentlink.edge.errors import ConfigError
from latentlink.edge.profiler import EDGE_STAGES, HOST_STAGES, load_report, main, summarize, write_report

from .conftest import ROOT

EDGE = [s for s in EDGE_STAGES if s != "entropy"]
SOURCE = "file:///data/clip.mp4"
# seq -> outcome on the edge. The host decoded the 'decoded' ones except seq 7 (the report of a host that stopped
# early); it also has seq 12, which the edge report lacks, and frames of another stream.
OUTCOMES = ["decoded", "decoded", "dropped", "decoded", "lost", "decoded", "failed", "decoded", "refused",
            "decoded", "decoded", "dropped"]
NOT_ON_HOST = {7}


def edge_record(seq, outcome):
    stages = {"capture": 5.0 + seq, "preprocess": 1.0, "encode": 20.0 + seq, "gpu_to_cpu": 0.05, "serialize": 0.2}
    if outcome not in ("dropped", "refused"):
        stages["send"] = 0.1
    rec = {"seq": seq, "stages": stages, "bytes": 300 + seq, "outcome": outcome}
    if outcome == "decoded":
        rec["latency_ms"] = 100.0 + 10 * seq
    if outcome == "failed":
        rec["reason"] = "decode failed: boom"
    return rec


def host_record(seq, stream="cam0"):
    return {"seq": seq, "stages": {"receive": 0.5, "deserialize": 0.25, "decode": 30.0 + seq, "write": 4.0},
            "stream": stream, "bytes": 300 + seq, "latency_ms": 99.0 + 10 * seq}


def write_reports(folder, source=SOURCE):
    edge_records = [edge_record(seq, outcome) for seq, outcome in enumerate(OUTCOMES)]
    counts = dict((k, OUTCOMES.count(k)) for k in ("decoded", "failed", "refused", "dropped", "lost"))
    summary = summarize(edge_records, EDGE, 33.0, 1.0, dropped=counts["dropped"],
                        extra={"captured": len(OUTCOMES), "outcomes": counts})
    edge_path = os.path.join(str(folder), "edge.json")
    write_report(edge_path, summary, edge_records, {"role": "edge", "stream": "cam0", "profile": "tiny",
                                                    "backend": "onnxruntime", "source": source})
    host_records = [host_record(seq) for seq, outcome in enumerate(OUTCOMES)
                    if outcome == "decoded" and seq not in NOT_ON_HOST]
    host_records += [host_record(12), host_record(0, "other"), host_record(1, "other")]
    host_path = os.path.join(str(folder), "host.json")
    write_report(host_path, summarize(host_records, HOST_STAGES, 33.0, 1.0), host_records,
                 {"role": "host", "stream": "cam0,other", "profile": "tiny", "backend": "onnxruntime"})
    return edge_path, host_path


@pytest.fixture
def reports(tmp_path):
    edge_path, host_path = write_reports(tmp_path)
    return load_report(edge_path), load_report(host_path), edge_path, host_path


def run_main(argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], [dict(zip(rows[0], row)) for row in rows[1:]]


def stacks(ax):
    """x centre -> summed height of the bars drawn at it."""
    tops = {}
    for patch in ax.patches:
        x = round(patch.get_x() + patch.get_width() / 2.0, 6)
        tops[x] = tops.get(x, 0.0) + patch.get_height()
    return tops


def legend_labels(ax):
    return [text.get_text() for text in ax.get_legend().get_texts()]


# --- the figure -----------------------------------------------------------------------------------------------------

def test_one_report_gives_timeline_distributions_and_latency(reports, tmp_path):
    pytest.importorskip("matplotlib")
    from latentlink.report_views import plot_reports

    edge, _, _, _ = reports
    out = tmp_path / "plots" / "edge.png"  # the folder is created
    fig = plot_reports([edge], str(out))
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10000
    assert tuple(fig.get_size_inches()) == (12.0, 8.0)
    assert len(fig.axes) == 3
    timeline, boxes, latency = fig.axes
    assert SOURCE in fig.get_suptitle() and SOURCE in timeline.get_title(loc="left")
    # One stacked bar per frame, as high as the frame's stages add up to; the budget line at budget_ms.
    expected = dict((float(r["seq"]), sum(r["stages"].values())) for r in edge["records"])
    assert stacks(timeline) == pytest.approx(expected)
    budget = [line for line in timeline.get_lines() if line.get_label() == "budget 33 ms"]
    assert len(budget) == 1 and list(budget[0].get_ydata()) == [33.0, 33.0]
    labels = legend_labels(timeline)
    assert labels[:1] == ["budget 33 ms"] and labels[-len(EDGE):] == EDGE
    assert {"failed (1)", "refused (1)", "dropped (2)", "lost (1)"} <= set(labels)
    assert "12 captured = 7 decoded + 1 failed + 1 refused + 2 dropped + 1 lost" in timeline.get_title(loc="left")
    # The marks sit over the frames they mark.
    marks = dict((c.get_label(), sorted(x for x, _ in c.get_offsets())) for c in timeline.collections)
    assert marks["dropped (2)"] == [2.0, 11.0] and marks["lost (1)"] == [4.0]
    assert [t.get_text() for t in boxes.get_yticklabels()] == list(reversed(EDGE + ["total"]))
    assert boxes.get_xscale() == "log"
    line = latency.get_lines()[0]
    assert list(line.get_xdata()) == [0, 1, 3, 5, 7, 9, 10]  # the decoded frames
    assert list(line.get_ydata()) == [100.0 + 10 * s for s in (0, 1, 3, 5, 7, 9, 10)]


def test_edge_and_host_are_joined_by_seq_into_one_breakdown_per_frame(reports, tmp_path):
    pytest.importorskip("matplotlib")
    from latentlink.report_views import NETWORK, plot_reports

    edge, host, edge_path, host_path = reports
    out = tmp_path / "joined.png"
    fig = plot_reports([host, edge], str(out), [host_path, edge_path])  # either order
    assert out.stat().st_size > 10000
    assert tuple(fig.get_size_inches()) == (12.0, 14.0) and len(fig.axes) == 5
    edge_ax, host_ax, breakdown, boxes, latency = fig.axes
    assert SOURCE in fig.get_suptitle() and "host 'cam0,other'" in fig.get_suptitle()
    assert edge_ax.get_title(loc="left").startswith("edge 'cam0' (tiny, onnxruntime, %s)" % SOURCE)
    assert host_ax.get_title(loc="left").startswith("host 'cam0,other' (tiny, onnxruntime)")
    # The host's timeline shows the edge's stream only.
    assert sorted(stacks(host_ax)) == [0.0, 1.0, 3.0, 5.0, 9.0, 10.0, 12.0]
    # Frames on both sides: edge stages after capture + network and queue + host stages = the frame's latency.
    tops = stacks(breakdown)
    assert sorted(tops) == [0.0, 1.0, 3.0, 5.0, 9.0, 10.0]
    for seq, top in tops.items():
        assert top == pytest.approx(100.0 + 10 * seq)
    labels = legend_labels(breakdown)
    assert labels.index("send") < labels.index(NETWORK) < labels.index("receive") and "capture" not in labels
    assert {"dropped (2)", "lost (1)", "host only (1)"} <= set(labels)
    marks = dict((c.get_label(), sorted(x for x, _ in c.get_offsets())) for c in breakdown.collections)
    assert marks["host only (1)"] == [12.0]
    assert "6 frames joined; 7 on one side only" in breakdown.get_title(loc="left")
    ticks = [t.get_text() for t in boxes.get_yticklabels()]
    assert ticks[0] == "latency" and ticks[-1] == "edge capture" and NETWORK in ticks
    assert [line.get_label() for line in latency.get_lines()] == ["edge (host's acknowledgement)", "host"]


def test_a_report_with_no_frames_and_no_latency_still_draws(tmp_path):
    pytest.importorskip("matplotlib")
    from latentlink.report_views import plot_reports

    path = str(tmp_path / "empty.json")
    write_report(path, summarize([], HOST_STAGES, 33.0, 0.0), [], {"role": "host"})
    fig = plot_reports([load_report(path)], str(tmp_path / "empty.png"))
    assert os.path.getsize(str(tmp_path / "empty.png")) > 0
    assert "no frames" in [t.get_text() for t in fig.axes[1].texts]
    assert any("no latency" in t.get_text() for t in fig.axes[2].texts)


# --- the CSV --------------------------------------------------------------------------------------------------------

def test_csv_of_one_report_has_a_row_per_record(reports, tmp_path):
    from latentlink.report_views import write_csv

    edge, host, _, _ = reports
    path = str(tmp_path / "edge.csv")
    assert write_csv([edge], path) == []
    columns, rows = read_csv(path)
    assert columns == (["seq", "stream", "outcome", "latency_ms"] + [s + "_ms" for s in EDGE] +
                       ["total_ms", "bytes", "reason"])
    assert len(rows) == len(OUTCOMES) and [r["outcome"] for r in rows] == OUTCOMES
    assert rows[0] == {"seq": "0", "stream": "cam0", "outcome": "decoded", "latency_ms": "100.0",
                       "capture_ms": "5.0", "preprocess_ms": "1.0", "encode_ms": "20.0", "gpu_to_cpu_ms": "0.05",
                       "serialize_ms": "0.2", "send_ms": "0.1", "total_ms": "26.35", "bytes": "300", "reason": ""}
    assert rows[2]["send_ms"] == "" and rows[2]["latency_ms"] == ""  # dropped: never sent, never decoded
    assert rows[6]["reason"] == "decode failed: boom"
    # A host report: every record, its stream, and "decoded" (a host records the frames it decoded).
    write_csv([host], path)
    columns, rows = read_csv(path)
    assert columns[:4] == ["seq", "stream", "outcome", "latency_ms"] and "decode_ms" in columns
    assert len(rows) == len(host["records"]) and {r["outcome"] for r in rows} == {"decoded"}
    assert [r["stream"] for r in rows].count("other") == 2


def test_csv_of_edge_and_host_joins_by_seq(reports, tmp_path):
    from latentlink.report_views import write_csv

    edge, host, _, _ = reports
    path = str(tmp_path / "joined.csv")
    write_csv([edge, host], path)
    columns, rows = read_csv(path)
    assert columns[:7] == ["seq", "stream", "outcome", "sides", "latency_ms", "edge_latency_ms", "host_latency_ms"]
    assert ["edge_%s_ms" % s for s in EDGE] + ["edge_total_ms", "network_queue_ms"] + [
        "host_%s_ms" % s for s in HOST_STAGES] + ["host_total_ms", "edge_bytes", "host_bytes", "reason"] == columns[7:]
    assert [int(r["seq"]) for r in rows] == list(range(13))  # 0-11 from the edge, 12 from the host only
    by_seq = dict((int(r["seq"]), r) for r in rows)
    assert {r["stream"] for r in rows} == {"cam0"}  # the other stream's records are not joined
    both = by_seq[3]
    assert both["sides"] == "edge+host" and both["outcome"] == "decoded"
    assert both["latency_ms"] == both["edge_latency_ms"] == "130.0" and both["host_latency_ms"] == "129.0"
    inside = 1.0 + 23.0 + 0.05 + 0.2 + 0.1 + 0.5 + 0.25 + 33.0 + 4.0  # every stage but capture
    assert float(both["network_queue_ms"]) == pytest.approx(130.0 - inside)
    assert both["edge_capture_ms"] == "8.0" and both["host_decode_ms"] == "33.0"
    edge_only = by_seq[7]  # decoded by the edge's account, but not in this host report
    assert edge_only["sides"] == "edge" and edge_only["host_decode_ms"] == "" and edge_only["network_queue_ms"] == ""
    assert by_seq[2]["sides"] == "edge" and by_seq[2]["outcome"] == "dropped" and by_seq[2]["host_bytes"] == ""
    host_only = by_seq[12]
    assert host_only["sides"] == "host" and host_only["outcome"] == "decoded" and host_only["edge_encode_ms"] == ""
    assert host_only["latency_ms"] == host_only["host_latency_ms"] == "219.0"


def test_the_join_warns_of_repeated_seqs_and_refuses_another_stream(reports, tmp_path):
    from latentlink.report_views import join_by_seq, write_csv

    edge, host, _, _ = reports
    host["records"].append(host_record(3))
    _, rows, warnings = join_by_seq(edge, host)
    assert len(rows) == 13 and len(warnings) == 1 and "1 seq numbers appear more than once" in warnings[0]
    edge["meta"]["stream"] = "cam9"
    with pytest.raises(ConfigError, match="no frames of the edge's stream 'cam9' \\(it has 'cam0', 'other'\\)"):
        write_csv([edge, host], str(tmp_path / "x.csv"))
    assert not os.path.exists(str(tmp_path / "x.csv"))


# --- latentlink report ----------------------------------------------------------------------------------------------

def test_latentlink_report_prints_tables_with_the_source_and_announces_each_file(reports, tmp_path):
    pytest.importorskip("matplotlib")
    _, _, edge_path, host_path = reports
    png, table = str(tmp_path / "out" / "r.png"), str(tmp_path / "out" / "r.csv")
    code, out, err = run_main(["report", edge_path, host_path, "--plot", png, "--csv", table])
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "edge 'cam0' (tiny, onnxruntime, %s)" % SOURCE
    assert "host 'cam0,other' (tiny, onnxruntime)" in lines
    assert lines[-2:] == ["plot: " + png, "csv: " + table]
    assert os.path.getsize(png) > 0 and len(read_csv(table)[1]) == 13


def test_latentlink_report_refuses_what_it_cannot_join(reports, tmp_path):
    _, _, edge_path, host_path = reports
    code, out, err = run_main([edge_path, edge_path, "--csv", str(tmp_path / "x.csv")])
    assert code == 2 and out.count("over budget") == 2  # the tables still print
    assert "error: --plot and --csv take one report, or an edge report and a host report" in err
    code, out, err = run_main([edge_path, str(tmp_path / "missing.json"), "--csv", str(tmp_path / "x.csv")])
    assert code == 2 and "nothing drawn or written" in err
    assert not os.path.exists(str(tmp_path / "x.csv"))


def test_printing_tables_imports_neither_matplotlib_nor_the_views(tmp_path):
    edge_path, _ = write_reports(tmp_path)
    code = ("import sys\nfrom latentlink.edge.profiler import main\nassert main([%r]) == 0\n"
            "assert 'matplotlib' not in sys.modules and 'latentlink.report_views' not in sys.modules" % edge_path)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                          capture_output=True, text=True)
    assert done.returncode == 0 and "over budget" in done.stdout, done.stderr


# --- the Nano: Python 3.6, numpy 1.19, no matplotlib ----------------------------------------------------------------

def python36():
    for candidate in (os.environ.get("LATENTLINK_PY36"), os.path.join(ROOT, ".venv36", "bin", "python")):
        if candidate and os.path.exists(candidate):
            return candidate
    pytest.skip("no Python 3.6 (set LATENTLINK_PY36, or make .venv36 as .ci/run does)")


def test_report_tables_and_csv_on_python36_without_matplotlib(tmp_path):
    py36 = python36()
    edge_path, host_path = write_reports(tmp_path)
    env = dict(os.environ, PYTHONPATH=ROOT)

    def run(*args):
        return subprocess.run([py36, "-m", "latentlink.edge.profiler"] + list(args), cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60)

    check = subprocess.run([py36, "-c", "import sys; assert sys.version_info[:2] == (3, 6); import matplotlib"],
                           capture_output=True, text=True)
    assert "No module named 'matplotlib'" in check.stderr, "this test needs a Python 3.6 without matplotlib"
    done = run(edge_path, host_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("edge 'cam0' (tiny, onnxruntime, %s)\nstage" % SOURCE)
    assert done.stdout.count("over budget") == 2
    table = str(tmp_path / "frames.csv")
    done = run(edge_path, host_path, "--csv", table)
    assert done.returncode == 0 and done.stdout.endswith("csv: %s\n" % table), done.stderr
    assert len(read_csv(table)[1]) == 13
    done = run(edge_path, "--plot", str(tmp_path / "x.png"))
    assert done.returncode == 2 and "over budget" in done.stdout
    assert "error: --plot needs matplotlib" in done.stderr and not os.path.exists(str(tmp_path / "x.png"))


def test_the_readme_shows_the_figure_with_the_command_that_made_it():
    import struct

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    command = ("python -m latentlink report /tmp/demo/edge.json /tmp/demo/host.json --plot docs/report-demo.png "
               "--csv /tmp/demo/frames.csv")
    assert "python -m latentlink demo --out /tmp/demo\n" + command + "\n" in readme
    assert "](docs/report-demo.png)" in readme
    with open(os.path.join(ROOT, "docs", "report-demo.png"), "rb") as f:
        png = f.read()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) < 200 * 1024
    assert struct.unpack(">II", png[16:24]) == (12 * 80, 14 * 80)  # the joined figure: 12 x 14 inches at 80 dpi
