#!/usr/bin/env bash
# The GPU measurements this project commits, on a 4-GPU NVLink machine.
#
#     OUT=/some/dir bash benchmarks/gpu_batch.sh [step...]     # default: every step, in the order below
#
# Steps on 2 GPUs run as two jobs side by side (GPUs 0,1 and 2,3):
#   sweep2 (correctness sweep, eager then CUDA graphs; shutdown check), zero2 | dp2, busbw2all (every op), busbw2, train2
# (sweep2a: the sweep alone, before anything else starts).
# Steps on 4 GPUs run one after another: busbw4all (every op), busbw4, busbw4rs, compressed4, zero4, pipeline4, train4,
# and, not in the default list: p2p4 (the point-to-point ceiling), pipecases4 (every pipeline schedule
# against one process over NCCL), sweep4 (the correctness sweep on 4 GPUs), nvlink4 and nvlink4v (the
# NVLink kernel's sweeps for calibration and its check), busbw4m and busbw4mv (every op, median of 5 loops),
# curve4 and curve2 (one ring step's message by size, for the profile's pair curve), depths4 (pipelined
# schedules at depths 1-32).
# Logs and JSON land in $OUT; each step has its own time limit and a failed step does not stop the rest.
# One 10-minute device slot does not hold them all: pass a few steps per slot. PACK=1 leaves one
# $OUT/results.tgz (plus steps.txt) instead of the loose files, for runners that return few files.
set -u
: "${OUT:?set OUT to a directory for the logs and results}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="${PWD}${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=4
wanted=" ${*:-sweep2 zero2 dp2 busbw2all busbw2 train2 busbw4all busbw4 busbw4rs compressed4 zero4 pipeline4 train4} "
mkdir -p "$OUT"
BUSBW=(-m benchmarks.busbw --algo all -b 1K -e 1G -f 4 -n 5 -w 2)

want() { [[ "$wanted" == *" $1 "* ]]; }

step() {  # step NAME LIMIT_S GPUS PORT NPROC -- torchrun args...
    local name=$1 limit=$2 gpus=$3 port=$4 nproc=$5; shift 6
    local t0=$SECONDS
    CUDA_VISIBLE_DEVICES=$gpus timeout -k 10 "$limit" torchrun --nproc-per-node "$nproc" \
        --master-port "$port" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
    if [[ $rc != 0 ]]; then  # the end of a failed step's log, with torchrun's own noise left out
        grep -v "^W[0-9]\|^  File \|^    \|^ *^" "$OUT/$name.log" | tail -n 12 | cut -c1-300 | sed "s/^/  $name| /"
    fi
}

cat >/tmp/topocomm_shutdown.py <<'PY'
import time, torch, collectives as C
comm = C.init(timeout=60)
x = torch.ones(1 << 20, device="cuda")
for algo in ("direct", "ring", "native"):
    comm.all_reduce(x, algorithm=algo)
torch.cuda.synchronize()
t = time.perf_counter()
C.shutdown()
print(f"rank {comm.rank}: collectives.shutdown() returned in {time.perf_counter() - t:.2f} s", flush=True)
PY

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpus.txt" 2>&1
python -c "import torch; print(torch.__version__, torch.cuda.nccl.version())" >>"$OUT/gpus.txt" 2>&1

if want sweep2a; then
    TOPOCOMM_CUDA_GRAPHS=0 step sweep2-eager 90 0,1 29501 2 -- -m tests.gpu_sweep -v
fi
(
    if want sweep2; then
        TOPOCOMM_CUDA_GRAPHS=0 step sweep2-eager 100 0,1 29501 2 -- -m tests.gpu_sweep -v
        step sweep2-graphs 100 0,1 29501 2 -- -m tests.gpu_sweep -v
        step shutdown2 60 0,1 29501 2 -- /tmp/topocomm_shutdown.py
    fi
    want zero2 && step zero2 150 0,1 29501 2 -- -m benchmarks.zero_memory --json "$OUT/zero-nccl-2gpu.json"
) &
(
    want dp2 && step dp2 120 2,3 29511 2 -- -m tests.dp_cases
    want busbw2all && step busbw2all 300 2,3 29511 2 -- "${BUSBW[@]}" \
        --op all_reduce,reduce_scatter,all_gather,broadcast,reduce,all_to_all --json "$OUT/nccl-2gpu-busbw-all.json"
    want busbw2 && step busbw2 240 2,3 29511 2 -- "${BUSBW[@]}" --op "${BUSBW2_OPS:-broadcast,reduce,all_to_all}" \
        --json "$OUT/nccl-h200x2-busbw-rooted.json"
    want train2 && step train2 120 2,3 29511 2 -- -m benchmarks.train --json "$OUT/train-nccl-2gpu.json"
) &
wait

want busbw4all && step busbw4all 300 0,1,2,3 29521 4 -- "${BUSBW[@]}" \
    --op all_reduce,reduce_scatter,all_gather,broadcast,reduce,all_to_all --json "$OUT/nccl-4gpu-busbw-all.json"
want busbw4 && step busbw4 220 0,1,2,3 29521 4 -- "${BUSBW[@]}" --op all_reduce --json "$OUT/nccl-4gpu-busbw-ar.json"
want busbw4rs && step busbw4rs 120 0,1,2,3 29521 4 -- "${BUSBW[@]}" --op reduce_scatter,all_gather \
    --json "$OUT/nccl-4gpu-busbw-rs-ag.json"
want compressed4 && step compressed4 90 0,1,2,3 29521 4 -- -m benchmarks.compressed --json "$OUT/compressed-nccl-4gpu.json"
want zero4 && step zero4 150 0,1,2,3 29521 4 -- -m benchmarks.zero_memory --json "$OUT/zero-nccl-4gpu.json"
want pipeline4 && step pipeline4 120 0,1,2,3 29521 4 -- -m benchmarks.pipeline --timeout 60 ${PIPELINE_ARGS:-} \
    --json "$OUT/pipeline-nccl-4gpu.json"
want train4 && step train4 100 0,1,2,3 29521 4 -- -m benchmarks.train --json "$OUT/train-nccl-4gpu.json"
want p2p4 && step p2p4 90 0,1,2,3 29521 4 -- -m benchmarks.p2p
want pipecases4 && step pipecases4 120 0,1,2,3 29521 4 -- -m tests.pipeline_cases
want sweep4 && step sweep4 150 0,1,2,3 29521 4 -- -m tests.gpu_sweep
# The NVLink kernel's sweeps (direct all-reduce and reduce-scatter, -n 20): nvlink4 to fit a world-4 table into
# the NCCL profile (collectives/calibrate.py, the rows marked path=nvlink), nvlink4v to check the refit.
for v in nvlink4 nvlink4v; do
    want $v && step $v 240 0,1,2,3 29521 4 -- -m benchmarks.busbw --op all_reduce,reduce_scatter --algo all -b 1K \
        -e 1G -f 4 -n 20 -w 5 --json "$OUT/nccl-4gpu-busbw-$v.json"
done
# The pair tier's message curve ([Note: message size] in collectives/pricing.py) on 4 GPUs and on 2.
want curve4 && step curve4 90 0,1,2,3 29521 4 -- -m benchmarks.p2p_curve --json "$OUT/nccl-4gpu-p2p-curve.json"
want curve2 && step curve2 90 0,1 29521 2 -- -m benchmarks.p2p_curve --json "$OUT/nccl-2gpu-p2p-curve.json"
# Every op with the median of 5 timed loops per cell ([Note: trials] in benchmarks/_sweep.py): busbw4m to fit the
# profile, busbw4mv, taken after it, to check it.
for v in busbw4m busbw4mv; do
    want $v && step $v 280 0,1,2,3 29521 4 -- -m benchmarks.busbw --algo all -b 1K -e 1G -f 4 -n 20 -w 5 --trials 5 \
        --op all_reduce,reduce_scatter,all_gather,broadcast,reduce,all_to_all --json "$OUT/nccl-4gpu-busbw-$v.json"
done
# Pipelined schedules at fixed depths (TOPOCOMM_PIPELINE): rows for the fit of the per-step cost.
if want depths4; then
    for k in 1 2 4 8 16 32; do
        TOPOCOMM_PIPELINE=$k step depths4-p$k 120 0,1,2,3 29521 4 -- -m benchmarks.busbw --op all_reduce,broadcast,reduce \
            --algo tree,ring -b 1M -e 1G -f 4 -n 10 -w 3 --trials 3 --json "$OUT/nccl-4gpu-busbw-depth$k.json"
    done
fi
cat "$OUT/steps.txt"
if [[ "${PACK:-0}" == 1 ]]; then
    tar czf /tmp/topocomm_results.tgz -C "$OUT" --exclude=steps.txt . && find "$OUT" -mindepth 1 ! -name steps.txt -delete \
        && mv /tmp/topocomm_results.tgz "$OUT/results.tgz"
fi
