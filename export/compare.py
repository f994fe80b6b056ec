"""Run the same inputs through two backends and say how far apart they are, like Polygraphy's ``run --compare``.

For each output: the max and mean absolute error, the max relative error, and the smallest tolerances that would
pass (``atol`` with ``rtol`` 0, ``rtol`` with ``atol`` 0). Binary latents are compared as bits: the fraction that
flipped (FP16 moves activations that sit near the threshold across it; everything else should agree).

Python 3.6 compatible: it runs on the Nano to check a TensorRT engine against PyTorch or ONNX Runtime.
"""

import numpy as np

from latentlink.edge.backends import open_backend
from latentlink.edge.errors import ConfigError
from latentlink.edge.preprocess import Preprocessor
from latentlink.edge.sources import open_source


def backend_inputs(info, role, count, source_uri="synthetic://", fit="center-crop", seed=0):
    """``count`` inputs for ``role``: frames from ``source_uri`` for an encoder; random latents in the packing's
    range (bits: 0/1; uint8: 0..255; floats: standard normal) for a decoder. Float32, the backend's input shape."""
    shape = info.shape_for(role)
    if role == "encoder":
        preprocess = Preprocessor(shape[3], shape[2], fit)
        inputs = []
        with open_source(source_uri, loop=True) as source:
            for _ in range(count):
                got = source.read()
                if got is None:
                    break
                inputs.append(preprocess(got[0]).copy())
        if not inputs:
            raise ConfigError("source {!r} gave no frames to compare with".format(source_uri))
        return inputs
    rng = np.random.RandomState(seed)
    if info.packing == "bits":
        return [rng.randint(0, 2, size=shape).astype(np.float32) for _ in range(count)]
    if info.packing == "uint8":
        return [rng.randint(0, 256, size=shape).astype(np.float32) for _ in range(count)]
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(count)]


def compare_outputs(reference, test, bits=False):
    """Error figures of ``test`` against ``reference`` (arrays of one shape); see the module docstring."""
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(test, dtype=np.float64)
    if a.shape != b.shape:
        raise ConfigError("outputs have different shapes: {} and {}".format(a.shape, b.shape))
    err = np.abs(a - b)
    scale = np.abs(a)
    relative = np.where(scale > 0, err / np.where(scale > 0, scale, 1.0), np.where(err > 0, np.inf, 0.0))
    # The smallest atol that passes (with rtol 0) is max_abs; the smallest rtol (with atol 0) is max_rel.
    result = {"max_abs": float(err.max()), "mean_abs": float(err.mean()), "max_rel": float(relative.max()),
              "elements": int(err.size)}
    if bits:
        flipped = int(np.count_nonzero((a > 0.5) != (b > 0.5)))
        result.update(flipped_bits=flipped, flipped_fraction=flipped / float(err.size))
    return result


def compare_backends(path_a, path_b, role, count=4, source_uri="synthetic://", options_a=None, options_b=None,
                     atol=1e-5, rtol=0.0, max_flipped=1e-3):
    """Compare the ``role`` models at ``path_a`` (the reference) and ``path_b`` on ``count`` inputs.

    ``options_a``/``options_b``: keyword arguments for :func:`open_backend` (device, precision, input_size...).
    Returns a dict: the backends, per-input figures, the worst over all inputs, and ``passed``: bits flipped at
    most ``max_flipped`` (binary latents) or every element within ``atol + rtol * |reference|``.
    """
    with open_backend(path_a, role, **(options_a or {})) as a, open_backend(path_b, role, **(options_b or {})) as b:
        if a.input_shape != b.input_shape:
            raise ConfigError("{} takes {} but {} takes {}: compare models of one input size".format(
                path_a, a.input_shape, path_b, b.input_shape))
        bits = role == "encoder" and a.info.packing == "bits"
        per_input, passed = [], True
        for array in backend_inputs(a.info, role, count, source_uri):
            out_a = a.infer(array)[0].copy()
            out_b = b.infer(array)[0].copy()  # the backends' buffers do not outlive them
            figures = compare_outputs(out_a, out_b, bits=bits)
            if bits:
                passed = passed and figures["flipped_fraction"] <= max_flipped
            else:
                passed = passed and bool(np.all(np.abs(out_b.astype(np.float64) - out_a) <=
                                                atol + rtol * np.abs(out_a.astype(np.float64))))
            per_input.append(figures)
        worst = dict((key, max(f[key] for f in per_input)) for key in per_input[0])
        return {"a": {"path": path_a, "backend": a.name}, "b": {"path": path_b, "backend": b.name}, "role": role,
                "bits": bits, "inputs": len(per_input), "atol": atol, "rtol": rtol, "max_flipped": max_flipped,
                "per_input": per_input, "worst": worst, "passed": passed}


def format_comparison(result):
    """The human-readable lines of a :func:`compare_backends` result."""
    worst = result["worst"]
    lines = ["{} A: {} ({})".format(result["role"], result["a"]["path"], result["a"]["backend"]),
             "{} B: {} ({})".format(result["role"], result["b"]["path"], result["b"]["backend"]),
             "{} inputs; worst over them:".format(result["inputs"])]
    if result["bits"]:
        lines.append("  flipped bits: {} of {} ({:.2e}); allowed {:.1e}".format(
            worst["flipped_bits"], worst["elements"], worst["flipped_fraction"], result["max_flipped"]))
    lines.append("  max |error| {:.3e}   mean |error| {:.3e}   max relative error {:.3e}".format(
        worst["max_abs"], worst["mean_abs"], worst["max_rel"]))
    lines.append("  smallest tolerance that passes: atol {:.3e} (with rtol 0), or rtol {:.3e} (with atol 0)".format(
        worst["max_abs"], worst["max_rel"]))
    if result["bits"]:
        verdict = "PASSED" if result["passed"] else "FAILED"
        lines.append("{}: the share of flipped bits is {} {:.1e}".format(
            verdict, "within" if result["passed"] else "over", result["max_flipped"]))
    else:
        lines.append("{} at atol {:.1e}, rtol {:.1e}".format("PASSED" if result["passed"] else "FAILED",
                                                             result["atol"], result["rtol"]))
    return "\n".join(lines)
