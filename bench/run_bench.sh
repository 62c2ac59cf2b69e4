#!/usr/bin/env bash
# Reproduce the README's bench table on this machine, on the embedded demo model (or pass
# --model and any other `mlx-specdec bench` flags). Results go to bench/results/bench.{json,md,png}.
# On Linux it preloads OpenBLAS when installed (apt install libopenblas0-pthread): MLX's wheel
# otherwise computes with a reference BLAS that is many times slower.
set -euo pipefail
cd "$(dirname "$0")/.."
OPENBLAS=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
if [[ "$(uname -s)" == Linux && -e "$OPENBLAS" ]]; then
    export LD_PRELOAD="$OPENBLAS"
fi
# "auto" learns from scratch in each run (its warm-up calibrates), not from what earlier
# processes kept on disk, so the table does not depend on this machine's history.
export MLX_SPECDEC_CACHE="${MLX_SPECDEC_CACHE:-off}"
mkdir -p bench/results
chart=()
if python -c "import matplotlib" 2>/dev/null; then
    chart=(--chart bench/results/bench.png)
fi
exec mlx-specdec bench --max-tokens 48 --repeats 9 --warmup 1 \
    --json bench/results/bench.json --markdown bench/results/bench.md "${chart[@]}" "$@"
