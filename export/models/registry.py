"""Name -> model class registry and checkpoints that carry their architecture."""

import inspect
from pathlib import Path

import torch

from latentlink.edge.errors import ConfigError

MODELS = {}

# weights_only: a checkpoint is data; it must not be able to run code when loaded. PyTorch < 1.13 (NVIDIA's wheels
# for the Nano's JetPack 4.6 are 1.10) lacks the option and unpickles freely: load only checkpoints you trust there.
_WEIGHTS_ONLY = {"weights_only": True} if "weights_only" in inspect.signature(torch.load).parameters else {}


def register_model(name):
    """Class decorator: make a model buildable as ``build_model(name, **hparams)``."""

    def wrap(cls):
        if name in MODELS:
            raise ValueError(f"model name {name!r} registered twice")
        cls.name = name
        MODELS[name] = cls
        return cls

    return wrap


def build_model(name, **hparams):
    """A fresh, untrained model of the registered architecture ``name``."""
    try:
        cls = MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r} (available: {', '.join(sorted(MODELS))})") from None
    try:
        return cls(**hparams)
    except TypeError as exc:
        takes = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise ConfigError(f"model {name!r} does not take these settings ({exc}); it takes: {', '.join(takes)}") from None


def save_checkpoint(path, model, **meta):
    """Write weights + architecture + ``meta`` (training facts) to ``path`` (a .pt file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"model": model.name, "hparams": dict(model.hparams), "state_dict": state, "meta": meta}, path)


def copy_matching_weights(model, source):
    """Warm start: copy into ``model`` every tensor of the model ``source`` whose name and shape match.

    For growing a model (a larger decoder, say) from a trained one: what matches starts trained, the rest keeps
    its fresh initialization. Returns ``(copied, fresh)``: the names copied and the names left fresh.
    """
    theirs = source.state_dict()
    ours = model.state_dict()
    copied = [k for k, v in ours.items() if k in theirs and theirs[k].shape == v.shape]
    if not copied:
        raise ConfigError(f"no weight of the {source.name} model fits model {model.name}: nothing to start from")
    ours.update({k: theirs[k] for k in copied})
    model.load_state_dict(ours)
    return copied, [k for k in ours if k not in copied]


def load_checkpoint(path, device="cpu"):
    """Rebuild a model from a checkpoint written by :func:`save_checkpoint`; returns ``(model, meta)``.

    The model is in eval mode (deterministic binarization) on ``device``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {str(path)!r} does not exist (train one with `latentlink train`)")
    try:
        ckpt = torch.load(path, map_location=device, **_WEIGHTS_ONLY)
    except Exception as exc:  # noqa: BLE001 - torch.load of a foreign file fails every way (KeyError, EOFError...)
        first = (str(exc).strip().splitlines() or [""])[0].split(". ")[0]
        raise ConfigError(f"{str(path)!r} is not a latentlink checkpoint: PyTorch cannot load it ("
                          f"{type(exc).__name__}: {first}); give a checkpoint written by `latentlink train`") from None
    missing = [key for key in ("model", "hparams", "state_dict") if not isinstance(ckpt, dict) or key not in ckpt]
    if missing:
        found = ", ".join(repr(k) for k in list(ckpt)[:6]) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ConfigError(f"{str(path)!r} is a PyTorch file but not a latentlink checkpoint: it has no "
                          f"{', '.join(repr(k) for k in missing)} (it holds {found or 'nothing'}). latentlink's "
                          f"checkpoints carry their architecture; train one with `latentlink train`, or start a "
                          f"new model from matching weights with `latentlink train --init-from` on a latentlink "
                          f"checkpoint")
    name, hparams, state = ckpt["model"], ckpt["hparams"], ckpt["state_dict"]
    # Settings added after a checkpoint was written take the value it was trained with, not today's default.
    hparams = {**getattr(MODELS.get(name), "legacy_hparams", {}), **dict(hparams or {})}
    model = build_model(name, **hparams)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"{str(path)!r}: its weights do not fit a {name} model with its own settings ({first}); "
                          f"the file is damaged or was edited") from None
    return model.to(device).eval(), ckpt.get("meta", {})
