#!/usr/bin/env bash
# Installs everything dtrain needs to build, test and run its quickstart.
#
# Idempotent: Debian packages already present are skipped, and the LibTorch
# venv (PyPI torch wheel, pinned) is reused when it already holds the pinned
# version. Safe to run on every build; takes well under a second when nothing
# is missing.
#
#   DTRAIN_TORCH_DIR  where the torch venv lives (default /opt/dtrain/torch-2.11.0)
#
# Exit status: 0 when everything is present afterwards, 1 with a message
# naming what failed otherwise.
set -euo pipefail

TORCH_VERSION="2.11.0"
TORCH_DIR="${DTRAIN_TORCH_DIR:-/opt/dtrain/torch-${TORCH_VERSION}}"

# The exact Debian packages the build, the tests and the quickstart use.
PACKAGES=(
  build-essential cmake pkg-config ninja-build
  libopenmpi-dev openmpi-bin
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  librocksdb-dev
  libfaiss-dev libopenblas-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libspdlog-dev libfmt-dev libcli11-dev nlohmann-json3-dev
  libpng-dev zlib1g-dev
  dataset-fashion-mnist
)

say() { echo "[install-deps] $*"; }
die() { echo "[install-deps] ERROR: $*" >&2; exit 1; }

# ---- Debian packages -------------------------------------------------------
missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if ((${#missing[@]})); then
  [[ $(id -u) -eq 0 ]] || SUDO=sudo
  say "installing ${#missing[@]} Debian package(s): ${missing[*]}"
  ${SUDO:-} apt-get update -qq || die "apt-get update failed (is the Debian mirror reachable?)"
  DEBIAN_FRONTEND=noninteractive ${SUDO:-} apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    >/tmp/dtrain-apt.log 2>&1 || { tail -20 /tmp/dtrain-apt.log >&2; die "apt-get install failed: ${missing[*]} (log: /tmp/dtrain-apt.log)"; }
else
  say "Debian packages: all ${#PACKAGES[@]} present"
fi

# ---- LibTorch from the PyPI torch wheel ------------------------------------
torch_ok() {
  [[ -x "$TORCH_DIR/bin/python" ]] &&
    [[ "$("$TORCH_DIR/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null)" == "$TORCH_VERSION" ]] &&
    [[ -d "$(torch_site)/torch/share/cmake/Torch" ]]
}
torch_site() { local d; for d in "$TORCH_DIR"/lib/python3*/site-packages; do echo "$d"; return; done; }

if torch_ok; then
  say "LibTorch: torch ${TORCH_VERSION} present in $TORCH_DIR"
else
  PY=""
  for cand in python3.11 python3 /usr/bin/python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import venv, ensurepip' 2>/dev/null; then PY=$(command -v "$cand"); break; fi
  done
  if [[ -z "$PY" ]]; then
    say "no Python with venv found; installing python3-venv"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null || die "cannot install python3-venv"
    PY=/usr/bin/python3
  fi
  say "installing torch==${TORCH_VERSION} into $TORCH_DIR with $PY (several GB, a few minutes)"
  mkdir -p "$(dirname "$TORCH_DIR")"
  # A half-finished earlier attempt is completed by pip, not started over.
  [[ -x "$TORCH_DIR/bin/pip" ]] || "$PY" -m venv "$TORCH_DIR" || die "python venv creation failed in $TORCH_DIR"
  "$TORCH_DIR/bin/pip" install --quiet --no-input "torch==${TORCH_VERSION}" \
    || die "pip install torch==${TORCH_VERSION} failed (PyPI reachable? disk space in $(dirname "$TORCH_DIR")?)"
  torch_ok || die "torch ${TORCH_VERSION} installed but not usable from $TORCH_DIR"
  say "LibTorch: torch ${TORCH_VERSION} installed in $TORCH_DIR"
fi

# ---- sanity: the files the build relies on -----------------------------------
[[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]] \
  || die "Fashion-MNIST not found in /usr/share/datasets/fashion-mnist (package dataset-fashion-mnist)"
say "ok"
