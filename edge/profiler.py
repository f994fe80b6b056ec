"""Per-frame, per-stage timing against a frame budget, and the reports built from it.

The edge and the host time every frame stage by stage with a :class:`FrameTimer` (milliseconds, measured with the
monotonic ``time.perf_counter``). A run's summary (min/median/mean/p95/p99/max per stage and for the frame total) is
built in bounded memory as frames complete: :class:`FrameStats` keeps one :class:`Distribution` per stage, never the
frames themselves, so an edge or a host that runs for days uses the same memory on day three as after a minute.
:func:`summarize` gives the same summary from a list of records.

With ``--report FILE``, :class:`ReportWriter` appends each frame's record to the file as the frame completes and
the summary at the end; the finished file is one JSON document, and one whose writer was killed is still read,
up to its last complete record, by :func:`load_report`. :func:`format_table` prints the table a human reads
(``latentlink report FILE.json``).

Runs on Python 3.6 with numpy 1.19 (Jetson Nano) as well as on current Python and numpy: stdlib and numpy only.
"""

import io
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time

import numpy as np

from .errors import ConfigError, LatentlinkError

# entropy: the optional lossless coding of the packed payload; reports of runs without a coder leave it out.
EDGE_STAGES = ("capture", "preprocess", "encode", "gpu_to_cpu", "serialize", "entropy", "send")
# postfilter: the optional network run on decoded frames (host --postfilter); reports of runs without one leave it out.
HOST_STAGES = ("receive", "deserialize", "decode", "postfilter", "write")


def host_stages(postfilter):
    """The stages the host times: :data:`HOST_STAGES`, without ``postfilter`` when it runs none (falsy)."""
    return HOST_STAGES if postfilter else tuple(s for s in HOST_STAGES if s != "postfilter")


REPORT_KIND = "latentlink-report"
REPORT_VERSION = 1
BAR_WIDTH = 20  # characters of '#' for 100 % of the budget

# A distribution keeps its values, and its percentiles are exact, up to EXACT_VALUES of them; from then on it
# counts them in a histogram of log-spaced buckets from HISTOGRAM_LOW_MS up, each HISTOGRAM_RATIO times as wide as
# the one before (2 %): a percentile read from it is within 1 % of the true one (see Distribution).
EXACT_VALUES = 1000
HISTOGRAM_LOW_MS = 0.001  # 1 us: the resolution of the records (3 decimals of a millisecond)
HISTOGRAM_HIGH_MS = 1e8  # about 28 hours; longer times share the last bucket (where the exact max bounds them)
HISTOGRAM_RATIO = 1.02
_LOG_RATIO = math.log(HISTOGRAM_RATIO)
HISTOGRAM_BUCKETS = 2 + int(math.ceil(math.log(HISTOGRAM_HIGH_MS / HISTOGRAM_LOW_MS) / _LOG_RATIO))  # 1,282

_STAT_KEYS = ("min_ms", "median_ms", "mean_ms", "p95_ms", "p99_ms", "max_ms")
_SUMMARY_KEYS = ("frames", "budget_ms", "over_budget", "fps", "t200_s", "bytes_per_frame", "dropped", "stages")
_RESERVED = frozenset(_SUMMARY_KEYS + ("gpu_stages", "latency", "iterations", "kind", "version", "meta", "records",
                                       "started"))
log = logging.getLogger("latentlink.report")
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
        self.stages[self._name] = self.stages.get(self._name, 0.0) + ms
        self._name = None  # last: a thread that sees the stage closed (see ``timing``) must also see its time
        return False

    @property
    def timing(self):
        """True while a stage is open. The edge's ``send`` is timed in the sender's thread, and the host's ACK may
        settle the frame before that thread closed the stage: its record waits until it is closed."""
        return self._name is not None

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


def _ordered_stats(lo, p50, mean, p95, p99, hi):
    """The stat dict (ms, 3 decimals), guarding the order against last-ulp float noise and the histogram's
    approximation: min <= median <= p95 <= p99 <= max, min <= mean <= max."""
    p50 = min(max(p50, lo), hi)
    p95 = min(max(p95, p50), hi)
    p99 = min(max(p99, p95), hi)
    mean = min(max(mean, lo), hi)
    return dict(zip(_STAT_KEYS, (_r(lo), _r(p50), _r(mean), _r(p95), _r(p99), _r(hi))))


class Distribution(object):
    """Streaming statistics of one quantity (milliseconds) in bounded memory: count, min, max, mean and the
    median, p95 and p99.

    ``count``, ``min``, ``max`` and the mean (a running sum over the count) are exact. The percentiles are exact
    (numpy's linear interpolation between order statistics) while there are at most :data:`EXACT_VALUES` values:
    those are kept. Beyond that the values are counted in :data:`HISTOGRAM_BUCKETS` log-spaced buckets (about
    10 KiB, whatever the count): bucket ``i >= 1`` holds ``[LOW * RATIO**(i-1), LOW * RATIO**i)`` with ``LOW`` = 1 us
    and ``RATIO`` = 1.02, bucket 0 everything under 1 us (negative values too), the last everything from about 28 h
    up. A percentile is then interpolated between the geometric middles of the buckets of the two order statistics
    it lies between, and clamped to [min, max]: it is within 1 % (sqrt(1.02) - 1) of the exact value, and within
    1 us of it below 1 us. Deterministic: the same values in any order give the same figures.
    """

    __slots__ = ("count", "total", "min", "max", "_values", "_buckets")

    def __init__(self):
        self.count = 0
        self.total = 0.0  # ms: the exact mean is total / count
        self.min = self.max = 0.0
        self._values = []  # every value while count <= EXACT_VALUES, then None
        self._buckets = None  # the histogram's counts (int64) once the values are dropped

    def add(self, ms):
        ms = float(ms)
        if self.count == 0:
            self.min = self.max = ms
        elif ms < self.min:
            self.min = ms
        elif ms > self.max:
            self.max = ms
        self.count += 1
        self.total += ms
        if self._values is not None:
            self._values.append(ms)
            if len(self._values) <= EXACT_VALUES:
                return
            self._buckets = np.zeros(HISTOGRAM_BUCKETS, dtype=np.int64)
            for value in self._values:
                self._buckets[_bucket(value)] += 1
            self._values = None
        else:
            self._buckets[_bucket(ms)] += 1

    @property
    def exact(self):
        """True while the percentiles are exact (at most :data:`EXACT_VALUES` values)."""
        return self._values is not None

    def stats(self):
        """``{min_ms, median_ms, mean_ms, p95_ms, p99_ms, max_ms}`` (ms, 3 decimals); zeros when empty."""
        if self.count == 0:
            return dict.fromkeys(_STAT_KEYS, 0.0)
        if self._values is not None:
            p50, p95, p99 = (float(p) for p in np.percentile(np.array(self._values), [50.0, 95.0, 99.0]))
        else:
            p50, p95, p99 = (self._percentile(q) for q in (50.0, 95.0, 99.0))
        return _ordered_stats(self.min, p50, self.total / self.count, p95, p99, self.max)

    def _percentile(self, q):
        # numpy's "linear" definition: position q/100 * (count - 1) among the sorted values, 0-based.
        position = q / 100.0 * (self.count - 1)
        below = int(math.floor(position))
        cumulative = np.cumsum(self._buckets)
        low, high = (self._middle(int(np.searchsorted(cumulative, rank, side="right"))) for rank in
                     (below, min(below + 1, self.count - 1)))
        return low + (position - below) * (high - low)

    def _middle(self, bucket):
        """The value standing for a bucket: its geometric middle, within [min, max]."""
        if bucket == 0:
            value = 0.0
        else:
            value = HISTOGRAM_LOW_MS * math.exp((bucket - 0.5) * _LOG_RATIO)
        return min(max(value, self.min), self.max)


def _bucket(ms):
    """The histogram bucket of ``ms`` (see :class:`Distribution`)."""
    if ms < HISTOGRAM_LOW_MS:
        return 0
    if not ms < HISTOGRAM_HIGH_MS:  # also inf and NaN, which math.log cannot place: a time must never crash a run
        return HISTOGRAM_BUCKETS - 1
    return min(1 + int(math.log(ms / HISTOGRAM_LOW_MS) / _LOG_RATIO), HISTOGRAM_BUCKETS - 1)


class FrameStats(object):
    """A run's summary, aggregated one frame record at a time in bounded memory (a few hundred KiB at most).

    ``add(record)`` takes a :meth:`FrameTimer.record` dict; ``summary(wall_s, dropped, extra)`` gives the dict
    :func:`summarize` documents. Frame counts, ``over_budget``, ``bytes_per_frame`` and every min, max and mean are
    exact; medians, p95 and p99 are exact up to :data:`EXACT_VALUES` frames and within 1 % beyond (see
    :class:`Distribution`). Not thread-safe: the host adds under its lock.
    """

    def __init__(self, stages, budget_ms):
        self.stages = tuple(stages)
        if "total" in self.stages:
            raise ValueError("'total' is computed by summarize; it cannot be a stage name")
        self.budget_ms = float(budget_ms)
        self.frames = 0
        self.over_budget = 0
        self.bytes_total, self.bytes_frames = 0.0, 0  # bytes on the wire, over the frames that say
        self._stages = dict((name, Distribution()) for name in self.stages)
        self._total = Distribution()  # the sum of a frame's stage times
        self._gpu = {}  # stage -> Distribution of its CUDA-event times, once a record has one
        self._latency = Distribution()
        self._iterations = {}  # a progressive model's iterations per frame -> [frames, bytes of those that say]

    def add(self, record):
        rec_stages = record.get("stages") or {}
        total = 0.0
        for name in self.stages:
            if name in rec_stages:
                ms = float(rec_stages[name])
                self._stages[name].add(ms)
                total += ms
        self._total.add(total)
        self.frames += 1
        if total > self.budget_ms:
            self.over_budget += 1
        if "bytes" in record:
            self.bytes_total += float(record["bytes"])
            self.bytes_frames += 1
        for name, ms in (record.get("gpu_stages") or {}).items():
            if name in self._stages:  # only the run's stages: a bounded set of names
                if name not in self._gpu:
                    self._gpu[name] = Distribution()
                self._gpu[name].add(ms)
        if record.get("latency_ms") is not None:
            self._latency.add(record["latency_ms"])
        k = record.get("iterations")
        if isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= 64:  # protocol.MAX_ITERATIONS: bounded
            counts = self._iterations.setdefault(k, [0, 0.0])
            counts[0] += 1
            counts[1] += float(record.get("bytes", 0.0))

    def summary(self, wall_s, dropped=0, extra=None):
        """The summary dict; ``wall_s``: seconds the frames took (fps = frames / wall_s); ``extra``: more keys."""
        extra = dict(extra or {})
        clash = sorted(_RESERVED.intersection(extra))
        if clash:
            raise ValueError("extra keys %s are reserved by the report format" % ", ".join(clash))
        fps = self.frames / float(wall_s) if self.frames and wall_s > 0 else 0.0
        stats = {}
        for name in self.stages:
            stats[name] = self._stages[name].stats()
            stats[name]["frames"] = self._stages[name].count
        stats["total"] = self._total.stats()
        stats["total"]["frames"] = self.frames
        summary = {
            "frames": self.frames,
            "budget_ms": _r(self.budget_ms),
            "over_budget": self.over_budget,
            "fps": _r(fps),
            "t200_s": _r(200.0 / fps) if fps > 0 else 0.0,
            "bytes_per_frame": _r(self.bytes_total / self.bytes_frames) if self.bytes_frames else 0.0,
            "dropped": int(dropped),
            "stages": stats,
        }
        if self._gpu:
            summary["gpu_stages"] = dict((name, self._gpu[name].stats()) for name in self.stages if name in self._gpu)
        if self._latency.count:
            summary["latency"] = self._latency.stats()
            summary["latency"]["frames"] = self._latency.count
        if self._iterations:
            summary["iterations"] = self._iteration_stats()
        summary.update(extra)
        return summary


    def _iteration_stats(self):
        """A progressive model's iterations per frame: ``frames``, ``mean``, ``min``, ``max``, and ``by_iterations``
        ({"k": {"frames", "bytes_per_frame"}}, JSON keys) for the frames whose records say them."""
        frames = sum(n for n, _ in self._iterations.values())
        return {"frames": frames, "mean": _r(sum(k * n for k, (n, _) in self._iterations.items()) / float(frames)),
                "min": min(self._iterations), "max": max(self._iterations),
                "by_iterations": dict((str(k), {"frames": n, "bytes_per_frame": _r(b / n)})
                                      for k, (n, b) in sorted(self._iterations.items()))}


def summarize(records, stages, budget_ms, wall_s, dropped=0, extra=None):
    """Summarize FrameTimer records: per-stage and total stats (ms), frames over ``budget_ms``, fps over ``wall_s``.

    A stage's statistics are over the frames that ran it, and its ``frames`` says how many did (on the edge, a
    frame dropped before ``send`` has no send time: that column shows the drops); a frame's total is the sum of
    the stage times it has. Where records carry ``gpu_stages`` (CUDA-event times), the summary gets ``gpu_stages``:
    the same statistics for each such stage, over the frames that have it. Where records carry ``latency_ms``
    (capture to decoded), the summary gets ``latency``: its statistics over those frames. The keys of ``extra``
    (notes, stream, backend, ...) are appended after the fixed keys.

    The same figures as a :class:`FrameStats` fed the same records, which is how it computes them: percentiles
    exact up to :data:`EXACT_VALUES` frames, within 1 % beyond; counts, min, max and means exact.
    """
    stats = FrameStats(stages, budget_ms)
    for record in records:
        stats.add(record)
    return stats.summary(wall_s, dropped, extra)


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


class ReportWriter(object):
    """Writes a report while the run goes: each frame's record reaches the file (flushed) as the frame completes,
    so nothing per frame is kept in memory, and a run that is killed leaves a report readable up to its last
    complete record.

    The file is one JSON document once :meth:`finish` wrote the summary, laid out one line per part::

        {"kind": "latentlink-report", "version": 1, "started": {"stages": [...], "budget_ms": 33.0, ...}, "records": [
        {"seq": 0, "stages": {...}, ...}
        ,{"seq": 1, "stages": {...}, ...}
        ], "frames": 2, "budget_ms": 33.0, ..., "meta": {...}}

    ``stages``: the stage names the run times; ``budget_ms``: its frame budget (ms); ``meta``: what describes the
    run at its start (role, stream, profile, backend...). They make ``started``, what was known when the run began:
    what :func:`load_report` needs to summarize the records of a report that never got its summary line. ``add`` may be
    called from any thread. A write that fails (disk full) is logged once and ends the report there; the run goes
    on (:attr:`error` holds the exception).
    """

    def __init__(self, path, stages, budget_ms, meta=None):
        self.path = os.fspath(path)
        self.records = 0
        self.error = None
        self._lock = threading.Lock()
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._file = io.open(self.path, "w", encoding="utf-8")
        except OSError as exc:  # at the start of the run, not after it
            raise ConfigError("cannot write the report '%s' (%s); pick another --report path"
                              % (self.path, exc.strerror or exc))
        head = {"kind": REPORT_KIND, "version": REPORT_VERSION,
                "started": {"stages": list(stages), "budget_ms": _r(budget_ms), "meta": dict(meta or {})}}
        with self._lock:
            self._write(json.dumps(head, default=_jsonable)[:-1] + ', "records": [\n')

    def add(self, record):
        """Append one frame's record (a dict) to the file. A record that strict JSON cannot hold (a NaN, an
        infinity, an integer beyond 2**53: :func:`check_report_values`) is logged and left out, never written."""
        try:
            check_report_values(record, "record")
            line = json.dumps(record, default=_jsonable, allow_nan=False)
        except ValueError as exc:
            log.error("report %s: a frame's record left out: %s", self.path, exc)
            return
        with self._lock:
            self._write(("," if self.records else "") + line + "\n")
            self.records += 1

    def finish(self, summary, meta=None):
        """Write the summary (and the final ``meta``: e.g. peak memory, known only now) and close the file."""
        tail = dict((k, v) for k, v in summary.items() if k not in ("kind", "version", "started", "records", "meta"))
        tail["meta"] = dict(meta or {})
        check_report_values(tail, "summary")  # a summary strict JSON cannot hold is a bug: raise, do not write it
        with self._lock:
            self._write("], " + json.dumps(tail, default=_jsonable, allow_nan=False)[1:] + "\n")
            self._close()

    def close(self):
        """Close the file without a summary (the run failed): it reads as an unfinished report."""
        with self._lock:
            self._close()

    def _write(self, text):
        """Under the lock."""
        if self._file is None:
            return
        try:
            self._file.write(text)
            self._file.flush()  # to the OS at once: a killed process loses no complete record
        except (OSError, ValueError) as exc:
            self.error = exc
            log.error("cannot write the report %s (%s): it stops after %d records; the run goes on", self.path, exc,
                      self.records)
            self._close()

    def _close(self):
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                self.error = self.error or exc
            self._file = None


def write_report(path, summary, records, meta=None):
    """Write a whole report at once (the layout :class:`ReportWriter` streams) to ``path`` atomically, creating
    parent dirs; OSError if it cannot be written. Checked with :func:`check_report_values` first: a NaN, an
    infinity or an integer beyond 2**53 raises ValueError (naming where it is) and nothing is written."""
    path = os.fspath(path)
    records = list(records)
    whole = dict(summary)
    whole.update(meta=dict(meta or {}), records=records)
    check_report_values(whole, "report")
    stages = [name for name in summary.get("stages") or {} if name != "total"]

    def write(tmp):
        writer = ReportWriter(tmp, stages, summary.get("budget_ms", 0.0), meta)
        for record in records:
            writer.add(record)
        writer.finish(summary, meta)
        if writer.error is not None:
            raise writer.error

    replace_atomically(path, write)


def replace_atomically(path, write):
    """Make ``path`` (creating its folder) by ``write(tmp_path)`` into a temporary file beside it, then rename: a
    reader sees the old file or the whole new one, never half of one. The temporary file goes if ``write`` fails."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_report(path, records=True):
    """Read a report; ConfigError if missing, not JSON, not a latentlink report, or damaged.

    Returns the summary's keys with ``kind``, ``version``, ``meta`` and (``records`` True) the list of per-frame
    ``records``. Reads the layout :class:`ReportWriter` writes and the single JSON document earlier latentlinks
    wrote. A report whose writer stopped before its summary (killed, or still running) is read up to its last
    complete record: its summary is then recomputed from those records (``unfinished`` is True and ``notes`` says
    what cannot be known: fps, the frames not yet settled, the host's per-stream counts).
    """
    path = os.fspath(path)
    try:
        with io.open(path, "rb") as f:
            head = _streamed_head(f.readline())
            if head is None:  # one JSON document written at once (latentlink before streamed reports)
                f.seek(0)
                report = json.load(f)
                _check_report(report, path)
            else:
                report = _read_streamed(f, head, path, records)
    except FileNotFoundError:
        raise ConfigError("report file '%s' does not exist; %s" % (path, _HOW_TO_MAKE))
    except OSError as e:
        raise ConfigError("cannot read report file '%s' (%s); %s" % (path, e.strerror or e, _HOW_TO_MAKE))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise ConfigError("report file '%s' is not JSON (%s); %s" % (path, e, _HOW_TO_MAKE))
    if not records:
        report.pop("records", None)
    return report


def _check_report(report, path):
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


def _streamed_head(line):
    """The header dict of a report :class:`ReportWriter` wrote (its first line), else None."""
    if not line.endswith(b'"records": [\n'):
        return None
    try:
        head = json.loads(line[:-1].decode("utf-8") + "]}")
    except ValueError:
        return None
    return head if isinstance(head, dict) and head.get("kind") == REPORT_KIND else None


def _read_streamed(f, head, path, keep_records):
    """The rest of a streamed report (``f`` is past its first line): a first pass finds the summary line without
    parsing the records; a second parses them when they are wanted, or when the summary must be recomputed."""
    if head.get("version") != REPORT_VERSION:
        _check_report(head, path)  # raises: the version message
    body = f.tell()
    count, tail, cut = 0, None, False
    for line in f:
        if not line.endswith(b"\n"):
            cut = True  # the writer was killed in the middle of this line
            break
        if line.startswith(b"]"):
            tail = line
            break
        count += 1
    started = head.get("started") if isinstance(head.get("started"), dict) else {}
    recount = None
    if tail is not None:
        try:
            summary = json.loads(b"{" + tail[2:] if tail.startswith(b"],") else b"{}")
        except ValueError:
            summary, cut = None, True  # a summary line cut short is no summary
    else:
        summary = None
    if summary is None:
        recount = FrameStats(started.get("stages") or (), started.get("budget_ms") or 0.0)
    report = dict(kind=head["kind"], version=head["version"], started=started, records=[])
    if keep_records or recount is not None:
        f.seek(body)
        dropped = 0
        for number in range(count):
            line = f.readline()
            try:
                record = json.loads(line[1:] if line.startswith(b",") else line)
            except ValueError as e:
                raise ConfigError("latentlink report '%s' is damaged (line %d: %s); %s"
                                  % (path, number + 2, e, _HOW_TO_MAKE))
            if keep_records:
                report["records"].append(record)
            if recount is not None:
                recount.add(record)
                dropped += record.get("outcome") == "dropped"
    if summary is None:
        summary = recount.summary(0.0, dropped, extra={"unfinished": True, "notes": {"report": (
            "unfinished: the writer stopped before the summary (killed, or still running); this summary is "
            "recomputed from the %d complete records%s; frames not settled by then, fps and the host's per-stream "
            "counts are unknown" % (count, " (the last line was cut short)" if cut else ""))}})
        summary["meta"] = started.get("meta") or {}
    report.update(summary)
    _check_report(report, path)
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
    iterations = summary.get("iterations")
    if isinstance(iterations, dict):
        lines.append("iterations per frame: mean %.2f, min %s, max %s over %s frames (%s)" % (
            float(iterations.get("mean", 0.0)), iterations.get("min"), iterations.get("max"),
            iterations.get("frames"), ", ".join("%s: %s" % (k, v.get("frames")) for k, v in (
                iterations.get("by_iterations") or {}).items() if isinstance(v, dict))))
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


def emit(text, stream=None):
    """Print ``text``, degrading characters the console cannot encode (a C locale on the Nano) instead of failing."""
    stream = sys.stdout if stream is None else stream
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
    from .cli import ArgumentParser, UsageError  # errors on one line, like every command's

    parser = ArgumentParser(
        prog="latentlink report", description="Print the per-stage timing table of latentlink reports.",
        epilog="examples:\n  latentlink report runs/edge.json runs/host.json\n"
               "  latentlink report runs/edge.json runs/host.json --plot runs/report.png --csv runs/frames.csv")
    parser.add_argument("files", nargs="+", metavar="FILE.json",
                        help="a report written by `latentlink edge --report` or `latentlink host --report`")
    parser.add_argument("--plot", metavar="OUT.png",
                        help="also draw one report, or an edge and a host report of one stream joined by seq: "
                             "per-frame stage times against the budget, per-stage distributions, latency and "
                             "outcomes (needs matplotlib: a host-side option)")
    parser.add_argument("--csv", metavar="OUT.csv",
                        help="also write the per-frame records as CSV, one row per frame (edge_* and host_* "
                             "columns when an edge and a host report are given)")
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        emit("error: %s" % e, sys.stderr)
        return 2
    status = 0
    reports = []
    for i, path in enumerate(args.files):
        try:
            report = load_report(path, records=bool(args.plot or args.csv))
            table = format_report(report)
        except LatentlinkError as e:
            emit("error: %s" % e, sys.stderr)
            status = 2
            continue
        reports.append(report)
        emit(("\n" if i else "") + table, sys.stdout)
    if (args.plot or args.csv) and status:
        emit("error: nothing drawn or written (--plot, --csv): a report above could not be read", sys.stderr)
    elif args.plot or args.csv:
        try:  # host-side and imported only here: the Nano prints its tables without it (and without matplotlib)
            from latentlink.report_views import write_views

            for kind, path in write_views(reports, args.files, plot=args.plot, csv_path=args.csv):
                emit("%s: %s" % (kind, path), sys.stdout)  # each file as soon as it is written
        except LatentlinkError as e:
            emit("error: %s" % e, sys.stderr)
            return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
