#!/usr/bin/env bash
# Throughput runs for docs/performance.md, in ONE device call (each run bounded by its own
# timeout, so a slow one cannot eat the others), then the tables from their JSON lines.
#
#   bash bench/throughput.sh OUT_DIR 'NAME|SECONDS|BENCH ARGS' ['NAME|SECONDS|BENCH ARGS' ...]
#
# e.g. on the GPU machine (wheels of .whl/ carried, see docs/performance.md):
#   bash bench/throughput.sh $OUT \
#     'full|400|--case full --steps 25 --memory-gib 80 --isolation' \
#     'lora|480|--case lora --steps 25 --memory-gib 80'
# Each run writes OUT_DIR/NAME.jsonl (stdout) and OUT_DIR/NAME.log (stderr).
set -u
out=${1:?usage: bench/throughput.sh OUT_DIR "NAME|SECONDS|BENCH ARGS" ...}
shift
python=${PYTHON:-$(command -v python3 || command -v python)}
mkdir -p "$out"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  lscpu 2>/dev/null | grep -i "model name"
  "$python" -c "import torch, transformers, trl, accelerate, peft; print(torch.__version__, transformers.__version__, trl.__version__, accelerate.__version__, peft.__version__)"
} > "$out/env.txt" 2>&1
files=()
for run in "$@"; do
  IFS='|' read -r name seconds args <<< "$run"
  # Word splitting of $args is wanted (flags), except inside the JSON of --extra-args.
  read -r -a argv <<< "${args%%--extra-args*}"
  extra=()
  if [[ "$args" == *"--extra-args "* ]]; then
    extra=(--extra-args "${args#*--extra-args }")
  fi
  timeout "$seconds" "$python" -m sftjob_bench.bench "${argv[@]}" "${extra[@]}" \
    > "$out/$name.jsonl" 2> "$out/$name.log"
  echo "$name: exit $?" | tee -a "$out/exits.txt"
  files+=("$out/$name.jsonl")
done
cat "$out/env.txt"
"$python" -m sftjob_bench.bench_report "${files[@]}" | tee "$out/report.md"
