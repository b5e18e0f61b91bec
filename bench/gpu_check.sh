#!/usr/bin/env bash
# GPU check, under 8 minutes on one H100/H200-class GPU: training images/s and MFU of cifar10-ddpm
# (fp32, TF32, bf16; eager and compiled), resume equality on the GPU, GPU vs CPU sampling from fixed
# noise, Inception features IEEE vs TF32, exact kNN 50k x 512 vs the CPU, one DRO proxy step.
# Prints one Markdown table (bench/gpu_check.py says what each row measures); the log goes to
# $OUT/gpu_check.log (or /tmp). Without a CUDA GPU it says so and exits 0.
#
#   bash bench/gpu_check.sh            # on a GPU worker with dedt installed (pip install -e '.[gpu]')
#   bash bench/gpu_check.sh download   # for a GPU machine with only torch and no package index: once, where
#                                      # the index is reachable, the other wheels (diffusers and what it imports,
#                                      # pydantic, faiss-cpu) into .gpu-wheels/ (gitignored, ~29 MB); copy it there
#   bash bench/gpu_check.sh --dry      # every section on the CPU at toy sizes: a test of this script
# Environment: PYTHON (default .venv/bin/python if present, else python3), PYVER (wheels' Python, 3.12),
# BUDGET_S (the check's time, default 450 s: compiled rows start only with 100 s left).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.gpu-wheels
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ "${1:-}" = download ]; then
  # The pins of constraints.txt; diffusers imports requests, regex, filelock and importlib_metadata.
  exec "$PYTHON" -m pip download --only-binary=:all: --no-deps --python-version "${PYVER:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" \
    diffusers==0.42.1 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing_extensions==4.16.0 requests==2.34.2 charset-normalizer==3.5.3 idna==3.20 urllib3==2.8.0 \
    certifi==2026.10.19.post1 regex==2026.11.19 filelock==4.3.1 importlib_metadata==10.2.0 zipp==4.1.2 \
    packaging==26.4 faiss-cpu==1.15.1
fi
if ! "$PYTHON" -c "import diffusers, pydantic, requests, faiss" 2>/dev/null; then
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    site="${TMPDIR:-/tmp}/dedt-gpu-site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$WHEELS"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_check: $PYTHON lacks diffusers, pydantic, requests or faiss, and $WHEELS/ holds no wheels:" \
      "run 'bash bench/gpu_check.sh download' where a package registry is reachable, then carry $WHEELS/" >&2
  fi
fi
# CUBLAS_WORKSPACE_CONFIG: deterministic cuBLAS for the resume check (read when cuBLAS starts).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
log="${OUT:-${TMPDIR:-/tmp}}/gpu_check.log"
set +e
"$PYTHON" bench/gpu_check.py "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
exit "$status"
