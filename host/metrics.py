"""Prometheus metrics of a running host (``latentlink host --metrics HOST:PORT``), for dashboards and alerts.

Served at ``http://HOST:PORT/metrics`` by ``prometheus_client`` (the ``[host]`` extra), from a registry of this
host's own (never the process-wide default one, so that several hosts, e.g. in tests, do not collide). Every name
starts with ``latentlink_``:

=================================================  =========  =====================================================
``latentlink_frames_decoded_total{stream}``        counter    frames decoded, per stream
``latentlink_frames_failed_total{stream}``         counter    frames received but not decoded or written
``latentlink_frames_dropped_total{stream}``        counter    sequence numbers never received (dropped or lost by
                                                              the edge: the summary's gaps)
``latentlink_frames_duplicate_total{stream}``      counter    resent frames already handled (not decoded again)
``latentlink_stream_connected{stream}``            gauge      1 while the stream's edge is connected
``latentlink_streams_unlisted``                    gauge      streams the host counts but the per-stream metrics
                                                              leave out (beyond ``max_streams``)
``latentlink_protocol_errors_total``,              counter    connections closed for a bad message, frames failed
``latentlink_write_errors_total``,                            by an output, connections refused (limits) and
``latentlink_refused_connections_total``,                     closed for silence
``latentlink_timeouts_total``
``latentlink_queue_depth``, ``_queue_capacity``    gauge      frames waiting to be decoded, and the most that may
``latentlink_batches_total{size}``                 counter    decoder batches, by batch size (frames)
``latentlink_stage_milliseconds{stage}``           histogram  each decoded frame's host stages (receive,
                                                              deserialize, decode, write), ms
``latentlink_latency_milliseconds``                histogram  capture (edge clock) to decoded, ms
=================================================  =========  =====================================================

A fleet (README: Fleets) adds its own, on the same kind of endpoint: a gateway (``latentlink host --jetstream
--metrics``) ``latentlink_gateway_frames_stored_total{stream}``, ``_duplicates_total{stream}`` (resends the broker
dropped), ``latentlink_gateway_publish_retries_total`` and ``_too_large_total`` (:class:`GatewayCollector`); a worker
(``latentlink worker --metrics``) ``latentlink_worker_frames_total{stream,outcome}`` (written, duplicate: already
written by a worker, failed, terminated: bad bytes), ``latentlink_worker_redelivered_total``,
``latentlink_worker_batches_total``, the stage and latency histograms above, and the broker's backlog as it last saw it:
``latentlink_jetstream_messages``, ``_bytes``, ``_ack_pending``, ``_redelivered`` (:class:`WorkerCollector`).

Counts and gauges are read from ``Host.snapshot()`` at each scrape (:class:`HostCollector`); the histograms are fed
by a record listener (:meth:`Metrics.add_record`). The per-stream metrics list at most ``max_streams`` streams
(:data:`MAX_STREAMS`): the connected ones, then the most recently connected. The host keeps the counts of up to
``Host.max_stream_stats`` (10,000) streams, and every edge picks its stream's name: without a bound, edges (or anyone,
on a host without credentials) could make a scrape tens of thousands of series, which Prometheus stores for weeks.
"""

import logging

from latentlink.edge.errors import ConfigError
from latentlink.edge.profiler import HOST_STAGES

from .view import http_url

log = logging.getLogger("latentlink.host")
STAGE_BUCKETS_MS = (0.25, 0.5, 1, 2, 5, 10, 20, 33, 50, 100, 200, 500, 1000)
LATENCY_BUCKETS_MS = (5, 10, 20, 33, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
MAX_STREAMS = 100  # streams the per-stream metrics list (label values per metric)


def _prometheus():
    try:
        import prometheus_client
    except ImportError:
        raise ConfigError("--metrics needs the prometheus_client package: pip install prometheus_client (the "
                          "[host] extra installs it)")
    return prometheus_client


class HostCollector(object):
    """A prometheus_client collector of the counts and gauges of ``snapshot()`` (``Host.snapshot``), listing at
    most ``max_streams`` streams."""

    def __init__(self, snapshot, max_streams=MAX_STREAMS):
        self.snapshot = snapshot
        self.max_streams = max_streams

    def describe(self):
        return []  # nothing to check against other collectors: the registry is this host's own

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self.snapshot()
        streams = listed_streams(snap["streams"], self.max_streams)
        per_stream = (("decoded", "frames_decoded", "frames decoded"),
                      ("failed", "frames_failed", "frames received but not decoded or not written"),
                      ("gaps", "frames_dropped", "sequence numbers never received (dropped or lost by the edge)"),
                      ("duplicates", "frames_duplicate", "resent frames already handled, not decoded again"))
        for key, name, doc in per_stream:
            family = CounterMetricFamily("latentlink_" + name, doc, labels=["stream"])
            for stream, counts in streams:
                family.add_metric([stream], counts[key])
            yield family
        connected = GaugeMetricFamily("latentlink_stream_connected", "1 while the stream's edge is connected",
                                      labels=["stream"])
        for stream, counts in streams:
            connected.add_metric([stream], 1 if counts["connected"] else 0)
        yield connected
        yield GaugeMetricFamily("latentlink_streams_unlisted", "streams the per-stream metrics leave out (their "
                                "number is bounded)", value=len(snap["streams"]) - len(streams))
        for key, doc in (("protocol_errors", "connections closed for a malformed or refused message"),
                         ("write_errors", "frames an output could not take"),
                         ("refused_connections", "connections refused (--max-connections, per peer)"),
                         ("timeouts", "connections closed for silence")):
            yield CounterMetricFamily("latentlink_" + key, doc, value=snap[key])
        yield GaugeMetricFamily("latentlink_queue_depth", "frames waiting to be decoded", value=snap["queue_depth"])
        yield GaugeMetricFamily("latentlink_queue_capacity", "the most frames that may wait to be decoded",
                                value=snap["queue_capacity"])
        batches = CounterMetricFamily("latentlink_batches", "decoder batches, by batch size (frames)",
                                      labels=["size"])
        for size, count in sorted(snap["batches"].items()):
            batches.add_metric([str(size)], count)
        yield batches


class GatewayCollector(object):
    """A gateway's counts (``Forwarder.snapshot``): frames stored in JetStream per stream, and the rest."""

    def __init__(self, snapshot, max_streams=MAX_STREAMS):
        self.snapshot, self.max_streams = snapshot, max_streams

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        snap = self.snapshot()
        for key, doc in (("stored", "frames stored in JetStream (acknowledged by the broker)"),
                         ("duplicates", "frames the broker already had (a resend after a restart), not stored twice")):
            family = CounterMetricFamily("latentlink_gateway_frames_" + key, doc, labels=["stream"])
            for stream in sorted(snap[key])[:self.max_streams]:
                family.add_metric([stream], snap[key][stream])
            yield family
        yield CounterMetricFamily("latentlink_gateway_publish_retries", "publishes retried (the broker did not "
                                  "answer in time)", value=snap["retries"])
        yield CounterMetricFamily("latentlink_gateway_too_large", "frames larger than the broker's max_payload",
                                  value=snap["failed"])


class WorkerCollector(object):
    """A decode worker's counts (``Worker.snapshot``): frames per stream and outcome, redeliveries, batches, and the
    broker's backlog as the worker last read it."""

    def __init__(self, snapshot, max_streams=MAX_STREAMS):
        self.snapshot, self.max_streams = snapshot, max_streams

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self.snapshot()
        frames = CounterMetricFamily("latentlink_worker_frames", "frames this worker handled, by stream and outcome "
                                     "(written; duplicate: written already; failed; terminated: bad bytes)",
                                     labels=["stream", "outcome"])
        for stream in sorted(snap["streams"])[:self.max_streams]:
            for outcome, n in sorted(snap["streams"][stream].items()):
                frames.add_metric([stream, outcome], n)
        yield frames
        yield CounterMetricFamily("latentlink_worker_redelivered", "messages delivered to this worker again (a "
                                  "worker died or was too slow: ack-wait)", value=snap["redelivered"])
        yield CounterMetricFamily("latentlink_worker_batches", "batches decoded", value=snap["batches"])
        for key, doc in (("messages", "frames waiting in the JetStream stream"),
                         ("bytes", "bytes of frames in the JetStream stream"),
                         ("ack_pending", "frames delivered to workers and not yet acknowledged"),
                         ("redelivered", "frames the consumer is redelivering")):
            if key in snap["backlog"]:
                yield GaugeMetricFamily("latentlink_jetstream_" + key, doc, value=snap["backlog"][key])


def listed_streams(streams, limit):
    """``(name, counts)`` of at most ``limit`` of ``streams`` (``Host.snapshot``'s, least recently connected first),
    by name: the connected ones, then the most recently connected."""
    names = list(streams)
    chosen = [n for n in names if streams[n]["connected"]] + [n for n in reversed(names) if not streams[n]["connected"]]
    return [(name, streams[name]) for name in sorted(chosen[:limit])]


class Metrics(object):
    """The metrics of one host: ``snapshot`` its ``Host.snapshot``; served on ``host:port`` (port 0: any free
    port; :attr:`address` is the bound one) from :meth:`open` to :meth:`close`. Add :meth:`add_record` as a record
    listener (``Host.add_record_listener``)."""

    def __init__(self, snapshot, host="127.0.0.1", port=0, max_streams=MAX_STREAMS, collectors=()):
        prometheus = _prometheus()
        self.bind = (host, port)
        self.registry = prometheus.CollectorRegistry()
        if snapshot is not None:  # None: a worker, which has no Host
            self.registry.register(HostCollector(snapshot, max_streams))
        for collector in collectors:  # a gateway's or a worker's own (GatewayCollector, WorkerCollector)
            self.registry.register(collector)
        self.stages = prometheus.Histogram("latentlink_stage_milliseconds", "host stages of each decoded frame, ms",
                                           ["stage"], buckets=STAGE_BUCKETS_MS, registry=self.registry)
        self.latency = prometheus.Histogram("latentlink_latency_milliseconds",
                                            "capture (edge clock) to decoded, ms", buckets=LATENCY_BUCKETS_MS,
                                            registry=self.registry)
        for stage in HOST_STAGES:  # every stage listed from the start, at 0, not only once a frame came
            self.stages.labels(stage)
        self._server = self._thread = None
        self.address = None

    def add_record(self, record):
        """A record listener: one decoded frame's stages and latency into the histograms."""
        for stage, ms in record.get("stages", {}).items():
            if stage in HOST_STAGES:  # known stages only: label values stay bounded
                self.stages.labels(stage).observe(ms)
        if record.get("latency_ms") is not None:
            self.latency.observe(record["latency_ms"])

    def text(self):
        """The metrics as Prometheus text (what the endpoint serves)."""
        return _prometheus().generate_latest(self.registry).decode("utf-8")

    def open(self):
        try:
            self._server, self._thread = _prometheus().start_http_server(self.bind[1], self.bind[0],
                                                                         registry=self.registry)
        except OSError as exc:
            raise ConfigError("--metrics {}:{}: cannot listen there ({}); pick another port, or port 0 for any free "
                              "one".format(self.bind[0], self.bind[1], exc))
        self.address = self._server.server_address[:2]
        log.info("metrics: %s (Prometheus text)", http_url(*self.address, path="/metrics"))

    def close(self):
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = None
