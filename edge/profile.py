"""Deployment profiles: model files, input size, precision, budget and transport settings, as validated YAML.

``load_profile("nano-504")`` reads ``profiles/nano-504.yaml`` from the installed ``profiles`` package;
``load_profile("my/site.yaml")`` reads any file. Model paths in a profile are relative to the profile file.
Unknown keys are errors (a typo must not silently fall back to a default), and every error names the file, the
key, the bad value and what is allowed.
"""

import collections
import io
import os

import yaml

from .entropy import CODERS
from .errors import ConfigError
from .preprocess import FIT_MODES
from .protocol import SERIALIZERS
from .protocol import DELIVERIES, MAX_WINDOW
from .sender import DROP_POLICIES

PRECISIONS = ("fp16", "fp32")

# JetPack -> the TensorRT it ships (major.minor: the operator table of export/trt_ops.py `export check` uses). On the
# Nano this matters: plain JetPack 4.6 (L4T R32.6.1) ships TensorRT 8.0.1, which cannot parse ONNX Sign or Round;
# JetPack 4.6.1 to 4.6.6 (L4T R32.7.x) ship 8.2.1. The JetPack 5 and 6 entries are from NVIDIA's JetPack release
# notes, unconfirmed here: they never run on a Nano.
JETPACK_TENSORRT = collections.OrderedDict(
    [("4.6", "8.0")] + [("4.6.{}".format(n), "8.2") for n in range(1, 7)]
    + [("5.0.2", "8.4")] + [(v, "8.5") for v in ("5.1", "5.1.1", "5.1.2", "5.1.3", "5.1.4")]
    + [("6.0", "8.6"), ("6.1", "10"), ("6.2", "10")])

# Device -> the JetPack lines it runs (the Nano's last is 4.6.x; JetPack 5 and 6 dropped it).
DEVICE_JETPACKS = collections.OrderedDict([
    ("jetson-nano", ("4.6",)),
    ("jetson-xavier", ("4.6", "5.0", "5.1")),
    ("jetson-orin", ("5.0", "5.1", "6.0", "6.1", "6.2")),
])

# key -> (type, default or REQUIRED, allowed values or (min, max) range or None)
REQUIRED = object()
SCHEMA = {
    "name": (str, REQUIRED, None),
    "description": (str, "", None),
    "model": {
        "encoder": (str, REQUIRED, None),
        "decoder": (str, REQUIRED, None),
    },
    "input": {
        "width": (int, REQUIRED, (4, 8192)),
        "height": (int, REQUIRED, (4, 8192)),
        "fit": (str, "center-crop", FIT_MODES),
    },
    "capture": {
        "width": (int, 1280, (16, 8192)),
        "height": (int, 720, (16, 8192)),
        "fps": (int, 30, (1, 240)),
    },
    "target": {  # what the encoder's engine is built on: `export check` checks against the TensorRT it ships
        "device": (str, "jetson-nano", tuple(DEVICE_JETPACKS)),
        "jetpack": (str, "4.6", tuple(JETPACK_TENSORRT)),
    },
    "precision": (str, "fp16", PRECISIONS),
    "budget_ms": (float, 33.0, (0.1, 100000.0)),
    "transport": {
        "serializer": (str, "framed", SERIALIZERS),
        "entropy": (str, "none", CODERS),
        "send_buffer_bytes": (int, 1 << 20, (4096, 1 << 28)),
        "queue_size": (int, 4, (1, 1024)),
        "drop": (str, "oldest", DROP_POLICIES),
        "window": (int, 4, (1, MAX_WINDOW)),
        "delivery": (str, "live", DELIVERIES),
        "wait_for_host_s": (float, 0.0, (0.0, 1e9)),
        "connect_timeout_s": (float, 5.0, (0.1, 3600.0)),
        "send_timeout_s": (float, 10.0, (0.1, 3600.0)),
        "max_backoff_s": (float, 5.0, (0.1, 3600.0)),
        "max_frame_bytes": (int, 4 << 20, (1024, 1 << 31)),
    },
}


class Section(object):
    """A validated mapping with attribute access (``profile.input.width``)."""

    def __init__(self, values):
        self.__dict__.update(values)

    def as_dict(self):
        return {k: v.as_dict() if isinstance(v, Section) else v for k, v in self.__dict__.items()}

    def __repr__(self):
        return "Section({!r})".format(self.as_dict())


def profiles_dir():
    """The folder of the profiles shipped with latentlink (the ``profiles`` package)."""
    from latentlink import profiles

    return os.path.dirname(os.path.abspath(profiles.__file__))


def available_profiles():
    return sorted(f[:-5] for f in os.listdir(profiles_dir()) if f.endswith(".yaml"))


def resolve_profile_path(name_or_path):
    """A profile name (``nano-504``) or a YAML file's path -> the file's absolute path.

    ``profiles/nano-504.yaml`` also finds the shipped profile when run outside a source checkout.
    """
    if os.path.isfile(name_or_path):
        return os.path.abspath(name_or_path)
    folder, base = os.path.split(name_or_path)
    if folder in ("", "profiles"):
        shipped = os.path.join(profiles_dir(), base if base.endswith(".yaml") else base + ".yaml")
        if os.path.isfile(shipped):
            return shipped
    raise ConfigError("no profile {!r} (shipped profiles: {}; or give the path of a YAML file)".format(
        name_or_path, ", ".join(available_profiles())))


def load_profile(name_or_path):
    """Read and validate a profile; model paths come back absolute."""
    path = resolve_profile_path(name_or_path)
    try:
        with io.open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError("{}: not valid UTF-8 YAML ({})".format(path, exc))
    profile = _validate(data, SCHEMA, path, "")
    base = os.path.dirname(path)
    profile.model.encoder = os.path.normpath(os.path.join(base, profile.model.encoder))
    profile.model.decoder = os.path.normpath(os.path.join(base, profile.model.decoder))
    _check_target(profile.target, path)
    profile.target.tensorrt = JETPACK_TENSORRT[profile.target.jetpack]
    profile.path = path
    return profile


def _check_target(target, path):
    """The device must run that JetPack (a Nano cannot have JetPack 5 or 6)."""
    if not _runs(target.device, target.jetpack):
        raise ConfigError("{}: target.jetpack {!r} does not run on a {} (it runs JetPack {})".format(
            path, target.jetpack, target.device,
            ", ".join(v for v in JETPACK_TENSORRT if _runs(target.device, v))))


def _runs(device, jetpack):
    return any(jetpack == line or jetpack.startswith(line + ".") for line in DEVICE_JETPACKS[device])


def _validate(data, schema, path, prefix):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("{}: {} must be a mapping, got {!r}".format(path, prefix.rstrip(".") or "the file", data))
    unknown = sorted(set(data) - set(schema))
    if unknown:
        raise ConfigError("{}: unknown key {!r} (allowed here: {})".format(
            path, prefix + str(unknown[0]), ", ".join(prefix + k for k in schema)))
    values = {}
    for key, rule in schema.items():
        if isinstance(rule, dict):
            values[key] = _validate(data.get(key), rule, path, prefix + key + ".")
            continue
        kind, default, allowed = rule
        if key not in data:
            if default is REQUIRED:
                raise ConfigError("{}: missing required key {!r}".format(path, prefix + key))
            values[key] = default
            continue
        values[key] = _check_value(data[key], kind, allowed, path, prefix + key)
    return Section(values)


def _check_value(value, kind, allowed, path, key):
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        hint = ' (quote it: "{}")'.format(value) if kind is str and isinstance(value, (int, float)) else ""
        raise ConfigError("{}: {} must be {}, got {!r}{}".format(path, key, _KIND_NAMES[kind], value, hint))
    if isinstance(allowed, tuple) and len(allowed) == 2 and not isinstance(allowed[0], str):
        low, high = allowed
        if not low <= value <= high:
            raise ConfigError("{}: {} must be between {} and {}, got {!r}".format(path, key, low, high, value))
    elif allowed is not None and value not in allowed:
        raise ConfigError("{}: {} must be one of {}, got {!r}".format(path, key, ", ".join(allowed), value))
    return value


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number"}
