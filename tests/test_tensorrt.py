"""The TensorRT path against fakes of TensorRT 8.2's binding API, 10.x's tensor API and pycuda (tests/fake_tensorrt.py).

No TensorRT or GPU here: these check the version dispatch, the engine cache, buffer sizing, zero-copy, CUDA-event
timing plumbing and error paths. tests/test_tensorrt_device.py runs the real thing where TensorRT and a GPU exist.
"""

import json
import os
import shutil
import threading

import numpy as np
import pytest

from latentlink.edge.backends import open_backend, trt_api
from latentlink.edge.errors import BackendError, ConfigError
from latentlink.edge.profile import load_profile

from . import fake_tensorrt

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

APIS = ["8.2", "10"]


@pytest.fixture
def onnx_dir(tmp_path, tiny_profile):
    """A copy of the tiny model's ONNX files and model.json in a folder of its own."""
    source = os.path.dirname(load_profile(tiny_profile).model.encoder)
    folder = tmp_path / "model"
    shutil.copytree(source, str(folder))
    return folder


def build(onnx_path, **kwargs):
    from latentlink.export.engine import build_engine

    logs = []
    meta = build_engine(str(onnx_path), log=logs.append, **kwargs)
    return meta, logs


def edit_sidecar(meta, **changes):
    """Rewrite keys of an engine's ``<engine>.json``."""
    sidecar = meta["engine"] + ".json"
    with open(sidecar) as f:
        data = json.load(f)
    data.update(changes)
    with open(sidecar, "w") as f:
        json.dump(data, f)


@pytest.mark.parametrize("api", APIS)
def test_engine_cache_name_sidecar_reuse_and_rebuild(monkeypatch, onnx_dir, api):
    trt, _ = fake_tensorrt.install(monkeypatch, api)
    meta, logs = build(onnx_dir / "encoder.onnx")
    from latentlink.export.engine import sha256_of

    sha = sha256_of(str(onnx_dir / "encoder.onnx"))
    name = "encoder.{}.trt{}.Fake-GPU-9000.fp16.engine".format(sha[:8], trt.__version__)
    assert os.path.basename(meta["engine"]) == name and not meta["reused"]
    assert trt.built == [(os.path.getsize(str(onnx_dir / "encoder.onnx")), True, 256 << 20)]
    sidecar = json.loads((onnx_dir / (name + ".json")).read_text())
    assert sidecar["input_shape"] == [1, 3, 64, 64] and sidecar["latent_shape"] == [1, 8, 16, 16]
    assert sidecar["packing"] == "bits" and sidecar["tensorrt"] == trt.__version__ and sidecar["precision"] == "fp16"
    assert sidecar["gpu"] == "Fake GPU 9000" and sidecar["onnx_sha256"] == sha and "parity" not in sidecar
    # Metadata lives beside the engine, never inside it: the engine file is exactly what the builder returned.
    assert (onnx_dir / name).read_bytes().startswith(fake_tensorrt.ENGINE_MAGIC)

    again, logs = build(onnx_dir / "encoder.onnx")
    assert again["reused"] and len(trt.built) == 1 and "reusing" in logs[0]
    build(onnx_dir / "encoder.onnx", force=True)
    assert len(trt.built) == 2

    # A changed ONNX file is a new engine; the stale one (same ONNX file, GPU, precision) is replaced.
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(onnx_dir / "encoder.onnx"))
    model.doc_string = "retrained"
    onnx.save(model, str(onnx_dir / "encoder.onnx"))
    new, logs = build(onnx_dir / "encoder.onnx")
    assert new["engine"] != meta["engine"] and not os.path.exists(meta["engine"])
    assert not os.path.exists(meta["engine"] + ".json") and any("replacing stale" in line for line in logs)
    # An FP32 engine is another precision, not a stale FP16 one: both stay.
    fp32, _ = build(onnx_dir / "encoder.onnx", precision="fp32")
    assert fp32["engine"].endswith(".fp32.engine") and os.path.exists(new["engine"])
    assert trt.built[-1][1] is False


def test_engines_of_other_models_in_one_folder_are_not_stale(monkeypatch, tmp_path, onnx_dir):
    """Every profile's encoder is encoder.onnx: engines for two of them share --out without deleting each other."""
    fake_tensorrt.install(monkeypatch, "8.2")
    other = tmp_path / "other-model"
    shutil.copytree(str(onnx_dir), str(other))
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(other / "encoder.onnx"))
    model.doc_string = "another profile's encoder"
    onnx.save(model, str(other / "encoder.onnx"))
    out = str(tmp_path / "engines")
    first, _ = build(onnx_dir / "encoder.onnx", out_dir=out)
    second, logs = build(other / "encoder.onnx", out_dir=out)
    assert first["engine"] != second["engine"] and os.path.exists(first["engine"]) and os.path.exists(second["engine"])
    assert not any("stale" in line for line in logs)


def test_unwritable_output_folder_is_refused_before_the_build(monkeypatch, tmp_path, onnx_dir):
    trt, _ = fake_tensorrt.install(monkeypatch, "8.2")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="cannot write engines to .*a-file/engines.*pass --out DIR"):
        build(onnx_dir / "encoder.onnx", out_dir=str(blocker / "engines"))
    assert not trt.built  # refused before minutes of building, not after


@pytest.mark.parametrize("api", APIS)
def test_workspace_goes_through_the_api_each_version_has(monkeypatch, onnx_dir, api):
    trt, _ = fake_tensorrt.install(monkeypatch, api)
    build(onnx_dir / "decoder.onnx", workspace_mb=64)
    assert trt.built[-1][2] == 64 << 20  # 8.2: max_workspace_size; 10: set_memory_pool_limit (the fake checks)


@pytest.mark.parametrize("api", APIS)
def test_parser_errors_one_per_line_with_the_node(monkeypatch, tmp_path, api):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    fake_tensorrt.install(monkeypatch, api)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu0"),
             helper.make_node("Softsign", ["r"], ["s"], name="odd"),
             helper.make_node("Erf", ["s"], ["y"], name="erf2")]
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y]),
                                opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "m.onnx"))
    (tmp_path / "model.json").write_text(json.dumps({"model": "m", "input_shape": [1, 4], "latent_shape": [1, 4],
                                                     "packing": "float32"}))
    with pytest.raises(BackendError) as info:
        build(tmp_path / "m.onnx")
    lines = str(info.value).splitlines()
    assert "cannot parse" in lines[0]
    if api == "8.2":  # 8.2's parser errors give the node's index only
        assert lines[1].strip() == "node 1: No importer registered for op: Softsign [UNSUPPORTED_NODE]"
    else:  # 10.x adds its name and operator
        assert lines[1].strip() == "node 1 (odd, Softsign): No importer registered for op: Softsign [UNSUPPORTED_NODE]"
    assert lines[2].strip().startswith("node 2") and "latentlink export check" in lines[3]
    assert not list(tmp_path.glob("*.engine"))


def test_failed_build_says_what_to_try_and_leaves_no_file(monkeypatch, onnx_dir):
    fake_tensorrt.install(monkeypatch, "8.2", fail_build=True)
    with pytest.raises(BackendError, match="Killed.*lower --workspace"):
        build(onnx_dir / "encoder.onnx")
    assert not list(onnx_dir.glob("*.engine*"))


def test_missing_tensorrt_is_a_clear_error(monkeypatch, onnx_dir):
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(BackendError, match="python3.6/dist-packages/tensorrt"):
        build(onnx_dir / "encoder.onnx")


def test_export_engine_without_tensorrt_points_to_trtexec(monkeypatch, onnx_dir, capsys):
    from latentlink.export.__main__ import main

    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)
    assert main(["engine", str(onnx_dir / "encoder.onnx")]) == 2
    assert "--trtexec` prints the trtexec command" in capsys.readouterr().err


def test_int8_is_refused_with_the_reason():
    from latentlink.export.engine import refuse_int8

    with pytest.raises(ConfigError, match="no fast INT8.*Maxwell"):
        refuse_int8("NVIDIA Tegra X1", has_fast_int8=False)
    with pytest.raises(ConfigError, match="calibration"):
        refuse_int8("NVIDIA RTX 4090", has_fast_int8=True)


def test_export_engine_command_line(monkeypatch, onnx_dir, capsys):
    from latentlink.export.__main__ import main

    fake_tensorrt.install(monkeypatch, "8.2")
    assert main(["engine", str(onnx_dir / "encoder.onnx"), "--workspace", "128"]) == 0
    out = capsys.readouterr().out
    assert "built " in out and "latentlink edge --encoder " in out and ".fp16.engine" in out
    assert main(["engine", str(onnx_dir / "encoder.onnx"), "--int8"]) == 2
    assert "no fast INT8" in capsys.readouterr().err
    assert main(["engine", str(onnx_dir / "encoder.onnx"), "--trtexec", "--fp32"]) == 0
    line, copy = capsys.readouterr().out.strip().splitlines()
    assert line.startswith("/usr/src/tensorrt/bin/trtexec --onnx=") and "--fp16" not in line
    engine = line.split("--saveEngine=")[1].split()[0]
    assert "--workspace=256 --buildOnly" in line and engine.endswith(".fp32.engine")
    assert copy == "cp {} {}.json".format(onnx_dir / "model.json", engine)  # the metadata the edge reads


def test_export_engine_runs_the_check_first(monkeypatch, tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from latentlink.export.__main__ import main

    trt, _ = fake_tensorrt.install(monkeypatch, "8.2")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.BOOL, [1, 4])
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    graph = helper.make_graph([helper.make_node("Greater", ["x", "zero"], ["y"])], "g", [x], [y], [zero])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "m.onnx"))
    assert main(["engine", str(tmp_path / "m.onnx")]) == 2
    assert "BOOL" in capsys.readouterr().err and not trt.built


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("mapped", [False, True], ids=["copies", "mapped"])
@pytest.mark.parametrize("role", ["encoder", "decoder"])
def test_backend_matches_onnxruntime_and_allocates_only_at_load(monkeypatch, onnx_dir, api, mapped, role):
    _, driver = fake_tensorrt.install(monkeypatch, api)
    meta, _ = build(onnx_dir / (role + ".onnx"), precision="fp32")
    state = driver._state
    rng = np.random.default_rng(0)
    with open_backend(meta["engine"], role, mapped=mapped) as engine, \
            open_backend(str(onnx_dir / (role + ".onnx")), role) as reference:
        assert engine.name == "tensorrt" and engine.input_shape == reference.input_shape
        allocations, copies = state.device_allocations, state.copies
        assert allocations == (0 if mapped else 2)  # one device buffer per tensor, none when zero-copy
        for _ in range(3):
            x = (rng.random(engine.input_shape) > 0.5).astype(np.float32) if role == "decoder" else \
                rng.random(engine.input_shape, dtype=np.float32)
            out, timings = engine.infer(x)
            np.testing.assert_array_equal(out, reference.infer(x)[0])
            assert set(timings) == {"run_ms", "copy_ms", "run_gpu_ms", "copy_gpu_ms"}
            assert all(v >= 0 for v in timings.values())
        assert state.device_allocations == allocations  # nothing allocated per frame
        assert state.copies - copies == (0 if mapped else 6)  # one upload and one download per frame
        assert "zero-copy" in engine.copy_note if mapped else "page-locked" in engine.copy_note
    assert state.contexts_alive == 0 and not state.stack and not state.memory  # clean shutdown


@pytest.mark.parametrize("api", APIS)
def test_backend_is_callable_from_another_thread(monkeypatch, onnx_dir, api):
    """The host decodes in connection threads: the context is pushed around each inference, not left current."""
    _, driver = fake_tensorrt.install(monkeypatch, api)
    meta, _ = build(onnx_dir / "decoder.onnx")
    with open_backend(meta["engine"], "decoder") as engine:
        assert not driver._state.stack
        result = []
        thread = threading.Thread(target=lambda: result.append(engine.infer(np.zeros(engine.input_shape,
                                                                                     np.float32))[0].shape))
        thread.start()
        thread.join(10)
        assert result == [(1, 3, 64, 64)] and not driver._state.stack


def test_backend_errors_name_tensor_and_shapes(monkeypatch, onnx_dir):
    fake_tensorrt.install(monkeypatch, "10")
    meta, _ = build(onnx_dir / "encoder.onnx")
    with open_backend(meta["engine"], "encoder") as engine:
        with pytest.raises(BackendError, match=r"encoder input 'image': got shape \(1, 3, 32, 32\), expected "
                                               r"\(1, 3, 64, 64\)"):
            engine.infer(np.zeros((1, 3, 32, 32), np.float32))
    # Metadata that disagrees with the engine (an engine copied beside another model's sidecar).
    edit_sidecar(meta, input_shape=[1, 3, 128, 128])
    with pytest.raises(BackendError, match=r"tensor 'image' has shape \(1, 3, 64, 64\) in the engine but "
                                           r"\(1, 3, 128, 128\)"):
        open_backend(meta["engine"], "encoder").load()


@pytest.mark.parametrize("api", APIS)
def test_refused_inference_is_an_error_and_leaves_no_context_current(monkeypatch, onnx_dir, api):
    _, driver = fake_tensorrt.install(monkeypatch, api, fail_execute=True)
    meta, _ = build(onnx_dir / "encoder.onnx")
    with open_backend(meta["engine"], "encoder") as engine:
        with pytest.raises(BackendError, match="execute_async_v[23] failed"):
            engine.infer(np.zeros(engine.input_shape, np.float32))
        assert not driver._state.stack
    assert driver._state.contexts_alive == 0 and not driver._state.memory


def test_refused_tensor_address_is_an_error(monkeypatch, onnx_dir):
    _, driver = fake_tensorrt.install(monkeypatch, "10", fail_address=True)
    meta, _ = build(onnx_dir / "encoder.onnx")
    with pytest.raises(BackendError, match="refused the address of tensor 'image'"):
        open_backend(meta["engine"], "encoder").load()
    assert driver._state.contexts_alive == 0 and not driver._state.stack


def test_output_shape_that_disagrees_with_the_metadata(monkeypatch, onnx_dir):
    fake_tensorrt.install(monkeypatch, "8.2")
    meta, _ = build(onnx_dir / "encoder.onnx")
    edit_sidecar(meta, latent_shape=[1, 32, 16, 16])
    with pytest.raises(BackendError, match=r"tensor 'latents' has shape \(1, 8, 16, 16\) in the engine but "
                                           r"\(1, 32, 16, 16\)"):
        open_backend(meta["engine"], "encoder").load()


def test_options_that_do_not_apply_are_refused(monkeypatch, onnx_dir):
    fake_tensorrt.install(monkeypatch, "8.2")
    meta, _ = build(onnx_dir / "encoder.onnx")
    with pytest.raises(ConfigError, match="give its index"):
        open_backend(meta["engine"], "encoder", device="cpu")
    with pytest.raises(ConfigError, match="precision is fixed when it is built"):
        open_backend(meta["engine"], "encoder", precision="fp16")
    with pytest.raises(ConfigError, match="--mapped applies to TensorRT engines"):
        open_backend(str(onnx_dir / "encoder.onnx"), "encoder", mapped=True)


def test_engine_from_another_machine_says_rebuild_here(monkeypatch, onnx_dir):
    _, driver = fake_tensorrt.install(monkeypatch, "8.2")
    meta, _ = build(onnx_dir / "encoder.onnx")
    with open(meta["engine"], "wb") as f:
        f.write(b"an engine serialized by another TensorRT")
    with pytest.raises(BackendError, match="rebuild it here with `latentlink export engine`"):
        open_backend(meta["engine"], "encoder").load()
    assert driver._state.contexts_alive == 0 and not driver._state.stack  # a failed load cleans up too


def test_engine_io_dispatch_reads_both_apis(monkeypatch, onnx_dir):
    for api in APIS:
        trt, driver = fake_tensorrt.install(monkeypatch, api)
        meta, _ = build(onnx_dir / "encoder.onnx", force=True)
        driver.init()
        context = driver.Device(0).make_context()
        with open(meta["engine"], "rb") as f:
            engine = trt.Runtime(None).deserialize_cuda_engine(f.read())
        context.detach()
        assert trt_api.has_tensor_api(engine) == (api == "10")
        tensors = trt_api.io_tensors(trt, engine)
        assert [(t.name, t.is_input, t.shape, t.dtype) for t in tensors] == [
            ("image", True, (1, 3, 64, 64), np.dtype(np.float32)),
            ("latents", False, (1, 8, 16, 16), np.dtype(np.float32))]


def test_edge_streams_through_an_engine_with_cuda_columns(monkeypatch, onnx_dir, tiny_profile):
    """edge -> host on loopback with the (fake) TensorRT encoder: the report carries CUDA-event times."""
    from latentlink.edge.pipeline import run_edge
    from latentlink.edge.profiler import format_table
    from latentlink.edge.sources import open_source
    from latentlink.host.server import Host

    fake_tensorrt.install(monkeypatch, "8.2")
    meta, _ = build(onnx_dir / "encoder.onnx")
    profile = load_profile(tiny_profile)
    with open_backend(str(onnx_dir / "decoder.onnx"), "decoder") as decoder:
        host = Host(decoder, max_streams=1)  # stops at end-of-stream: after max_frames the last ack could be lost
        address = host.bind("127.0.0.1", 0)
        thread = threading.Thread(target=host.serve, daemon=True)
        thread.start()
        records = []
        with open_source("synthetic://") as source, open_backend(meta["engine"], "encoder") as encoder:
            summary = run_edge(source, encoder, profile, address, "jetson", frames=5, drop="block",
                               on_record=records.append)
        thread.join(20)
        host_summary = host.summary()
    assert summary["outcomes"]["decoded"] == 5 and host_summary["frames"] == 5
    assert set(summary["gpu_stages"]) == {"encode", "gpu_to_cpu"}
    assert len(records) == 5 and all(set(r["gpu_stages"]) == {"encode", "gpu_to_cpu"} for r in records)
    assert "CUDA med" in format_table(summary) and "page-locked" in summary["notes"]["gpu_to_cpu"]
