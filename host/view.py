"""The live view (``latentlink host --view HOST:PORT``): watch a headless host in a browser.

A small HTTP server (the standard library's ``ThreadingHTTPServer``) with:

- ``/``: a page showing every stream's latest frame, its host stages (ms: the last frame's and the mean of the
  last :data:`RECENT` frames) and its capture-to-decoded latency, updated once a second by a little JavaScript from
  ``/status.json``. Frames play as MJPEG (``/stream/<name>.mjpg``); ``/?still=1`` shows still JPEGs refreshed by
  the script instead (for browsers or proxies that do not play MJPEG, and for screenshots).
- ``/stream/<name>.mjpg``: the stream's frames as ``multipart/x-mixed-replace`` JPEGs, each sent as it is
  decoded (and the latest again after :data:`RESEND_S` without a new one); ``/stream/<name>.jpg``: its latest
  frame as one JPEG.
- ``/status.json``: the streams' latest sequence numbers, stages, latency and the host's counts
  (``Host.snapshot()``).

:class:`LiveView` is an :class:`~latentlink.host.outputs.Output` (``write`` keeps each stream's latest frame) plus a
record listener (:meth:`LiveView.add_record`, for the stages). Memory is bounded: the latest frame of at most
``max_streams`` streams (the most recently active), JPEG-encoded only when a browser asks for it (once per frame,
whatever the number of viewers), :data:`RECENT` records per stream, at most ``max_viewers`` MJPEG viewers at
once (more get 503), and at most ``max_connections`` connections served at once, each in a thread (more get 503:
idle or slow clients cannot make threads without end in the host's process). Anyone who can reach the address sees
the frames: keep it on 127.0.0.1 (the default of a bare port) or a trusted network; there, requests must name an IP
address or localhost (DNS rebinding, :meth:`_Handler._host_allowed`).
"""

import collections
import ipaddress
import json
import logging
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np

from latentlink.edge.cli import is_loopback
from latentlink.edge.errors import ConfigError
from latentlink.edge.profiler import HOST_STAGES
from latentlink.edge.protocol import check_stream_name

from .outputs import Output

log = logging.getLogger("latentlink.host")
RECENT = 30  # records per stream whose stages are averaged on the page
JPEG_QUALITY = 85
BOUNDARY = "latentlink-frame"
RESEND_S = 1.0  # an MJPEG viewer gets the latest frame again after this long without a new one


class _Stream(object):
    """One stream's latest frame (``image``, BGR, not yet encoded), its JPEG once a viewer asked, and its recent
    records. ``version`` counts the frames written: a frame is new by its version, not its seq, which starts again at
    0 when the stream's edge restarts."""

    def __init__(self):
        self.seq = -1
        self.version = 0
        self.image = None
        self.jpeg, self.jpeg_version = None, None
        self.latency_ms = None
        self.records = collections.deque(maxlen=RECENT)


class LiveView(Output):
    """The live view, served on ``host:port`` (port 0: any free port; :attr:`address` is the bound one) once
    :meth:`open` is called. ``snapshot``: a callable giving the host's counts (``Host.snapshot``), shown on the
    page; None: none shown."""

    def __init__(self, host="127.0.0.1", port=0, snapshot=None, max_streams=16, max_viewers=8, max_connections=32,
                 title="latentlink"):
        self.bind = (host, port)
        self.max_connections = max_connections
        self.uri = http_url(host, port)
        self.snapshot = snapshot
        self.max_streams, self.title = max_streams, title
        self._streams = collections.OrderedDict()  # name -> _Stream, least recently written first
        self._changed = threading.Condition()  # guards _streams; notified on every frame and at close
        self._viewers = threading.BoundedSemaphore(max_viewers)
        self._closed = False
        self._server = self._thread = None
        self.address = None

    # Output.
    def open(self):
        if self._server is not None:  # opened already (open_outputs, or a host that opens its outputs)
            return
        handler = type("Handler", (_Handler,), {"view": self})  # each view its own handler class
        server_class = _Server
        if ":" in self.bind[0]:  # an IPv6 address ([::1]:PORT)
            server_class = type("Server6", (_Server,), {"address_family": socket.AF_INET6})
        try:
            self._server = server_class(self.bind, handler)
        except OSError as exc:
            raise ConfigError("--view {}:{}: cannot listen there ({}); pick another port, or port 0 for any free "
                              "one".format(self.bind[0], self.bind[1], exc))
        self._server.connections = threading.BoundedSemaphore(self.max_connections)
        self.address = self._server.server_address[:2]
        self.uri = http_url(*self.address)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        daemon=True, name="latentlink-view")
        self._thread.start()
        log.info("live view: %s (every stream's latest frame, stages and latency)", self.uri)

    def write(self, frame):
        image = np.array(frame.image, dtype=np.uint8, copy=True)  # the host may reuse its buffers
        with self._changed:
            stream = self._streams.pop(frame.stream, None) or _Stream()
            self._streams[frame.stream] = stream  # most recently written last
            while len(self._streams) > self.max_streams:  # the least recently active stream leaves the page
                self._streams.popitem(last=False)
            stream.seq, stream.image, stream.latency_ms = frame.seq, image, frame.latency_ms
            stream.version += 1
            self._changed.notify_all()

    def add_record(self, record):
        """A record listener (``Host.add_record_listener``): keeps the stream's recent stages for the page."""
        with self._changed:
            stream = self._streams.get(record.get("stream"))
            if stream is not None:
                stream.records.append(record)

    def close(self):
        with self._changed:
            self._closed = True
            self._changed.notify_all()  # MJPEG viewers end their responses
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = None

    # What the handler serves.
    def status(self):
        """The page's data: ``streams`` (a list by name: name, seq, version (frames written, see :class:`_Stream`),
        width, height, latency_ms, stages {stage: {"last", "mean"}} in ms, and the host's counts of it) and ``host``
        (the host's totals)."""
        snapshot = self.snapshot() if self.snapshot is not None else {"streams": {}}
        with self._changed:
            streams = []
            for name, stream in sorted(self._streams.items()):  # by name: the page's order stays put
                stages = {}
                for stage in HOST_STAGES:
                    values = [r["stages"][stage] for r in stream.records if stage in r.get("stages", {})]
                    if values:
                        stages[stage] = {"last": values[-1], "mean": round(sum(values) / len(values), 3)}
                latencies = [r["latency_ms"] for r in stream.records if r.get("latency_ms") is not None]
                entry = {"name": name, "seq": stream.seq, "version": stream.version, "width": stream.image.shape[1],
                         "height": stream.image.shape[0], "latency_ms": stream.latency_ms,
                         "latency_mean_ms": round(sum(latencies) / len(latencies), 3) if latencies else None,
                         "stages": stages}
                entry.update(snapshot["streams"].get(name, {}))
                streams.append(entry)
        host = {k: v for k, v in snapshot.items() if k != "streams"}
        host["batches"] = {str(k): v for k, v in host.get("batches", {}).items()}
        return {"title": self.title, "streams": streams, "host": host}

    def jpeg(self, name, after=None, timeout=None):
        """``(version, JPEG bytes)`` of stream ``name``'s latest frame (``version``: which of its frames, counted
        from 1), or None if it has none. With ``after``: wait (up to ``timeout`` s) for a frame after version
        ``after``; None if none came or the view closed."""
        with self._changed:
            if after is not None:
                self._changed.wait_for(lambda: self._closed or self._newer(name, after), timeout)
                if self._closed or not self._newer(name, after):
                    return None
            stream = self._streams.get(name)
            if stream is None:
                return None
            if stream.jpeg_version == stream.version:  # encoded once per frame, however many viewers
                return stream.version, stream.jpeg
            version, image = stream.version, stream.image
        # Encoded outside the lock: the host's writes of other frames do not wait for it.
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            return None
        with self._changed:
            if stream.version == version:
                stream.jpeg, stream.jpeg_version = data.tobytes(), version
        return version, data.tobytes()

    def _newer(self, name, version):
        stream = self._streams.get(name)
        return stream is not None and stream.version != version

    def closed(self):
        return self._closed


def http_url(host, port, path="/"):
    """``http://host:port/path``, with an IPv6 address in brackets."""
    return "http://{}:{}{}".format("[{}]".format(host) if ":" in host else host, port, path)


class _Server(ThreadingHTTPServer):
    """A thread per connection, at most ``connections`` (a semaphore, set by :meth:`LiveView.open`) at once: one
    more is answered 503 and closed by the accepting thread itself."""

    daemon_threads = True  # an MJPEG viewer never ends its request: never wait for it
    connections = None

    def process_request(self, request, client_address):
        if not self.connections.acquire(blocking=False):
            try:  # a few bytes into a new socket's empty buffer: never blocks
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n\r\n"
                                b"too many connections to this host's live view; try again later\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # starts the thread, which releases the slot
        except BaseException:
            self.connections.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()


class _Handler(BaseHTTPRequestHandler):
    view = None  # the LiveView, set on a subclass per server
    timeout = 10  # s: a viewer that stops reading is cut off, its thread freed
    protocol_version = "HTTP/1.0"  # one request per connection: the MJPEG response ends with the connection
    server_version = "latentlink-view"

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        if not self._host_allowed():
            self._send(403, "text/plain", b"this live view answers only http://127.0.0.1:PORT/ or "
                       b"http://localhost:PORT/ (a request for another name may be a DNS rebinding attack)\n")
        elif url.path == "/":
            still = urllib.parse.parse_qs(url.query).get("still") == ["1"]
            self._send(200, "text/html; charset=utf-8", PAGE.replace("__STILL__", "true" if still else "false")
                       .encode("utf-8"))
        elif url.path == "/status.json":
            self._send(200, "application/json", json.dumps(self.view.status()).encode("utf-8"))
        elif url.path.startswith("/stream/"):
            name, _, kind = urllib.parse.unquote(url.path[len("/stream/"):]).rpartition(".")
            try:
                check_stream_name(name)
            except ConfigError:
                name = None
            if name is None or kind not in ("jpg", "mjpg"):
                self._send(404, "text/plain", b"no such stream\n")
            elif kind == "jpg":
                latest = self.view.jpeg(name)
                if latest is None:
                    self._send(404, "text/plain", b"no frame of that stream yet\n")
                else:
                    self._send(200, "image/jpeg", latest[1])
            else:
                self._mjpeg(name)
        else:
            self._send(404, "text/plain", b"not found\n")

    def _host_allowed(self):
        """DNS rebinding: a page of another site, its name then re-pointed at 127.0.0.1, would read the frames
        through the visitor's browser. A view on a loopback address therefore answers only requests that name an
        IP address or localhost (the Host header); one listening on the network answers any (it is open anyway)."""
        if not is_loopback(self.view.address[0]):
            return True
        host = self.headers.get("Host")
        if host is None:  # an HTTP/1.0 client without the header (every browser sends it)
            return True
        try:
            name = urllib.parse.urlsplit("//" + host).hostname
        except ValueError:
            return False
        if name == "localhost":
            return True
        try:
            ipaddress.ip_address(name or "")
        except ValueError:
            return False
        return True

    def do_HEAD(self):  # curl -I, uptime checks: GET's status and headers, without the body
        self.do_GET()

    def _send(self, code, content_type, body):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _mjpeg(self, name):
        if self.view.jpeg(name) is None:  # not an empty 200 that ends at once: players and scripts see why
            self._send(404, "text/plain", b"no frame of that stream yet\n")
            return
        if not self.view._viewers.acquire(blocking=False):
            self._send(503, "text/plain", b"too many viewers of this host's live view; try again later\n")
            return
        try:
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=" + BOUNDARY)
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if self.command == "HEAD":
                return
            # Each part is followed at once by the next boundary: browsers show a part only once they see its end.
            self.wfile.write("--{}\r\n".format(BOUNDARY).encode("ascii"))
            version = None
            while not self.view.closed():
                latest = self.view.jpeg(name, after=version, timeout=RESEND_S)
                if latest is None:
                    # No new frame: the latest again. Browsers keep painting, and a viewer that left is found
                    # (the write fails) and its slot freed, even while the stream is silent.
                    latest = self.view.jpeg(name)
                    if latest is None:  # the view closed, or the stream left it (max_streams)
                        break
                version, data = latest
                self.wfile.write("Content-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n".format(len(data))
                                 .encode("ascii") + data + "\r\n--{}\r\n".format(BOUNDARY).encode("ascii"))
                self.wfile.flush()
        except OSError:  # the viewer went away (or stopped reading for `timeout` s)
            pass
        finally:
            self.view._viewers.release()

    def log_message(self, format, *args):  # requests are not worth the host's log; errors are below
        log.debug("view: %s: " + format, self.address_string(), *args)


# The page: the script builds each stream's card once (names only as text: never parsed as HTML), then updates it.
PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>latentlink host</title>
<style>
body { font-family: sans-serif; background: #222; color: #eee; margin: 1em; }
.stream { display: inline-block; vertical-align: top; margin: 0 1em 1em 0; background: #333; padding: .5em; }
.stream img { display: block; max-width: 640px; }
table { border-collapse: collapse; margin-top: .4em; font-size: 90%; }
td, th { padding: 0 .6em; text-align: right; } td:first-child, th:first-child { text-align: left; }
#host { font-size: 90%; color: #bbb; }
h2 { font-size: 110%; margin: .2em 0 .4em; }
</style></head>
<body><h1>latentlink host: live view</h1><p id="host">waiting for frames...</p><div id="streams"></div>
<script>
const STILL = __STILL__;
const STAGES = ["receive", "deserialize", "decode", "write"];
const cards = {};
function ms(v) { return v === null || v === undefined ? "-" : v.toFixed(1); }
function card(s) {
  let c = cards[s.name];
  if (c) return c;
  c = {root: document.createElement("div"), img: document.createElement("img"),
       title: document.createElement("h2"), table: document.createElement("table"), version: 0};
  c.root.className = "stream";
  c.root.dataset.stream = s.name;
  c.img.alt = s.name;
  const src = "stream/" + encodeURIComponent(s.name);
  if (!STILL) c.img.src = src + ".mjpg";
  c.still = src + ".jpg";
  c.root.append(c.title, c.img, c.table);
  document.getElementById("streams").append(c.root);
  return cards[s.name] = c;
}
function row(table, cells, tag) {
  const tr = table.insertRow();
  for (const text of cells) { const td = document.createElement(tag || "td"); td.textContent = text; tr.append(td); }
}
async function update() {
  try {
    const status = await (await fetch("status.json", {cache: "no-store"})).json();
    const h = status.host;
    document.getElementById("host").textContent = status.streams.length + " stream(s)" + ("frames" in h ?
      "; " + h.frames + " frames decoded, " + h.failed + " failed; decode queue " + h.queue_depth + " of " +
      h.queue_capacity : "");
    for (const s of status.streams) {
      const c = card(s);
      c.title.textContent = s.name + " (frame " + s.seq + ", " + s.width + "x" + s.height + ")";
      if (STILL && c.version !== s.version) c.img.src = c.still + "?v=" + s.version;  // seq restarts with the edge
      c.version = s.version;
      c.table.replaceChildren();
      row(c.table, ["ms", "last", "mean of last 30"], "th");
      for (const st of STAGES) if (s.stages[st]) row(c.table, [st, ms(s.stages[st].last), ms(s.stages[st].mean)]);
      row(c.table, ["latency", ms(s.latency_ms), ms(s.latency_mean_ms)]);
      for (const k of ["decoded", "failed", "gaps"])
        if (k in s) row(c.table, [k === "gaps" ? "dropped" : k, "" + s[k], ""]);
    }
  } catch (e) {
    document.getElementById("host").textContent = "host unreachable: " + e;
  }
}
update();
setInterval(update, 1000);
</script></body></html>
"""
