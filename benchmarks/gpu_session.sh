#!/usr/bin/env bash
# Everything that needs a GPU, in parts that each fit a 10-minute slot, with every result written to a folder.
#
#   bash benchmarks/gpu_session.sh tests     # the whole test suite: on a GPU the kernel tests run compiled
#                                            # (fp32 / fp16 / bf16) and the gpu-marked tests run too
#   bash benchmarks/gpu_session.sh kernels   # kernel benchmarks (attention TFLOP/s vs FlashAttention-2 alone, cuDNN,
#                                            # FlexAttention; FSQ), per-call times from do_bench with quantiles
#   bash benchmarks/gpu_session.sh encode    # end-to-end encode: upstream-packed (the baseline) / eager / cudagraph,
#                                            # and upstream itself with TITOK_UPSTREAM=<checkout of old-variableComp>
#   bash benchmarks/gpu_session.sh decode    # end-to-end decode, the same providers
#   bash benchmarks/gpu_session.sh encode-compile   # compile (torch.compile takes a while), eager beside it
#   bash benchmarks/gpu_session.sh decode-compile
#   bash benchmarks/gpu_session.sh all       # all six in a row
#
# Results go to $OUT if set, else ./gpu-results: <part>.txt (what was printed), <part>.json (pytest-benchmark),
# <part>.jsonl (end-to-end cases, one line each as soon as measured, so a part cut short keeps what it measured),
# environment.txt (card, driver, versions, commit: $COMMIT where the copy has no .git). The machine may have no
# network: Python packages it lacks (PyAV, omegaconf, ruff) are installed from ./.wheels, which `make wheels`
# fills on a machine that has one.
set -u -o pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
python="${PYTHON:-python3}"
mkdir -p "$out"

prepare() {
    {
        date -u +"%Y-%m-%d %H:%M UTC"
        echo "commit: ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1
        "$python" -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0], '| torch', \
torch.__version__, '| triton', triton.__version__, '| numpy', numpy.__version__)"
    } > "$out/environment.txt" 2>&1
    # the kernels/ folder installs as titok_fast.kernels: install the checkout itself (editable, offline)
    if ! "$python" -c "import titok_fast.kernels" 2>/dev/null \
        && ! "$python" -m pip install --quiet --no-deps --no-index --no-build-isolation -e .; then
        echo "cannot install this checkout (pip install --no-deps --no-build-isolation -e .)" >&2
        exit 2
    fi
    local missing
    missing=$("$python" -c "import importlib.util as u
print(*[m for m in ('av', 'omegaconf', 'ruff') if not u.find_spec(m)])")
    if [ -n "$missing" ] && ! "$python" -m pip install --quiet --no-index --find-links .wheels $missing; then
        echo "cannot install $missing: run 'make wheels' where there is a network and carry .wheels" >&2
        [ "$1" = tests ] || [ "$1" = all ] && exit 2  # the benchmarks need none of them
    fi
}

bench() {  # bench NAME PYTEST-K-EXPRESSION
    TITOK_BENCH_LOG="$out/$1.jsonl" "$python" -m titok_fast.cli bench -k "$2" --json "$out/$1.json" 2>&1 \
        | tee "$out/$1.txt"
}

part() {
    case "$1" in
        tests) "$python" -m pytest -q -rs tests -p no:cacheprovider 2>&1 | tee "$out/tests.txt" ;;
        kernels) bench kernels "bench_kernels" ;;
        encode | decode) bench "$1" "test_gpu and $1 and not compile" ;;
        encode-compile | decode-compile) bench "$1" "test_gpu and ${1%-compile} and (compile or eager)" ;;
        all) for p in tests kernels encode decode encode-compile decode-compile; do part "$p"; done ;;
        *) echo "unknown part '$1': tests, kernels, encode, decode, encode-compile, decode-compile, all" >&2; exit 2 ;;
    esac
}

export PYTHONUNBUFFERED=1  # a part cut off by its time limit still leaves what it printed
prepare "${1:-all}"
part "${1:-all}"
cat "$out/environment.txt"
