"""Per-frame, per-stage timing against a frame budget, and the reports built from it.

The edge and the host time every frame stage by stage with a :class:`FrameTimer` (milliseconds, measured with the
monotonic ``time.perf_counter``); :func:`summarize` turns the per-frame records into min/median/mean/p95/p99/max per
stage and for the frame total; :func:`write_report` / :func:`load_report` store and read the JSON report, and
:func:`format_table` prints the table a human reads (``latentlink report FILE.json``).

Runs on Python 3.6 with numpy 1.19 (Jetson Nano) as well as on current Python and numpy: stdlib and numpy only.
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

from .errors import ConfigError, LatentlinkError

# entropy: the optional lossless coding of the packed payload; reports of runs without a coder leave it out.
EDGE_STAGES = ("capture", "preprocess", "encode", "gpu_to_cpu", "serialize", "entropy", "send")
HOST_STAGES = ("receive", "deserialize", "decode", "write")

REPORT_KIND = "latentlink-report"
REPORT_VERSION = 1
BAR_WIDTH = 20  # characters of '#' for 100 % of the budget

_STAT_KEYS = ("min_ms", "median_ms", "mean_ms", "p95_ms", "p99_ms", "max_ms")
_SUMMARY_KEYS = ("frames", "budget_ms", "over_budget", "fps", "t200_s", "bytes_per_frame", "dropped", "stages")
_RESERVED = frozenset(_SUMMARY_KEYS + ("gpu_stages", "latency", "kind", "version", "meta", "records"))
_HOW_TO_MAKE = "write one with `latentlink edge --report FILE.json` or `latentlink host --report FILE.json`"


class FrameTimer(object):
    """Times the stages of one frame, in milliseconds.

    ``with timer.stage("encode"): ...`` adds the elapsed ms to that stage (repeated stages add up; stages do not
    nest); ``timer.add(name, ms)`` records a time measured elsewhere; ``timer.extra`` holds other per-frame facts
    (e.g. ``bytes`` on the wire); ``timer.add_gpu(name, ms)`` records the same stage's time measured with CUDA
    events on the GPU's stream, kept beside the wall-clock time (not added to the frame total). The timer is its
    own context manager, so a stage allocates nothing but its dict entry.
    """

    __slots__ = ("seq", "stages", "gpu_stages", "extra", "_clock", "_name", "_t0")

    def __init__(self, seq, clock=time.perf_counter):
        self.seq = int(seq)
        self.stages = {}  # stage name -> wall-clock ms
        self.gpu_stages = {}  # stage name -> ms between CUDA events (GPU backends only)
        self.extra = {}
        self._clock = clock  # seconds, monotonic
        self._name = None
        self._t0 = 0.0

    def stage(self, name):
        """Context manager timing ``name``; use as ``with timer.stage(name): ...``."""
        if self._name is not None:
            raise RuntimeError("stage %r is still open; stages of a FrameTimer do not nest" % self._name)
        self._name = name
        return self

    def __enter__(self):
        self._t0 = self._clock()
        return self

    def __exit__(self, exc_type, exc, tb):
        ms = (self._clock() - self._t0) * 1000.0
        name, self._name = self._name, None
        self.stages[name] = self.stages.get(name, 0.0) + ms
        return False

    def add(self, name, ms):
        """Add ``ms`` milliseconds measured elsewhere (a CUDA event, a backend's own timing) to stage ``name``."""
        self.stages[name] = self.stages.get(name, 0.0) + float(ms)

    def add_gpu(self, name, ms):
        """Add ``ms`` milliseconds timed with CUDA events to the GPU time of stage ``name``."""
        self.gpu_stages[name] = self.gpu_stages.get(name, 0.0) + float(ms)

    def add_backend_timings(self, stage, copy_stage, timings):
        """Record a backend's ``infer`` timings: ``run_ms`` -> ``stage``, ``copy_ms`` -> ``copy_stage``.

        ``copy_stage`` None adds the copy to ``stage``. ``run_gpu_ms``/``copy_gpu_ms`` (CUDA events) go to the GPU
        columns of the same stages.
        """
        copy_stage = copy_stage or stage
        self.add(stage, timings["run_ms"])
        self.add(copy_stage, timings["copy_ms"])
        if "run_gpu_ms" in timings:
            self.add_gpu(stage, timings["run_gpu_ms"])
            self.add_gpu(copy_stage, timings["copy_gpu_ms"])

    def record(self):
        """``{"seq": int, "stages": {name: ms}, ["gpu_stages": {name: ms},] **extra}``.

        ``extra`` cannot override ``seq``, ``stages`` or ``gpu_stages``. Times are rounded to the microsecond (3
        decimals of a millisecond), like the summary.
        """
        rec = {"seq": self.seq, "stages": dict((k, _r(v)) for k, v in self.stages.items())}
        if self.gpu_stages:
            rec["gpu_stages"] = dict((k, _r(v)) for k, v in self.gpu_stages.items())
        for key, value in self.extra.items():
            rec.setdefault(key, value)
        return rec


def _r(x):
    return round(float(x), 3)


def _stats(values):
    """min/median/mean/p95/p99/max (ms, 3 decimals) of a 1-d array; zeros for an empty one."""
    if values.size == 0:
        return dict.fromkeys(_STAT_KEYS, 0.0)
    lo, hi = float(values.min()), float(values.max())
    p50, p95, p99 = (float(p) for p in np.percentile(values, [50.0, 95.0, 99.0]))
    # Guard the order against last-ulp float noise: min <= median <= p95 <= p99 <= max, min <= mean <= max.
    p50 = min(max(p50, lo), hi)
    p95 = min(max(p95, p50), hi)
    p99 = min(max(p99, p95), hi)
    mean = min(max(float(values.mean()), lo), hi)
    return dict(zip(_STAT_KEYS, (_r(lo), _r(p50), _r(mean), _r(p95), _r(p99), _r(hi))))


def summarize(records, stages, budget_ms, wall_s, dropped=0, extra=None):
    """Summarize FrameTimer records: per-stage and total stats (ms), frames over ``budget_ms``, fps over ``wall_s``.

    A stage's statistics are over the frames that ran it, and its ``frames`` says how many did (on the edge, a
    frame dropped before ``send`` has no send time: that column shows the drops); a frame's total is the sum of
    the stage times it has. Where records carry ``gpu_stages`` (CUDA-event times), the summary gets ``gpu_stages``:
    the same statistics for each such stage, over the frames that have it. Where records carry ``latency_ms``
    (capture to decoded), the summary gets ``latency``: its statistics over those frames. The keys of ``extra``
    (notes, stream, backend, ...) are appended after the fixed keys.
    """
    stages = tuple(stages)
    if "total" in stages:
        raise ValueError("'total' is computed by summarize; it cannot be a stage name")
    extra = dict(extra or {})
    clash = sorted(_RESERVED.intersection(extra))
    if clash:
        raise ValueError("extra keys %s are reserved by the report format" % ", ".join(clash))
    frames = len(records)
    times = np.full((frames, len(stages)), np.nan, dtype=np.float64)
    for i, rec in enumerate(records):
        rec_stages = rec.get("stages") or {}
        for j, name in enumerate(stages):
            if name in rec_stages:
                times[i, j] = rec_stages[name]
    totals = np.nansum(times, axis=1) if frames else np.zeros(0)
    fps = frames / float(wall_s) if frames and wall_s > 0 else 0.0
    sizes = [float(rec["bytes"]) for rec in records if "bytes" in rec]
    stats = {}
    for j, name in enumerate(stages):
        ran = times[:, j][~np.isnan(times[:, j])]
        stats[name] = _stats(ran)
        stats[name]["frames"] = int(ran.size)
    stats["total"] = _stats(totals)
    stats["total"]["frames"] = frames
    summary = {
        "frames": frames,
        "budget_ms": _r(budget_ms),
        "over_budget": int(np.count_nonzero(totals > budget_ms)),
        "fps": _r(fps),
        "t200_s": _r(200.0 / fps) if fps > 0 else 0.0,
        "bytes_per_frame": _r(sum(sizes) / len(sizes)) if sizes else 0.0,
        "dropped": int(dropped),
        "stages": stats,
    }
    gpu = {}  # stage -> its CUDA-event times, over the frames that have them
    for rec in records:
        for name, ms in (rec.get("gpu_stages") or {}).items():
            gpu.setdefault(name, []).append(ms)
    if gpu:
        summary["gpu_stages"] = {name: _stats(np.array(gpu[name], dtype=np.float64)) for name in stages if name in gpu}
    latencies = [float(rec["latency_ms"]) for rec in records if rec.get("latency_ms") is not None]
    if latencies:
        summary["latency"] = _stats(np.array(latencies, dtype=np.float64))
        summary["latency"]["frames"] = len(latencies)
    summary.update(extra)
    return summary


def _jsonable(obj):
    """json.dump fallback: numpy scalars and arrays become plain Python numbers and lists."""
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    raise TypeError("%r (%s) cannot be written to a report" % (obj, type(obj).__name__))


# The largest integer magnitude a report may hold: JSON readers that parse numbers as doubles (JavaScript, jq)
# lose exactness above it, so a larger count is a bug or a peer's lie, never a measurement.
MAX_JSON_INT = 2 ** 53


def check_report_values(value, where="report"):
    """Raise ValueError unless ``value`` is plain, strict JSON: dicts with string keys, lists, strings, booleans,
    None, finite floats and integers within +-2**53 (numpy scalars and arrays count as their Python values).

    ``json.dumps`` alone would write NaN and Infinity, which are not JSON (``json.loads`` elsewhere, ``jq`` and
    browsers refuse the whole file); the message names where in the report the bad value is.
    """
    if isinstance(value, (np.generic, np.ndarray)):
        value = value.tolist()
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError("%s has a key %r that is not a string" % (where, key))
            check_report_values(item, "%s.%s" % (where, key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_report_values(item, "%s[%d]" % (where, i))
    elif isinstance(value, bool) or value is None or isinstance(value, str):
        pass
    elif isinstance(value, int):
        if not -MAX_JSON_INT <= value <= MAX_JSON_INT:
            raise ValueError("%s is %d, beyond the integers JSON readers hold exactly (+-2**53): a bug, or a "
                             "number from the network that was not checked" % (where, value))
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("%s is %r, which JSON cannot hold (a report may only hold finite numbers)"
                             % (where, value))
    else:
        raise ValueError("%s is %r (%s), which cannot be written to a report" % (where, value, type(value).__name__))


def write_report(path, summary, records, meta=None):
    """Write ``{**summary, kind, version, meta, records}`` as JSON to ``path`` atomically, creating parent dirs.

    Checked with :func:`check_report_values` first: a NaN, an infinity or an integer beyond 2**53 raises
    ValueError (naming where it is) and nothing is written, rather than a file no strict JSON reader accepts.
    """
    report = dict(summary)
    report.update(kind=REPORT_KIND, version=REPORT_VERSION, meta=dict(meta or {}), records=list(records))
    check_report_values(report)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, default=_jsonable, allow_nan=False)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_report(path):
    """Read a report written by :func:`write_report`; ConfigError if missing, not JSON or not a latentlink report."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except FileNotFoundError:
        raise ConfigError("report file '%s' does not exist; %s" % (path, _HOW_TO_MAKE))
    except OSError as e:
        raise ConfigError("cannot read report file '%s' (%s); %s" % (path, e.strerror or e, _HOW_TO_MAKE))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise ConfigError("report file '%s' is not JSON (%s); %s" % (path, e, _HOW_TO_MAKE))
    if not isinstance(report, dict) or report.get("kind") != REPORT_KIND:
        raise ConfigError("'%s' is not a latentlink report (no \"kind\": \"%s\"); %s"
                          % (path, REPORT_KIND, _HOW_TO_MAKE))
    if report.get("version") != REPORT_VERSION:
        raise ConfigError("'%s' is a latentlink report of version %r, this latentlink reads version %d; "
                          "read it with the latentlink that wrote it, or %s"
                          % (path, report.get("version"), REPORT_VERSION, _HOW_TO_MAKE))
    missing = [k for k in _SUMMARY_KEYS if k not in report]
    if missing or not isinstance(report.get("stages"), dict):
        raise ConfigError("latentlink report '%s' is damaged (missing or bad: %s); %s"
                          % (path, ", ".join(missing) or "stages", _HOW_TO_MAKE))
    return report


def format_table(summary, title=""):
    """The per-stage table: median, p95, max (ms) and the median's share of the budget (% and a '#' bar).

    When the summary has CUDA-event times (``gpu_stages``), a ``CUDA med`` column shows their median beside the
    wall clock, like jetson-inference's ``CPU x ms  CUDA y ms`` rows; ``-`` where a stage has none.
    """
    stages = summary.get("stages") or {}
    gpu = summary.get("gpu_stages") if isinstance(summary.get("gpu_stages"), dict) else {}
    names = [n for n in stages if n != "total"] + (["total"] if "total" in stages else [])
    budget = float(summary.get("budget_ms") or 0.0)
    w = max([len("budget") + 2, 15] + [len(n) + 2 for n in names])
    lines = [title] if title else []
    lines.append("stage".ljust(w) + " frames  median ms   p95 ms   max ms" + (" CUDA med" if gpu else "") +
                 "   budget share")
    for name in names:
        st = stages[name]
        median = float(st.get("median_ms", 0.0))
        share = 100.0 * median / budget if budget > 0 else 0.0
        bar = "#" * int(round(min(share, 100.0) * BAR_WIDTH / 100.0))
        cuda = ""
        if gpu:
            cuda = "%9.2f" % float(gpu[name].get("median_ms", 0.0)) if name in gpu else "%9s" % "-"
        count = st.get("frames", summary.get("frames", 0))
        row = "%s%7s%11.2f%9.2f%9.2f%s%9.1f%%  %s" % (name.ljust(w), count, median, float(st.get("p95_ms", 0.0)),
                                                      float(st.get("max_ms", 0.0)), cuda, share, bar)
        lines.append(row.rstrip())
    lines.append("%s%7s%11.2f%s%18s%9.1f%%" % ("budget".ljust(w), "", budget, " " * 9 if gpu else "", "", 100.0))
    latency = summary.get("latency")
    if isinstance(latency, dict):
        lines.append("%s%7s%11.2f%9.2f%9.2f   capture to decoded (glass to glass)" % (
            "latency".ljust(w), latency.get("frames", ""), float(latency.get("median_ms", 0.0)),
            float(latency.get("p95_ms", 0.0)), float(latency.get("max_ms", 0.0))))
    frames, over = int(summary.get("frames", 0)), int(summary.get("over_budget", 0))
    lines.append("over budget: %d of %d frames (%.1f%%)" % (over, frames, 100.0 * over / frames if frames else 0.0))
    lines.append("fps {:.1f} \u00b7 T200 {:.2f} s \u00b7 {:,.0f} bytes/frame on the wire \u00b7 dropped {:d}".format(
        float(summary.get("fps", 0.0)), float(summary.get("t200_s", 0.0)),
        float(summary.get("bytes_per_frame", 0.0)), int(summary.get("dropped", 0))))
    outcomes = summary.get("outcomes")
    if isinstance(outcomes, dict):
        lines.append("frames: %s captured = %s" % (summary.get("captured", sum(outcomes.values())), " + ".join(
            "%d %s" % (n, name) for name, n in outcomes.items())))
    for key in ("refused", "gave_up"):
        if summary.get(key):
            value = summary[key]
            lines.append("%s: %s" % (key.replace("_", " "), value.get("message") if isinstance(value, dict) else value))
    notes = summary.get("notes")
    if isinstance(notes, dict):
        lines.extend("note: %s: %s" % (stage, text) for stage, text in notes.items())
    elif notes:
        lines.append("note: %s" % notes)
    return "\n".join(lines)


def report_title(report):
    """A loaded report's title from its ``meta``: ``role 'stream' (profile, backend, source)``; "" without meta."""
    meta = report.get("meta") or {}
    words = [str(meta["role"])] if meta.get("role") else []
    if meta.get("stream"):
        words.append("'%s'" % meta["stream"])
    details = [str(meta[k]) for k in ("profile", "backend", "source") if meta.get(k)]
    if details:
        words.append("(%s)" % ", ".join(details))
    return " ".join(words)


def format_report(report):
    """The table of a loaded report, titled by :func:`report_title`."""
    return format_table(report, title=report_title(report))


def _emit(text, stream):
    """Print ``text``, degrading characters the console cannot encode (a C locale on the Nano) instead of failing."""
    encoding = getattr(stream, "encoding", None) or "ascii"
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        text = text.replace("\u00b7", "-").encode(encoding, "replace").decode(encoding)
    except LookupError:
        pass
    print(text, file=stream)


def main(argv=None):
    """``latentlink report FILE.json [FILE.json ...] [--plot OUT.png] [--csv OUT.csv]``: print the table of each
    report, and draw or flatten them (:mod:`latentlink.report_views`); 2 on a bad file or option."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) > 1 and argv[0] == "report":  # accept the sub-command word as well
        argv = argv[1:]
    parser = argparse.ArgumentParser(
        prog="latentlink report", description="Print the per-stage timing table of latentlink reports.",
        epilog="examples:\n  latentlink report runs/edge.json runs/host.json\n"
               "  latentlink report runs/edge.json runs/host.json --plot runs/report.png --csv runs/frames.csv",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", metavar="FILE.json",
                        help="a report written by `latentlink edge --report` or `latentlink host --report`")
    parser.add_argument("--plot", metavar="OUT.png",
                        help="also draw one report, or an edge and a host report of one stream joined by seq: "
                             "per-frame stage times against the budget, per-stage distributions, latency and "
                             "outcomes (needs matplotlib: a host-side option)")
    parser.add_argument("--csv", metavar="OUT.csv",
                        help="also write the per-frame records as CSV, one row per frame (edge_* and host_* "
                             "columns when an edge and a host report are given)")
    args = parser.parse_args(argv)
    status = 0
    reports = []
    for i, path in enumerate(args.files):
        try:
            report = load_report(path)
            table = format_report(report)
        except LatentlinkError as e:
            _emit("error: %s" % e, sys.stderr)
            status = 2
            continue
        reports.append(report)
        _emit(("\n" if i else "") + table, sys.stdout)
    if (args.plot or args.csv) and status:
        _emit("error: nothing drawn or written (--plot, --csv): a report above could not be read", sys.stderr)
    elif args.plot or args.csv:
        try:  # host-side and imported only here: the Nano prints its tables without it (and without matplotlib)
            from latentlink.report_views import write_views

            for kind, path in write_views(reports, args.files, plot=args.plot, csv_path=args.csv):
                _emit("%s: %s" % (kind, path), sys.stdout)  # each file as soon as it is written
        except LatentlinkError as e:
            _emit("error: %s" % e, sys.stderr)
            return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
