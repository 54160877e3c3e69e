#!/usr/bin/env bash
# One call on a lent GPU machine: installs what its image lacks, unpacks the IXI subset carried in .gpu/,
# preprocesses it to 128^3, then runs the stages named in $STAGES. Results go to $OUT/results.tar.gz.
#   STAGES="bench train" OUT=/tmp/out bash benchmarks/gpu_session.sh
# Issue 18's rows in one call of under 10 minutes (random data, no IXI needed):
#   STAGES=round2 OUT=/tmp/out bash benchmarks/gpu_session.sh
# Work longer than one call: `launch` starts each line of $JOBS ("NAME<TAB>COMMAND", $WORK usable) in its own
# session, so it outlives the call while the machine stays held; `wait` polls up to $WAIT_SECONDS for them.
#   STAGES="launch wait" JOBS=.gpu/jobs.tsv WAIT_SECONDS=500 bash benchmarks/gpu_session.sh   (first call)
#   STAGES="wait" WAIT_SECONDS=500 bash benchmarks/gpu_session.sh                               (next calls)
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/hagan-out}
WORK=/tmp/hagan-work
mkdir -p "$OUT" "$WORK"
exec > >(tee "$OUT/log.txt") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
started=$(date +%s)
elapsed() { echo "[$(( $(date +%s) - started )) s] $*"; }
case " ${STAGES:-bench train} " in
  *" train "*|*" launch "*)  # only real training reads the IXI subset
    if [ ! -d "$WORK/cache128" ]; then
      mkdir -p "$WORK/ixi" && tar xJf .gpu/ixi110.tar.xz -C "$WORK/ixi"
      python3 -m hagan.cli preprocess "$WORK/ixi" "$WORK/cache128" --recipe mri --size 128 2>&1 | tail -3
    fi
    elapsed "data ready" ;;
esac
for stage in ${STAGES:-bench train}; do
  case $stage in
    bench)
      timeout 240 python3 benchmarks/gpu_performance.py --variants fp32 bf16 bf16-cl --sizes 128 256 --out "$WORK/perf" ;;
    bench512)
      timeout 120 python3 benchmarks/gpu_performance.py --variants bf16 --sizes 512 --batch-sizes 2 --iterations 5 --warmup 2 --out "$WORK/perf"
      timeout 60 python3 benchmarks/gpu_performance.py --variants bf16 --sizes 512 --batch-sizes 1 --iterations 3 --warmup 1 --tile-depth 16 --out "$WORK/perf"
      timeout 60 python3 benchmarks/gpu_performance.py --variants bf16 --sizes 256 --batch-sizes 1 --iterations 5 --generate-batch 8 --out "$WORK/perf" ;;
    round2)
      # training at 128^3 and 256^3, batch 4 and 2, fp32 and bf16: eager, torch.compile, torch.compile with
      # CUDA graphs (TORCHINDUCTOR_CUDAGRAPHS=1); paper-512 at batch 2 with and without
      # hagan.recompute_activations; generation of 256^3 in batches of 8, untiled and tiled, and of 512^3 tiled
      bench="python3 benchmarks/gpu_performance.py --out $WORK/perf"
      timeout 140 $bench --variants fp32 bf16 --sizes 128 256 --batch-sizes 4 2 --iterations 8 --warmup 2
      elapsed "eager rows done"
      timeout 140 $bench --variants bf16-compile fp32-compile --sizes 128 256 --batch-sizes 4 2 --iterations 8 --warmup 3
      elapsed "compiled rows done"
      timeout 90 $bench --variants bf16-compile-graphs fp32-compile-graphs --sizes 128 256 --batch-sizes 4 2 --iterations 8 --warmup 3
      elapsed "CUDA graph rows done"
      timeout 60 $bench --variants bf16 bf16-recompute --sizes 512 --batch-sizes 2 --iterations 4 --warmup 1
      timeout 35 $bench --variants bf16 --sizes 256 --batch-sizes 1 --iterations 3 --warmup 1 --generate-batch 8
      timeout 35 $bench --variants bf16 --sizes 256 --batch-sizes 1 --iterations 3 --warmup 1 --generate-batch 8 --tile-depth 16
      timeout 35 $bench --variants bf16 --sizes 512 --batch-sizes 1 --iterations 3 --warmup 1 --tile-depth 16
      cp "$WORK"/perf/*.json "$OUT"/ 2>/dev/null ;;
    compile)
      timeout 300 python3 benchmarks/gpu_performance.py --variants bf16-compile --sizes 128 256 --batch-sizes 4 --out "$WORK/perf" ;;
    train)
      # the configurations side by side on the one GPU, each for the same wall-clock minutes
      pids=""
      for config in ${CONFIGS:-paper small-data}; do
        rm -rf "$WORK/train-$config-${PRECISION:-auto}"
        timeout $(( ${MINUTES:-3} * 60 + 90 )) python3 experiments/small_data.py --data "$WORK/cache128" --size 128 \
          --minutes "${MINUTES:-3}" --configs "$config" --precision "${PRECISION:-auto}" --save-samples \
          --out "$WORK/train-$config-${PRECISION:-auto}" > "$WORK/train-$config.log" 2>&1 &
        pids="$pids $!"
      done
      wait $pids  # not a bare wait: that would also wait for the tee of this script's own log
      tail -n 3 "$WORK"/train-*.log ;;
    launch)
      mkdir -p "$WORK/jobs"
      while IFS=$'\t' read -r name command; do
        [ -z "$name" ] && continue
        WORK=$WORK setsid nohup bash -c "( $command ) > '$WORK/jobs/$name.log' 2>&1; echo \$? > '$WORK/jobs/$name.rc'" \
          > /dev/null 2>&1 < /dev/null &
        echo "launched $name"
      done < "${JOBS:-.gpu/jobs.tsv}"
      cp "${JOBS:-.gpu/jobs.tsv}" "$WORK/jobs/list.tsv" ;;
    wait)
      deadline=$(( $(date +%s) + ${WAIT_SECONDS:-480} ))
      total=$(grep -c . "$WORK/jobs/list.tsv")
      while [ "$(ls "$WORK"/jobs/*.rc 2>/dev/null | wc -l)" -lt "$total" ] && [ "$(date +%s)" -lt "$deadline" ]; do
        sleep 10
      done
      for log in "$WORK"/jobs/*.log; do echo "== $log (rc $(cat "${log%.log}.rc" 2>/dev/null || echo running))"; tail -n 2 "$log"; done
      nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader ;;
  esac
  elapsed "stage $stage done"
done
nvidia-smi --query-gpu=memory.used --format=csv,noheader
cp "$WORK"/train-*/samples_*.npz "$WORK"/jobs/*/samples_*.npz "$OUT"/ 2>/dev/null
cd "$WORK" && tar czf "$OUT/results.tar.gz" --exclude='checkpoints' --exclude='cache128' --exclude='ixi' --exclude='*.npz' .
ls -la "$OUT"
