#!/usr/bin/env bash
# On a machine with a CUDA GPU, from the repository root, after `pip install -r requirements-dev.txt`
# (with a CUDA build of torch): the GPU tests (every metric on cuda against its CPU values), then the
# real-model bench on the GPU's free memory (its budget), then the large-model plans. One command:
#     bash bench/bench_gpu.sh
set -euo pipefail
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python -m pytest -q -m gpu tests/test_gpu.py
python bench/bench_real_model.py --device cuda --budget machine --out bench/results-real-model-gpu.json
python bench/plan_large_models.py --out bench/large-models-gpu-check.md
