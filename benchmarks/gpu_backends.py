"""Encode and decode times of the PyTorch backend on a GPU (CUDA events beside the wall clock), and its parity with
ONNX Runtime on the CPU, for the shipped profiles in FP32 and FP16. Prints the figures; asserts nothing.

    python benchmarks/gpu_backends.py --source file://data/holdout/   # CUDA, nano-504 and nano-1008, fp32, fp16
    python benchmarks/gpu_backends.py --device cpu --precisions fp32 --frames 5    # the same code path on a CPU
    python benchmarks/gpu_backends.py --engine-dir ~/engines   # also every engine there (TensorRT + pycuda)

Per configuration: medians over ``--frames`` frames after ``--warmup``: encode and gpu_to_cpu (wall ms, CUDA ms),
host decode (wall, CUDA), and against ONNX Runtime on the same photo: the share of latent bits that flipped and the
decoder's max |error| on identical latents.
"""

import argparse
import glob
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from latentlink.edge.backends import open_backend, role_from_name  # noqa: E402
from latentlink.edge.preprocess import Preprocessor  # noqa: E402
from latentlink.edge.profile import load_profile  # noqa: E402
from latentlink.edge.sources import open_source  # noqa: E402

CHECKPOINT = os.path.join("profiles", "default", "lossy-cae.pt")


def median(values):
    return float(np.median(values)) if values else float("nan")


def time_backend(backend, array, frames, warmup):
    """Median wall and CUDA ms of run and copy over ``frames`` calls; returns (figures, last output copy)."""
    runs = {"run_ms": [], "copy_ms": [], "run_gpu_ms": [], "copy_gpu_ms": []}
    for i in range(warmup + frames):
        out, timings = backend.infer(array)
        if i >= warmup:
            for key, value in timings.items():
                runs[key].append(value)
    return dict((key, median(values)) for key, values in runs.items()), out.copy()


def first_frame(profile, source_uri):
    preprocess = Preprocessor(profile.input.width, profile.input.height, profile.input.fit)
    with open_source(source_uri) as source:
        return preprocess(source.read()[0]).copy()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: %(default)s)")
    parser.add_argument("--profiles", nargs="+", default=["nano-504", "nano-1008"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "fp16"], choices=("fp32", "fp16"))
    parser.add_argument("--checkpoint", default=CHECKPOINT)
    parser.add_argument("--source", default="synthetic://",
                        help="where the test frame comes from, e.g. file://data/holdout/ (default: %(default)s)")
    parser.add_argument("--frames", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--engine-dir", help="also time every *.engine here with the TensorRT backend")
    args = parser.parse_args(argv)

    import torch

    gpu = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print("PyTorch {} on {} ({}); {} frames after {} warm-up".format(torch.__version__, gpu, args.device,
                                                                    args.frames, args.warmup))
    header = ("profile     precision  encode ms  CUDA ms  gpu_to_cpu ms  CUDA ms  decode ms  CUDA ms  "
              "bits flipped  decoder max|err|")
    print(header)
    for name in args.profiles:
        profile = load_profile(name)
        size = (profile.input.height, profile.input.width)
        image = first_frame(profile, args.source)
        with open_backend(profile.model.encoder, "encoder") as ref_enc, \
                open_backend(profile.model.decoder, "decoder") as ref_dec:
            ref_bits = ref_enc.infer(image)[0].copy()
            ref_image = ref_dec.infer(ref_bits)[0].copy()
        for precision in args.precisions:
            options = dict(device=args.device, precision=precision, input_size=size)
            with open_backend(args.checkpoint, "encoder", **options) as enc, \
                    open_backend(args.checkpoint, "decoder", **options) as dec:
                enc_t, bits = time_backend(enc, image, args.frames, args.warmup)
                dec_t, decoded = time_backend(dec, ref_bits, args.frames, args.warmup)
            flipped = float(np.mean(bits.astype(np.float32) != ref_bits))
            err = float(np.abs(decoded.astype(np.float32) - ref_image).max())
            print("{:<11} {:<9} {:>10.2f} {:>8.2f} {:>14.3f} {:>8.3f} {:>10.2f} {:>8.2f} {:>13.2e} {:>17.2e}".format(
                name, precision, enc_t["run_ms"], enc_t["run_gpu_ms"], enc_t["copy_ms"], enc_t["copy_gpu_ms"],
                dec_t["run_ms"] + dec_t["copy_ms"], dec_t["run_gpu_ms"] + dec_t["copy_gpu_ms"], flipped, err))
    if args.engine_dir:
        for path in sorted(glob.glob(os.path.join(args.engine_dir, "*.engine"))):
            with open_backend(path, role_from_name(path)) as engine:
                shape = engine.input_shape
                figures, _ = time_backend(engine, np.random.RandomState(0).rand(*shape).astype(np.float32),
                                          args.frames, args.warmup)
            print("{}: run {run_ms:.2f} ms (CUDA {run_gpu_ms:.2f}), gpu_to_cpu {copy_ms:.3f} ms (CUDA "
                  "{copy_gpu_ms:.3f})".format(os.path.basename(path), **figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
