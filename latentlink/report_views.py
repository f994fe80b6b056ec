"""Figures and per-frame CSV from latentlink reports: ``latentlink report FILE... --plot OUT.png --csv OUT.csv``.

Everything here is built on the dict :func:`latentlink.edge.profiler.load_report` returns (the summary's keys at the
top level, ``meta``, and the ``records`` list), never on the report file itself, so it reads reports however they
are stored.

**One report** is drawn on its own: (a) a per-frame timeline, one bar per frame (by ``seq``, capture order) with
its stage times stacked, in ms, and the frame budget (``budget_ms``) as a line; frames whose ``outcome`` is not
``decoded`` (``failed``, ``refused``, ``dropped``, ``lost``) are marked above their bar; (b) the distribution of
each stage's times (box plots, log scale); (c) the glass-to-glass latency (records' ``latency_ms``) against seq.

**An edge report and a host report of the same stream** are joined by ``seq`` (host records also carry ``stream``;
a host report of several streams is cut to the edge's ``meta.stream``). The figure then has both timelines, and one
**capture-to-decoded breakdown per frame**: the edge's stages after capture, then "network + queue", then the
host's stages. "Network + queue" is the rest of the frame's latency that no stage accounts for: the wire, the
frame's wait in the edge's queue and the host's socket buffer, and the host's wait for its decoder. The capture
stage is not part of latency: the capture time (``t_capture``) is taken when the frame has arrived. Frames that
only one side has (dropped or lost by the edge, or from a host run that saw more) get rows and marks, not bars.

``latency_ms`` of a joined frame is the edge's (the host's ``t_done`` from its acknowledgement, on the edge's clock
via the measured offset) where the edge has one, else the host's (protocol-1 edges get no acknowledgements).

The CSV has one row per frame: ``seq``, ``stream``, ``outcome``, ``latency_ms``, ``<stage>_ms`` for every stage,
``total_ms`` (the sum of the stages a frame ran), ``<stage>_cuda_ms`` where the report has CUDA-event times,
``bytes``, ``iterations`` (a progressive model's reports only: edge/rate.py) and ``reason`` (why a frame failed);
joined, ``edge_*`` and ``host_*`` columns, ``network_queue_ms``, both latencies, and ``sides`` (``edge+host``,
``edge`` or ``host``). Empty cells are values a frame does not have.

Host-side tooling: matplotlib (the Agg backend, without pyplot or a display) is imported only to draw. The CSV
needs the standard library only, and this module keeps to Python 3.6 syntax, so ``latentlink report --csv`` also
runs on the Nano.
"""

import csv
import io
import math

from latentlink.edge.errors import ConfigError
from latentlink.edge.profiler import EDGE_STAGES, HOST_STAGES, replace_atomically, report_title

NETWORK = "network + queue"
# Frames that did not end up decoded, as marked on the timelines: (marker, colour).
# "host only": a joined frame the edge report does not have.
OUTCOME_MARKS = {"failed": ("X", "#d62728"), "refused": ("s", "#9467bd"), "dropped": ("v", "#ff7f0e"),
                 "lost": ("D", "#000000"), "host only": ("^", "#2ca02c")}
_EDGE_COLOURS = ("#8c8c8c", "#bcbd22", "#1f77b4", "#17becf", "#9467bd", "#e377c2", "#ff7f0e")  # EDGE_STAGES order
_HOST_COLOURS = ("#2ca02c", "#98df8a", "#d62728", "#8c564b", "#ff9896")  # HOST_STAGES order
_OTHER_COLOURS = ("#7f7f7f", "#c49c94", "#aec7e8", "#ffbb78", "#c5b0d5")
_NETWORK_COLOUR = "#d9d9d9"
_MIN_MS = 1e-3  # the log scale's floor: stage times are rounded to the microsecond, so 0.0 happens
DPI = 80


def role_of(report):
    """``"edge"`` or ``"host"``: the report's ``meta.role``, else told by its stage names; ``"report"`` if neither."""
    role = (report.get("meta") or {}).get("role")
    if role in ("edge", "host"):
        return role
    names = set(stages_of(report))
    if names & set(HOST_STAGES) and not names & set(EDGE_STAGES):
        return "host"
    return "edge" if names & set(EDGE_STAGES) else "report"


def stages_of(report):
    """The report's stage names in table order (its summary's), then any that only its records have."""
    names = [name for name in (report.get("stages") or {}) if name != "total"]
    for rec in report.get("records") or []:
        for name in rec.get("stages") or {}:
            if name not in names:
                names.append(name)
    return names


def _records(report):
    return [rec for rec in report.get("records") or [] if isinstance(rec, dict)]


def _outcome(rec, role):
    # A host records only the frames it decoded; an edge says each frame's bucket ("sent": protocol 1).
    return rec.get("outcome") or ("decoded" if role == "host" else "")


def _sum(values):
    return round(sum(values), 3) if values else None


def frame_rows(report):
    """``(columns, rows)``: one dict per record of one report, in record order (see the module docstring)."""
    role, stages = role_of(report), stages_of(report)
    records = _records(report)
    cuda = [name for name in stages if any(name in (rec.get("gpu_stages") or {}) for rec in records)]
    stream = (report.get("meta") or {}).get("stream")
    columns = (["seq", "stream", "outcome", "latency_ms"] + [name + "_ms" for name in stages] + ["total_ms"] +
               [name + "_cuda_ms" for name in cuda] + ["bytes"] + _iterations_column(records) + ["reason"])
    rows = []
    for rec in records:
        times = rec.get("stages") or {}
        row = {"seq": rec.get("seq"), "stream": rec.get("stream", stream), "outcome": _outcome(rec, role),
               "latency_ms": rec.get("latency_ms"), "total_ms": _sum([float(v) for v in times.values()]),
               "bytes": rec.get("bytes"), "reason": rec.get("reason"), "iterations": rec.get("iterations")}
        for name in stages:
            row[name + "_ms"] = times.get(name)
        for name in cuda:
            row[name + "_cuda_ms"] = (rec.get("gpu_stages") or {}).get(name)
        rows.append(row)
    return columns, rows


def _iterations_column(records):
    """``["iterations"]`` when any record says a progressive model's iterations, else none (other CSVs unchanged)."""
    return ["iterations"] if any("iterations" in rec for rec in records) else []


def pair(reports, names=None):
    """``(edge, host)`` for an edge and a host report, in either order; ``(report, None)`` for one report.

    Anything else is a :class:`ConfigError`: a figure or CSV shows one report, or one stream seen from both ends.
    """
    names = list(names or ["report %d" % (i + 1) for i in range(len(reports))])
    if len(reports) == 1:
        return reports[0], None
    roles = [role_of(r) for r in reports]
    if len(reports) == 2 and sorted(roles) == ["edge", "host"]:
        return (reports[0], reports[1]) if roles[0] == "edge" else (reports[1], reports[0])
    raise ConfigError("--plot and --csv take one report, or an edge report and a host report of the same stream "
                      "(joined by seq); got %s" % ", ".join("%s (%s)" % (n, r) for n, r in zip(names, roles)))


def join_by_seq(edge, host):
    """``(columns, rows, warnings)``: the edge's and the host's records of one stream, one row per seq.

    The host's records are those of the edge's stream (``meta.stream``; a host report of one stream needs no
    name). A seq the host decoded twice (an edge restarted under the same name during one host run) is joined
    with its first record, and a warning says so.
    """
    warnings = []
    edge_stages = stages_of(edge)
    host_stages = stages_of(host)
    host_records = _records(host)
    host_streams = sorted(set(str(rec["stream"]) for rec in host_records if rec.get("stream") is not None))
    stream = (edge.get("meta") or {}).get("stream")
    if stream is None and len(host_streams) == 1:
        stream = host_streams[0]
    if host_streams and stream not in host_streams:
        raise ConfigError("the host report has no frames of the edge's stream %r (it has %s): give the host "
                          "report of the run the edge streamed to" % (stream, ", ".join(repr(s) for s in host_streams)))
    on_host = {}
    repeated = 0
    for rec in host_records:
        if rec.get("stream", stream) != stream:
            continue
        if rec.get("seq") in on_host:
            repeated += 1
            continue
        on_host[rec.get("seq")] = rec
    if repeated:
        warnings.append("%d seq numbers appear more than once in the host report for stream %r (an edge restarted "
                        "under the same name?): each is joined with its first record" % (repeated, stream))
    on_edge = dict((rec.get("seq"), rec) for rec in _records(edge))
    columns = (["seq", "stream", "outcome", "sides", "latency_ms", "edge_latency_ms", "host_latency_ms"] +
               ["edge_%s_ms" % n for n in edge_stages] + ["edge_total_ms", "network_queue_ms"] +
               ["host_%s_ms" % n for n in host_stages] + ["host_total_ms", "edge_bytes", "host_bytes"] +
               _iterations_column(_records(edge) + host_records) + ["reason"])
    rows = []
    for seq in sorted(set(on_edge) | set(on_host), key=lambda s: (s is None, s)):
        e, h = on_edge.get(seq), on_host.get(seq)
        e_times, h_times = (e or {}).get("stages") or {}, (h or {}).get("stages") or {}
        e_latency, h_latency = (e or {}).get("latency_ms"), (h or {}).get("latency_ms")
        latency = e_latency if e_latency is not None else h_latency
        row = {"seq": seq, "stream": stream, "outcome": _outcome(e, "edge") if e is not None else "decoded",
               "sides": "edge+host" if e is not None and h is not None else ("edge" if e is not None else "host"),
               "latency_ms": latency, "edge_latency_ms": e_latency, "host_latency_ms": h_latency,
               "edge_total_ms": _sum([float(v) for v in e_times.values()]) if e is not None else None,
               "host_total_ms": _sum([float(v) for v in h_times.values()]) if h is not None else None,
               "edge_bytes": (e or {}).get("bytes"), "host_bytes": (h or {}).get("bytes"),
               "iterations": (e or h or {}).get("iterations"),
               "reason": (e or {}).get("reason"), "network_queue_ms": None}
        for name in edge_stages:
            row["edge_%s_ms" % name] = e_times.get(name)
        for name in host_stages:
            row["host_%s_ms" % name] = h_times.get(name)
        if e is not None and h is not None and latency is not None:
            inside = [float(v) for k, v in e_times.items() if k != "capture"] + [float(v) for v in h_times.values()]
            row["network_queue_ms"] = round(float(latency) - sum(inside), 3)
        rows.append(row)
    return columns, rows, warnings


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(round(value, 3))
    return str(value)


def write_csv(reports, path, names=None):
    """Write one report's records, or an edge and a host report joined by seq, as CSV; returns the warnings."""
    edge, host = pair(reports, names)
    if host is None:
        (columns, rows), warnings = frame_rows(edge), []
    else:
        columns, rows, warnings = join_by_seq(edge, host)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_cell(row.get(column)) for column in columns])
    _write_atomically(path, text.getvalue().encode("utf-8"))
    return warnings


def _write_atomically(path, data):
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    try:
        replace_atomically(path, write)
    except OSError as exc:
        raise ConfigError("cannot write %s (%s)" % (path, exc))


def write_views(reports, names, plot=None, csv_path=None):
    """Write the figure and/or the CSV; yields ``(kind, path)`` as each file is written (``"plot"``, ``"csv"``),
    and ``("warning", text)`` for what the join had to decide."""
    pair(reports, names)  # the same refusal for both, before anything is written
    if plot:
        warnings = plot_reports(reports, plot, names).latentlink_warnings
        for text in warnings:
            yield "warning", text
        yield "plot", plot
    if csv_path:
        for text in write_csv(reports, csv_path, names):
            if not plot:
                yield "warning", text
        yield "csv", csv_path


# --- the figure ---------------------------------------------------------------------------------------------------

def _colours(edge_stages, host_stages):
    colours, spare = {}, list(_OTHER_COLOURS)
    for known, palette, names in ((EDGE_STAGES, _EDGE_COLOURS, edge_stages), (HOST_STAGES, _HOST_COLOURS,
                                                                              host_stages)):
        for name in names:
            if name in known:
                colours[name] = palette[known.index(name)]
            elif name not in colours:
                colours[name] = spare.pop(0) if spare else "#333333"
    colours[NETWORK] = _NETWORK_COLOUR
    return colours


def _x_of(rows):
    """x positions: seq when the rows' seqs are distinct numbers (one stream), else the record index."""
    seqs = [row["seq"] for row in rows]
    if all(isinstance(s, int) for s in seqs) and len(set(seqs)) == len(seqs):
        return seqs, "seq (capture order)"
    return list(range(len(rows))), "record (several streams: in stream, seq order)"


def _outcome_text(report, rows):
    outcomes = report.get("outcomes")
    if isinstance(outcomes, dict):
        return "%s captured = %s" % (report.get("captured", sum(outcomes.values())), " + ".join(
            "%d %s" % (n, name) for name, n in outcomes.items()))
    counts = {}
    for row in rows:
        counts[row["outcome"] or "?"] = counts.get(row["outcome"] or "?", 0) + 1
    return ", ".join("%d %s" % (n, name) for name, n in sorted(counts.items()))


def _mark_outcomes(ax, x, outcomes):
    """Mark frames that were not decoded just above the plot's top edge, one marker style per outcome."""
    transform = ax.get_xaxis_transform()  # x in data, y in axes fractions
    for outcome, (marker, colour) in OUTCOME_MARKS.items():
        xs = [xi for xi, o in zip(x, outcomes) if o == outcome]
        if xs:
            ax.scatter(xs, [1.02] * len(xs), transform=transform, marker=marker, s=22, color=colour,
                       clip_on=False, zorder=4, label="%s (%d)" % (outcome, len(xs)))


def _span(ax, x):
    """Every frame inside the x range, marked ones included (marks do not move matplotlib's autoscaling)."""
    if x:
        ax.set_xlim(min(x) - 1, max(x) + 1)


def _legend(ax):
    ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False, borderaxespad=0.0)


def _stacked(ax, x, layers, colours):
    """One bar per frame, ``layers`` (name, heights) stacked bottom-up."""
    import numpy as np

    bottom = np.zeros(len(x))
    for name, heights in layers:
        h = np.array([0.0 if v is None else max(0.0, float(v)) for v in heights])
        if h.any():
            ax.bar(x, h, bottom=bottom, width=0.8, color=colours[name], label=name, linewidth=0)
        bottom += h
    return bottom


def _timeline(ax, report, rows, colours, prefix=""):
    stages = stages_of(report)
    x, xlabel = _x_of(rows)
    _stacked(ax, x, [(name, [row[prefix + name + "_ms"] for row in rows]) for name in stages], colours)
    budget = float(report.get("budget_ms") or 0.0)
    if budget > 0:
        ax.axhline(budget, color="#d62728", linestyle="--", linewidth=1.2, label="budget %g ms" % budget)
    _mark_outcomes(ax, x, [row["outcome"] for row in rows])
    _span(ax, x)
    over = report.get("over_budget")
    ax.set_title("%s\n(a) stage times per frame: %s%s" % (
        report_title(report) or role_of(report), _outcome_text(report, rows),
        "; %s of %s over budget" % (over, report.get("frames")) if over is not None else ""),
        fontsize=9, loc="left", pad=12)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("ms", fontsize=8)
    _legend(ax)


def _breakdown(ax, edge, host, rows, colours):
    joined = [row for row in rows if row["network_queue_ms"] is not None]
    x = [row["seq"] for row in joined]
    layers = [(name, [row["edge_%s_ms" % name] for row in joined]) for name in stages_of(edge) if name != "capture"]
    layers.append((NETWORK, [row["network_queue_ms"] for row in joined]))
    layers += [(name, [row["host_%s_ms" % name] for row in joined]) for name in stages_of(host)]
    _stacked(ax, x, layers, colours)
    _mark_outcomes(ax, [row["seq"] for row in rows], [row["outcome"] if row["sides"] != "host" else "host only"
                                                      for row in rows])
    _span(ax, [row["seq"] for row in rows])
    negative = sum(1 for row in joined if row["network_queue_ms"] < 0)
    one_side = sum(1 for row in rows if row["sides"] != "edge+host")
    ax.set_title("capture to decoded, per frame joined by seq: edge stages after capture, %s (the rest of the "
                 "latency), host stages\n%d frames joined%s%s" % (
                     NETWORK, len(joined), "; %d on one side only (marked)" % one_side if one_side else "",
                     "; %d with stages longer than their latency (clock offset error): %s drawn as 0" % (
                         negative, NETWORK) if negative else ""), fontsize=9, loc="left", pad=12)
    ax.set_xlabel("seq (capture order)", fontsize=8)
    ax.set_ylabel("ms", fontsize=8)
    _legend(ax)


def _distributions(ax, series, colours):
    """Horizontal box plots of each (label, colour key, values) with values, log scale."""
    series = [(label, key, [max(_MIN_MS, float(v)) for v in values if v is not None])
              for label, key, values in series]
    series = [item for item in series if item[2]]
    if not series:
        ax.text(0.5, 0.5, "no frames", ha="center", va="center", transform=ax.transAxes)
        return
    series.reverse()  # the first stage at the top
    data = [values for _, _, values in series]
    style = dict(patch_artist=True, widths=0.6, showfliers=True, medianprops=dict(color="black"),
                 flierprops=dict(marker=".", markersize=3))
    try:
        boxes = ax.boxplot(data, orientation="horizontal", **style)
    except TypeError:  # matplotlib < 3.10
        boxes = ax.boxplot(data, vert=False, **style)
    for patch, (_, key, _) in zip(boxes["boxes"], series):
        patch.set_facecolor(colours.get(key, "#cccccc"))
    ax.set_yticks(range(1, len(series) + 1))
    ax.set_yticklabels([label for label, _, _ in series], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("ms (log scale; median, quartiles, 1.5 IQR whiskers)", fontsize=8)
    ax.set_title("(b) per-stage distributions", fontsize=9, loc="left", pad=12)


def _latency(ax, rows, series):
    """Latency against seq: ``series`` is a list of (column, label, style)."""
    x, xlabel = _x_of(rows)
    drawn = 0
    for column, label, style in series:
        points = [(xi, row[column]) for xi, row in zip(x, rows) if row.get(column) is not None]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], label=label, **style)
            drawn += 1
    _mark_outcomes(ax, x, [row["outcome"] for row in rows])
    _span(ax, x)
    if not drawn:
        ax.text(0.5, 0.5, "no latency in this report\n(protocol 1 and pickle-raw frames are not acknowledged)",
                ha="center", va="center", transform=ax.transAxes, fontsize=8)
    ax.set_title("(c) glass-to-glass latency: capture to decoded", fontsize=9, loc="left", pad=12)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("ms", fontsize=8)
    if drawn or ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")


def plot_reports(reports, path, names=None):
    """Draw one report, or an edge and a host report joined by seq, to ``path`` (PNG; see the module docstring).

    Returns the matplotlib :class:`~matplotlib.figure.Figure`; ``figure.latentlink_warnings`` lists what the join
    had to decide. Needs matplotlib (the Agg backend is used directly: no display, no pyplot state).
    """
    edge, host = pair(reports, names)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("--plot needs matplotlib, which this Python does not have: pip install matplotlib (a "
                          "host-side option; the tables above and --csv need nothing more)")
    warnings = []
    if host is None:
        report = edge
        _, rows = frame_rows(report)
        stages = stages_of(report)
        colours = _colours(stages if role_of(report) != "host" else [], stages if role_of(report) == "host" else [])
        fig = Figure(figsize=(12, 8), dpi=DPI)
        grid = fig.add_gridspec(2, 2, height_ratios=(1.15, 1), width_ratios=(1, 1.25), hspace=0.45, wspace=0.28)
        _timeline(fig.add_subplot(grid[0, :]), report, rows, colours)
        _distributions(fig.add_subplot(grid[1, 0]), [(name, name, [row[name + "_ms"] for row in rows])
                                                     for name in stages] +
                       [("total", "total", [row["total_ms"] for row in rows])], colours)
        _latency(fig.add_subplot(grid[1, 1]), rows, [("latency_ms", "latency_ms", dict(
            color="#1f77b4", marker=".", markersize=4, linewidth=1))])
        titles = [report_title(report) or role_of(report)]
    else:
        _, edge_rows = frame_rows(edge)
        _, host_rows = frame_rows(host)
        _, rows, warnings = join_by_seq(edge, host)
        stream = rows[0]["stream"] if rows else None
        host_rows = [row for row in host_rows if row["stream"] in (None, stream)]
        edge_stages, host_stages = stages_of(edge), stages_of(host)
        colours = _colours(edge_stages, host_stages)
        fig = Figure(figsize=(12, 14), dpi=DPI)
        grid = fig.add_gridspec(4, 2, height_ratios=(1, 1, 1.15, 1.05), width_ratios=(1, 1.25), hspace=0.55,
                                wspace=0.3)
        _timeline(fig.add_subplot(grid[0, :]), edge, edge_rows, colours, prefix="")
        _timeline(fig.add_subplot(grid[1, :]), host, host_rows, colours, prefix="")
        _breakdown(fig.add_subplot(grid[2, :]), edge, host, rows, colours)
        series = [("edge " + n, n, [row["edge_%s_ms" % n] for row in rows]) for n in edge_stages]
        series.append((NETWORK, NETWORK, [row["network_queue_ms"] for row in rows]))
        series += [("host " + n, n, [row["host_%s_ms" % n] for row in rows]) for n in host_stages]
        series.append(("latency", "latency", [row["latency_ms"] for row in rows]))
        _distributions(fig.add_subplot(grid[3, 0]), series, colours)
        _latency(fig.add_subplot(grid[3, 1]), rows, [
            ("edge_latency_ms", "edge (host's acknowledgement)", dict(color="#1f77b4", linewidth=1.5)),
            ("host_latency_ms", "host", dict(color="#ff7f0e", marker=".", markersize=4, linestyle="none"))])
        titles = [report_title(edge) or "edge", report_title(host) or "host"]
    fig.suptitle("latentlink report: " + "\n".join(titles), fontsize=11, x=0.02, y=0.995, ha="left", va="top")
    fig.subplots_adjust(left=0.1, right=0.86, top=0.87 if host is None else 0.91,
                        bottom=0.07 if host is None else 0.045)
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    _write_atomically(path, buf.getvalue())
    fig.latentlink_warnings = warnings
    return fig
