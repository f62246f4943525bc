#!/bin/bash
# The device calls of issue 24's end-to-end runs (2026-12-05), from the repository root of a
# GPU machine whose .whl/ holds the wheels its image lacks (trl, datasets: see
# /work/shared/docs/environment-facts.md):  BUDGET=430 bash docs/bench-results/2026-12-05-h100-e2e/gpu-call.sh ref autoours fill warm
# Each stage runs only if time is left (BUDGET seconds from start); $OUT receives the files.
# Session 18 added `warmimports` (every library read once before the timed stages), `probe`
# (bench/startup_probe.py and bench/tokenizing_processes.py), `img` (the defaults with liger
# importable, as in the trainer image) and `imgserial` (img with parallelSave off).
# (Run then from a copy of the tree one folder down, .gpu-tree/, so with ../.whl.)
START=$(date +%s); BUDGET=${BUDGET:-585}
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
cd "$(dirname "$0")/../../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD/.whl-bnb/site:$PWD/trainer_image:$PWD/operator
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > $OUT/card.txt
python3 -c "import torch,transformers,trl;print(torch.__version__,transformers.__version__,trl.__version__, torch.cuda.get_device_name(0))" >> $OUT/card.txt 2>&1
cat $OUT/card.txt
for stage in "$@"; do
  L=$(left); echo "== $stage (left ${L}s)"; [ "$L" -lt 40 ] && { echo "skip $stage: no time"; continue; }
  T=$(( L - 15 ))
  case $stage in
    ref) timeout $T python3 -m sftjob_bench.bench --case reference-job --memory-gib 80 --workdir /tmp/e2e --sides reference --max-steps-reference ${REF_STEPS:-10} > $OUT/ref.jsonl 2> $OUT/ref.log; echo "ref exit $?";;
    autoours) export HF_HOME=/tmp/model-cache-empty; timeout $T python3 -m sftjob_bench.bench --case reference-job --memory-gib 80 --workdir /tmp/e2e --sides sftjob --sftjob-output auto > $OUT/autoours.jsonl 2> $OUT/autoours.log; echo "autoours exit $?";;
    varlen) export HF_HOME=/tmp/model-cache-varlen; SFTJOB_SPEED='{"varlenAttention": "on"}' timeout $T python3 -m sftjob_bench.bench --case reference-job --memory-gib 80 --workdir /tmp/e2e --sides sftjob --sftjob-output varlen > $OUT/varlen.jsonl 2> $OUT/varlen.log; echo "varlen exit $?";;
    autofill) export HF_HOME=/tmp/model-cache-empty; timeout $T python3 -m sftjob_bench.bench --case reference-job --memory-gib 80 --workdir /tmp/e2e --sides sftjob --sftjob-output auto1 --max-steps-sftjob 3 > $OUT/autofill.jsonl 2> $OUT/autofill.log; echo "autofill exit $?";;
    autowarm) export HF_HOME=/tmp/model-cache-empty; timeout $T python3 -m sftjob_bench.bench --case reference-job --memory-gib 80 --workdir /tmp/e2e --sides sftjob --sftjob-output auto2 --max-steps-sftjob ${WARM_STEPS:-10} > $OUT/autowarm.jsonl 2> $OUT/autowarm.log; echo "autowarm exit $?";;
    auto) export HF_HOME=/tmp/model-cache; timeout $T python3 -m sftjob_bench.bench --case reference-job --memory-gib 80 --workdir /tmp/e2e --max-steps-reference ${REF_STEPS:-20} > $OUT/auto.jsonl 2> $OUT/auto.log; echo "auto exit $?";;
    fill) export HF_HOME=/tmp/model-cache; SFTJOB_SPEED='{"compile": "on"}' timeout $T python3 -m sftjob_bench.bench --case reference-job --memory-gib 80 --workdir /tmp/e2e --sides sftjob --sftjob-output job1 --max-steps-sftjob 3 > $OUT/fill.jsonl 2> $OUT/fill.log; echo "fill exit $?"; ls -la /tmp/model-cache/sftjob-compile-cache;;
    e2e) export HF_HOME=/tmp/model-cache; timeout $T python3 -m sftjob_bench.bench --case reference-job --memory-gib 80 --workdir /tmp/e2e --max-steps-reference 40 > $OUT/e2e.jsonl 2> $OUT/e2e.log; echo "e2e exit $?";;
    cold) export HF_HOME=/tmp/model-cache; timeout $T python3 -m sftjob_bench.bench --case reference-job --memory-gib 80 --workdir /tmp/e2e --sides sftjob > $OUT/cold.jsonl 2> $OUT/cold.log; echo "cold exit $?";;
    warm) export HF_HOME=/tmp/model-cache; timeout $T python3 -m sftjob_bench.bench --case reference-job --memory-gib 80 --workdir /tmp/e2e --sides sftjob --sftjob-output job2 --max-steps-sftjob ${WARM_STEPS:-10} > $OUT/warm.jsonl 2> $OUT/warm.log; echo "warm exit $?";;
    regfill) export HF_HOME=/tmp/model-cache-regional; SFTJOB_COMPILE_REGIONS=on SFTJOB_SPEED='{"compile": "on"}' timeout $T python3 -m sftjob_bench.bench --case reference-job --memory-gib 80 --workdir /tmp/e2e --sides sftjob --sftjob-output regjob1 --max-steps-sftjob 3 > $OUT/regfill.jsonl 2> $OUT/regfill.log; echo "regfill exit $?";;
    regwarm) export HF_HOME=/tmp/model-cache-regional; SFTJOB_COMPILE_REGIONS=on timeout $T python3 -m sftjob_bench.bench --case reference-job --memory-gib 80 --workdir /tmp/e2e --sides sftjob --sftjob-output regjob2 --max-steps-sftjob ${WARM_STEPS:-10} > $OUT/regwarm.jsonl 2> $OUT/regwarm.log; echo "regwarm exit $?";;
    whole) unset HF_HOME; timeout $T python3 -m sftjob_bench.bench --case reference-job --memory-gib 80 --workdir /tmp/e2e --sides sftjob --sftjob-output whole > $OUT/whole.jsonl 2> $OUT/whole.log; echo "whole exit $?";;
    regional) unset HF_HOME; SFTJOB_COMPILE_REGIONS=on timeout $T python3 -m sftjob_bench.bench --case reference-job --memory-gib 80 --workdir /tmp/e2e --sides sftjob --sftjob-output regional > $OUT/regional.jsonl 2> $OUT/regional.log; echo "regional exit $?";;
    reference) timeout $T python3 -m sftjob_bench.bench --case reference-job --memory-gib 80 --workdir /tmp/e2e --sides reference > $OUT/reference.jsonl 2> $OUT/reference.log; echo "reference exit $?";;
    vreg|vregwarm) export HF_HOME=/tmp/model-cache-vreg; SFTJOB_COMPILE_REGIONS=on SFTJOB_SPEED='{"varlenAttention": "on", "compile": "on"}' timeout $T python3 -m sftjob_bench.bench --case reference-job --memory-gib 80 --workdir /tmp/e2e --sides sftjob --sftjob-output $stage > $OUT/$stage.jsonl 2> $OUT/$stage.log; echo "$stage exit $?";;
    vregcap|vregcapwarm) export HF_HOME=/tmp/model-cache-vregcap; SFTJOB_COMPILE_REGIONS=on SFTJOB_SPEED='{"varlenAttention": "on", "compile": "on"}' timeout $T python3 -m sftjob_bench.bench --case reference-job --memory-gib 80 --workdir /tmp/e2e --sides sftjob --sftjob-output $stage --max-steps-sftjob ${CAP_STEPS:-15} > $OUT/$stage.jsonl 2> $OUT/$stage.log; echo "$stage exit $?";;
    varlencap) export HF_HOME=/tmp/model-cache-varlencap; SFTJOB_SPEED='{"varlenAttention": "on"}' timeout $T python3 -m sftjob_bench.bench --case reference-job --memory-gib 80 --workdir /tmp/e2e --sides sftjob --sftjob-output varlencap --max-steps-sftjob ${CAP_STEPS:-15} > $OUT/varlencap.jsonl 2> $OUT/varlencap.log; echo "varlencap exit $?";;
    vwhole) export HF_HOME=/tmp/model-cache-vwhole; SFTJOB_SPEED='{"varlenAttention": "on", "compile": "on"}' timeout $T python3 -m sftjob_bench.bench --case reference-job --memory-gib 80 --workdir /tmp/e2e --sides sftjob --sftjob-output vwhole --max-steps-sftjob ${WARM_STEPS:-10} > $OUT/vwhole.jsonl 2> $OUT/vwhole.log; echo "vwhole exit $?";;
    vliger|vligercap) [ -d /tmp/liger ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/liger .whl-liger/*.whl; export HF_HOME=/tmp/model-cache-$stage; CAP=""; [ $stage = vligercap ] && CAP="--max-steps-sftjob ${CAP_STEPS:-15}"; PYTHONPATH=/tmp/liger:$PYTHONPATH SFTJOB_SPEED='{"varlenAttention": "on", "ligerKernel": "on"}' timeout $T python3 -m sftjob_bench.bench --case reference-job --memory-gib 80 --workdir /tmp/e2e --sides sftjob --sftjob-output $stage $CAP > $OUT/$stage.jsonl 2> $OUT/$stage.log; echo "$stage exit $?";;
    newauto) export HF_HOME=/tmp/model-cache-newauto; timeout $T python3 -m sftjob_bench.bench --case reference-job --memory-gib 80 --workdir /tmp/e2e --sides sftjob --sftjob-output newauto > $OUT/newauto.jsonl 2> $OUT/newauto.log; echo "newauto exit $?";;
    qlora) python3 -c "import bitsandbytes as b, torch; l=b.nn.Linear4bit(64, 64, compute_dtype=torch.bfloat16, quant_type='nf4').cuda(); print('bnb', b.__version__, l(torch.randn(2, 64, device='cuda', dtype=torch.bfloat16)).shape)" 2>&1 | tail -1; timeout $T python3 -m sftjob_bench.bench --case llama8b-qlora --steps 10 --skip 3 --memory-gib 80 --side-timeout 220 --workdir /tmp/q > $OUT/qlora.jsonl 2> $OUT/qlora.log; echo "qlora exit $?";;
    # Session 19: a job over the compiled layers' break-even (2,500 rows), the defaults
    # against the varlen kernel in compiled decoder layers; and the steady-state cases.
    long|longreg) [ -d /tmp/liger ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/liger .whl-liger/*.whl; export HF_HOME=/tmp/model-cache-$stage; SPEED='{}'; [ $stage = longreg ] && { SPEED='{"varlenAttention": "on", "compile": "on"}'; export SFTJOB_COMPILE_REGIONS=on; }; PYTHONPATH=/tmp/liger:$PYTHONPATH SFTJOB_SPEED="$SPEED" timeout $T python3 -m sftjob_bench.bench --case long-job --memory-gib 80 --workdir /tmp/long --sides sftjob --sftjob-output $stage > $OUT/$stage.jsonl 2> $OUT/$stage.log; echo "$stage exit $?"; unset SFTJOB_COMPILE_REGIONS; find /tmp/long -mindepth 2 -maxdepth 3 -type d \( -name 'checkpoint-*' -o -name final \) -exec rm -rf {} + 2>/dev/null;;
    longref) timeout $T python3 -m sftjob_bench.bench --case long-job --memory-gib 80 --workdir /tmp/long --sides reference --max-steps-reference ${REF_STEPS:-10} > $OUT/longref.jsonl 2> $OUT/longref.log; echo "longref exit $?";;
    # fullvw/loravw: the whole model compiled with the varlen kernel inside (not flex attention).
    full|lora|fullreg|lorareg|fullvw|loravw) [ -d /tmp/liger ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/liger .whl-liger/*.whl; SIDES=reference,sftjob; SPEED='{}'; case $stage in *reg) SIDES=sftjob; SPEED='{"varlenAttention": "on", "compile": "on"}'; export SFTJOB_COMPILE_REGIONS=on;; *vw) SIDES=sftjob; SPEED='{"varlenAttention": "on", "compile": "on"}'; export SFTJOB_COMPILE_REGIONS=off;; esac; CASE=${stage%reg}; CASE=${CASE%vw}; PYTHONPATH=/tmp/liger:$PYTHONPATH SFTJOB_SPEED="$SPEED" timeout $T python3 -m sftjob_bench.bench --case $CASE --steps ${STEADY_STEPS:-20} --memory-gib 80 --sides $SIDES > $OUT/$stage.jsonl 2> $OUT/$stage.log; echo "$stage exit $?"; unset SFTJOB_COMPILE_REGIONS;;
    # Every library both sides import, read once from disk before the timed stages: the first
    # process on a fresh machine otherwise pays the cold disk (session 18's call 2: the
    # reference ran first, its startup 26.4 s against ours 19.9 s).
    warmimports) [ -d /tmp/liger ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/liger .whl-liger/*.whl; PYTHONPATH=/tmp/liger:$PYTHONPATH python3 -c "import time; t = time.time(); import torch, trl.trainer.sft_trainer, liger_kernel.transformers; from sftjob_trainer import train; print('warm imports', round(time.time() - t, 1), 's')";;
    probe) [ -d /tmp/liger ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/liger .whl-liger/*.whl; PYTHONPATH=/tmp/liger:$PYTHONPATH timeout $T python3 bench/startup_probe.py > $OUT/probe.jsonl 2> $OUT/probe.log; echo "probe exit $?"; for n in 4 8; do timeout 100 python3 bench/tokenizing_processes.py --rows 1000 --processes $n >> $OUT/probe.jsonl 2>> $OUT/probe.log; done;;
    img|img2|img3|imgcap) [ -d /tmp/liger ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/liger .whl-liger/*.whl; export HF_HOME=/tmp/model-cache-$stage; CAP=""; [ $stage = imgcap ] && CAP="--max-steps-sftjob ${CAP_STEPS:-15}"; PYTHONPATH=/tmp/liger:$PYTHONPATH timeout $T python3 -m sftjob_bench.bench --case reference-job --memory-gib 80 --workdir /tmp/e2e --sides sftjob --sftjob-output $stage $CAP > $OUT/$stage.jsonl 2> $OUT/$stage.log; echo "$stage exit $?";;
    # Session 20: the LoRA case's steady state uncompiled (the varlen kernel and liger's
    # kernels), our side only: the rate the decoder layers' compile must beat for LoRA.
    loraoff) [ -d /tmp/liger ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/liger .whl-liger/*.whl; PYTHONPATH=/tmp/liger:$PYTHONPATH SFTJOB_SPEED='{"compile": "off"}' timeout $T python3 -m sftjob_bench.bench --case lora --steps ${STEADY_STEPS:-20} --memory-gib 80 --sides sftjob > $OUT/$stage.jsonl 2> $OUT/$stage.log; echo "$stage exit $?";;
    # The reference job with LoRA adapters (case reference-job-lora, session 20): the snippet
    # with a peft LoraConfig (capped at REF_STEPS, the rest priced at its own rate), and ours.
    reflora) timeout $T python3 -m sftjob_bench.bench --case reference-job-lora --memory-gib 80 --workdir /tmp/e2elora --sides reference --max-steps-reference ${REF_STEPS:-10} > $OUT/reflora.jsonl 2> $OUT/reflora.log; echo "reflora exit $?";;
    imglora) [ -d /tmp/liger ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/liger .whl-liger/*.whl; export HF_HOME=/tmp/model-cache-$stage; PYTHONPATH=/tmp/liger:$PYTHONPATH timeout $T python3 -m sftjob_bench.bench --case reference-job-lora --memory-gib 80 --workdir /tmp/e2elora --sides sftjob --sftjob-output $stage > $OUT/$stage.jsonl 2> $OUT/$stage.log; echo "$stage exit $?";;
    # Session 21: fp8 matmuls (torch._scaled_mm) against bf16 at the layer's linear shapes,
    # each compiled, forward and backward; then with frozen weights (LoRA's base layers).
    fp8probe) timeout $T python3 bench/fp8_matmul_probe.py > $OUT/fp8probe.jsonl 2> $OUT/fp8probe.log; echo "fp8probe exit $?"; timeout 120 python3 bench/fp8_matmul_probe.py --frozen >> $OUT/fp8probe.jsonl 2>> $OUT/fp8probe.log;;
    # Session 21: the steady cases with fp8Matmuls on (our side only; `full`/`lora` give
    # the reference and our defaults in the same call).
    full8|lora8) [ -d /tmp/liger ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/liger .whl-liger/*.whl; PYTHONPATH=/tmp/liger:$PYTHONPATH SFTJOB_SPEED='{"fp8Matmuls": "on"}' timeout $T python3 -m sftjob_bench.bench --case ${stage%8} --steps ${STEADY_STEPS:-20} --memory-gib 80 --sides sftjob > $OUT/$stage.jsonl 2> $OUT/$stage.log; echo "$stage exit $?";;
    # The single-GPU tries left (issue24-gpu-commands.md): our side of the full case with
    # GEMM autotuning in the compile, and sized for MEM_GIB (e.g. 100 on an H200: the plan
    # may then take a micro-batch of 8 x 2, which the estimate refuses at 80).
    fullat) [ -d /tmp/liger ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/liger .whl-liger/*.whl; PYTHONPATH=/tmp/liger:$PYTHONPATH timeout $T python3 -m sftjob_bench.bench --case full --steps ${STEADY_STEPS:-20} --memory-gib 80 --sides sftjob --extra-args '{"torch_compile_mode": "max-autotune-no-cudagraphs"}' > $OUT/$stage.jsonl 2> $OUT/$stage.log; echo "$stage exit $?";;
    fullmem) [ -d /tmp/liger ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/liger .whl-liger/*.whl; PYTHONPATH=/tmp/liger:$PYTHONPATH timeout $T python3 -m sftjob_bench.bench --case full --steps ${STEADY_STEPS:-20} --memory-gib ${MEM_GIB:-100} --sides sftjob > $OUT/$stage.jsonl 2> $OUT/$stage.log; echo "$stage exit $?";;
    # Session 22: the reference job's data preparation inside the job with N tokenizing
    # processes (extraArgs dataset_num_proc, which dataWorkers keeps), 3 steps each: compare
    # data_preparation_s and preparation.tokenize_pack_s across N (TOK_PROCS, one call).
    tokprocs) [ -d /tmp/liger ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/liger .whl-liger/*.whl; export HF_HOME=/tmp/model-cache-$stage; for n in ${TOK_PROCS:-1 2 4 8}; do L=$(left); [ "$L" -lt 60 ] && { echo "skip tok$n: no time"; continue; }; PYTHONPATH=/tmp/liger:$PYTHONPATH timeout $(( L - 15 )) python3 -m sftjob_bench.bench --case reference-job --memory-gib 80 --workdir /tmp/e2e --sides sftjob --sftjob-output tok$n --max-steps-sftjob 3 --extra-args "{\"dataset_num_proc\": $n}" > $OUT/tok$n.jsonl 2> $OUT/tok$n.log; echo "tok$n exit $?"; done;;
    imgserial) [ -d /tmp/liger ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/liger .whl-liger/*.whl; export HF_HOME=/tmp/model-cache-$stage; CAP=""; [ $stage = imgcap ] && CAP="--max-steps-sftjob ${CAP_STEPS:-15}"; PYTHONPATH=/tmp/liger:$PYTHONPATH SFTJOB_SPEED='{"parallelSave": "off"}' timeout $T python3 -m sftjob_bench.bench --case reference-job --memory-gib 80 --workdir /tmp/e2e --sides sftjob --sftjob-output $stage $CAP > $OUT/$stage.jsonl 2> $OUT/$stage.log; echo "$stage exit $?";;
  esac
  # Each job leaves 18 GB (weights and optimizer state): drop them, or the 64 GB disk fills
  # (session 15's third job failed writing its checkpoint). The compile caches stay.
  find /tmp/e2e -mindepth 2 -maxdepth 3 -type d \( -name 'checkpoint-*' -o -name final \) -exec rm -rf {} + 2>/dev/null; df -h /tmp | tail -1
  for f in $OUT/*.log; do [ -f "$f" ] && [ $(stat -c %s "$f") -gt 2000000 ] && { gzip -f "$f"; }; done
done
for f in $OUT/*.jsonl; do echo "--- $f"; grep -h '"side"\|"check"' $f | python3 -c "
import sys,json
for l in map(json.loads,sys.stdin):
    if 'check' in l or 'probe' in l or 'same_rows' in l: print(l); continue
    print(l.get('side'), 'wall', l.get('wall_s'), 'tps', l.get('tokens_per_s'), 'tps_e2e', l.get('tokens_per_s_e2e'), 'load->first', l.get('model_loaded_to_first_step_s'), 'phases', l.get('phases'), 'cc', (l.get('compile_cache') or {}).get('warm'), 'extrap', l.get('extrapolated'))
" 2>&1 | cut -c1-900; done
# At most 8 files come back from $OUT (2026-12-06 call 1 lost five of its 13): every stage's
# line and log travel together in one archive, and the lines also as they are while they fit.
(cd $OUT && tar czf results.tar.gz *.jsonl *.log* 2>/dev/null && rm -f *.log*)
ls -la $OUT
