#!/usr/bin/env bash
# bench/gpu_check.sh on a bare GPU machine whose python3 has torch, numpy, pillow, pyarrow,
# safetensors, huggingface_hub, tqdm and PyYAML but not diffusers or pydantic (the `device` tool's
# H100/H200 image): installs the wheels of .gpu-wheels/ into /tmp/site, then runs the check and
# keeps its log in $OUT (or /tmp).
#
#   bash bench/gpu_device.sh download   # here, once: fetch the py3.12 wheels into .gpu-wheels/ (gitignored, ~9 MB)
#   bash bench/gpu_device.sh            # there, with .gpu-wheels carried along
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.gpu-wheels
if [ "${1:-}" = download ]; then
  exec "${PIP:-.venv/bin/pip}" download --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" \
    diffusers==0.42.1 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    typing_extensions==4.16.0
fi
python3 -c "import torch, numpy, PIL, pyarrow, safetensors, huggingface_hub, tqdm, yaml
print('torch', torch.__version__, 'CUDA', torch.cuda.is_available(), 'huggingface_hub', huggingface_hub.__version__)"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
log="${OUT:-/tmp}/gpu_check.log"
bash bench/gpu_check.sh 2>&1 | tee "$log"
