"""Encoder and decoder -> two ONNX files for two devices, fit for the Nano's TensorRT (8.0 on JetPack 4.6, 8.2 later).

Static shapes (one input size per profile; the decoder's batch axis alone is dynamic, so that the host decodes
several frames in one run: the Nano's encoder stays fully static), opset 13 (the newest TensorRT 8.0 and 8.2 parse),
the legacy TorchScript exporter (PyTorch >= 2.9 would pick the dynamo exporter and opset 18), and no BOOL tensors
anywhere in the graph.
Beside the two files goes ``model.json``, which the edge and host read: model, input shape, latent shape, packing.
"""

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from latentlink.edge.cli import progress
from latentlink.edge.errors import ConfigError
from latentlink.edge.tiles import split_tiles, tile_shape

from .cost_model import estimate, format_estimate, verdict
from .engine import sha256_of
from .onnx_check import check_onnx, format_check

OPSET = 13
log = logging.getLogger("latentlink.export")


def export_onnx(model, height, width, out_dir, profile=None, checkpoint=None, sample=None, tiles=(1, 1), quiet=False,
                budget_ms=None):
    """Write ``encoder.onnx``, ``decoder.onnx`` and ``model.json`` for ``height`` x ``width`` frames to ``out_dir``.

    ``tiles=(R, C)``: patch processing; the models take the frame as a batch of R*C tiles (see edge/tiles.py),
    and model.json records the grid for the host. ``sample``: an optional float32 (1, 3, H, W) frame for the
    parity check (default: a smooth random image). Returns the model.json contents, parity figures included.
    A progress bar of the steps on stderr where it is a terminal, unless ``quiet``. model.json also records the
    encoder's predicted time on a Jetson Nano (export/cost_model.py), and with ``budget_ms`` (the profile's frame
    budget) a warning is logged when that prediction does not fit it.
    """
    if getattr(model, "name", None) == "progressive":  # steps with state, not one encoder/decoder pair
        if tuple(tiles) != (1, 1):
            raise ConfigError("the progressive model codes whole frames; export it without tiles")
        return export_progressive(model, height, width, out_dir, profile=profile, checkpoint=checkpoint,
                                  sample=sample, quiet=quiet)
    tile_batch = tile_shape((1, 3, height, width), tiles)
    if tile_batch[2] % model.downscale or tile_batch[3] % model.downscale:
        what = "input" if tuple(tiles) == (1, 1) else f"tile {tile_batch[3]}x{tile_batch[2]} of"
        raise ConfigError(f"{what} {width}x{height} is not a multiple of {model.downscale} (the model's downscale)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    frame = sample if sample is not None else _smooth_random(height, width).numpy()
    image = torch.from_numpy(split_tiles(frame, tiles))
    with torch.no_grad():
        latents = model.encoder(image)
    enc_path, dec_path = out_dir / "encoder.onnx", out_dir / "decoder.onnx"
    bar = progress(quiet=quiet, total=5, desc="export onnx", unit="step",
                   bar_format="{desc}: {n}/{total} steps {bar} {elapsed}")

    def step(text):
        bar.set_description("export onnx: " + text)

    step("encoder")
    _export(model.encoder, image, enc_path, "image", "latents")
    bar.update()
    step("decoder")
    # The batch axis holds a frame's tiles; the host joins several frames' tiles along it (infer_batch).
    _export(model.decoder, latents, dec_path, "latents", "image", dynamic_batch=True)
    bar.update()
    for path in (enc_path, dec_path):
        step("checking " + path.name)
        constants_to_initializers(path)
        check_graph(path)
        bar.update()
    step("parity with PyTorch")
    parity = parity_check(model, image, enc_path, dec_path)
    bar.update()
    bar.close()
    info = {
        "format": "latentlink-model", "version": 1, "model": model.name, "hparams": model.hparams,
        "profile": profile, "input_shape": list(image.shape), "latent_shape": list(latents.shape),
        "tiles": list(tiles), "frame_shape": [1, 3, height, width],
        "packing": model.packing, "latent_dtype": "float32", "bits_per_pixel": model.bits_per_pixel,
        "input": "RGB float32 in [0, 1], NCHW", "output": "RGB float32, NCHW, clip to [0, 1]",
        "encoder": enc_path.name, "decoder": dec_path.name, "opset": OPSET, "torch": torch.__version__,
        "checkpoint": Path(checkpoint).name if checkpoint else None,
        "checkpoint_sha256": sha256_of(checkpoint) if checkpoint else None,
        "parity": parity,
        "estimate": estimate(enc_path),
    }
    if budget_ms and verdict(info["estimate"], budget_ms) != "fits":
        log.warning("%s: the encoder may not fit the Nano's frame budget: %s. A cheaper encoder (README \"Will it "
                    "fit? The cost model\") or a smaller input would.", enc_path,
                    format_estimate(info["estimate"], budget_ms))
    (out_dir / "model.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def _export(module, example, path, input_name, output_name, dynamic_batch=False):
    axes = {input_name: {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=OPSET, do_constant_folding=True,
                          input_names=[input_name], output_names=[output_name], dynamic_axes=axes)


def constants_to_initializers(path):
    """Rewrite ``Constant`` nodes as graph initializers, in place.

    TensorRT 8.x wants some operands (Clip's min and max, Mul's and Sub's scalars) as initializers; the TorchScript
    exporter leaves them as Constant nodes.
    """
    model = onnx.load(str(path))
    graph = model.graph
    for node in [n for n in graph.node if n.op_type == "Constant"]:
        value = next((a.t for a in node.attribute if a.name == "value"), None)
        if value is None:
            continue
        tensor = onnx.TensorProto()
        tensor.CopyFrom(value)
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        graph.node.remove(node)
    onnx.save(model, str(path))


def check_graph(path):
    """Raise ConfigError unless ``path`` passes ``latentlink export check`` (see :mod:`export.onnx_check`)."""
    report = check_onnx(path)
    if not report["ok"]:
        raise ConfigError(format_check(report))


def parity_check(model, image, enc_path, dec_path):
    """Compare ONNX Runtime with PyTorch on one image: the latents, and the decoder's max/mean error.

    Discrete latents (``bits``, ``uint8``) are compared by the share that differ; float latents by the max error.
    """
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    enc = ort.InferenceSession(str(enc_path), providers=providers)
    dec = ort.InferenceSession(str(dec_path), providers=providers)
    with torch.no_grad():
        latents = model.encoder(image).numpy()
        reference = model.decoder(torch.from_numpy(latents)).numpy()
    onnx_latents = enc.run(None, {"image": image.numpy()})[0]
    decoded = dec.run(None, {"latents": latents})[0]  # same latents: isolate the decoder's error
    err = np.abs(decoded - reference)
    result = {"decoder_max_abs_error": float(err.max()), "decoder_mean_abs_error": float(err.mean())}
    # The dynamic batch axis: two frames in one run give what each gives alone (the host batches frames).
    batched = dec.run(None, {"latents": np.concatenate([latents, np.flip(latents, -1).copy()])})[0]
    alone = np.concatenate([decoded, dec.run(None, {"latents": np.flip(latents, -1).copy()})[0]])
    result["decoder_batch_max_abs_error"] = float(np.abs(batched - alone).max())
    if model.packing in ("bits", "uint8"):
        # A value may differ only where an activation sits at a rounding threshold; more is an export bug.
        result["latent_mismatch_fraction"] = float(np.mean(onnx_latents != latents))
        bad = result["latent_mismatch_fraction"] > 1e-3
    else:
        result["latent_max_abs_error"] = float(np.abs(onnx_latents - latents).max())
        bad = result["latent_max_abs_error"] > 1e-3 * (1 + float(np.abs(latents).max()))
    if bad or err.max() > 1e-3 or result["decoder_batch_max_abs_error"] > 1e-3:
        raise ConfigError(f"ONNX Runtime disagrees with PyTorch: {result}")
    return result


def _smooth_random(height, width, seed=0):
    """A smooth random RGB image (1, 3, H, W): random noise blurred by upsampling, values in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, max(1, height // 16), max(1, width // 16), generator=g)
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)


def export_progressive(model, height, width, out_dir, profile=None, checkpoint=None, sample=None, quiet=False):
    """The progressive model (export/models/progressive.py) as two step graphs: ``encoder_step.onnx`` (residual +
    encoder state -> one iteration's bits + new state) and ``decoder_step.onnx`` (bits + decoder state -> increment +
    new state), one iteration per engine call, the state an explicit input and output; and ``model.json`` with a
    ``progressive`` section (iterations, code and state shapes, each step's inputs and outputs in order).

    Both steps are fully static (batch 1) and go to the edge: the encoder needs the decoder to form the residual of
    the next iteration. Returns the model.json contents, parity figures included.
    """
    from .models.progressive import (DECODER_INPUTS, DECODER_OUTPUTS, ENCODER_INPUTS, ENCODER_OUTPUTS,
                                     progressive_info)

    if height % model.downscale or width % model.downscale:
        raise ConfigError(f"input {width}x{height} is not a multiple of {model.downscale} (the model's downscale)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    section = progressive_info(model, height, width)
    image = torch.from_numpy(sample if sample is not None else _smooth_random(height, width).numpy())
    state = torch.zeros([1] + section["state_shape"])
    with torch.no_grad():
        codes, _ = model.encoder(image - 0.5, state)
    enc_path, dec_path = out_dir / section["encoder_step"]["file"], out_dir / section["decoder_step"]["file"]
    bar = progress(quiet=quiet, total=5, desc="export onnx", unit="step",
                   bar_format="{desc}: {n}/{total} steps {bar} {elapsed}")
    for module, example, path, names in ((model.encoder, (image - 0.5, state), enc_path,
                                          (ENCODER_INPUTS, ENCODER_OUTPUTS)),
                                         (model.decoder, (codes, state), dec_path,
                                          (DECODER_INPUTS, DECODER_OUTPUTS))):
        bar.set_description("export onnx: " + path.name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(module, example, str(path), dynamo=False, opset_version=OPSET, do_constant_folding=True,
                              input_names=list(names[0]), output_names=list(names[1]))
        bar.update()
    for path in (enc_path, dec_path):
        bar.set_description("export onnx: checking " + path.name)
        constants_to_initializers(path)
        check_graph(path)
        bar.update()
    bar.set_description("export onnx: parity with PyTorch")
    parity = progressive_parity(model, image, enc_path, dec_path)
    bar.update()
    bar.close()
    info = {
        "format": "latentlink-model", "version": 1, "model": model.name, "hparams": model.hparams,
        "profile": profile, "input_shape": [1, 3, height, width], "latent_shape": [1] + section["code_shape"],
        "tiles": [1, 1], "frame_shape": [1, 3, height, width],
        "packing": model.packing, "latent_dtype": "float32", "bits_per_pixel": model.bits_per_pixel,
        "input": "RGB float32 in [0, 1], NCHW; the encoder step takes the residual image - reconstruction",
        "output": "the decoder step's increment: reconstruction = 0.5 + the sum of the increments; clip to [0, 1]",
        "encoder": enc_path.name, "decoder": dec_path.name, "opset": OPSET, "torch": torch.__version__,
        "checkpoint": Path(checkpoint).name if checkpoint else None,
        "checkpoint_sha256": sha256_of(checkpoint) if checkpoint else None,
        "progressive": section,
        "parity": parity,
        "estimate": {"encoder_step": estimate(enc_path), "decoder_step": estimate(dec_path)},
    }
    (out_dir / "model.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def progressive_parity(model, image, enc_path, dec_path):
    """Every iteration of the steps in ONNX Runtime against PyTorch, each fed PyTorch's inputs (so that one flipped
    bit does not compound): the share of differing bits, and the increments' and states' max error."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    enc = ort.InferenceSession(str(enc_path), providers=providers)
    dec = ort.InferenceSession(str(dec_path), providers=providers)
    enc_state = dec_state = model.initial_state(image)
    x_hat = torch.full_like(image, 0.5)
    mismatch, err = [], 0.0
    with torch.no_grad():
        for _ in range(model.iterations):
            residual = image - x_hat
            feeds = {"residual": residual.numpy(), "state": enc_state.numpy()}
            codes, new_enc = model.encoder(residual, enc_state)
            onnx_codes, onnx_state = enc.run(None, feeds)
            mismatch.append(float(np.mean(onnx_codes != codes.numpy())))
            err = max(err, float(np.abs(onnx_state - new_enc.numpy()).max()))
            increment, new_dec = model.decoder(codes, dec_state)
            onnx_inc, onnx_dec = dec.run(None, {"codes": codes.numpy(), "state": dec_state.numpy()})
            err = max(err, float(np.abs(onnx_inc - increment.numpy()).max()),
                      float(np.abs(onnx_dec - new_dec.numpy()).max()))
            enc_state, dec_state, x_hat = new_enc, new_dec, x_hat + increment
    result = {"code_mismatch_fraction": max(mismatch), "max_abs_error": err}
    if result["code_mismatch_fraction"] > 1e-3 or err > 1e-3:
        raise ConfigError(f"ONNX Runtime disagrees with PyTorch: {result}")
    return result
