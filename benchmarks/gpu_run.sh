#!/usr/bin/env bash
# The GPU work of one device call, in order, each step under its own time limit with its log (a step cut off
# at its limit keeps its log and the next step still runs). Logs and results are written to a work folder and
# packed after every step into $OUT/results.tgz (the device tool brings back only a few files).
#
#   OUT=DIR bash benchmarks/gpu_run.sh STEP[=SECONDS] ...     (exits with the worst step's status)
#
# Steps: tests (pytest -m gpu tests/ops: kernels against the reference and fla, lasp_attention on every GPU
# here; a -k expression in $TESTS_K), models (pytest -m gpu tests/models: paper-size model steps), ops
# (bench_ops_gpu: our impls beside jla, fla and LASP, each framework in its own process; its flags in $OPS_ARGS),
# lasp (LASP's lasp_fuse_parallel under torchrun on every GPU, then bench_lasp_gpu: lasp_attention beside jla's
# context parallelism; its flags in $LASP_ARGS, e.g. --gpus 2,4,8 for weak scaling), train (bench_train_gpu on 1
# and 2 GPUs with lasp_jax impl $TRAIN_IMPL, default auto; more flags in $TRAIN_ARGS). "Every GPU" means those
# CUDA_VISIBLE_DEVICES leaves, so several runs can share one machine. The peers' wheels in .whl/ (all of them:
# see benchmarks/README.md) are installed first when present.
set -u
PACK=${OUT:?set OUT to the folder for the packed results}/results.tgz
mkdir -p "$OUT"
OUT=$(mktemp -d)
if compgen -G ".whl/*.whl" > /dev/null; then
  # Installed once per machine and set of wheels, under a lock: runs started side by side on different GPUs
  # (CUDA_VISIBLE_DEVICES) share it.
  MARK=/tmp/site/.installed-$(ls .whl/*.whl | md5sum | cut -c1-12)
  ( flock 9; [ -f "$MARK" ] || { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target /tmp/site .whl/*.whl && touch "$MARK"; } ) 9> /tmp/site.lock
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
# NVLink multicast off (the device notes say why); XLA must not take the memory the torch peers need.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
  NVSHMEM_DISABLE_NVLS=1
NGPU=$(nvidia-smi -L | grep -c '^GPU')
[ -n "${CUDA_VISIBLE_DEVICES:-}" ] && NGPU=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
WORST=0

run_step() {  # name limit command...
  local name=$1 limit=$2
  shift 2
  local rc
  echo "[$(date -u +%T)] $name (limit ${limit}s): $*"
  timeout -k 20 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  [ "$rc" -gt "$WORST" ] && WORST=$rc
  echo "[$(date -u +%T)] $name rc=$rc"
  tail -n 25 "$OUT/$name.log"
  tar czf "$PACK" -C "$OUT" .
}

for arg in "$@"; do
  step=${arg%%=*}
  limit=${arg#*=}
  [ "$limit" = "$arg" ] || [ -z "$limit" ] && limit=300
  [ "$limit" -ge 60 ] || { echo "$step: give it at least 60 s"; exit 2; }
  case $step in
    # A test still running after faulthandler_timeout seconds dumps every thread's stack into the log (a hang
    # and a slow compile look alike from the outside).
    tests) run_step tests "$limit" python3 -m pytest -m gpu tests/ops -v --tb=short -rfE -p no:cacheprovider \
             -o faulthandler_timeout=90 ${TESTS_K:+-k "$TESTS_K"} ;;
    models) run_step models "$limit" python3 -m pytest -m gpu tests/models -q -rfE -s -p no:cacheprovider ;;
    ops) run_step ops "$limit" python3 -m benchmarks.bench_ops_gpu --iters 10 --reps 5 --out "$OUT" ${OPS_ARGS:-} ;;
    lasp)
      run_step lasp_peer $((limit / 3)) python3 -m torch.distributed.run --nproc_per_node "$NGPU" \
        -m benchmarks.peer_lasp_parallel --iters 3 --reps 3 --out "$OUT"
      run_step lasp $((limit - limit / 3)) python3 -m benchmarks.bench_lasp_gpu --iters 10 --reps 5 --out "$OUT" \
        ${LASP_ARGS:-} ;;
    train) run_step train "$limit" python3 -m benchmarks.bench_train_gpu --attn-impl "${TRAIN_IMPL:-auto}" \
             --budget-s $((limit - 20)) --out "$OUT" ${TRAIN_ARGS:-} ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
exit "$WORST"
