#!/usr/bin/env bash
# gpu-check.sh: what a run on the GPU machine does, in one call (see
# ../shared/device/README.md): unpack the Debian packages carried in .deps, build in
# Release, run the GPU tests, then the steps named on the command line, each logged under
# $OUT (or ./gpu-out). The peers of ../shared/device travel in .devtools/ (a git-ignored
# copy the device call carries with .deps). Steps:
#   suite     the README's test labels (unit, integration, gpu) with ctest -j
#   engine    rlb-bench-engine --device cuda (1B shape) and the HF generate peer
#   engine8b  the same on the 8B shape
#   gemv      rlb-bench-engine --device cuda --gemv: the decode GEMV on every matrix of both
#             shapes at 1 to 8 rows, plain and fused as a step runs it
#   sync      rlb-bench-sync --device cuda (1B shape; sync8b: both shapes) and the torch
#             reshard peer
#   sync-vmm  rlb-bench-sync --device cuda --vmm: the trainer's memory VMM-mapped (exported
#             as fds, as under expandable_segments:True) instead of cudaMalloc (IPC handles)
#   sync-debug  the 8B shape alone with the bridge's and the executor's debug log (where
#             the time from publish to the copy's launch goes)
#   reshard   rlb-bench-reshard-gpu (the copy kernel at 8B size, counting NaN/Inf and not)
#             and the torch reshard peer
#   mem       rlb-bench-reshard-gpu --mem (the sync's copy by kind of memory: cudaMalloc,
#             VMM, VMM mapped through its fd)
#   grpo      examples/grpo_torch.py, 30 steps, --check (fp32: logprob mismatch <= 1e-4)
#   grpo-vmm  the same under PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (the trainer's
#             memory goes to the bridge as VMM fds; the log must say so), 20 steps
#   lora-kernel  test_cuda_lora (the fused merges, on tensor cores and in multiply-adds, and
#             the separate ones, against the CPU executor and the double-precision
#             reference) and rlb-bench-reshard-gpu --lora
#   lora      the PEFT golden fixture (scripts/make_peft_fixture.py, needs peft; a copy lands
#             in $OUT/peft_lora.tar) and its test, rlb-bench-reshard-gpu --lora (the merge
#             kernels), then rlb-bench-sync --device cuda --lora with the PEFT merge peer
#             (bench/peft_merge_peer.py), with the merges as RLB_LORA_MERGE says (default
#             gemm)
#   lora-sync the end-to-end part of lora alone: the PEFT peer, then rlb-bench-sync --lora
#   lora-ab   rlb-bench-sync --lora under each RLB_LORA_MERGE (RLB_AB_MERGES: gemm, fused,
#             separate), with the CUDA executor's line saying how its merges were written
#   lora-sync-ab  rlb-bench-sync --lora of this tree against each tree in .devtools/base*.tar
#             (as engine-ab), RLB_AB_ROUNDS interleaved rounds
#   ncu-lora  ncu's throughput, occupancy, warp state and scheduler sections on the first
#             tensor-core merge launch of rlb-bench-reshard-gpu --lora (rank 16)
#   engine-ab the engine's decode (--main-only, 1B and 8B, two interleaved rounds) of this
#             tree against each tree in .devtools/base*.tar (`git archive REV -o
#             .devtools/base.tar` here; their rlb-bench-engine is built on the device), the
#             before and after of a kernel change in one call (RLB_AB_ROUNDS: rounds, 2)
#   ncu-attn  ncu's occupancy, warp state, scheduler and instruction sections on one
#             batch-256 launch of the tensor-core decode attention, 1B and 8B shapes (the
#             reports land in $OUT/ncu-attn-SHAPE.txt)
#   ncu-step  every kernel of one batch-256 decode step at context 256 (1B and 8B shapes;
#             RLB_NCU_BATCH, RLB_NCU_SHAPES), ncu's time and DRAM bytes per kernel (caches
#             kept and clocks free between kernels, as in a step), summed by kernel name
#             (scripts/ncu_step_summary.py; the CSVs land in $OUT/ncu-step-bBATCH.tar)
#   gemm-sweep  rlb-bench-engine --gemm-sweep: every cuBLASLt algorithm the heuristic offers
#             for each matrix of both shapes at 256 rows, timed
#   xnode-gpu the bridges of two nodes on one GPU exchanging GPU memory over NCCL, and the
#             GPU digest of their chunks (NCCL_HOSTID per node): test_cuda_digest,
#             test_xport_nccl and test_xnode_gpu, verbose
#   lora-gemm rlb-bench-lora-gemm (the LoRA merge as cuBLASLt products with the base as C,
#             against a memcpy of the same bytes), then rlb-bench-reshard-gpu --lora (the
#             merge kernel now) beside it
#   multi     (two GPUs or more) rlb generate --tp 2 on two GPUs against HF's greedy tokens,
#             the peer-copy and NCCL transport tests, examples/grpo_torch.py with an
#             FSDP2 world of 2 under torchrun and a TP-2 worker replica over NCCL, and
#             rlb-bench-xnode --nccl over the 8B model's bytes
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
# ../shared/device/prepare fetches neither libxxhash (the build needs it) nor UCX (the bridges
# of a multi-node job start it, GPU jobs too): once per checkout, here,
#   cd .deps/debs && apt-get download libxxhash-dev libxxhash0 libucx-dev libucx0 libnuma1 \
#       libibverbs1 librdmacm1 libnl-3-200 libnl-route-3-200
for pkg in libxxhash-dev libucx-dev; do
    ls .deps/debs/${pkg}_*.deb > /dev/null 2>&1 || {
        echo "gpu-check: .deps/debs has no $pkg (see the top of scripts/gpu-check.sh)"
        exit 1
    }
done
source .deps/on-device.sh
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
# RLB_GPU_TARGETS="t1 t2 ...": build only those targets (a short call); default: everything
targets=()
for t in ${RLB_GPU_TARGETS:-}; do targets+=(--target "$t"); done
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DRLB_CUDA=ON > "$out/configure.log" 2>&1 &&
    cmake --build build-gpu -j16 "${targets[@]}" > "$out/build.log" 2>&1 ||
    { tail -40 "$out/build.log"; exit 1; }
echo "== build ok"
if [ "${RLB_GPU_TESTS:-1}" != 0 ]; then # RLB_GPU_TESTS=0: the steps alone
    RLB_LOG=warn ctest --test-dir build-gpu -L gpu --output-on-failure --timeout 240 \
        > "$out/gpu-tests.log" 2>&1
    grep -E "tests passed|Failed|\*\*\*|Passed|Skipped" "$out/gpu-tests.log" | tail -20
fi
# ab_trees STEP TARGET...: the trees an A/B step (engine-ab, lora-sync-ab) compares, into
# trees: "this" and each .devtools/base*.tar (`git archive REV -o .devtools/base.tar` here:
# base.tar, base-x.tar, ...) unpacked under /tmp/rlb-ab-NAME with its TARGETs built there;
# a tree that does not build is left out, STEP naming it.
ab_trees() {
    local step=$1 tarball name dir t
    shift
    local targets=()
    for t in "$@"; do targets+=(--target "$t"); done
    trees=(this)
    for tarball in .devtools/base*.tar; do
        [ -e "$tarball" ] || continue
        name=$(basename "$tarball" .tar)
        dir=/tmp/rlb-ab-$name
        rm -rf "$dir" && mkdir -p "$dir" && tar xf "$tarball" -C "$dir" &&
            cmake -S "$dir" -B "$dir/b" -DCMAKE_BUILD_TYPE=Release -DRLB_CUDA=ON \
                > "$out/ab-configure-$name.log" 2>&1 &&
            cmake --build "$dir/b" -j16 "${targets[@]}" > "$out/ab-build-$name.log" 2>&1 &&
            trees+=("$name") ||
            { echo "$step: $name did not build"; tail -20 "$out/ab-build-$name.log"; }
    done
}
# The LoRA tests named by the regex $1, then the merge kernels' bench (lora-kernel, lora).
lora_kernel() {
    ctest --test-dir build-gpu -R "$1" -V --timeout 600 > "$out/lora-tests.log" 2>&1
    grep -E "tests passed|Failed|FAILED|Skipped|Passed|ulps|differ in their|error" \
        "$out/lora-tests.log" | tail -60
    build-gpu/bench/rlb-bench-reshard-gpu --lora --iters "${RLB_BENCH_ITERS:-10}" \
        > "$out/bench-reshard-lora.log" 2>&1
    tail -13 "$out/bench-reshard-lora.log"
}
# The end-to-end LoRA sync against full and the PEFT merge peer (lora, lora-sync).
lora_sync() {
    peer=$(timeout 300 python3 bench/peft_merge_peer.py 2> "$out/peft-peer.err" |
        tee "$out/peft-peer.log" | tail -1)
    tail -4 "$out/peft-peer.log"
    timeout 500 build-gpu/rlb-bench-sync \
        --device cuda --lora $peer > "$out/bench-lora.log" 2>&1
    tail -8 "$out/bench-lora.log"
}
for step in "$@"; do
    case $step in
    suite)
        ctest --test-dir build-gpu -L 'unit|integration|gpu' -j8 --timeout 300 \
            --output-on-failure > "$out/suite.log" 2>&1
        grep -E "tests passed|\*\*\*Failed|Timeout" "$out/suite.log" | tail -12 ;;
    engine|engine8b)
        shape=1b; [ "$step" = engine8b ] && shape=8b
        # the peer first: the bench reads its result and prints the speedups
        python3 .devtools/hf_generate_baseline.py --shape $shape --batch 1 32 \
            > "$out/hf-$shape.log" 2>&1
        tail -1 "$out/hf-$shape.log"
        build-gpu/bench/rlb-bench-engine --device cuda --shape $shape \
            --hf-log "$out/hf-$shape.log" > "$out/bench-engine-$shape.log" 2>&1
        tail -25 "$out/bench-engine-$shape.log" ;;
    gemv)
        # the decode GEMV alone, plain and fused, every matrix of both shapes
        build-gpu/bench/rlb-bench-engine --device cuda --gemv > "$out/bench-gemv.log" 2>&1
        grep -E " 1 rows| 8 rows" "$out/bench-gemv.log" ;;
    sync|sync8b)
        shape=(--shape 1b); [ "$step" = sync8b ] && shape=()
        timeout 400 build-gpu/rlb-bench-sync --device cuda "${shape[@]}" \
            > "$out/bench-sync.log" 2>&1
        tail -12 "$out/bench-sync.log"
        timeout 200 python3 .devtools/torch_reshard_baseline.py > "$out/torch-reshard.log" 2>&1
        tail -4 "$out/torch-reshard.log" ;;
    sync-vmm)
        timeout 400 build-gpu/rlb-bench-sync --device cuda --vmm > "$out/bench-sync-vmm.log" 2>&1
        tail -12 "$out/bench-sync-vmm.log" ;;
    sync-debug)
        RLB_LOG=debug:bridge,kernel timeout 400 build-gpu/rlb-bench-sync --device cuda \
            --shape 8b > "$out/bench-sync-debug.log" 2>&1
        grep -E "launched|cuda run" "$out/bench-sync-debug.log" | tail -8
        tail -3 "$out/bench-sync-debug.log" ;;
    lora-kernel)
        lora_kernel 'test_cuda_lora' ;;
    xnode-gpu)
        RLB_LOG=info ctest --test-dir build-gpu -V --timeout 300 \
            -R 'test_cuda_digest|test_xport_nccl|test_xnode_gpu' > "$out/xnode-gpu.log" 2>&1
        grep -E "tests passed|Failed|FAILED|Skipped|Passed|\[ *(OK|FAILED|RUN) *\]|NCCL|nccl|GB/s|received|ERROR" \
            "$out/xnode-gpu.log" | tail -50 ;;
    lora-gemm)
        build-gpu/bench/rlb-bench-lora-gemm > "$out/bench-lora-gemm.log" 2>&1
        tail -20 "$out/bench-lora-gemm.log"
        build-gpu/bench/rlb-bench-reshard-gpu --lora --iters 5 \
            > "$out/bench-reshard-lora.log" 2>&1
        tail -13 "$out/bench-reshard-lora.log" ;;
    lora)
        python3 scripts/make_peft_fixture.py > "$out/peft-fixture.log" 2>&1 &&
            tar cf "$out/peft_lora.tar" tests/fixtures/peft_lora
        tail -12 "$out/peft-fixture.log"
        lora_kernel 'test_peft_fixture|test_cuda_lora'
        lora_sync ;;
    lora-sync)
        lora_sync ;;
    lora-ab)
        # the end-to-end LoRA sync under each way of writing the merges
        for how in ${RLB_AB_MERGES:-gemm fused separate}; do
            RLB_LORA_MERGE=$how RLB_LOG=debug:kernel timeout 200 build-gpu/rlb-bench-sync \
                --device cuda --lora > "$out/bench-lora-$how.log" 2>&1
            echo "== RLB_LORA_MERGE=$how"
            grep -m2 "LoRA merges" "$out/bench-lora-$how.log"
            grep -E "^adapters|phases" "$out/bench-lora-$how.log"
        done ;;
    lora-sync-ab)
        ab_trees lora-sync-ab rlb rlb-bench-sync
        for round in $(seq "${RLB_AB_ROUNDS:-2}"); do
            for tree in "${trees[@]}"; do
                bin=build-gpu/rlb-bench-sync
                [ "$tree" != this ] && bin=/tmp/rlb-ab-$tree/b/rlb-bench-sync
                echo "== $tree (round $round)"
                timeout 200 $bin --device cuda --lora 2>&1 | tee -a "$out/lora-sync-ab.log" |
                    grep -E "^adapters|phases" | tail -3
            done
        done ;;
    ncu-lora)
        # ncu on the first tensor-core merge launch of rlb-bench-reshard-gpu --lora
        timeout 240 /usr/local/cuda/bin/ncu -k regex:fused_tc_kernel --launch-count 1 \
            --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
            --section Occupancy --section LaunchStats --section SchedulerStats \
            build-gpu/bench/rlb-bench-reshard-gpu --lora --iters 1 > "$out/ncu-lora.txt" 2>&1
        grep -E "Duration|DRAM Through|L2 Cache Through|Memory Through|Achieved Occ" \
            "$out/ncu-lora.txt" | head -12
        grep -E "Theoretical Occ|Warp Cycles Per Issued|Eligible Warps|No Eligible|Block Limit" \
            "$out/ncu-lora.txt" | head -12 ;;
    reshard)
        timeout 200 python3 .devtools/torch_reshard_baseline.py > "$out/torch-reshard.log" 2>&1
        build-gpu/bench/rlb-bench-reshard-gpu --torch-log "$out/torch-reshard.log" \
            > "$out/bench-reshard.log" 2>&1
        tail -12 "$out/bench-reshard.log" ;;
    mem)
        build-gpu/bench/rlb-bench-reshard-gpu --mem > "$out/bench-mem.log" 2>&1
        tail -8 "$out/bench-mem.log" ;;
    grpo)
        RLBRIDGE_LIB=$PWD/build-gpu/librlb.so.1 timeout 300 python3 examples/grpo_torch.py \
            --rlb build-gpu/rlb --steps 30 --check > "$out/grpo.log" 2>&1
        echo "grpo exit $?"; tail -8 "$out/grpo.log" ;;
    grpo-vmm)
        PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True RLB_LOG=info \
            RLBRIDGE_LIB=$PWD/build-gpu/librlb.so.1 timeout 300 python3 examples/grpo_torch.py \
            --rlb build-gpu/rlb --steps 20 --check > "$out/grpo-vmm.log" 2>&1
        echo "grpo (expandable segments) exit $?"
        grep -c "as VMM fds" "$out/grpo-vmm.log" | sed 's/^/allocations exported as VMM fds: /'
        grep -c "as a CUDA IPC handle" "$out/grpo-vmm.log" | sed 's/^/as CUDA IPC handles: /'
        tail -4 "$out/grpo-vmm.log" ;;
    ncu-attn)
        # --new 16, batches 1 and 256: the kernel runs 16 steps x layers at batch 1, then
        # at batch 256; the skip lands in the latter
        for sc in "1b 400" "8b 800"; do
            set -- $sc
            timeout 200 /usr/local/cuda/bin/ncu -k regex:attn_decode_tc --launch-skip "$2" \
                --launch-count 1 --section SpeedOfLight --section Occupancy \
                --section WarpStateStats --section SchedulerStats --section LaunchStats \
                --section InstructionStats --section SourceCounters \
                build-gpu/bench/rlb-bench-engine --device cuda --shape "$1" --main-only \
                --batches 1,256 --new 16 > "$out/ncu-attn-$1.txt" 2>&1
            echo "== $1"
            grep -E "Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Waves Per SM|Eligible Warps|Issued Warp|Executed Instructions  " \
                "$out/ncu-attn-$1.txt" | head -12
        done ;;
    ncu-step)
        # decode step 128 of batch RLB_NCU_BATCH (256): context 256, the bench's mean over
        # its 256 steps; RLB_NCU_SHAPES: the shapes (1b 8b)
        nb=${RLB_NCU_BATCH:-256}
        for shape in ${RLB_NCU_SHAPES:-1b 8b}; do
            RLB_BENCH_PROFILE=$nb:128 timeout 300 /usr/local/cuda/bin/ncu --csv \
                --profile-from-start off --cache-control none --clock-control none --metrics \
                gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
                build-gpu/bench/rlb-bench-engine --device cuda --shape $shape --main-only \
                --batches 1,$nb --new 160 > "$out/ncu-step-$shape.csv" 2> "$out/ncu-step-$shape.err"
            gbs=$(grep -o 'copy [0-9]* GB/s' "$out/ncu-step-$shape.csv" | head -1 | tr -dc 0-9)
            echo "== $shape batch $nb (copy ${gbs:-?} GB/s)"
            python3 scripts/ncu_step_summary.py "$out/ncu-step-$shape.csv" ${gbs:-} | head -24
        done
        # one file back instead of four (a call brings back only so many)
        (cd "$out" && tar cf "ncu-step-b$nb.tar" ncu-step-*.csv ncu-step-*.err &&
            rm -f ncu-step-*.csv ncu-step-*.err) ;;
    gemm-sweep)
        build-gpu/bench/rlb-bench-engine --device cuda --gemm-sweep --batches 1,256 \
            > "$out/gemm-sweep.log" 2>&1
        grep -E "^sweep|copy" "$out/gemm-sweep.log" ;;
    engine-ab)
        ab_trees engine-ab rlb-bench-engine
        for round in $(seq "${RLB_AB_ROUNDS:-2}"); do
            for shape in 1b 8b; do
                for tree in "${trees[@]}"; do
                    bin=build-gpu/bench/rlb-bench-engine
                    [ "$tree" != this ] && bin=/tmp/rlb-ab-$tree/b/bench/rlb-bench-engine
                    echo "$shape $tree (round $round): $(timeout 200 $bin --device cuda \
                        --shape $shape --main-only 2>&1 | tee -a "$out/engine-ab.log" |
                        awk '$2 == "decode" && $3 == "batch" {c = $9; sub(/\)/, "", c);
                                 printf "b%s %s (classic %s)  ", $4, $5, c}
                             $2 == "attention" && $3 == "warps" {
                                 printf "w%s:b%s %s  ", $4, $6, $7}')"
                done
            done
        done ;;
    multi)
        ctest --test-dir build-gpu -R 'test_engine_generate|test_cuda_peer|test_xport_nccl' \
            -V --timeout 300 > "$out/multi-tests.log" 2>&1
        grep -E "one GPU|tests passed|Failed|Skipped|Passed" "$out/multi-tests.log" | tail -8
        RLBRIDGE_LIB=$PWD/build-gpu/librlb.so.1 timeout 400 torchrun --nproc-per-node 2 \
            examples/grpo_torch.py --rlb build-gpu/rlb --steps 20 --check --rollout-tp 2 \
            > "$out/grpo-tp2.log" 2>&1
        echo "grpo (FSDP2 world 2, TP 2 workers) exit $?"; tail -8 "$out/grpo-tp2.log"
        # the bridges' NCCL transport over the 8B model's bf16 bytes (16.06 GB), GPU 0 to
        # GPU 1, against an NCCL all-gather of the same bytes on the same GPUs
        timeout 300 build-gpu/bench/rlb-bench-xnode --nccl --mib 15316 --runs 3 \
            > "$out/bench-xnode-nccl.log" 2>&1
        tail -6 "$out/bench-xnode-nccl.log" ;;
    esac
done
