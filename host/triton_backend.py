"""The host's decoders: a model file (``open_model``: any backend, progressive models too), or a decode service,
``triton://HOST:PORT/MODEL``.

:func:`open_decoder` is what ``latentlink host`` (and anything else that takes ``--decoder``) calls. A
``triton://`` decoder is a :class:`TritonBackend`: frames go to ``latentlink decode-service`` (host/
decode_service.py) over Triton's HTTP/REST protocol (KServe v2, binary tensors), with Python's own http.client:
the host needs no Triton package, and every read from the service is bounded (the service is a network peer: a
wrong or hostile one costs frames a clear BackendError, never the host's memory or a crash).
"""

import http.client
import json
import re
import socket
import time

import numpy as np

from latentlink.edge.rate import open_model
from latentlink.edge.backends.base import Backend, ModelInfo, elapsed_ms
from latentlink.edge.errors import BackendError, ConfigError

SCHEME = "triton://"
TIMEOUT_S = 30.0  # a request's connect and each read; a service that hangs costs the frames, not the host
HOLD_OFF_S = 2.0  # after a connection failure, requests fail at once this long with its reason (see _request)
MAX_INFO_BYTES = 4 << 20  # the metadata response (model.json + entropy tables: about 130 kB for the default)
MAX_HEADER_BYTES = 64 << 10  # an inference response's JSON header
MAX_ELEMENTS = 1 << 28  # a model's tensors: 1 GiB of float32 at most
INFO_SUFFIX = "-info"  # as host/decode_service.py names the metadata model
SERVICE_FIX = "start it with `latentlink decode-service --decoder MODEL --listen {host}:{port}` (pip install " \
              "\"latentlink[triton]\" there)"


def open_decoder(spec, role="decoder", **options):
    """An unloaded decoder backend: a :class:`TritonBackend` for ``triton://HOST:PORT/MODEL`` (the service is asked
    for its model's metadata now: BackendError if it is down), else the model file's backend
    (:func:`latentlink.edge.rate.open_model` with ``options``: a progressive model's too). A service decides its own
    device and precision: options other than the defaults are refused for it (ConfigError), not ignored."""
    if not is_service(spec):
        return open_model(spec, role, **options)
    if role != "decoder":
        raise ConfigError("{}: a decode service serves decoders; the edge's encoder is a model file".format(spec))
    for name in ("device", "precision"):
        if options.get(name) is not None:
            raise ConfigError("--{} {} with --decoder {}: the service decides where its decoder runs (`latentlink "
                              "decode-service --{} ...` there)".format(name, options[name], spec, name))
    if options.get("mapped"):
        raise ConfigError("--mapped with --decoder {}: TensorRT's mapped memory is the service's affair".format(spec))
    return TritonBackend(spec)


def is_service(spec):
    """True for a decode service's address, ``triton://...``."""
    return str(spec).lower().startswith(SCHEME)


def parse_spec(spec):
    """``triton://HOST:PORT/MODEL`` -> (host, port, model); ConfigError naming the form otherwise."""
    match = re.match(r"^triton://(\[[0-9A-Fa-f:.]+\]|[^/:\[\]]+):(\d{1,5})/([A-Za-z0-9][A-Za-z0-9_.-]{0,63})/?$",
                     str(spec), re.IGNORECASE)
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ConfigError("--decoder {!r}: a decode service is triton://HOST:PORT/MODEL, e.g. "
                          "triton://192.168.1.30:8000/decoder (HTTP port of `latentlink decode-service`, and its "
                          "--model-name)".format(spec))
    return match.group(1).strip("[]"), int(match.group(2)), match.group(3)


class RemoteModelInfo(ModelInfo):
    """A :class:`ModelInfo` from a decode service's metadata: the model.json the service loaded, and its entropy
    tables' text (None when it has none), so that context-coded frames decode as with a local decoder."""

    def __init__(self, data, entropy_text, where):
        try:
            super(RemoteModelInfo, self).__init__(data, where)
        except (TypeError, ValueError, AttributeError) as exc:  # fields ModelInfo converts outside its own checks
            raise ConfigError("{}: not a latentlink model description ({})".format(where, exc))
        for name, shape in (("input_shape", self.input_shape), ("latent_shape", self.latent_shape)):
            if len(shape) != 4 or min(shape) < 1 or int(np.prod(shape, dtype=np.int64)) > MAX_ELEMENTS:
                raise ConfigError("{}: {} {} is not an NCHW shape of at most {} elements".format(
                    where, name, list(shape), MAX_ELEMENTS))
        self._entropy_text = entropy_text

    def context_model(self):
        if self._context_model is None:
            from latentlink.edge.context_model import ContextModel

            if self._entropy_text is None:
                raise ConfigError("--entropy context needs the model's probability tables, and the decode service "
                                  "{} has none: give it a decoder whose folder has entropy.json (`latentlink export "
                                  "entropy`)".format(self.path))
            model = ContextModel.from_json(self._entropy_text, "{} (its entropy tables)".format(self.path))
            if model.channels != self.latent_shape[1]:
                raise ConfigError("{}: tables for {} channels, and the model's latents are {}".format(
                    self.path, model.channels, list(self.latent_shape)))
            self._context_model = model
        return self._context_model


class TritonBackend(Backend):
    """A decoder served by ``latentlink decode-service``: ``infer_batch`` sends the frames in one request (Triton's
    dynamic batcher joins them with other hosts' requests). The model's metadata is fetched when the backend is
    made, so ``info`` and ``input_shape`` are there before ``load()``, as for a model file."""

    name = "triton"
    copy_note = "a decode service: run_ms is the request's round trip (network, queue and decoding)"
    input_name = "latents"
    max_batch = 1 << 10  # one request for the host's whole batch; the service splits it into its --max-batch runs

    def __init__(self, spec):
        self.host, self.port, self.model = parse_spec(spec)
        self.url = "http://{}:{}".format("[{}]".format(self.host) if ":" in self.host else self.host, self.port)
        self._conn = None
        self._failed = (0.0, None)  # (monotonic time, BackendError) of the last connection failure
        info = self._fetch_info(spec)
        super(TritonBackend, self).__init__(spec, "decoder", info)
        self._frame = tuple(self.input_shape[1:]) if self.input_shape[0] == 1 else tuple(self.input_shape)

    # --- HTTP ----------------------------------------------------------------------------------------------------
    def _request(self, method, path, body=None, headers=None, limit=MAX_INFO_BYTES):
        """One request on the kept-alive connection; returns (status, headers, body bytes), the body at most
        ``limit`` bytes (BackendError beyond). A connection the service closed while idle is retried once. For
        :data:`HOLD_OFF_S` after a connection failure, requests fail at once with that failure: the host retries a
        failed batch frame by frame, and a service that hangs must not cost the timeout for each of them."""
        when, error = self._failed
        if error is not None and time.monotonic() - when < HOLD_OFF_S:
            raise BackendError(str(error))  # a new one: re-raising one object would grow its traceback each time
        try:
            return self._request_once(method, path, body, headers, limit)
        except BackendError as exc:
            if self._conn is None:  # a connection failure (not a refused request): hold off
                self._failed = (time.monotonic(), exc)
            raise

    def _request_once(self, method, path, body, headers, limit):
        for attempt in (0, 1):
            reused = self._conn is not None
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT_S)
            try:
                self._conn.request(method, path, body=body, headers=headers or {})
                response = self._conn.getresponse()
                length = response.getheader("Content-Length")
                if length is not None and (not length.isdigit() or int(length) > limit):
                    raise BackendError("the decode service {} answered {} bytes (Content-Length {!r}), more than "
                                       "the {} this request may take: is {} a latentlink decode service?".format(
                                           self.url, length, length, limit, self.url))
                data = response.read(limit + 1)
                if len(data) > limit:
                    raise BackendError("the decode service {} answered more than {} bytes to {}".format(
                        self.url, limit, path))
                return response.status, response, data
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self._drop_connection()
                if reused and attempt == 0:
                    continue  # the service closed an idle kept-alive connection: a new one
                raise BackendError("the decode service {} closed the connection ({}): is it still running? {}".format(
                    self.url, exc, SERVICE_FIX.format(host=self.host, port=self.port)))
            except ConnectionRefusedError:
                self._drop_connection()
                raise BackendError("no decode service at {} (connection refused): {}".format(
                    self.url, SERVICE_FIX.format(host=self.host, port=self.port)))
            except (socket.timeout, OSError, http.client.HTTPException) as exc:
                self._drop_connection()
                raise BackendError("the decode service {} failed: {} ({}); is it running and reachable? {}".format(
                    self.url, exc or type(exc).__name__, type(exc).__name__,
                    SERVICE_FIX.format(host=self.host, port=self.port)))
            except BackendError:
                self._drop_connection()  # a half-read response leaves the connection unusable
                raise

    def _drop_connection(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _error_text(self, status, data):
        """The service's error message (Triton answers {"error": "..."}), for BackendError texts."""
        try:
            text = json.loads(data.decode("utf-8"))["error"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            text = data[:200].decode("utf-8", "replace")
        return "HTTP {}: {}".format(status, str(text)[:300])

    # --- metadata --------------------------------------------------------------------------------------------------
    def _fetch_info(self, spec):
        """The service's ``MODEL-info`` answer -> :class:`RemoteModelInfo`; BackendError when the service is down
        or has no such model, ConfigError when what it sent is not a latentlink model's metadata."""
        body = json.dumps({"inputs": [{"name": "request", "shape": [1], "datatype": "INT32", "data": [0]}]})
        status, _, data = self._request("POST", "/v2/models/{}{}/infer".format(self.model, INFO_SUFFIX),
                                        body=body.encode("ascii"), headers={"Content-Type": "application/json"})
        if status == 404:  # Triton: "Request for unknown model"
            raise BackendError("the decode service {} has no model {!r} ({}): MODEL in --decoder triton://{}:{}/MODEL "
                               "is the service's --model-name (default: decoder)".format(
                                   self.url, self.model, self._error_text(status, data), self.host, self.port))
        if status != 200:
            raise BackendError("the decode service {} did not describe model {!r} ({}): is it a latentlink "
                               "decode-service, and is the model loaded?".format(self.url, self.model,
                                                                                 self._error_text(status, data)))
        where = "{} (the decode service's metadata)".format(spec)
        try:
            answer = json.loads(data.decode("utf-8"))
            text = answer["outputs"][0]["data"][0]
            info = json.loads(text)
            if not isinstance(info, dict) or info.get("format") != "latentlink-decode-service" \
                    or info.get("version") != 1:
                raise ValueError("format {!r}, version {!r}".format(
                    info.get("format") if isinstance(info, dict) else type(info).__name__,
                    info.get("version") if isinstance(info, dict) else None))
            model, entropy = info["model"], info.get("entropy")
            if not isinstance(model, dict) or not (entropy is None or isinstance(entropy, str)):
                raise ValueError("model is {}, entropy is {}".format(type(model).__name__, type(entropy).__name__))
        except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError) as exc:
            raise ConfigError("{}: not a latentlink decode service's answer ({}); is {} `latentlink decode-service`, "
                              "and of the same latentlink version?".format(where, exc, self.url))
        self.service = info.get("service") if isinstance(info.get("service"), dict) else {}
        return RemoteModelInfo(model, entropy, where)

    # --- the backend ------------------------------------------------------------------------------------------------
    def _load(self):
        status, _, data = self._request("GET", "/v2/models/{}/ready".format(self.model), limit=1 << 16)
        if status != 200:
            raise BackendError("the decode service {} has model {!r} but it is not ready ({})".format(
                self.url, self.model, self._error_text(status, data)))

    def _infer(self, array):
        outputs, timings = self._infer_batch([array])
        return outputs[0], timings

    def _infer_batch(self, arrays):
        """The frames in one request, as binary tensors; the decoded images back, each checked for its shape."""
        start = time.perf_counter()
        batch = np.ascontiguousarray(np.stack([np.asarray(a, np.float32).reshape(self._frame) for a in arrays]))
        header = json.dumps({"inputs": [{"name": "latents", "shape": list(batch.shape), "datatype": "FP32",
                                         "parameters": {"binary_data_size": batch.nbytes}}],
                             "outputs": [{"name": "image", "parameters": {"binary_data": True}}]}).encode("ascii")
        expected = len(arrays) * int(np.prod(self._output_shape(), dtype=np.int64)) * 4
        status, response, data = self._request(
            "POST", "/v2/models/{}/infer".format(self.model), body=header + batch.tobytes(),
            headers={"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))},
            limit=expected + MAX_HEADER_BYTES)
        if status != 200:
            raise BackendError("the decode service {} refused {} frame(s) for model {!r}: {}".format(
                self.url, len(arrays), self.model, self._error_text(status, data)))
        images = self._parse_images(response, data, len(arrays))
        return list(images), {"run_ms": elapsed_ms(start), "copy_ms": 0.0}

    def _output_shape(self):
        """One frame's decoded shape as the service declared it (3, H, W), or from the model's input shape."""
        shape = self.service.get("output_shape")
        if isinstance(shape, list) and 0 < len(shape) <= 5 and all(isinstance(d, int) and d > 0 for d in shape) \
                and int(np.prod(shape, dtype=np.int64)) <= MAX_ELEMENTS:
            return tuple(shape)
        return tuple(self.info.input_shape[1:]) if self.info.input_shape[0] == 1 else tuple(self.info.input_shape)

    def _parse_images(self, response, data, count):
        """The binary response: a JSON header of ``Inference-Header-Content-Length`` bytes, then the image tensor."""
        try:
            size = int(response.getheader("Inference-Header-Content-Length", len(data)))
            if not 0 < size <= min(len(data), MAX_HEADER_BYTES):
                raise ValueError("a header of {} bytes in a response of {}".format(size, len(data)))
            output = json.loads(data[:size].decode("utf-8"))["outputs"][0]
            shape = tuple(int(d) for d in output["shape"])
            want = (count,) + self._output_shape()
            if output.get("datatype") != "FP32" or shape != want:
                raise ValueError("{} {} (expected FP32 {})".format(output.get("datatype"), list(shape), list(want)))
            raw = data[size:]
            if len(raw) != int(np.prod(want, dtype=np.int64)) * 4:
                raise ValueError("{} bytes of image data for {} float32 values".format(len(raw), np.prod(want)))
        except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError) as exc:
            raise BackendError("the decode service {} sent a malformed answer for model {!r} ({}): is it a latentlink "
                               "decode service for this model?".format(self.url, self.model, exc))
        images = np.frombuffer(raw, dtype="<f4").reshape(want).copy()  # writable, like a local decoder's output
        # each frame in the decoder's own output shape: with its batch axis of 1 (a tiled model's: its tiles)
        return [image[None] if self.info.input_shape[0] == 1 else image for image in images]

    def _close(self):
        self._drop_connection()
