"""A test double of a progressive model (edge/progressive.py's ProgressiveCodec), for tests only.

Each 8x8 cell's mean colour (3 channels, [0, 1]) is quantized to K bits; iteration i codes bit K-1-i of every cell, so
the first k codes give the mean to within 2**-k, and more iterations give a better image. ``install()`` makes it
``latentlink.edge.progressive`` in this process (an edge or host process started through :func:`main` too), and
:func:`write_model` writes a model folder and profile that ``latentlink edge`` and ``latentlink host`` open as a
progressive model.
"""

import json
import os
import sys

import numpy as np

CELL = 8


class DoubleCodec(object):
    name = "double"

    def __init__(self, iterations, height, width):
        self.max_iterations = int(iterations)
        self.input_shape = (1, 3, height, width)
        self.code_shape = (3, height // CELL, width // CELL)
        self.encoded = []  # the iterations of each encode call

    def encode(self, image, iterations):
        k, (c, h, w) = self.max_iterations, self.code_shape
        means = np.asarray(image, dtype=np.float64)[0].reshape(c, h, CELL, w, CELL).mean(axis=(2, 4))
        q = np.clip(np.floor(means * 2 ** k), 0, 2 ** k - 1).astype(np.int64)
        self.encoded.append(iterations)
        return np.stack([(q >> (k - 1 - i)) & 1 for i in range(iterations)]).astype(np.uint8), {"run_ms": 0.0}

    def decode(self, codes):
        k, n = self.max_iterations, codes.shape[0]
        if not 1 <= n <= k or tuple(codes.shape[1:]) != self.code_shape:
            raise ValueError("codes of shape {}".format(codes.shape))
        q = sum(codes[i].astype(np.int64) << (k - 1 - i) for i in range(n))
        value = (q + 0.5 * 2 ** (k - n)) / 2 ** k
        image = np.repeat(np.repeat(value, CELL, axis=1), CELL, axis=2)[None].astype(np.float32)
        return image, {"run_ms": 0.0}


def open_progressive(model_path, role, **options):
    folder = os.path.dirname(os.path.abspath(model_path))
    with open(os.path.join(folder, "model.json")) as f:
        data = json.load(f)
    _, _, height, width = data["input_shape"]
    return DoubleCodec(data["progressive"]["iterations"], height, width)


def install():
    """Make this module ``latentlink.edge.progressive`` in this process."""
    sys.modules["latentlink.edge.progressive"] = sys.modules[__name__]


def write_model(folder, iterations=6, size=64, window=4, queue_size=2):
    """A progressive double's model folder (model.json, placeholder encoder.onnx / decoder.onnx) and a profile for it
    under ``folder``; returns the profile's path."""
    os.makedirs(os.path.join(folder, "model"), exist_ok=True)
    code_shape = [3, size // CELL, size // CELL]
    image, codes, state = [1, 3, size, size], [1] + code_shape, [1, 4] + code_shape[1:]
    steps = {"encoder_step": {"file": "encoder_step.onnx", "inputs": [["residual", image], ["state", state]],
                              "outputs": [["codes", codes], ["new_state", state]]},
             "decoder_step": {"file": "decoder_step.onnx", "inputs": [["codes", codes], ["state", state]],
                              "outputs": [["increment", image], ["new_state", state]]}}
    data = {"model": "progressive-double", "input_shape": image, "latent_shape": codes, "packing": "bits",
            "latent_dtype": "uint8", "checkpoint_sha256": "ab" * 32,
            "progressive": dict(steps, iterations=iterations, code_shape=code_shape, state_shape=state[1:])}
    with open(os.path.join(folder, "model", "model.json"), "w") as f:
        json.dump(data, f)
    for name in ("encoder_step.onnx", "decoder_step.onnx"):  # placeholders: the double computes without them
        open(os.path.join(folder, "model", name), "wb").close()
    profile = os.path.join(folder, "progressive.yaml")
    with open(profile, "w") as f:
        f.write("name: progressive-double\nmodel:\n  encoder: model/encoder_step.onnx\n"
                "  decoder: model/decoder_step.onnx\n"
                "input:\n  width: {0}\n  height: {0}\nbudget_ms: 33\ntransport:\n  queue_size: {1}\n  window: {2}\n"
                "  max_backoff_s: 0.5\n".format(size, queue_size, window))
    return profile


def main(argv):
    """``python -m tests.progressive_double edge|host ARGS``: that command with this double as the model."""
    install()
    if argv[0] == "edge":
        from latentlink.edge.__main__ import main as command
    else:
        from latentlink.host.__main__ import main as command
    return command(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
