"""PyTorch backend: a checkpoint's encoder or decoder on the CPU or a CUDA GPU, in FP32 or FP16.

What a Nano owner with NVIDIA's PyTorch wheel runs before building an engine, and what a host with a GPU decodes
with. On CUDA, the input goes through a page-locked buffer, the output comes back into one, and CUDA events on the
stream time ``encode`` (upload + model) and ``gpu_to_cpu`` beside the wall clock.

Python 3.6 compatible; torch and the model zoo (``export.models``) are imported in ``load()``.
"""

import time

import numpy as np

from ..errors import BackendError, ConfigError
from .base import Backend, ModelInfo, elapsed_ms, file_sha256

PRECISIONS = ("fp32", "fp16")
WARMUP_RUNS = 3  # cuDNN picks its kernels on the first runs; none of that belongs in a frame's time


class TorchBackend(Backend):
    """Runs ``role`` of a ``latentlink train`` checkpoint at ``input_size`` (height, width) in pixels.

    ``device``: "cpu", "cuda" or "cuda:N"; ``precision``: "fp32" or "fp16" (CUDA only); ``threads``: CPU threads
    for PyTorch (0: its default).
    """

    name = "pytorch"

    def __init__(self, path, role, input_size=None, device="cpu", precision="fp32", threads=0):
        if input_size is None:
            raise ConfigError("a PyTorch checkpoint has no fixed input size: give the profile (--profile) whose "
                              "input size it should run at")
        if precision not in PRECISIONS:
            raise ConfigError("precision {!r} is not one of {}".format(precision, ", ".join(PRECISIONS)))
        device = str(device or "cpu")
        if precision == "fp16" and not device.startswith("cuda"):
            raise ConfigError("--precision fp16 needs --device cuda: FP16 convolutions on the CPU are slower than "
                              "FP32, not faster")
        self.path, self.role, self.loaded = path, role, False
        self.height, self.width = (int(n) for n in input_size)
        self.device, self.precision, self.threads = device, precision, threads
        self.info = None  # known once the checkpoint is loaded
        self.input_name = "image" if role == "encoder" else "latents"
        self.name = "pytorch-{}-{}".format(device.split(":")[0], precision)
        self.copy_note = ("device-to-host copy into a page-locked buffer" if self.on_cuda else
                          "PyTorch on the CPU has no device: gpu_to_cpu is the copy of the output into the "
                          "backend's host buffer, near zero")

    @property
    def on_cuda(self):
        return self.device.startswith("cuda")

    def _load(self):
        try:
            import torch
        except ImportError:
            raise BackendError("PyTorch is not installed, and .pt checkpoints need it: on a PC, its CPU build with "
                               "`pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu` "
                               "(or the [export] extra); on a Jetson, NVIDIA's wheel for JetPack 4.6 (see the "
                               "README)")
        from latentlink.export.models import load_checkpoint

        if self.on_cuda and not torch.cuda.is_available():
            raise BackendError("--device {}: PyTorch {} sees no CUDA GPU (a CPU-only build, or no driver); use "
                               "--device cpu".format(self.device, torch.__version__))
        if self.threads:
            torch.set_num_threads(self.threads)
        torch.backends.cudnn.benchmark = True  # static shapes: let cuDNN pick the fastest kernels once
        self._torch = torch
        model, _ = load_checkpoint(self.path, device="cpu")
        dtype = torch.float16 if self.precision == "fp16" else torch.float32
        image = torch.zeros(1, 3, self.height, self.width)
        if self.height % model.downscale or self.width % model.downscale:
            raise ConfigError("input {}x{} is not a multiple of {} ({}'s downscale); pick a profile whose size "
                              "is".format(self.width, self.height, model.downscale, model.name))
        if model.name == "progressive":
            return self._load_steps(model, dtype)
        with torch.no_grad():
            latents = model.encoder(image)
        self.info = ModelInfo({"model": model.name, "input_shape": list(image.shape),
                               "latent_shape": list(latents.shape), "packing": model.packing,
                               "bits_per_pixel": model.bits_per_pixel,
                               "checkpoint_sha256": file_sha256(self.path)}, self.path)
        self._module = getattr(model, self.role).to(device=self.device, dtype=dtype).eval()
        shape, out_shape = (image.shape, latents.shape) if self.role == "encoder" else (latents.shape, image.shape)
        pin = self.on_cuda  # page-locked host buffers: the copies can be asynchronous DMA
        self._host_in = torch.empty(tuple(shape), dtype=torch.float32, pin_memory=pin)
        # The upload lands in a float32 device buffer (an asynchronous DMA from pinned memory); an FP16 model then
        # casts it on the GPU into its own buffer. A cross-dtype copy straight from the host would cast on the CPU.
        self._upload = torch.empty(tuple(shape), dtype=torch.float32, device=self.device)
        self._device_in = self._upload if dtype == torch.float32 else torch.empty(tuple(shape), dtype=dtype,
                                                                                   device=self.device)
        with torch.no_grad():
            for _ in range(WARMUP_RUNS if self.on_cuda else 1):
                out = self._module(self._device_in.zero_())
        if tuple(out.shape) != tuple(out_shape):
            raise BackendError("{}: the {} returns shape {}, expected {}".format(
                self.path, self.role, tuple(out.shape), tuple(out_shape)))
        self._host_out = torch.empty(tuple(out_shape), dtype=out.dtype, pin_memory=pin)
        self._host_in_np, self._host_out_np = self._host_in.numpy(), self._host_out.numpy()
        if self.on_cuda:
            self._stream = torch.cuda.current_stream(self.device)
            # blocking: waiting on an event sleeps instead of spinning a CPU core (the Nano has 4).
            self._events = [torch.cuda.Event(enable_timing=True, blocking=True) for _ in range(3)]
            torch.cuda.synchronize(self.device)

    def _load_steps(self, model, dtype):
        """A progressive model: its ``role`` step (encoder or decoder iteration), run through :meth:`infer_named`
        with the inputs and outputs model.json would give its ONNX export (export/models/progressive.py)."""
        from latentlink.export.models.progressive import progressive_info

        section = progressive_info(model, self.height, self.width)
        self.info = ModelInfo({"model": model.name, "input_shape": [1, 3, self.height, self.width],
                               "latent_shape": [1] + section["code_shape"], "packing": model.packing,
                               "bits_per_pixel": model.bits_per_pixel, "progressive": section,
                               "checkpoint_sha256": file_sha256(self.path)}, self.path)
        self._dtype = dtype
        self._module = getattr(model, self.role).to(device=self.device, dtype=dtype).eval()
        self.input_name = self.info.io_shapes(self.role)[0][0][0]

    def _infer_named(self, feeds):
        """Inputs in the graph's order, one run (FP16 where so loaded), outputs back as float32 numpy arrays. On
        CUDA no page-locked buffers: the plain copies (unverified here: no GPU in latentlink's CI)."""
        torch = self._torch
        inputs, outputs = self.info.io_shapes(self.role)
        start = time.perf_counter()
        with torch.no_grad():
            args = [torch.from_numpy(np.ascontiguousarray(feeds[name], dtype=np.float32)).to(
                device=self.device, dtype=self._dtype) for name, _ in inputs]
            results = self._module(*args)
            if self.on_cuda:
                torch.cuda.synchronize(self.device)
        run_ms = elapsed_ms(start)
        start = time.perf_counter()
        arrays = dict((name, value.float().cpu().numpy()) for (name, _), value in zip(outputs, results))
        return arrays, {"run_ms": run_ms, "copy_ms": elapsed_ms(start)}

    def _infer(self, array):
        return self._infer_cuda(array) if self.on_cuda else self._infer_cpu(array)

    def _infer_cpu(self, array):
        torch = self._torch
        start = time.perf_counter()
        with torch.no_grad():
            out = self._module(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)))
        run_ms = elapsed_ms(start)
        start = time.perf_counter()
        np.copyto(self._host_out_np, out.numpy())
        return self._host_out_np, {"run_ms": run_ms, "copy_ms": elapsed_ms(start)}

    def _infer_cuda(self, array):
        torch = self._torch
        start_ev, run_ev, copy_ev = self._events
        start = time.perf_counter()
        np.copyto(self._host_in_np, array)
        start_ev.record(self._stream)
        with torch.no_grad():
            self._upload.copy_(self._host_in, non_blocking=True)  # on the stream: ordered before the model
            if self._device_in is not self._upload:
                self._device_in.copy_(self._upload)  # float32 -> FP16, on the GPU
            out = self._module(self._device_in)
        run_ev.record(self._stream)
        run_ev.synchronize()
        run_ms = elapsed_ms(start)
        start = time.perf_counter()
        self._host_out.copy_(out, non_blocking=True)
        copy_ev.record(self._stream)
        copy_ev.synchronize()
        copy_ms = elapsed_ms(start)
        return self._host_out_np, {"run_ms": run_ms, "copy_ms": copy_ms,
                                   "run_gpu_ms": start_ev.elapsed_time(run_ev),
                                   "copy_gpu_ms": run_ev.elapsed_time(copy_ev)}

    max_batch = 64  # a checkpoint's modules take any batch: several frames run in one call (infer_batch)

    def _infer_batch(self, arrays):
        """The inputs joined along the batch axis, one run (FP16 on CUDA where so loaded), split back. On CUDA the
        batch goes through page-locked memory made for it (unverified here: no GPU in latentlink's CI)."""
        torch = self._torch
        start = time.perf_counter()
        batch = torch.from_numpy(np.ascontiguousarray(np.concatenate(arrays), dtype=np.float32))
        with torch.no_grad():
            if self.on_cuda:
                batch = batch.pin_memory().to(self.device, non_blocking=True).to(self._device_in.dtype)
                out = self._module(batch)
                torch.cuda.synchronize(self.device)
            else:
                out = self._module(batch)
        run_ms = elapsed_ms(start)
        start = time.perf_counter()
        out = out.cpu().numpy()
        outputs = [part.copy() for part in np.split(out, len(arrays))]
        return outputs, {"run_ms": run_ms, "copy_ms": elapsed_ms(start)}

    def _close(self):
        for name in ("_module", "_dtype", "_upload", "_device_in", "_host_in", "_host_out", "_host_in_np",
                     "_host_out_np", "_events"):
            self.__dict__.pop(name, None)
        if self.on_cuda:
            self._torch.cuda.empty_cache()
