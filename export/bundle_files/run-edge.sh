#!/usr/bin/env bash
# Run the latentlink edge of this bundle: what latentlink-edge.service starts, and what you run by hand.
#
#   LATENTLINK_HOST=192.168.1.20:5760 ./run-edge.sh
#   LATENTLINK_HOST=192.168.1.20:5760 LATENTLINK_EDGE_ARGS="--frames 300 --report edge.json" ./run-edge.sh
#
# Settings (environment variables; the service reads them from /etc/latentlink/edge.env, and so does this script
# when LATENTLINK_HOST is not set):
#   LATENTLINK_HOST       the host's address, HOST:PORT (required)
#   LATENTLINK_SOURCE     where frames come from (default csi://0; v4l2:///dev/video0, synthetic://, ...)
#   LATENTLINK_NAME       the stream's name on the host (default: this machine's name)
#   LATENTLINK_ENCODER    the encoder file (default: the newest engine in engines/ built from the bundle's
#                         encoder, else the profile's ONNX encoder, run by ONNX Runtime)
#   LATENTLINK_EDGE_ARGS  more `latentlink edge` options, e.g. "--mapped --tls /etc/latentlink/keys"
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Python 3.6 writes ASCII under the C locale (a systemd service's, an ssh session's without LANG): the
# edge's table has non-ASCII characters, which would stop it with UnicodeEncodeError at its very end.
export PYTHONIOENCODING=${PYTHONIOENCODING:-utf-8}
# shellcheck source=/dev/null
. "$here/bundle.env"
config=${LATENTLINK_CONFIG:-/etc/latentlink/edge.env}
if [ -z "${LATENTLINK_HOST:-}" ] && [ -r "$config" ]; then
  # Read as systemd reads an EnvironmentFile (KEY=VALUE, the value to the end of the line, spaces and all, optional
  # quotes around it), not as shell: "LATENTLINK_EDGE_ARGS=--frames 5" is valid there and a command in bash.
  while IFS= read -r line || [ -n "$line" ]; do
    line=${line#"${line%%[![:space:]]*}"}
    case $line in '' | '#'* | ';'*) continue ;; esac
    key=${line%%=*}
    value=${line#*=}
    case $value in \"*\" | \'*\') value=${value:1:${#value}-2} ;; esac
    if [[ $key =~ ^LATENTLINK_[A-Z_]+$ ]]; then export "$key=$value"; fi
  done <"$config"
fi
if [ -z "${LATENTLINK_HOST:-}" ]; then
  echo "run-edge.sh: error: LATENTLINK_HOST is not set: put LATENTLINK_HOST=HOST:PORT (the host's address) in $config" >&2
  exit 2  # the edge's exit status for bad options: the service does not restart on it (RestartPreventExitStatus)
fi

encoder=${LATENTLINK_ENCODER:-}
if [ -z "$encoder" ]; then
  stem=$(basename "$BUNDLE_ENCODER" .onnx)
  for candidate in "$here"/engines/"$stem".*.engine; do
    if [ -f "$candidate" ] && { [ -z "$encoder" ] || [ "$candidate" -nt "$encoder" ]; }; then encoder=$candidate; fi
  done
  encoder=${encoder:-$here/$BUNDLE_ENCODER}
fi

options=(--source "${LATENTLINK_SOURCE:-csi://0}" --connect "$LATENTLINK_HOST" --profile "$here/$BUNDLE_PROFILE"
         --encoder "$encoder")
if [ -n "${LATENTLINK_NAME:-}" ]; then options+=(--name "$LATENTLINK_NAME"); fi
read -r -a extra <<<"${LATENTLINK_EDGE_ARGS:-}"
echo "run-edge.sh: latentlink edge ${options[*]} ${extra[*]+${extra[*]}}"
exec "$here/venv/bin/latentlink" edge "${options[@]}" ${extra[@]+"${extra[@]}"}
