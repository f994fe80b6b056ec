#!/usr/bin/env bash
# Install this latentlink bundle where it was unpacked (usually /opt/latentlink), on a Jetson Nano (JetPack 4.6.x,
# Python 3.6) or any Linux machine with Python >= 3.6. Written by `latentlink export bundle`; README.txt beside it
# has the whole procedure. Safe to run again: each step checks what is there first.
#
#   sudo ./setup.sh                                   # the Nano: apt packages, venv, pins, engine, check, service
#   sudo LATENTLINK_BENCH_HOST=192.168.1.20:5760 ./setup.sh    # the same, then a 100-frame benchmark to that host
#   LATENTLINK_APT=0 LATENTLINK_SERVICE=0 ./setup.sh  # no root: skip apt and the service (packages already there)
#
# Steps: apt packages -> virtual environment (venv/, seeing JetPack's system packages: OpenCV with GStreamer,
# TensorRT, pycuda if built) -> pip pins -> the latentlink wheel from wheels/ -> `latentlink export check` ->
# the TensorRT engine (engines/, through the engine cache) -> the systemd service -> the benchmark.
#
# Options (environment variables):
#   LATENTLINK_APT=1|0          apt-get install the system packages below (needs root; default 1)
#   LATENTLINK_PYTHON=python3   the interpreter the venv is made from (default: /usr/bin/python3, JetPack's 3.6)
#   LATENTLINK_JETSON=auto|1|0  Jetson pins (numpy 1.19.4, pycuda, the wheel with --no-deps); auto: if
#                               /etc/nv_tegra_release exists. Elsewhere the wheel's [edge] extra brings its
#                               dependencies (numpy, PyYAML, OpenCV headless, ONNX Runtime)
#   LATENTLINK_ENGINE=auto|1|0  build the TensorRT engine; auto: when TensorRT and pycuda import, else skipped
#                               (and said so); 1: fail without them
#   LATENTLINK_CHECK_ARGS=...   extra arguments for `latentlink export check` (default: what the bundle was
#                               checked with, BUNDLE_CHECK_ARGS in bundle.env)
#   LATENTLINK_PIP_EXTRA=...    more pip requirements, e.g. "zstandard==0.20.0" for --entropy zstd
#   LATENTLINK_SERVICE=1|0      create the user, /etc/latentlink/edge.env and the systemd unit (default: 1 as
#                               root, else 0); never enables it: `systemctl enable --now latentlink-edge` does
#   LATENTLINK_USER=latentlink  the service's user (a system user, in group video for the cameras)
#   LATENTLINK_BENCH_HOST=H:P   after installing, stream LATENTLINK_BENCH_FRAMES (default 100) frames from
#                               LATENTLINK_BENCH_SOURCE (default synthetic://) to this running `latentlink host`
#                               and write bench.json; skipped when unset (the edge has no host-less mode)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Python 3.6 writes ASCII under the C locale (a systemd service's, an ssh session's without LANG): the
# edge's table has non-ASCII characters, which would stop it with UnicodeEncodeError at its very end.
export PYTHONIOENCODING=${PYTHONIOENCODING:-utf-8}
cd "$here"
# shellcheck source=/dev/null
. "$here/bundle.env"

apt_install=${LATENTLINK_APT:-1}
python=${LATENTLINK_PYTHON:-/usr/bin/python3}
jetson=${LATENTLINK_JETSON:-auto}
engine=${LATENTLINK_ENGINE:-auto}
check_args=${LATENTLINK_CHECK_ARGS-$BUNDLE_CHECK_ARGS}
pip_extra=${LATENTLINK_PIP_EXTRA:-}
service_user=${LATENTLINK_USER:-latentlink}
bench_host=${LATENTLINK_BENCH_HOST:-}
bench_frames=${LATENTLINK_BENCH_FRAMES:-100}
bench_source=${LATENTLINK_BENCH_SOURCE:-synthetic://}
if [ "$(id -u)" -eq 0 ]; then service=${LATENTLINK_SERVICE:-1}; else service=${LATENTLINK_SERVICE:-0}; fi
if [ "$jetson" = auto ]; then
  if [ -e /etc/nv_tegra_release ]; then jetson=1; else jetson=0; fi
fi

venv="$here/venv"
ll="$venv/bin/latentlink"
vpython="$venv/bin/python"
encoder="$here/$BUNDLE_ENCODER"

step() { printf '\n== %s\n' "$*"; }
die() { printf 'setup.sh: error: %s\n' "$*" >&2; exit 1; }

step "latentlink bundle $BUNDLE_NAME (profile $BUNDLE_PROFILE_NAME, latentlink $BUNDLE_VERSION) in $here"
sha256sum --quiet -c SHA256SUMS || die "files differ from SHA256SUMS: unpack the bundle again (tar -xzf FILE.tar.gz)"

step "system packages"
if [ "$apt_install" = 1 ]; then
  packages=(python3-pip python3-venv python3-dev python3-yaml)
  [ "$(id -u)" -eq 0 ] \
    || die "apt-get needs root: sudo ./setup.sh, or LATENTLINK_APT=0 ./setup.sh if these are installed: ${packages[*]}"
  missing=()
  for package in "${packages[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
  else
    echo "already installed: ${packages[*]}"
  fi
else
  echo "skipped (LATENTLINK_APT=0)"
fi

step "virtual environment $venv"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 6))' \
  || die "$python is older than Python 3.6; set LATENTLINK_PYTHON to a Python >= 3.6"
if [ -x "$vpython" ]; then
  echo "reusing it ($("$vpython" --version 2>&1))"
else
  # --system-site-packages: JetPack's OpenCV (with GStreamer, for the CSI camera), TensorRT and the system PyYAML
  # live in the system Python's dist-packages; a pip OpenCV would break the camera.
  "$python" -m venv --system-site-packages "$venv"
  echo "made with $("$vpython" --version 2>&1)"
fi
pip=("$vpython" -m pip --disable-pip-version-check)
if "$vpython" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 6))'; then
  # Ubuntu 18.04's pip 9 cannot install manylinux2014 wheels (numpy's); 21.3.1 is the last pip for Python 3.6.
  if [ "$("$vpython" -m pip --version | cut -d' ' -f2)" != 21.3.1 ]; then
    "${pip[@]}" install -q "pip==21.3.1"
  fi
fi

step "pinned dependencies"
if [ "$jetson" = 1 ]; then
  # 1.19.5 dies with "Illegal instruction" on the Nano; JetPack's own numpy (1.13) is too old for latentlink.
  "${pip[@]}" install -q "numpy==1.19.4"
  if "$vpython" -c 'import pycuda.driver' 2>/dev/null; then
    echo "pycuda: already installed"
  elif [ -x /usr/local/cuda/bin/nvcc ]; then
    # pycuda builds from source: nvcc on PATH and CUDA's headers and libraries given, or "cuda.h missing".
    PATH=/usr/local/cuda/bin:$PATH CPATH=/usr/local/cuda/include LIBRARY_PATH=/usr/local/cuda/lib64 \
      "${pip[@]}" install -q "pycuda<2021.1"   # TensorRT 8.2's samples pin it for Python < 3.7
  else
    echo "pycuda: NOT installed: no /usr/local/cuda/bin/nvcc (install JetPack's CUDA: sudo apt-get install nvidia-jetpack)"
  fi
else
  echo "not a Jetson (no /etc/nv_tegra_release): the wheel's [edge] extra brings numpy, PyYAML, OpenCV, ONNX Runtime"
fi
if [ -n "$pip_extra" ]; then
  read -r -a extra <<<"$pip_extra"
  "${pip[@]}" install -q "${extra[@]}"
fi

step "latentlink $BUNDLE_VERSION from $BUNDLE_WHEEL"
if [ "$jetson" = 0 ]; then
  "${pip[@]}" install -q "$here/${BUNDLE_WHEEL}[edge]"
fi
# --no-deps on the Nano: pip must not replace JetPack's OpenCV (and has no ONNX Runtime wheel for it anyway).
# --force-reinstall: a newer bundle of the same version number still replaces the code.
"${pip[@]}" install -q --no-deps --force-reinstall "$here/$BUNDLE_WHEEL"
"$vpython" -c 'import latentlink, numpy, yaml, cv2
print("latentlink at", latentlink.__file__, "| numpy", numpy.__version__, "| OpenCV", cv2.__version__)'

step "latentlink export check (will the Nano's TensorRT parse the encoder?)"
if "$vpython" -c 'import onnx' 2>/dev/null; then
  # shellcheck disable=SC2086  # the arguments are meant to split
  "$ll" export check "$encoder" $check_args
else
  echo "SKIPPED here: the onnx package is not installed (LATENTLINK_PIP_EXTRA=onnx to add it);" \
       "the bundle was checked when it was built: $BUNDLE_CHECKED"
fi

step "TensorRT engine (engines/, reused while the ONNX file, TensorRT and GPU match)"
built=0
if [ "$engine" != 0 ] && "$vpython" -c 'import tensorrt, pycuda.driver' 2>/dev/null; then
  precision_flag=()
  [ "$BUNDLE_PRECISION" = fp32 ] && precision_flag=(--fp32)
  # `export engine` runs `export check` first where the onnx package is installed (it is not, on a plain Nano).
  "$ll" export engine "$encoder" --out "$here/engines" ${precision_flag[@]+"${precision_flag[@]}"}
  built=1
elif [ "$engine" = 1 ]; then
  die "LATENTLINK_ENGINE=1 but TensorRT or pycuda does not import in $vpython (see the pycuda step above)"
else
  echo "ENGINE BUILD SKIPPED: TensorRT and pycuda do not both import here (not a Jetson, LATENTLINK_ENGINE=0," \
       "or pycuda did not build). The edge will run the profile's ONNX encoder with ONNX Runtime, if installed."
  if [ "$jetson" = 1 ]; then
    echo "On this Jetson: is JetPack's TensorRT for Python installed (sudo apt-get install python3-libnvinfer)," \
         "and did pycuda build (above)? Then run ./setup.sh again."
  fi
  "$vpython" -c 'import onnxruntime' 2>/dev/null \
    || echo "WARNING: ONNX Runtime is not installed either: the edge has no encoder backend here."
fi

step "systemd service latentlink-edge"
if [ "$service" = 1 ]; then
  [ "$(id -u)" -eq 0 ] || die "installing the service needs root: sudo ./setup.sh, or LATENTLINK_SERVICE=0"
  if ! id -u "$service_user" >/dev/null 2>&1; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$service_user"
  fi
  usermod -a -G video "$service_user"   # the CSI (nvargus) and V4L2 cameras
  mkdir -p /etc/latentlink
  if [ ! -e /etc/latentlink/edge.env ]; then
    install -m 0644 edge.env.example /etc/latentlink/edge.env
    echo "wrote /etc/latentlink/edge.env: set LATENTLINK_HOST there"
  else
    echo "kept /etc/latentlink/edge.env"
  fi
  sed -e "s|/opt/latentlink|$here|g" -e "s|^User=latentlink|User=$service_user|" latentlink-edge.service \
    >/etc/systemd/system/latentlink-edge.service
  systemctl daemon-reload || echo "WARNING: systemctl daemon-reload failed (is systemd running here?)"
  echo "installed /etc/systemd/system/latentlink-edge.service; start it now and at every boot with:"
  echo "  sudo systemctl enable --now latentlink-edge && journalctl -u latentlink-edge -f"
else
  echo "skipped (LATENTLINK_SERVICE=0, or not root); run-edge.sh runs the edge by hand"
fi

step "benchmark"
if [ -n "$bench_host" ]; then
  LATENTLINK_HOST=$bench_host LATENTLINK_SOURCE=$bench_source \
    LATENTLINK_EDGE_ARGS="--frames $bench_frames --drop block --report $here/bench.json" "$here/run-edge.sh"
  echo "wrote $here/bench.json ($bench_frames frames from $bench_source to $bench_host): $ll report $here/bench.json"
else
  echo "skipped: set LATENTLINK_BENCH_HOST=HOST:PORT of a running \`latentlink host\` (the edge needs a host to" \
       "send to) and run ./setup.sh again"
fi

step "done"
if [ "$built" = 1 ]; then echo "encoder: the TensorRT engine in $here/engines"; else echo "encoder: $encoder (ONNX Runtime)"; fi
echo "run by hand: LATENTLINK_HOST=HOST:5760 $here/run-edge.sh"
