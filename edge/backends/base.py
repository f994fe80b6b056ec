"""The backend contract, and the metadata sidecar that describes an exported model."""

import io
import json
import os
import time


from ..errors import BackendError, ConfigError
from ..protocol import PACKINGS


class ModelInfo(object):
    """What an exported model pair is: read from the ``model.json`` written beside the ONNX files.

    Attributes: ``model`` (zoo name), ``input_shape`` and ``latent_shape`` (NCHW tuples), ``packing`` (how the
    latents travel), ``latent_dtype``, ``bits_per_pixel``, ``tiles`` ((rows, columns); (1, 1) without patch
    processing), ``frame_shape`` (the whole frame, (1, C, H, W)), ``path`` (of the sidecar) and ``data`` (all of it).
    """

    def __init__(self, data, path):
        try:
            self.model = str(data["model"])
            self.input_shape = tuple(int(d) for d in data["input_shape"])
            self.latent_shape = tuple(int(d) for d in data["latent_shape"])
            self.packing = str(data["packing"])
            self.latent_dtype = str(data.get("latent_dtype", "float32"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError("{}: not a latentlink model description ({!r} missing or malformed); re-export with "
                              "`latentlink export onnx`".format(path, exc.args[0] if exc.args else exc))
        if self.packing not in PACKINGS:
            raise ConfigError("{}: packing {!r} is not one of {}".format(path, self.packing, ", ".join(PACKINGS)))
        self.bits_per_pixel = float(data.get("bits_per_pixel", 0.0))
        try:
            self.tiles = tuple(int(n) for n in data.get("tiles", (1, 1)))
            rows, cols = self.tiles
        except (TypeError, ValueError):
            raise ConfigError("{}: tiles {!r} is not [rows, columns]".format(path, data.get("tiles")))
        if rows < 1 or cols < 1 or self.input_shape[0] != rows * cols:
            raise ConfigError("{}: tiles {!r} do not fit the input batch of {} (re-export with `latentlink export "
                              "onnx --tiles`)".format(path, list(self.tiles), self.input_shape[0]))
        self.frame_shape = self.input_shape  # the frame the tiles make
        if self.tiles != (1, 1):
            if len(self.input_shape) != 4:
                raise ConfigError("{}: tiles need an NCHW input, not {!r}".format(path, list(self.input_shape)))
            self.frame_shape = (1, self.input_shape[1], self.input_shape[2] * rows, self.input_shape[3] * cols)
        self.path = path
        self.data = data
        # The identity of the encoder/decoder pair: both halves of one checkpoint carry its SHA-256, so an edge and
        # a host can tell a decoder from another training run (same shapes, pink noise) before any frame is sent.
        # None for exports that did not record their checkpoint: identity then goes unchecked.
        model_id = data.get("checkpoint_sha256")
        self.model_id = str(model_id) if model_id else None
        self._context_model = None
        # A progressive model's steps (export/models/progressive.py): several named inputs and outputs each.
        self.progressive = data.get("progressive") if isinstance(data.get("progressive"), dict) else None
        self._steps = {}
        if self.progressive is not None:
            try:
                for role in ("encoder", "decoder"):
                    step = self.progressive[role + "_step"]
                    self._steps[role] = tuple([(str(name), tuple(int(d) for d in shape)) for name, shape in
                                               step[key]] for key in ("inputs", "outputs"))
                self.iterations = int(self.progressive["iterations"])
                self.code_shape = tuple(int(d) for d in self.progressive["code_shape"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ConfigError("{}: its 'progressive' section is malformed ({!r}); re-export with `latentlink "
                                  "export onnx`".format(path, exc.args[0] if exc.args else exc))

    def context_model(self):
        """The model's entropy tables for ``--entropy context``: ``entropy.json`` beside this metadata, read once
        (:class:`~latentlink.edge.context_model.ContextModel`); ConfigError if there is none or it does not fit."""
        if self._context_model is None:
            from ..context_model import FILENAME, ContextModel

            # beside this metadata; for a TensorRT engine built into another folder, beside the ONNX it came from
            folders = [os.path.dirname(self.path)]
            if isinstance(self.data.get("onnx"), str):
                folders.append(os.path.dirname(self.data["onnx"]))
            path = next((os.path.join(f, FILENAME) for f in folders if os.path.isfile(os.path.join(f, FILENAME))),
                        os.path.join(folders[0], FILENAME))
            if not os.path.isfile(path):
                raise ConfigError("--entropy context needs the model's probability tables, {} (none there): fit "
                                  "them with `latentlink export entropy --checkpoint CKPT --photos DIR --out {}`"
                                  .format(path, os.path.dirname(path) or "."))
            model = ContextModel.load(path)
            # a progressive model's tables cover all its iterations' channels (edge/progressive.py)
            channels = self.latent_shape[1] * (self.iterations if self.progressive is not None else 1)
            if len(self.latent_shape) != 4 or model.channels != channels:
                raise ConfigError("{}: tables for {} channels, and the model's latents are {}{}".format(
                    path, model.channels, list(self.latent_shape),
                    " x {} iterations".format(self.iterations) if self.progressive is not None else ""))
            self._context_model = model
        return self._context_model

    def identity(self, entropy):
        """The model identity a HELLO carries: ``model_id``, and with ``entropy`` "context" the tables' hash after
        it (``<model_id>+ctx-<16 hex digits>``), so that edge and host also agree on the tables."""
        if entropy != "context":
            return self.model_id
        return "{}{}{}".format(self.model_id or "", CONTEXT_TAG, self.context_model().sha256[:16])

    def io_shapes(self, role):
        """``(inputs, outputs)`` of the ``role``'s graph, each a list of ``(name, shape)`` in the graph's order; None
        for a model of one input and one output (every model but the progressive one's steps)."""
        return self._steps.get(role)

    def shape_for(self, role):
        """The input shape the ``role`` ("encoder" or "decoder") expects."""
        return self.input_shape if role == "encoder" else self.latent_shape

    def __repr__(self):
        return "ModelInfo({} {} -> {} {})".format(self.model, self.input_shape, self.latent_shape, self.packing)


CONTEXT_TAG = "+ctx-"  # in a HELLO's model identity: the checkpoint's hash, then this, then the tables' (identity)


def checkpoint_of(identity):
    """The checkpoint part of a HELLO's model identity (:meth:`ModelInfo.identity`), without the tables' hash."""
    return (identity or "").split(CONTEXT_TAG)[0]


def read_model_info(model_path):
    """The :class:`ModelInfo` for a model file: its sidecar ``<file>.json`` (TensorRT engines have one, written by
    ``latentlink export engine``), else ``model.json`` in the same folder (written by ``latentlink export onnx``)."""
    path = os.path.abspath(model_path) + ".json"
    if not os.path.isfile(path):
        path = os.path.join(os.path.dirname(os.path.abspath(model_path)), "model.json")
    try:
        with io.open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, IOError):
        raise ConfigError("{} has no metadata ({}.json or model.json beside it), so its input shape and latent "
                          "packing are unknown; `latentlink export onnx` writes model.json, `latentlink export engine` "
                          "writes <engine>.json".format(model_path, os.path.basename(model_path)))
    except ValueError as exc:  # UnicodeDecodeError is a ValueError too
        raise ConfigError("{}: not valid UTF-8 JSON ({})".format(path, exc))
    return ModelInfo(data, path)


class Backend(object):
    """One model on one runtime: ``load()``, ``infer(array)``, ``close()``; also a context manager.

    ``infer`` takes a float32 array of exactly ``input_shape`` and returns ``(output, timings)``: ``output`` is a
    host (CPU) numpy array owned by the backend, valid until the next ``infer`` or ``close()`` (copy it to keep
    it; float32, or float16 from an FP16 model); ``timings`` is a dict of wall-clock milliseconds: ``run_ms`` (the
    model itself, with the upload of its input on a GPU) and ``copy_ms`` (bringing the output to host memory; on a
    GPU that is the device-to-host copy). GPU backends add ``run_gpu_ms`` and ``copy_gpu_ms``: the same two spans
    timed with CUDA events on the stream. ``copy_note`` says what ``copy_ms`` really measures on this backend.
    """

    name = "backend"
    copy_note = ""

    def __init__(self, path, role, info=None):
        self.path = path
        self.role = role
        self.info = info or read_model_info(path)
        self.loaded = False

    @property
    def input_shape(self):
        """The NCHW shape ``infer`` takes."""
        return self.info.shape_for(self.role)

    def load(self):
        if not self.loaded:
            self._load()
            self.loaded = True
        return self

    def infer(self, array):
        if not self.loaded:
            raise BackendError("{} backend for {} is not loaded: call load() or use it in a `with` block".format(
                self.name, self.path))
        if self.multi_io:
            raise BackendError("{} is a progressive model's {} step, with inputs {}: run it with infer_named, or "
                               "through latentlink.edge.progressive (open_progressive)".format(
                                   self.path, self.role, [name for name, _ in self.info.io_shapes(self.role)[0]]))
        if tuple(array.shape) != self.input_shape:
            raise BackendError("{} input {!r}: got shape {}, expected {} (is the profile's input size the one the "
                               "model was exported for?)".format(self.role, self.input_name, tuple(array.shape),
                                                                 self.input_shape))
        return self._infer(array)

    @property
    def multi_io(self):
        """True for a graph of several inputs or outputs (a progressive model's step): use :meth:`infer_named`."""
        return self.info is not None and self.info.io_shapes(self.role) is not None

    def infer_named(self, feeds):
        """Run a graph of named inputs and outputs (a progressive model's step): ``feeds`` is a dict name -> float32
        array of exactly the shape model.json gives (:meth:`ModelInfo.io_shapes`); returns ``(outputs, timings)``:
        a dict name -> host numpy array, owned by the backend and valid until the next call (copy to keep), and
        the timings in ms as :meth:`infer`'s (``run_ms``, ``copy_ms``, and on a GPU ``run_gpu_ms``, ``copy_gpu_ms``).
        A model of one input takes ``{input_name: array}`` and returns ``{"output": array}``."""
        if not self.loaded:
            raise BackendError("{} backend for {} is not loaded: call load() or use it in a `with` block".format(
                self.name, self.path))
        io = self.info.io_shapes(self.role)
        if io is None:
            if set(feeds) != {self.input_name}:
                raise BackendError("{} takes one input, {!r}; got {}".format(self.path, self.input_name,
                                                                             sorted(feeds)))
            output, timings = self.infer(feeds[self.input_name])
            return {"output": output}, timings
        expected = dict(io[0])
        if set(feeds) != set(expected):
            raise BackendError("{} ({} step) takes inputs {}; got {}".format(
                self.path, self.role, sorted(expected), sorted(feeds)))
        for name, array in feeds.items():
            if tuple(array.shape) != expected[name]:
                raise BackendError("{} ({} step) input {!r}: got shape {}, expected {}".format(
                    self.path, self.role, name, tuple(array.shape), expected[name]))
        return self._infer_named(feeds)

    def _infer_named(self, feeds):
        raise BackendError("the {} backend cannot run graphs of several inputs".format(self.name))

    def infer_batch(self, arrays):
        """Run several inputs, each a float32 array of exactly ``input_shape`` (the host's frames of several
        streams); returns ``(outputs, timings)``: one output per input, each its own array (unlike ``infer``'s),
        and the batch's timings (ms, as for ``infer``, for the whole batch). A backend whose model takes a batch
        (:attr:`max_batch` > 1) runs them in one call, in chunks of at most ``max_batch`` inputs; others loop."""
        if not self.loaded:
            raise BackendError("{} backend for {} is not loaded: call load() or use it in a `with` block".format(
                self.name, self.path))
        for array in arrays:
            if tuple(array.shape) != self.input_shape:
                raise BackendError("{} input {!r}: got shape {}, expected {}".format(
                    self.role, self.input_name, tuple(array.shape), self.input_shape))
        outputs, total = [], {}
        step = max(1, self.max_batch)
        for start in range(0, len(arrays), step):
            chunk = arrays[start:start + step]
            if len(chunk) == 1:
                output, timings = self._infer(chunk[0])
                results = [output.copy()]
            else:
                results, timings = self._infer_batch(chunk)
            outputs.extend(results)
            for key, value in timings.items():
                total[key] = total.get(key, 0.0) + value
        return outputs, total

    max_batch = 1  # inputs one call may take (a model with a dynamic batch axis: more); 1: infer_batch loops

    def close(self):
        if self.loaded:
            self._close()
            self.loaded = False

    def __enter__(self):
        return self.load()

    def __exit__(self, *exc_info):
        self.close()

    # Subclasses implement these.
    input_name = "input"

    def _load(self):
        raise NotImplementedError

    def _infer(self, array):
        raise NotImplementedError

    def _infer_batch(self, arrays):
        """Run ``arrays`` (2 to ``max_batch`` inputs) in one call; returns ``(outputs, timings)``."""
        raise NotImplementedError

    def _close(self):
        pass


def file_sha256(path):
    """Hex SHA-256 of a file's bytes (a checkpoint's identity, as ``export onnx`` records it in model.json)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def elapsed_ms(start):
    return (time.perf_counter() - start) * 1000.0
