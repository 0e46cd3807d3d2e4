#!/usr/bin/env bash
# One prepared GPU session: unpack the bundle that scripts/device/build_bundle.sh made, put it on PYTHONPATH
# in front of the machine's own Python 3.12 (its torch and, where compatible, its transformers stay), then run
# the GPU benchmarks one after another, each under `timeout`, and summarise their JSON lines.
#
#     bash scripts/device/gpu_session.sh                     # everything, within BUDGET_S (default 560 s)
#     STEPS="gen real" BUDGET_S=400 bash scripts/device/gpu_session.sh
#
# Run by the `run` tool in the repo root with carry [".device_bundle/bundle.tar.xz"] and timeout_s 600.
# Steps (STEPS, in this order by default: "gen old train real"):
#   gen    benchmarks/generation.py --size full       engine vs model.generate, full-size random AF3   (T_GEN)
#   old    benchmarks/gpu_full_size.py --phases generate   HF generate figures, as before                (T_OLD)
#   train  benchmarks/gpu_full_size.py --phases train,encoder --variants ours,old                        (T_TRAIN)
#   real   benchmarks/gpu_real_job.py                  ray_jobs.finetune on one GPU, then resumed        (T_REAL)
# Each step's timeout is the smaller of its T_* and what is left of BUDGET_S (counted from this script's
# start, minus RESERVE_S for the summary); a step with under MIN_STEP_S left is skipped. A failed or timed-out
# step does not stop the next. Everything lands in $OUT (at most 8 files come back from there):
#   session.log       this whole output
#   env.txt           nvidia-smi, versions, which overrides were used
#   <step>.json       each benchmark's last JSON line (or {"step":..,"rc":..} when it printed none)
#   summary.json      one object: step -> {rc, seconds, result}
set -uo pipefail

T0=$(date +%s)
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/outputs/gpu_session}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1

PY="${PY:-python3}"
BUNDLE="${BUNDLE:-$ROOT/.device_bundle/bundle.tar.xz}"
DEST="${BUNDLE_DIR:-/tmp/af3dist-bundle}"
STEPS="${STEPS:-gen old train real}"
BUDGET_S="${BUDGET_S:-560}"
RESERVE_S="${RESERVE_S:-10}"
MIN_STEP_S="${MIN_STEP_S:-45}"
T_GEN="${T_GEN:-110}"
T_OLD="${T_OLD:-70}"
T_TRAIN="${T_TRAIN:-120}"
T_REAL="${T_REAL:-400}"        # the last step: in practice it gets what is left
elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( BUDGET_S - RESERVE_S - $(elapsed) )); }

echo "== gpu_session $(date -u +%FT%TZ) in $ROOT; OUT=$OUT; steps: $STEPS; budget ${BUDGET_S}s"

# ---- unpack -----------------------------------------------------------------------------------------------
if [ ! -f "$BUNDLE" ]; then
    echo "no bundle at $BUNDLE: build it with scripts/device/build_bundle.sh and carry .device_bundle/bundle.tar.xz"
    exit 2
fi
rm -rf "$DEST" && mkdir -p "$DEST"
if command -v xz >/dev/null; then
    xz -T0 -dc "$BUNDLE" | tar -C "$DEST" -xf -
else  # no xz binary: Python's lzma
    "$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1], 'r:xz').extractall(sys.argv[2])" "$BUNDLE" "$DEST"
fi
if [ ! -f "$DEST/opt.txt" ]; then
    echo "unpacking $BUNDLE failed"; exit 2
fi
echo "unpacked $(du -sm "$DEST" | cut -f1) MB into $DEST in $(elapsed)s"

# Overrides: opt/<name> goes on the path only where the machine's own <name> is missing or outside its spec.
PP="$DEST/site"
OVERRIDES=""
while read -r name spec; do
    [ -n "$name" ] || continue
    have=$(PYTHONPATH= "$PY" - "$name" "$spec" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
name, spec = sys.argv[1], sys.argv[2]
try:
    v = version(name)
except PackageNotFoundError:
    print("missing"); sys.exit(1)
try:
    from packaging.specifiers import SpecifierSet
    ok = SpecifierSet(spec).contains(v, prereleases=True)
except Exception:
    ok = False
print(v); sys.exit(0 if ok else 1)
EOF
)
    if [ $? -ne 0 ]; then
        PP="$DEST/opt/$name:$PP"
        OVERRIDES="$OVERRIDES $name(machine: $have; carried: $(grep "^$name==" "$DEST/manifest.txt" | cut -d' ' -f1))"
    fi
done <"$DEST/opt.txt"
export PYTHONPATH="$PP:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Ray's workers inherit this environment (PYTHONPATH included) from the driver that starts the local cluster.
SESSION_TOKEN="$$-$T0"
export AF3DIST_GPU_SESSION="$SESSION_TOKEN"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 DS_ACCELERATOR=cuda \
       HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       RAY_USAGE_STATS_ENABLED=0 RAY_DEDUP_LOGS=0 TOKENIZERS_PARALLELISM=false
echo "overrides:${OVERRIDES:- none}"

# ---- environment ------------------------------------------------------------------------------------------
{
    echo "date: $(date -u +%FT%TZ)"
    echo "overrides:${OVERRIDES:- none}"
    echo "PYTHONPATH=$PYTHONPATH"
    nvidia-smi 2>&1 || echo "nvidia-smi failed"
    df -h /tmp /dev/shm 2>&1
    free -g 2>&1
    timeout 60 "$PY" - <<'EOF' 2>&1
import importlib, sys, time
print("python", sys.version.split()[0], sys.executable)
mods = ["torch", "transformers", "tokenizers", "huggingface_hub", "safetensors", "peft", "accelerate", "deepspeed",
        "ray", "ray.train.torch", "ray.data", "pydantic", "pyarrow", "fsspec", "av", "soxr", "soundfile", "yaml",
        "numpy", "pandas", "psutil", "jsonschema", "tensorboardX", "af3dist.cli", "af3dist.training.finetune"]
bad = 0
for m in mods:
    t = time.perf_counter()
    try:
        mod = importlib.import_module(m)
        v = getattr(mod, "__version__", "")
        where = (getattr(mod, "__file__", "") or "").replace("/site-packages/", "/s-p/")
        print(f"  ok   {m:28s} {v:16s} {time.perf_counter() - t:5.1f}s {where}")
    except Exception as err:
        bad += 1
        print(f"  FAIL {m:28s} {type(err).__name__}: {err}")
try:
    import torch
    print("cuda", torch.cuda.is_available(), torch.version.cuda,
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
except Exception as err:
    print("torch:", err)
sys.exit(1 if bad else 0)
EOF
    echo "import check rc=$?"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# ---- steps ------------------------------------------------------------------------------------------------
declare -A RC SECS
run_step() {  # name own_timeout command...
    local name=$1 own=$2; shift 2
    local budget; budget=$(left)
    local t=$(( own < budget ? own : budget ))
    if [ "$t" -lt "$MIN_STEP_S" ]; then
        echo "== [$name] skipped: ${budget}s left of the budget"
        RC[$name]=skipped; SECS[$name]=0
        return
    fi
    echo "== [$name] $(elapsed)s in, timeout ${t}s: $*"
    local tmp; tmp=$(mktemp -d)
    local start; start=$(date +%s)
    # The benchmark writes $OUT/<its name>.json: point it at a temp dir, then keep its file as <step>.json.
    OUT="$tmp" timeout -k 10 "$t" "$@" 2>&1 | tee "$tmp/stdout.txt"
    local rc=${PIPESTATUS[0]}
    RC[$name]=$rc; SECS[$name]=$(( $(date +%s) - start ))
    local js; js=$(ls "$tmp"/*.json 2>/dev/null | head -1)
    if [ -n "$js" ]; then
        cp "$js" "$OUT/$name.json"
    elif line=$(grep -E '^\{.*\}$' "$tmp/stdout.txt" | tail -1) && [ -n "$line" ]; then
        echo "$line" >"$OUT/$name.json"
    else
        echo "{\"step\": \"$name\", \"rc\": \"$rc\", \"note\": \"no JSON line\"}" >"$OUT/$name.json"
    fi
    echo "== [$name] rc=$rc in ${SECS[$name]}s$( [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo ' (timed out)')"
    rm -rf "$tmp"
    # A step killed by its timeout can leave processes behind (Ray's raylet, GCS and workers hold GPU memory):
    # end those this script started, found by the token in their environment, by pid.
    end_leftovers
}
end_leftovers() {
    local pids=() p
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [ "$p" = "$$" ] && continue
        if { tr '\0' '\n' <"/proc/$p/environ"; } 2>/dev/null | grep -qx "AF3DIST_GPU_SESSION=$SESSION_TOKEN"; then
            pids+=("$p")
        fi
    done
    # Spare this shell's own children (the tee that writes session.log).
    local mine; mine=$(ps -o pid= --ppid $$ 2>/dev/null | tr -d ' ' | tr '\n' ' ')
    local kill=()
    for p in "${pids[@]}"; do
        case " $mine " in *" $p "*) continue ;; esac
        [ "$(ps -o comm= -p "$p" 2>/dev/null)" = tee ] && continue
        kill+=("$p")
    done
    if [ ${#kill[@]} -gt 0 ]; then
        echo "   ending ${#kill[@]} leftover processes: $(ps -o pid=,comm= -p "$(IFS=,; echo "${kill[*]}")" | tr -s ' \n' ' ')"
        kill -TERM "${kill[@]}" 2>/dev/null; sleep 3; kill -KILL "${kill[@]}" 2>/dev/null
    fi
    return 0
}

for s in $STEPS; do
    case $s in
        gen)   run_step gen "$T_GEN" "$PY" benchmarks/generation.py --size full --batches 1 8 32 \
                   --max-tokens 32 --repeats 3 ;;
        old)   run_step old "$T_OLD" "$PY" benchmarks/gpu_full_size.py --phases generate \
                   --gen-batches 1,8,32 --gen-tokens 32 --micro-batches 4 ;;
        train) run_step train "$T_TRAIN" "$PY" benchmarks/gpu_full_size.py --phases train,encoder \
                   --variants ours,old --micro-batches 4,16,32 --steps 8 --warmup 3 ;;
        real)  t=$(( T_REAL < $(left) ? T_REAL : $(left) ))
               run_step real "$T_REAL" "$PY" benchmarks/gpu_real_job.py --size full --steps 6 --more 2 \
                   --clips 256 --timeout $(( t > 40 ? t - 20 : 20 )) ;;
        *)     echo "unknown step $s (gen old train real)" ;;
    esac
done

# ---- summary ----------------------------------------------------------------------------------------------
echo "== summary after $(elapsed)s"
args=()
for s in $STEPS; do args+=("$s" "${RC[$s]:-none}" "${SECS[$s]:-0}"); done
"$PY" - "$OUT" "${args[@]}" <<'EOF'
import json, sys
from pathlib import Path
out, rest = Path(sys.argv[1]), sys.argv[2:]
summary = {}
for i in range(0, len(rest), 3):
    name, rc, secs = rest[i:i + 3]
    f = out / f"{name}.json"
    try:
        result = json.loads(f.read_text().strip().splitlines()[-1]) if f.is_file() else None
    except (ValueError, IndexError):
        result = f.read_text()[-2000:]
    summary[name] = {"rc": rc, "seconds": int(secs), "result": result}
    print(f"--- {name}: rc={rc} {secs}s")
    print(json.dumps(result, default=str))
(out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
EOF
echo "== done in $(elapsed)s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
