import os

import pytest

from latentlink.edge.errors import ConfigError
from latentlink.edge.profile import available_profiles, load_profile


@pytest.mark.parametrize("name,size", [("nano-504", 504), ("nano-1008", 1008)])
def test_shipped_profiles_load(name, size):
    profile = load_profile(name)
    assert profile.name == name and profile.input.width == profile.input.height == size
    assert profile.precision == "fp16" and profile.budget_ms == 33.0
    assert os.path.isabs(profile.model.encoder) and profile.model.encoder.endswith("encoder.onnx")
    assert load_profile("profiles/{}.yaml".format(name)).name == name


def test_available_profiles():
    assert {"nano-504", "nano-1008"} <= set(available_profiles())


def write(tmp_path, text):
    path = tmp_path / "p.yaml"
    path.write_text("name: p\nmodel: {encoder: e.onnx, decoder: d.onnx}\ninput: {width: 64, height: 64}\n" + text)
    return str(path)


def test_defaults_and_relative_model_paths(tmp_path):
    profile = load_profile(write(tmp_path, ""))
    assert profile.transport.drop == "oldest" and profile.input.fit == "center-crop"
    assert profile.transport.entropy == "none"
    assert load_profile(write(tmp_path, "transport: {entropy: zstd}\n")).transport.entropy == "zstd"
    assert profile.model.encoder == str(tmp_path / "e.onnx")


@pytest.mark.parametrize("text,message", [
    ("budgett_ms: 30\n", "unknown key 'budgett_ms'"),
    ("transport: {drop: latest}\n", "transport.drop must be one of oldest, newest, block, got 'latest'"),
    ("transport: {entropy: brotli}\n", "transport.entropy must be one of none, zlib, lz4, zstd, context, got 'brotli'"),
    ("budget_ms: fast\n", "budget_ms must be a number, got 'fast'"),
    ("transport: {queue_size: 0}\n", "transport.queue_size must be between 1 and 1024, got 0"),
    ("precision: int8\n", "precision must be one of fp16, fp32"),
    ("input: {width: 64}\n", "missing required key 'input.height'"),
    ("transport: [1, 2]\n", "transport must be a mapping"),
    ("input: {width: true, height: 64}\n", "input.width must be an integer, got True"),
])
def test_invalid_profiles_name_the_key_and_value(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    base = "name: p\nmodel: {encoder: e.onnx, decoder: d.onnx}\n"
    path.write_text(base + ("input: {width: 64, height: 64}\n" if not text.startswith("input") else "") + text)
    with pytest.raises(ConfigError) as err:
        load_profile(str(path))
    assert message in str(err.value) and str(path) in str(err.value)


def test_bad_yaml_and_missing_profile(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid UTF-8 YAML"):
        load_profile(str(path))
    with pytest.raises(ConfigError, match="no profile 'nano-999'.*nano-504"):
        load_profile("nano-999")
