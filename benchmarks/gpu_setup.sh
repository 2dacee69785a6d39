#!/usr/bin/env bash
# Set up a fresh GPU machine (this repository copied there, no venv) for benchmarks/gpu.py. From the repository root:
#
#   bash benchmarks/gpu_setup.sh                 # then: HF_HUB_OFFLINE=1 $VENV/bin/python benchmarks/gpu.py
#   bash benchmarks/gpu_setup.sh --check-driver  # only: does the driver run PyPI's CUDA build of torch 2.13.0?
#
# Which torch, and why:
# - PyPI's torch==2.13.0 wheel for Linux x86-64 IS the CUDA build: CUDA 13.0 (it requires cuda-toolkit 13.0.3,
#   nvidia-cudnn-cu13 9.20.0.48, triton 3.7.1). The wheel alone is 526,605,292 bytes (502 MiB, cp312), its CUDA
#   libraries several GB more. It needs a driver that reports CUDA >= 13.0 in nvidia-smi (the 580 series or newer);
#   PyPI has no CUDA 12 build of 2.13.0, so an older driver stops this script with that message.
# - Online (PyPI reachable, no CUDA torch on the machine): `make setup`, exactly the development machines' set-up
#   (torch==2.13.0 first, then '.[test,models]', the MPNet parts, the C kernels). Outside a machine whose pip is
#   pointed at a local CPU wheel, that torch==2.13.0 resolves to the CUDA build above.
# - Offline (nothing reachable; the python3 already there holds a CUDA torch): .venv-gpu/bin/python runs that
#   python3 with hyprec's source and any wheels carried in .whl/ (gguf, a model package) in front of its own
#   packages. That torch is the image's, not 2.13.0; gpu.py records which version ran. Models whose packages are not
#   there are reported as not run by gpu.py, with the package each needs. GPU_SETUP_TORCH=pypi forces the online path.
# - flash-attn is not built: PyPI ships 2.8.3 as source only, and compiling its CUDA kernels takes far longer than a
#   GPU session here lasts. hyprec then uses SDPA, whose float16/bfloat16 path on sm80+ is PyTorch's own
#   FlashAttention-2 kernel; gpu.py checks that kernel refuses float32.
#
# This workplace's device machines (measured 2026-12, numbers in benchmarks/results/gpu.md): they reach no network,
# and one call may carry at most 64 MiB of working tree and files. A CUDA torch is no obstacle there: their image's
# python3 has torch 2.11.0+cu130 (the offline path). The model weights are: the MiniLM wheel is 79.6 MiB, the
# first MPNet part 90.0 MiB (438 MB in five), the Gemma GGUF 242 MiB (in parts of about 54 MiB). None fits one call.
set -euo pipefail
cd "$(dirname "$0")/.."

MIN_CUDA=13.0 # what PyPI's torch==2.13.0 Linux wheel is built for

die() {
  echo "gpu_setup: $*" >&2
  exit 1
}

check_driver() {
  local banner version
  command -v nvidia-smi >/dev/null 2>&1 || die "no nvidia-smi: this is not a GPU machine (benchmarks/gpu.py needs one)"
  banner=$(nvidia-smi 2>&1) || die "nvidia-smi failed: $(printf '%s\n' "$banner" | head -n 1)"
  # The CUDA version the driver supports, from nvidia-smi's banner ("... CUDA Version: 13.0 ...").
  version=$(printf '%s\n' "$banner" | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1)
  [ -n "$version" ] || die "nvidia-smi printed no 'CUDA Version'; cannot tell which torch build the driver runs"
  if [ "$(printf '%s\n%s\n' "$MIN_CUDA" "$version" | sort -V | head -n 1)" != "$MIN_CUDA" ]; then
    die "the driver supports CUDA $version, but PyPI's torch==2.13.0 is built for CUDA $MIN_CUDA (driver 580 or" \
      "newer); PyPI has no CUDA 12 build of it: update the driver, or install torch 2.13.0 from PyTorch's own" \
      "index for CUDA ${version%%.*}"
  fi
  echo "gpu_setup: the driver supports CUDA $version (>= $MIN_CUDA): PyPI's torch==2.13.0 runs on it"
}

# Whether the python3 already on the machine holds a torch that sees a CUDA device.
system_cuda_torch() {
  python3 -c 'import sys, torch; sys.exit(0 if torch.version.cuda and torch.cuda.is_available() else 1)' 2>/dev/null
}

if [ "${1:-}" = "--check-driver" ]; then
  check_driver
  exit 0
fi
[ $# -eq 0 ] || die "unknown argument $1 (expected none, or --check-driver)"

check_driver
if [ "${GPU_SETUP_TORCH:-auto}" != pypi ] && system_cuda_torch; then
  # Not a venv: the image's python3 is itself one, and a venv made from it would not see its packages. A wrapper
  # puts hyprec's source and the carried wheels in front of that python3's own packages instead.
  VENV=.venv-gpu
  PY3=$(command -v python3)
  echo "gpu_setup: offline: $PY3 and its CUDA torch, with hyprec and .whl/*.whl, as $VENV/bin/python"
  rm -rf "$VENV"
  mkdir -p "$VENV/bin" "$VENV/site"
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install --quiet --no-index --no-deps --no-compile --target "$VENV/site" .whl/*.whl
  fi
  printf '#!/bin/sh\nPYTHONPATH="%s${PYTHONPATH:+:$PYTHONPATH}" exec "%s" "$@"\n' \
    "$PWD/src:$PWD/$VENV/site" "$PY3" >"$VENV/bin/python"
  chmod +x "$VENV/bin/python"
  "$VENV/bin/python" -m hyprec.kernels || echo "gpu_setup: the C kernels did not build; the CPU reference runs without them"
else
  VENV=.venv
  echo "gpu_setup: online: make setup (torch==2.13.0 from PyPI, the CUDA $MIN_CUDA build)"
  make setup
fi

"$VENV/bin/python" - <<'EOF' || die "the venv's torch cannot run on this GPU (see above)"
import torch

if not torch.version.cuda:
    raise SystemExit(f"torch {torch.__version__} is a CPU-only build (a local CPU wheel shadowed PyPI's?)")
if not torch.cuda.is_available():
    raise SystemExit(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device")
print(f"gpu_setup: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
EOF
"$VENV/bin/python" - <<'EOF'
from hyprec.errors import HyprecError
from hyprec.model_sources import resolve_model

for name in ("minilm", "gemma", "mpnet"):
    try:
        print(f"gpu_setup: model {name}: {resolve_model(name)}")
    except HyprecError as exc:
        print(f"gpu_setup: model {name}: not available ({exc})")
EOF
echo "gpu_setup: ready: HF_HUB_OFFLINE=1 $VENV/bin/python benchmarks/gpu.py"
