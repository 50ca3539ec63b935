#!/usr/bin/env bash
# Everything that needs a GPU, in parts that each run within 10 minutes, with every result written to a folder.
#
#   bash benchmarks/gpu_session.sh tests     # the whole test suite: on a GPU the kernel tests run compiled
#                                            # (fp32 / fp16 / bf16) and the gpu-marked tests run too
#   bash benchmarks/gpu_session.sh gpu-tests # the gpu-marked tests alone (270 s at most): device preprocessing's
#                                            # tokens against the CPU path's, NVDEC's planes against PyAV's (and a
#                                            # tar archive's member read in place through NVDEC's demuxer), the
#                                            # NV12 and I420 kernels, the engine's CUDA graphs and streams, FP8
#                                            # in graphs, pinned hand-over; and the compile mode's graphs traced
#                                            # on fake CUDA tensors under this machine's torch (cuda_build)
#   bash benchmarks/gpu_session.sh kernels   # kernel benchmarks (attention TFLOP/s vs FlashAttention-2 alone, cuDNN,
#                                            # FlexAttention; every ATTENTION_BLOCKS shape; FSQ), per-call times
#                                            # from do_bench with quantiles
#   bash benchmarks/gpu_session.sh attention # the attention rows of kernels alone (240 s at most): the anchors
#                                            # and every ATTENTION_BLOCKS shape (the pipelined ones too), on
#                                            # the V1 mix and on one clip (a batch of one)
#   bash benchmarks/gpu_session.sh encode    # end-to-end encode: upstream-packed (the baseline) / eager / cudagraph /
#                                            # auto, and upstream itself with TITOK_UPSTREAM=<checkout of
#                                            # old-variableComp> (`make upstream` makes one in .upstream/ to carry)
#   bash benchmarks/gpu_session.sh decode    # end-to-end decode, the same providers
#   bash benchmarks/gpu_session.sh encode-compile   # compile (torch.compile takes a while), eager beside it
#   bash benchmarks/gpu_session.sh decode-compile
#   bash benchmarks/gpu_session.sh fp8       # batch-32 decode: auto (bf16) beside fp8 (auto with the decoder's
#                                            # Linears in FP8), in the same run
#   bash benchmarks/gpu_session.sh parity    # tokens equal to the float32 oracle's (V1, 8 seeds): the bf16 floor,
#                                            # the triton backend in bf16, and with FP8 (decoder) linears; and
#                                            # their decoded pixels against the float32 oracle's
#   bash benchmarks/gpu_session.sh pipeline  # files in, token files out (V1, bf16): before / after on 720p30 and
#                                            # 256p8 sources, an NVDEC probe and run
#   bash benchmarks/gpu_session.sh pipeline-sweeps  # NVDEC against threads (benchmarks/nvdec_scaling.py),
#                                            # decoding workers 1..16, one long video read by 1 worker and by
#                                            # every core
#   bash benchmarks/gpu_session.sh all       # all eight in a row, up to 10 minutes each (pipeline is run on its own)
#   bash benchmarks/gpu_session.sh targets gpu-tests   # several parts in a row, their results in one place
#   bash benchmarks/gpu_session.sh targets   # one short run, under 9.5 minutes by its timeouts (570 s): the
#                                            # measurements behind every target of RESULTS.md (attention vs
#                                            # the anchors and every block shape; encode and decode at 256
#                                            # tokens, b1/b8/b32,
#                                            # upstream-packed / eager / auto; fp8 at b32; parity; the pipeline
#                                            # before /
#                                            # after on 720p30 and 256p8, and NVDEC), then the table of
#                                            # targets met or missed (benchmarks/targets.py)
#   bash benchmarks/gpu_session.sh targets-model   # its model rows alone (305 s), judged
#   bash benchmarks/gpu_session.sh fusions   # encode and decode at b1 and b32 (256 tokens): auto beside
#                                            # auto-unfused (the LayerNorms in PyTorch, each residual added by a
#                                            # kernel of its own after its GEMM), and the LayerNorm kernel against
#                                            # PyTorch's (105 s)
#   bash benchmarks/gpu_session.sh pipeline-short  # its input pipeline rows alone (295 s), judged
#   bash benchmarks/gpu_session.sh profile   # where a batch's time goes (benchmarks/profile_model.py, 180 s at
#                                            # most): device ms by kind of kernel and the GPU's idle time, encode
#                                            # and decode at b1 and b32 (auto), and FP8 decode at b32
#
# With 15 minutes of device time (a machine's start included), what has changed since the last GPU run goes first:
# since the H100 run of 2026-12-05 the default attention kernel is the same, with seven new candidate block shapes
# (five `-pipe`: the next key block's QK^T in flight during the softmax; `m128n32w8s3-r80`: three CTAs per SM, one
# clip's encoder grid in one wave); the layers' LayerNorms are a kernel of one pass and a 16-bit model adds its
# residuals in the GEMMs' epilogues (`fusions` measures both against the before); the input pipeline has changed
# (H.264 in MP4 decoded without FFmpeg's probe, NVDEC decoders kept from file to file, one thread writing token
# files, the weights' digest taken once a run, tar archives read in place: whether NVDEC's demuxer opens a member's
# span is a gpu test), the gpu tests corrected or added since have not run, and the
# pipeline rows say what the decoding workers and the model's feeder waited for (why 16 processes kept 11 cores
# busy), beside a row of 256p8 with a stand-in for the model at its measured speed (what driving the model costs the
# input). So, each a call of its own:
#   1. `gpu-tests pipeline-short` (565 s at most by its steps' limits, and some 20 s of installs: give the call
#      600 s; what each step measured is packed as it ends): the device-side preprocessing and NVDEC checks, then
#      every pipeline target;
#   2. `attention fusions` (345 s at most: which block shape is fastest, beside FlashAttention-2 and cuDNN; the
#      LayerNorm kernel and the residual adds in the GEMM against the before), then, in what is left,
#      `targets-model` (305 s at most) or `profile` (180 s). The limits are ceilings: on the H100 on
#      2026-12-05 call 1's parts took 146 s together and `targets-model profile` 116 s. The two ceilings add up
#      to more than 15 minutes: call 2 fits only as call 1 ran (look at its time first); a machine is kept 30 s
#      after a call, so the next call goes out at once (a fresh start costs 1-2 minutes).
#
# Its exit status is 0 whatever the parts gave (each part says how it ended, "[name: N s]" and any cut-off): read
# what it printed, or the results (2: an unknown part, or a checkout or PyAV that cannot be installed).
# Results: <part>.txt (what was printed), <part>.json (pytest-benchmark), <part>.jsonl (end-to-end cases, one line
# each as soon as measured, so a part cut short keeps what it measured), environment.txt (card, driver, versions,
# commit: $COMMIT where the checkout has no .git), in ./gpu-results; or, with $OUT set, packed into
# $OUT/results.tar.gz after every step, beside copies of targets.md and environment.txt (three files to copy back
# from a remote machine, whatever the number of parts; the generated videos stay out of it). The machine may have
# no network: Python packages it lacks (PyAV, omegaconf, PyNvVideoCodec, pytest-xdist) are installed from
# ./.wheels, which `make wheels` fills on a machine that has one (without ruff, to stay small: the lint test skips
# without it).
set -u -o pipefail
cd "$(dirname "$0")/.."
PARTS=" tests gpu-tests kernels attention encode decode encode-compile decode-compile fp8 fusions parity pipeline \
pipeline-short pipeline-sweeps all targets targets-model profile "
for name in "${@:-all}"; do  # every part named is checked before any runs: a misspelled later part would
    # otherwise stop the call after the parts before it had used the machine's time
    case "$name" in
        -h | --help) sed -n '2,/^set /p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) [[ "$PARTS" == *" $name "* ]] || { echo "unknown part '$name': one of$PARTS" >&2; exit 2; } ;;
    esac
done
python="${PYTHON:-python3}"
# with $OUT set, results are written to a scratch folder and packed into $OUT after every step (a run stopped from
# outside keeps what was packed)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's titok_fast, for `python benchmarks/x.py` too
if [ -n "${OUT:-}" ]; then out=$(mktemp -d "${TMPDIR:-/tmp}/titok-gpu-results.XXXXXX"); else out=gpu-results; fi
scratch="${TMPDIR:-/tmp}/titok-gpu-videos"
mkdir -p "$out" "$scratch"

pack() {
    [ -n "${OUT:-}" ] || return 0
    mkdir -p "$OUT"
    tar -czf "$OUT/.results.tar.gz" -C "$out" . && mv "$OUT/.results.tar.gz" "$OUT/results.tar.gz"
    for f in targets.md environment.txt; do [ -f "$out/$f" ] && cp "$out/$f" "$OUT/"; done
    return 0
}

cut_off() {  # cut_off STATUS NAME SECONDS: say so when a step ran into its time limit
    if [ "$1" = 124 ] || [ "$1" = 137 ]; then echo "[$2: cut off at its limit of $3 s; what it measured is kept]"; fi
}

limited() {  # limited NAME SECONDS COMMAND...: COMMAND cut off after SECONDS (killed 10 s later if it lingers),
    # saying so, and how long it took
    local name=$1 seconds=$2 start=$SECONDS
    shift 2
    timeout -k 10 "$seconds" "$@"
    local status=$?
    cut_off "$status" "$name" "$seconds"
    echo "[$name: $((SECONDS - start)) s]"
    pack  # what the step measured reaches $OUT now, not only at the end of its part (a call cut off keeps it)
    return $status
}

prepare() {
    {
        date -u +"%Y-%m-%d %H:%M UTC"
        echo "commit: ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1
        "$python" -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0], '| torch', \
torch.__version__, '| triton', triton.__version__, '| numpy', numpy.__version__)"
    } > "$out/environment.txt" 2>&1
    # the kernels/ folder installs as titok_fast.kernels: install the checkout itself (editable, offline), unless
    # installed (looked at from outside the checkout: from within, its own titok_fast imports, but a script run as
    # `python benchmarks/x.py` has benchmarks/ on its path, not the checkout; PYTHONPATH above covers those too)
    if ! (cd / && env -u PYTHONPATH "$python" -c "import titok_fast.kernels") 2>/dev/null \
        && ! "$python" -m pip install --quiet --no-deps --no-index --no-build-isolation -e .; then
        echo "cannot install this checkout (pip install --no-deps --no-build-isolation -e .)" >&2
        exit 2
    fi
    local missing
    missing=$("$python" -c "import importlib.util as u
print(*[m for m in ('av', 'omegaconf') if not u.find_spec(m)])")
    if [ -n "$missing" ] && ! "$python" -m pip install --quiet --no-index --find-links .wheels $missing; then
        echo "cannot install $missing: run 'make wheels' on a machine with a network and copy .wheels here" >&2
        # titok_fast reads videos with PyAV: nothing runs without it; omegaconf: upstream's configs (tests, all)
        ! "$python" -c "import av" 2>/dev/null || [ "$1" = tests ] || [ "$1" = all ] && exit 2
    fi
    # upstream's own code (provider `upstream`, with TITOK_UPSTREAM: `make upstream` puts it in .upstream/) needs
    # einops, which `make wheels` brings
    if [ -n "${TITOK_UPSTREAM:-}" ] && ! "$python" -c "import einops" 2>/dev/null \
        && ! "$python" -m pip install --quiet --no-index --find-links .wheels einops; then
        echo "einops is not installed: provider upstream will fail (make wheels brings it)" >&2
    fi
    if { [[ "$1" == pipeline* ]] || [[ "$1" == *tests ]] || [ "$1" = targets ] || [ "$1" = all ]; } \
        && ! "$python" -c "import PyNvVideoCodec" 2>/dev/null \
        && ! "$python" -m pip install --quiet --no-index --find-links .wheels pynvvideocodec; then
        echo "PyNvVideoCodec is not installed: the NVDEC rows will say why, its GPU test skips" >&2  # optional
    fi
    { [ "$1" != tests ] && [ "$1" != all ]; } || "$python" -c "import xdist" 2>/dev/null \
        || "$python" -m pip install --quiet --no-index --find-links .wheels pytest-xdist 2>/dev/null \
        || echo "pytest-xdist is not installed: the tests part runs on one core" >&2  # optional too
    [[ "$1" != *tests ]] || "$python" -c "import pytest_timeout" 2>/dev/null \
        || "$python" -m pip install --quiet --no-index --find-links .wheels pytest-timeout 2>/dev/null \
        || echo "pytest-timeout is not installed: a gpu test that hangs takes the part's whole limit" >&2  # optional
}

bench() {  # bench NAME PYTEST-K-EXPRESSION [SECONDS]: cut off after SECONDS (default 540, so that with the
    # installs a part stays within 10 minutes), keeping what it measured
    TITOK_BENCH_LOG="$out/$1.jsonl" limited "$1" "${3:-540}" "$python" -m titok_fast.cli bench -k "$2" \
        --json "$out/$1.json" 2>&1 | tee "$out/$1.txt"
    pack
}

part() {
    case "$1" in
        tests) local spread=() && "$python" -c "import xdist" 2>/dev/null && spread=(-n 4 --dist loadfile)
               timeout 540 "$python" -m pytest -q -rs tests -p no:cacheprovider "${spread[@]}" 2>&1 \
                   | tee "$out/tests.txt" ;;
        # (-v: a test cut off by the limit is named; tests of a file that cannot be collected, as without omegaconf,
        # are left out, not the rest; --timeout where pytest-timeout is installed: one hung test, not the part)
        gpu-tests) local per_test=() && "$python" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout=90)
                   limited gpu-tests 240 "$python" -m pytest -v -rs -m "gpu or cuda_build" tests -p no:cacheprovider \
                       --continue-on-collection-errors "${per_test[@]}" 2>&1 | tee "$out/gpu-tests.txt"
                   # the test that passed alone and failed after the others on the H100 (2026-12-05), alone in a
                   # process of its own: an order effect is then told from a graph-against-eager difference
                   limited "layout graphs alone" 30 "$python" -m pytest -v -p no:cacheprovider \
                       "tests/test_engine.py::test_v1_bf16_layout_graphs_on_the_gpu_are_the_eager_path_bit_for_bit" \
                       2>&1 | tee -a "$out/gpu-tests.txt"
                   pack ;;
        kernels) bench kernels "bench_kernels" ;;
        attention) bench attention "bench_kernels and attention" 240 ;;  # anchors, every block shape; one clip last
        encode | decode) bench "$1" "test_gpu and $1 and not compile and not fp8 and not unfused" ;;
        fp8) bench fp8 "test_gpu and decode and b32 and (auto or fp8) and not unfused" ;;
        fusions) bench fusions "test_gpu and n256 and (b1 or b32) and not mixed and auto" 75  # auto, auto-unfused
                 bench fusions-kernels "bench_kernels and layer_norm" 30 ;;
        encode-compile | decode-compile) bench "$1" "test_gpu and ${1%-compile} and (compile or eager)" ;;
        parity) timeout 540 "$python" benchmarks/bf16_parity.py --config v1 --device cuda --oracle-device cuda \
                    --backends triton --seeds 8 --fp8 --decode 2>&1 | tee "$out/parity.txt" ;;
        pipeline) pipeline ;;
        pipeline-short) pipeline short; pack; judge ;;  # the pipeline rows of targets alone, judged
        pipeline-sweeps) pipeline sweeps ;;
        targets) part targets-model unjudged; pipeline short; pack; judge ;;
        targets-model)  # the model's rows of targets (305 s by the timeouts)
            bench kernels "bench_kernels and (attention or gated_gelu) and not blocks" 70  # the block sweep: part
            # kernels
            bench encode "test_gpu and encode and n256 and not mixed and (upstream or eager or auto) and not unfused" 80
            bench decode "test_gpu and decode and n256 and not mixed and (upstream or eager or auto) and not unfused" 70
            bench fp8 "test_gpu and decode and n256 and b32 and (auto or fp8) and not unfused" 40
            limited parity 45 "$python" benchmarks/bf16_parity.py --config v1 --device cuda --oracle-device cuda \
                --backends triton --seeds 4 --fp8 --decode 2>&1 | tee "$out/parity.txt"
            pack
            [ "${2:-}" = unjudged ] || judge ;;
        profile)  # the kernels by kind, at the targets' cases (auto: b1 replays a layout's graph, b32 runs eager)
            limited profile 130 "$python" benchmarks/profile_model.py --mode auto --stages encode,decode \
                --batches 1,32 --out "$out/profile" 2>&1 | tee "$out/profile.txt"
            limited profile-fp8 50 "$python" benchmarks/profile_model.py --mode auto --precision fp8 --stages decode \
                --batches 32 --out "$out/profile-fp8" 2>&1 | tee "$out/profile-fp8.txt"
            pack ;;
        all) for p in tests kernels encode decode encode-compile decode-compile fp8 parity; do part "$p"; done ;;
        *) echo "unknown part '$1': one of$PARTS" >&2  # (refused before any part runs)
           exit 2 ;;
    esac
}

judge() {  # the targets met or missed, of what this call measured ("not measured" for the rest)
    "$python" benchmarks/targets.py "$out" 2>&1 | tee "$out/targets.md"
}

pipeline() {  # $1: "" (every before / after row: 490 s by the timeouts below), "short" (the rows of the targets:
    # 295 s; no 256p8 "before", no rows with threads) or "sweeps" (NVDEC against threads, decoding workers 1..16,
    # one long video: 485 s); every row is appended to pipeline.jsonl as soon as it is measured
    local log="$out/pipeline.jsonl" videos="$scratch/pipeline-videos" mode=${1:-}
    local run=("$python" benchmarks/bench_pipeline.py --config v1 --dtype bf16 --batch-size 32 --seconds 10
               --videos "$videos" --log "$log")
    {
        [ "$mode" = sweeps ] && { sweeps; return; }
        echo "## NVDEC probe"
        PROBE_VIDEO="$scratch/probe.mp4" limited "NVDEC probe" 20 "$python" - <<'PROBE' 2>&1
import os, sys
sys.path.insert(0, "benchmarks")
from pathlib import Path
import av, torch
import bench_pipeline
from titok_fast import decoders
probe = os.environ["PROBE_VIDEO"]
bench_pipeline.make_source(Path(probe), 640, 360, 30, 2)
try:  # NVDEC itself, without the CPU fallback: the exact error if it cannot be reached
    with av.open(probe) as container:
        frames = decoders.nvdec_frames(probe, container.streams.video[0])
        first = next(frames)
        rgb = decoders.nvdec_rgb(first)
        count = 1 + sum(1 for _ in frames)
        print("NVDEC reachable:", count, "frames, first", tuple(rgb.shape), rgb.device, "| GPU", torch.cuda.get_device_name())
        cpu = next(container.decode(video=0)).to_ndarray(format="rgb24")
        print("max |NVDEC RGB - PyAV RGB| on frame 0:", (rgb.cpu().int() - torch.from_numpy(cpu).int()).abs().max().item())
except Exception as exc:
    print("NVDEC unreachable:", type(exc).__name__, exc)
PROBE
        # before: the old path (every frame decoded, per-frame float32 resize on the CPU, 2 decoding threads), same
        # commit and command
        # (720p30: 12 files of 4 clips; 256p8: 128 files of 4 clips, 512 clips: with fewer, a run at the model's
        # speed would be mostly start-up; the "after" rows: 32 files of 720p30, so that each of 16 workers has a
        # file and more (a file of 4 clips is read by one worker: 12 files kept 4 of 16 idle), and 256 files,
        # 1024 clips, of 256p8: 2.4 s at the aim's 426 clips/s)
        local long=1 && [ "$mode" = short ] && long=0
        local before=(--label before --preprocess cpu --no-prune --workers 2)
        limited sources 40 "${run[@]}" --sources 720p30,256p8 --sources-only  # x264, once, outside the runs
        limited "before 720p30" $((long ? 60 : 50)) "${run[@]}" --sources 720p30 --files 12 "${before[@]}"
        [ $long = 0 ] || limited "before 256p8" 60 "${run[@]}" --sources 256p8 --files 128 "${before[@]}"
        # after: the defaults (a decoding worker per core, processes from 8 of them on small sources; preprocessing
        # on the GPU by the placement rule)
        limited "after 720p30" 40 "${run[@]}" --sources 720p30 --files 32 --label after --workers "$(nproc)"
        limited "after 256p8" 40 "${run[@]}" --sources 256p8 --files 256 --label after --workers "$(nproc)"
        # the same with a stand-in for the model at the model-only rate that row measured (a sleep per batch): what
        # the input pipeline gives a model of that speed, less what driving the real one costs the run's thread
        local rate
        rate=$("$python" -c "import json, sys; rows = [json.loads(l) for l in open(sys.argv[1])]; print(next((r['model_only_clips_per_s'] for r in reversed(rows) if r.get('source') == 'after 256p8' and 'model_only_clips_per_s' in r), 750))" "$log" 2>/dev/null || echo 750)
        limited "stand-in 256p8" 30 "${run[@]}" --sources 256p8 --files 256 --label stand-in --workers "$(nproc)" \
            --stand-in "$rate"
        limited nvdec 35 "${run[@]}" --sources 720p30 --files 32 --label nvdec --decoder nvdec --workers "$(nproc)"
        # 256p8 through NVDEC: whether the hardware decoder carries small sources to the model's speed, where CPU
        # decoding cannot (0.03-0.05 CPU-s a clip: 16 cores feed some 300-500 clips/s at best); as many files as
        # the CPU row, each decoding thread's first decoder (made within the row: some 0.24 s each) included
        limited "nvdec 256p8" 40 "${run[@]}" --sources 256p8 --files 256 --label nvdec --decoder nvdec \
            --workers "$(nproc)"
        [ $long = 1 ] || return 0
        # the CPU decoder's frames uploaded as RGB, as before the I420 hand-over (the "after" rows: I420)
        limited "after 720p30, rgb" 40 "${run[@]}" --sources 720p30 --files 32 --label after-rgb --upload rgb \
            --workers "$(nproc)"
        limited "after 256p8, rgb" 40 "${run[@]}" --sources 256p8 --files 256 --label after-rgb --upload rgb \
            --workers "$(nproc)"
        # the same with threads, the default before worker_kind_for
        limited "after 256p8, threads" 40 "${run[@]}" --sources 256p8 --files 256 --label after-threads \
            --worker-kind thread --workers "$(nproc)"
        limited "after 720p30, threads" 40 "${run[@]}" --sources 720p30 --files 32 --label after-threads \
            --worker-kind thread --workers "$(nproc)"
    } 2>&1 | tee "$out/pipeline.txt"
}

sweeps() {  # pipeline's "sweeps" (its $run, $videos and $out)
    limited sources 40 "${run[@]}" --sources 720p30,256p8 --sources-only
    # what limits NVDEC: whether PyNvVideoCodec's Decode holds the GIL, and its frames/s against threads
    # (titok: RGB by the kernel a clip of 20 frames a launch, as the reader converts; titok-frames: a launch a frame,
    # as it converted before; kept: a decoder kept
    # from one pass over the file to the next, to be set beside raw, a new decoder for each: what making one costs)
    limited "NVDEC scaling" 80 "$python" benchmarks/nvdec_scaling.py --videos "$videos" --seconds 10 \
        --threads 1,2,4,8,16 --case-seconds 2 --log "$out/nvdec_scaling.jsonl"
    limited "NVDEC scaling 256p8" 45 "$python" benchmarks/nvdec_scaling.py --videos "$videos" --seconds 10 \
        --source 256p8 --paths raw,kept,titok,titok-frames --threads 1,4,16 --case-seconds 2 \
        --log "$out/nvdec_scaling.jsonl"
    for kind in thread process; do
        local counts=(1 2 4 8 16) && [ $kind = process ] && counts=(1 4 16)
        for w in "${counts[@]}"; do
            # (two files a worker at least: a file of 4 clips is read by one worker)
            limited "input $kind x$w" 20 "${run[@]}" --sources 720p30 --files $((w > 4 ? 2 * w : 8)) --input-only \
                --worker-kind $kind --workers $w --label "input $kind x$w"
        done
        for w in 4 8 16; do  # small sources, where a thread's share of the GIL limits threads first
            limited "input 256p8 $kind x$w" 20 "${run[@]}" --sources 256p8 --files 64 --input-only \
                --worker-kind $kind --workers $w --label "input 256p8 $kind x$w"
        done
    done
    # one long video (96 clips), split across the workers: 1 worker, then every core
    limited "long source" 20 "${run[@]}" --sources 256p8 --seconds 240 --sources-only
    for w in 1 "$(nproc)"; do
        limited "one long file x$w" 10 "${run[@]}" --sources 256p8 --seconds 240 --files 1 --input-only \
            --workers "$w" --label "one long file x$w"
    done
}

export PYTHONUNBUFFERED=1  # a part cut off by its time limit still leaves what it printed
# every row this invocation logs names it: targets.py judges a log on its latest session alone (gpu-results/ without
# $OUT keeps the rows of earlier sessions, maybe of another card)
export TITOK_BENCH_SESSION="${TITOK_BENCH_SESSION:-$(date -u +%Y%m%dT%H%M%SZ)-$$}"
for name in "${@:-all}"; do  # one part, or several in a row (e.g. targets gpu-tests), into the same results
    prepare "$name"
    part "$name"
    pack
done
cat "$out/environment.txt"
