"""The model zoo: one registry, one contract.

Every model has ``encoder`` and ``decoder`` submodules (exported as two ONNX files), a ``forward(x)`` for training
that returns ``{"x_hat": reconstruction, "latents": what goes on the wire}``, a class attribute ``packing`` naming
how its latents travel (``bits``, ``uint8``, ``float16``, ``float32``), and ``hparams``: the keyword arguments that
rebuild it, stored in every checkpoint so a checkpoint alone rebuilds the model.
"""

from edge.errors import ConfigError

from .registry import MODELS, build_model, copy_matching_weights, load_checkpoint, register_model, save_checkpoint

# Importing the model modules registers them.
from . import lossy_cae  # noqa: F401,E402

__all__ = ["MODELS", "build_model", "copy_matching_weights", "load_checkpoint", "register_model", "save_checkpoint",
           "ConfigError"]
