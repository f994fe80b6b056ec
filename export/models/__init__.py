"""The model zoo: one registry, one contract.

Every model has ``encoder`` and ``decoder`` submodules (exported as two ONNX files), a ``forward(x)`` for training
that returns ``{"x_hat": reconstruction, "latents": what goes on the wire}``, ``packing`` naming how its latents
travel (``bits``, ``uint8``, ``float16``, ``float32``), ``downscale`` (input sides must be multiples of it),
``latent_shape(h, w)``, ``bits_per_pixel`` and ``hparams``: the keyword arguments that rebuild it, stored in every
checkpoint so a checkpoint alone rebuilds the model. A model trained against critics (``cyclegan``) also has
``generator_loss(x, out, reconstruction_loss)``, ``discriminator_loss(x, out)`` and ``discriminators``.

    ==========  ==========================================  =========  ==============================
    name        model                                       packing    bpp at the defaults
    ==========  ==========================================  =========  ==============================
    lossy-cae   binary latents (the deck's best on a Nano)  bits       0.5 (8 channels at 1/4)
    cae         plain autoencoder, 8-bit small image        uint8      1.5 (3 channels at 1/4)
    crae        seed 000's Tables IV and V                  float32    1.375 (44 channels at 1/32)
    cyclegan    the deck's Cycle-GAN generator pair         uint8      6 (RGB at 1/2)
    progressive K residual iterations of binary codes (002/003) bits       1.0 at K=8 (0.125 per iteration)
    ==========  ==========================================  =========  ==============================
"""

from latentlink.edge.errors import ConfigError

from .registry import MODELS, build_model, copy_matching_weights, load_checkpoint, register_model, save_checkpoint

# Importing the model modules registers them.
from . import cae, crae, cyclegan, lossy_cae, progressive  # noqa: F401,E402

__all__ = ["MODELS", "build_model", "copy_matching_weights", "load_checkpoint", "register_model", "save_checkpoint",
           "ConfigError"]
