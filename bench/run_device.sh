#!/usr/bin/env bash
# One device call: unpack the GPU bundle, install the package (regular install: the device
# image's setuptools does not map package-dir folders in editable mode), run the gpu-marked
# tests, doctor, and the GPU benchmarks, writing everything under $OUT.
#   bash bench/run_device.sh [tests|kernels|bench|sampling|spec|mixed|mixedtests|tp|all|ab|none]
# "ab": .device/before.tar.gz (git archive of the commit to compare with) and this checkout are
# installed side by side and timed alternately (bench/commit_ab_gpu.py, AB_ROUNDS rounds).
# "tests" (~4 min) and "bench" (~5 min) each fit one 10-minute device call; "all" runs both.
# "mixed" (~4 min): the mixed-step graphs' and measured sampler-kernel GPU tests, then the
# Poisson-arrival mixed-workload benchmark (bench/bench_mixed_graphs_gpu.py).
set -uo pipefail
what=${1:-all}
OUT=${OUT:-/tmp/lz_out}
mkdir -p "$OUT" /root/lz
if [ ! -d /root/lz/site ]; then
  # the bundle sits in the checkout's .device/ (run from the root or from .device/src)
  bundle=$(ls .device/*.tar.xz ../*.tar.xz 2>/dev/null | head -1)
  if [ -z "$bundle" ]; then echo "no GPU bundle (.device/*.tar.xz) found" >&2; exit 2; fi
  tar xJf "$bundle" -C /root/lz
fi
export PYTHONPATH=/root/lz/site PYTHONUNBUFFERED=1 FLASHINFER_CUDA_ARCH_LIST=9.0a
export LZ_SPEC_TRIALS=1000000  # the losslessness tests' trial count on the device
python3 -m pip install -q --no-deps --no-build-isolation . > "$OUT/pip.log" 2>&1 || cat "$OUT/pip.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.txt"
cd /tmp  # import the installed package, not the checkout (never run Python from the root)
REPO=$OLDPWD
python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" \
  | tee "$OUT/versions.txt"
if [ "$what" = ab ]; then  # before/after A/B of two commits in one run
  mkdir -p /root/ab/before_src && tar xzf "$REPO/.device/before.tar.gz" -C /root/ab/before_src
  (cd /root/ab/before_src && python3 -m pip install -q --no-deps --no-build-isolation \
    --target /root/ab/before .) > "$OUT/pip_ab.log" 2>&1
  (cd "$REPO" && python3 -m pip install -q --no-deps --no-build-isolation \
    --target /root/ab/after .) >> "$OUT/pip_ab.log" 2>&1
  python3 "$REPO/bench/commit_ab_gpu.py" --site before=/root/ab/before --site after=/root/ab/after \
    --rounds "${AB_ROUNDS:-2}" --out "$OUT" 2>&1 | grep -v "^INFO" | tail -20 | tee "$OUT/ab.txt"
fi
if [ "$what" = tests ] || [ "$what" = all ]; then
  python3 -m pytest "$REPO/tests" -m gpu -q -p no:cacheprovider \
    -o addopts="" 2>&1 | tail -40 | tee "$OUT/gpu_tests.txt"
  # kernel tests that run natively when CUDA is present (interpreted on the CPU in CI)
  python3 -m pytest "$REPO/tests/kernels/test_triton_norm.py" \
    "$REPO/tests/kernels/test_triton_sampling.py" "$REPO/tests/kernels/test_triton_rejection.py" \
    "$REPO/tests/kernels/test_triton_gemv.py" "$REPO/tests/unit/test_plugin_faults_rejection.py" \
    -q -p no:cacheprovider -o addopts="" 2>&1 | tail -5 | tee -a "$OUT/gpu_tests.txt"
  layerzero-serve doctor > "$OUT/doctor.txt" 2>&1
  layerzero-serve doctor --json > "$OUT/doctor.json" 2>/dev/null
  timeout 120 layerzero-serve demo --quiet > "$OUT/demo_gpu.txt" 2>&1
fi
if [ "$what" = spec ]; then  # speculative decoding's GPU tests and benchmark, plus the decode bench
  python3 -m pytest "$REPO/tests/gpu/test_spec_lossless_gpu.py" "$REPO/tests/gpu/test_spec_graphs.py" \
    "$REPO/tests/examples/test_custom_model_example.py" -q -p no:cacheprovider -o addopts="" \
    2>&1 | tail -15 | tee "$OUT/gpu_tests_spec.txt"
  python3 "$REPO/bench/bench_spec_gpu.py" --out "$OUT" > "$OUT/bench_spec.log" 2>&1
  grep "^{\|ngram" "$OUT/bench_spec.log" | cut -c1-300 | tail -12
  python3 "$REPO/bench/bench_decode_gpu.py" --out "$OUT" > "$OUT/bench_decode.log" 2>&1
  grep -v "^INFO\|capture CUDA" "$OUT/bench_decode.log" | tail -12
fi
if [ "$what" = mixed ]; then  # piecewise graphs for prefill / mixed steps; measured sampling kernels
  timeout 200 python3 -m pytest "$REPO/tests/gpu/test_mixed_graphs.py" \
    "$REPO/tests/gpu/test_sampler_kernel_choice.py" "$REPO/tests/gpu/test_cuda_graphs.py" \
    -q -p no:cacheprovider -o addopts="" 2>&1 | tail -25 | tee "$OUT/gpu_tests_mixed.txt"
  timeout 300 python3 "$REPO/bench/bench_mixed_graphs_gpu.py" --out "$OUT" \
    > "$OUT/bench_mixed.log" 2>&1
  grep -v "^INFO\|capture" "$OUT/bench_mixed.log" | tail -14
fi
if [ "$what" = tp ]; then  # tensor parallelism: NCCL at world size 1 (and TP=2 with 2 GPUs)
  timeout 280 python3 -m pytest "$REPO/tests/gpu/test_tensor_parallel_gpu.py" -q -p no:cacheprovider \
    -o addopts="" -rs 2>&1 | tail -25 | tee "$OUT/gpu_tests_tp.txt"
fi
if [ "$what" = mixedtests ]; then  # the mixed-step graphs' and sampler-kernel GPU tests only
  timeout 240 python3 -m pytest "$REPO/tests/gpu/test_mixed_graphs.py" \
    "$REPO/tests/gpu/test_sampler_kernel_choice.py" "$REPO/tests/gpu/test_cuda_graphs.py" \
    -q -p no:cacheprovider -o addopts="" 2>&1 | tail -25 | tee "$OUT/gpu_tests_mixed.txt"
fi
if [ "$what" = sampling ]; then  # the sampler's GPU tests, kernels and benchmarks only
  python3 -m pytest "$REPO/tests/gpu/test_sampling_gpu.py" "$REPO/tests/gpu/test_cuda_graphs.py" \
    "$REPO/tests/kernels/test_triton_topk_sampling.py" "$REPO/tests/kernels/test_triton_sampling.py" \
    -q -p no:cacheprovider -o addopts="" 2>&1 | tail -15 | tee "$OUT/gpu_tests_sampling.txt"
  python3 "$REPO/bench/bench_sampling.py" --out "$OUT/sampling_gpu.json" > "$OUT/bench_sampling.log" 2>&1
  tail -4 "$OUT/bench_sampling.log"
  python3 "$REPO/bench/bench_decode_gpu.py" --out "$OUT" > "$OUT/bench_decode.log" 2>&1
  grep -v "^INFO\|capture CUDA" "$OUT/bench_decode.log" | tail -8
fi
if [ "$what" = kernels ] || [ "$what" = bench ] || [ "$what" = all ]; then
  python3 "$REPO/bench/bench_decode_kernels_gpu.py" --out "$OUT" > "$OUT/bench_decode_kernels.log" 2>&1
  tail -3 "$OUT/bench_decode_kernels.log"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  python3 "$REPO/bench/bench_decode_gpu.py" --out "$OUT" > "$OUT/bench_decode.log" 2>&1
  grep -v "^INFO\|capture CUDA" "$OUT/bench_decode.log" | tail -20
  python3 "$REPO/bench/bench_sampling.py" --out "$OUT/sampling_gpu.json" > "$OUT/bench_sampling.log" 2>&1
  tail -2 "$OUT/bench_sampling.log"
  python3 "$REPO/bench/bench_spec_gpu.py" --out "$OUT" > "$OUT/bench_spec.log" 2>&1
  grep "^{\|ngram" "$OUT/bench_spec.log" | tail -12
fi
