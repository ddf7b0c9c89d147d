#!/usr/bin/env bash
# GPU pass at paper settings: smoke, then benchmarks. All stages together take about as long as one 10-minute
# device command may run (results/README.md, "Second GPU pass", ran it in these two calls), so under such a
# limit run it as --only smoke,step128,infer,encoder,hostcpu then --only step,stepbf16,layout.
#
#   bash code/benchmarks/gpu_check.sh [--root_path LA_ROOT | --synthetic] [--out DIR] [--quick] [--only S,S]
#
# Needs python3 with torch (CUDA), numpy, scipy, h5py and tqdm -- no network; the smoke stage's test_LA.py also
# needs nibabel (carry it as a wheel). Data: --root_path, else $LA_DATA_ROOT, else LA-sized phantoms written on
# the fly (--synthetic, also the automatic fallback). Generalists are RANDOM-weight vit_b_ori (timing only).
# Training steps load data with 4 DataLoader workers (as training does), so 'data' is the wait for a batch,
# not its loading cost. Stages, in this order (most wanted first, so a cut-short run keeps them), each writing
# into --out (default <repo>/results/gpu):
#   smoke    smoke.json: train/resume/bf16/UA-MT/DDP(1 rank)/SemiSAM+ with validation/generalist fine-tuning/
#            test_LA.py end to end on CUDA (gpu_smoke.py)
#   step128  step_128.json: MT and SemiSAM at the SemiSAM script's 128^3 patch, fp32 and bf16
#   infer    inference.json: sliding-window inference of one volume (112x112x80, stride 18/4) fp32 vs bf16
#   encoder  encoder.json: vit_b_ori image encoder fast vs reference, fp32 and bf16, batch 2; generalist
#            branch fp32 vs bf16
#   step     step_fp32.json: MT, UA-MT, SemiSAM (point, 10 clicks) at 112x112x80, batch 4 (2 labeled), fp32
#   stepbf16 step_bf16.json: the same under bf16 autocast, plus MT fp32 as the in-run baseline
#   layout   step_128_layout_memory.json: MT at 128^3 in channels_last (the CUDA default since the 2026-11-26
#            H100 pass) vs contiguous, with cuDNN autotuning (--deterministic 0) in fp32 and bf16; SemiSAM's CUDA
#            peak memory with --checkpoint_levels 2
#   hostcpu  cpu_step.json, cpu_inference.json: the machine's own CPU (AMX on recent Xeons): MT fp32 vs bf16 at
#            112x112x80 and one volume's inference fp32 vs bf16 (the issue's CPU bf16 targets); clicks.json:
#            the generalist's simulated clicks by mask kind (the first one runs on this CPU; bench_clicks.py)
# and gpu_check.log (everything printed): 11 files (a device tool that returns at most 8 files needs a tar of
# --out). A failing stage does not stop the others; the exit status is 1 when
# any failed, and the log's last line names them. --only runs the named stages (e.g. to redo a failed one).
# GPU_CHECK_DRY_RUN=1 prints the commands without running them (the tests check them against the parsers).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
code_dir="$(dirname "$here")"
results="$(dirname "$code_dir")/results/gpu"
data=()
steps=8
warmup=3
only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --root_path) data=(--root_path "$2"); shift 2 ;;
    --synthetic) data=(--synthetic); shift ;;
    --out) results="$2"; shift 2 ;;
    --quick) steps=3; warmup=1; shift ;;
    --only) only=",$2,"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | grep '^#'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
if [ ${#data[@]} -eq 0 ]; then
  if [ -n "${LA_DATA_ROOT:-}" ] && [ -d "${LA_DATA_ROOT}" ]; then
    data=(--root_path "$LA_DATA_ROOT")
  else
    data=(--synthetic)
  fi
fi
dry="${GPU_CHECK_DRY_RUN:-}"
py="${PYTHON:-python3}"

failed=()
# run STAGE CMD...: CMD unless --only leaves STAGE out; a failure is recorded, not fatal
run() {
  local stage="$1"; shift
  if [ -n "$only" ] && [[ "$only" != *",$stage,"* ]]; then return 0; fi
  echo "+ $*"
  if [ -z "$dry" ]; then
    local t0=$SECONDS
    "$@" || failed+=("$stage")
    echo "gpu_check.sh: stage $stage took $((SECONDS - t0)) s"
  fi
}

cd "$code_dir"
if [ -z "$dry" ]; then
  mkdir -p "$results"
  exec > >(tee "$results/gpu_check.log") 2>&1
  GPU_CHECK_ROOT="$( [ "${data[0]}" = "--root_path" ] && echo "${data[1]}" || true )" "$py" - <<'EOF'
import importlib, os, sys
import torch
missing = [m for m in ("numpy", "scipy", "h5py", "tqdm") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check.sh: missing python packages {missing}: carry them as wheels (see README)")
if os.environ.get("GPU_CHECK_ROOT"):   # fail before any stage rather than in each
    from benchmarks import common, bench_step
    try:
        n_train, n_test = bench_step.check_enough_cases(common.resolve_case_dir(os.environ["GPU_CHECK_ROOT"]))
    except (common.BenchmarkError, FileNotFoundError) as err:
        sys.exit(f"gpu_check.sh: {err}")
    print(f"data: {n_train} training and {n_test} test cases")
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: torch sees no CUDA device")
print("torch", torch.__version__, "cuda", torch.version.cuda, "on", torch.cuda.get_device_name(0))
EOF
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv || true
fi

common=(--device cuda --steps "$steps" --warmup "$warmup" --num_workers 4 "${data[@]}")
run smoke "$py" benchmarks/gpu_smoke.py --device cuda --ddp "${data[@]}" --json "$results/smoke.json"
run step128 "$py" benchmarks/bench_step.py --compare mt semisam mt:amp=bf16 semisam:amp=bf16 "${common[@]}" \
    --patch_size 128 128 128 --json "$results/step_128.json"
run infer "$py" benchmarks/bench_inference.py --device cuda --repeats 3 "${data[@]}" --json "$results/inference.json"
run encoder "$py" benchmarks/bench_encoder.py --device cuda --batch 2 --steps "$steps" --warmup "$warmup" --branch \
    "${data[@]}" --json "$results/encoder.json"
run step "$py" benchmarks/bench_step.py --compare mt uamt semisam "${common[@]}" --json "$results/step_fp32.json"
run stepbf16 "$py" benchmarks/bench_step.py --compare mt mt:amp=bf16 uamt:amp=bf16 semisam:amp=bf16 "${common[@]}" \
    --json "$results/step_bf16.json"
run layout "$py" benchmarks/bench_step.py --compare mt mt:channels_last=0 mt:deterministic=0 mt:amp=bf16 \
    mt:amp=bf16:deterministic=0 semisam:checkpoint_levels=2 semisam:amp=bf16:checkpoint_levels=2 "${common[@]}" \
    --patch_size 128 128 128 \
    --json "$results/step_128_layout_memory.json"
run hostcpu "$py" benchmarks/bench_step.py --compare mt mt:amp=bf16 --device cpu --steps 3 --warmup 2 "${data[@]}" \
    --json "$results/cpu_step.json"
run hostcpu "$py" benchmarks/bench_inference.py --device cpu --repeats 2 "${data[@]}" \
    --json "$results/cpu_inference.json"
run hostcpu "$py" benchmarks/bench_clicks.py --device cuda "${data[@]}" --json "$results/clicks.json"
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check.sh: FAILED stages: ${failed[*]}; results in $results"
  exit 1
fi
echo "gpu_check.sh: done; results in $results"
