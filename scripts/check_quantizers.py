"""Exhaustive proof that the TensorRT 8.0-safe quantizers equal Sign and Round, bit for bit, on every float32.

    python scripts/check_quantizers.py            # PyTorch and ONNX Runtime; a few minutes on 2 cores
    python scripts/check_quantizers.py --torch-only

``step`` (export/models/layers.py) against ``clamp(sign(x), min=0)`` over all 2^32 bit patterns except NaNs, and
``round_half_even`` against ``torch.round`` / ONNX Round over every float32 in [0, 256) (what QuantizeUint8 rounds:
255 * sigmoid). In ONNX Runtime both sides are the exported graphs (old: Sign + Clip, Round; new: what TensorRT 8.0
parses), compared as bit patterns, so +0.0 and -0.0 count as different. Prints the counts; exit 1 on any mismatch.
"""

import argparse
import os
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from latentlink.export.models.layers import round_half_even, step  # noqa: E402
from latentlink.export.onnx_export import _export, constants_to_initializers  # noqa: E402

CHUNK = 1 << 24  # floats per batch: 64 MB of float32


class _Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def onnx_session(fn, folder, name):
    import onnxruntime as ort

    path = os.path.join(folder, name + ".onnx")
    _export(_Fn(fn).eval(), torch.zeros(CHUNK), path, "x", "y")  # static shapes, as the shipped models
    constants_to_initializers(path)
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def chunks(first, last):
    """(float32 array of CHUNK values, how many count): the bit patterns first .. last - 1 as unsigned 32-bit
    integers, NaNs and the padding of the last chunk replaced by 0.0 and not counted."""
    for start in range(first, last, CHUNK):
        x = np.zeros(CHUNK, np.float32)
        x[:min(CHUNK, last - start)] = np.arange(start, min(start + CHUNK, last), dtype=np.uint64).astype(
            np.uint32).view(np.float32)
        nan = np.isnan(x)
        x[nan] = 0
        yield x, min(CHUNK, last - start) - int(nan.sum())


def compare(name, new, old, ranges, sessions):
    checked = differ = 0
    for first, last in ranges:
        for x, count in chunks(first, last):
            t = torch.from_numpy(x)
            differ += int(np.count_nonzero(new(t).numpy().view(np.uint32) != old(t).numpy().view(np.uint32)))
            if sessions:
                a, b = (s.run(None, {"x": x})[0] for s in sessions)
                differ += int(np.count_nonzero(a.view(np.uint32) != b.view(np.uint32)))
            checked += count
    print("{}: {:,} float32 values, {} differing bit patterns{}".format(
        name, checked, differ, " (PyTorch and ONNX Runtime)" if sessions else " (PyTorch)"))
    return differ


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch-only", action="store_true", help="skip ONNX Runtime")
    args = parser.parse_args()
    old_step = lambda x: torch.clamp(torch.sign(x), min=0)  # noqa: E731
    all_floats = [(0, 1 << 32)]
    below_256 = [(0, int(np.float32(256).view(np.uint32)))]  # +0.0 up to the float before 256
    with tempfile.TemporaryDirectory() as folder:
        step_sessions = round_sessions = None
        if not args.torch_only:
            step_sessions = (onnx_session(step, folder, "step"), onnx_session(old_step, folder, "sign"))
            round_sessions = (onnx_session(round_half_even, folder, "rhe"), onnx_session(torch.round, folder, "round"))
        bad = compare("step vs clamp(sign(x), 0)", step, old_step, all_floats, step_sessions)
        bad += compare("round_half_even vs Round on [0, 256)", round_half_even, torch.round, below_256, round_sessions)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
