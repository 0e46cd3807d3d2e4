#!/usr/bin/env bash
# Build .device_bundle/bundle.tar.xz: the Python packages af3dist's GPU benchmarks need that the GPU machine
# (no network; its own CPython 3.12 with torch and transformers) lacks, pre-installed for cp312 manylinux x86_64.
#
#     bash scripts/device/build_bundle.sh          # here, where PyPI is reachable; prints the bundle's size
#
# Then, on the GPU machine (the `run` tool, carry [".device_bundle/bundle.tar.xz"]):
#     bash scripts/device/gpu_session.sh
#
# Layout inside the archive (unpacked by gpu_session.sh):
#   site/            always put on PYTHONPATH: packages the machine is known to lack (Ray, DeepSpeed, pydantic,
#                    PyAV, soxr, soundfile, jsonschema, ...), installed with `pip install --target --no-deps
#                    --platform ... --python-version 3.12` here, so that the machine needs no pip at all
#   opt/<name>/      one folder per override: put on PYTHONPATH only when the machine's own version is missing
#                    or outside the spec in opt.txt (transformers ==5.24 that af3dist is tested with, peft,
#                    pyarrow, fsspec, ...). torch and the nvidia libraries are never carried.
#   manifest.txt     name==version and wheel file of everything carried; opt.txt "name spec" per override
#
# Ray is stripped of what a local job does not run: the Java worker (ray/jars), the dashboard's web client
# (init_ray starts Ray with include_dashboard=False), RLlib, Ray LLM and Serve (the jobs never import them), tests and the
# bundled C++ headers. The downloaded wheels stay in .device_bundle/wheels as a cache (not in the archive).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
PY="${PY:-$ROOT/.venv/bin/python}"
B="$ROOT/.device_bundle"
W="$B/wheels"
S="$B/stage"
mkdir -p "$W"
rm -rf "$S"
# The bundle must not travel as untracked files (the wheels cache alone is over the limit): ignore it locally
# (.git/info/exclude, not .gitignore) unless something already ignores it.
if ! git check-ignore -q "$B/bundle.tar.xz" 2>/dev/null; then
    echo "/.device_bundle/" >>"$(git rev-parse --git-path info/exclude)"
fi
mkdir -p "$S/site" "$S/opt"

PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none)
for p in manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 \
         manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64 any; do
    PLAT+=(--platform "$p")
done

# Always carried (absent on the machine, per /work/.library/device/KINDS.md): af3dist's needs and theirs.
# Versions = what .venv has (the versions the test suite passes with).
ALWAYS=(
    ray==2.60.0                       # core + [train,data]; its needs click filelock msgpack packaging protobuf
                                      # pyyaml requests are on the machine, jsonschema is not
    jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
    tensorboardX==2.6.5               # ray[train]
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    hjson==3.1.0                      # deepspeed's one missing need (einops msgpack ninja numpy packaging psutil
                                      # py-cpuinfo tqdm nvidia-ml-py are there)
    av==18.1.0                        # PyAV with its FFmpeg
    soundfile==0.14.0 cffi==2.1.1 pycparser==3.12
    soxr==1.1.0
)
# Overrides, used only where the machine's own version is missing or outside the spec (what af3dist, Ray,
# pydantic or transformers 5.24 ask for). "name==version|spec".
OPTIONAL=(
    "transformers==5.24.0|>=5.24,<5.25"      # pyproject pins 5.24 (the machine had 5.17.0 in 2026-11)
    "peft==0.21.2|>=0.17"
    # Not carried, for size (the archive and the working tree must fit 64 MiB together): pyarrow (52 MB as a
    # wheel; the machine has one, and ray[data] asks only >=17) and tokenizers (the machine's 0.23.2 already
    # satisfies transformers 5.24's >=0.23.1,<0.24). gpu_session.sh's import check shows both versions.
    "fsspec==2026.9.0|>=2024.6"
    "typing-extensions==4.16.0|>=4.16.0"     # pydantic 2.14
    "huggingface-hub==1.33.0|>=1.31,<3"      # transformers 5.24; the machine's own version (2.x needs httpx2)
    "regex==2026.11.19|>=2025.10.22"         # transformers 5.24
    "packaging==26.4|>=24.2"                 # ray
    "safetensors==0.8.0|>=0.8.0"             # transformers 5.24
)

wheel_of() {  # the downloaded wheel of "name==version" (names normalised as wheel files spell them)
    local n="${1%%==*}" v="${1##*==}"
    n="$(echo "$n" | tr 'A-Z-' 'a-z_')"
    ls "$W" | awk -v n="$n" -v v="$v" 'BEGIN{IGNORECASE=1} index(tolower($0), n"-"v"-")==1' | head -1
}

echo "== downloading wheels (cp312, manylinux x86_64) into $W"
names=("${ALWAYS[@]}")
for o in "${OPTIONAL[@]}"; do names+=("${o%%|*}"); done
"$PY" -m pip download -q --no-deps "${PLAT[@]}" -d "$W" "${names[@]}" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
for spec in "${names[@]}"; do [ -n "$(wheel_of "$spec")" ] || { echo "download failed: $spec" >&2; exit 1; }; done

# DeepSpeed publishes a source dist only: a pure-Python wheel built with no ops (DS_BUILD_OPS=0; the af3
# preset's AdamW is torch_adam, so nothing is JIT-compiled on the machine either).
if ! ls "$W"/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
    cached=$(find "$HOME/.cache/pip/wheels" -name 'deepspeed-0.19.8-py3-none-any.whl' 2>/dev/null | head -1 || true)
    if [ -n "$cached" ]; then
        cp "$cached" "$W/"
    else
        DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$W" deepspeed==0.19.8
    fi
fi

: >"$S/manifest.txt"
: >"$S/opt.txt"
record() { echo "$1  $2" >>"$S/manifest.txt"; }

echo "== installing into the stage (no compile, no deps)"
always_wheels=()
for spec in "${ALWAYS[@]}" deepspeed==0.19.8; do
    w="$(wheel_of "$spec")"
    [ -n "$w" ] || { echo "missing wheel for $spec" >&2; exit 1; }
    always_wheels+=("$W/$w")
    record "$spec" "$w"
done
"$PY" -m pip install -q --no-deps --no-index --no-compile "${PLAT[@]}" --target "$S/site" "${always_wheels[@]}"

for o in "${OPTIONAL[@]}"; do
    spec="${o%%|*}" req="${o##*|}"
    name="${spec%%==*}"
    w="$(wheel_of "$spec")"
    [ -n "$w" ] || { echo "missing wheel for $spec" >&2; exit 1; }
    "$PY" -m pip install -q --no-deps --no-index --no-compile "${PLAT[@]}" --target "$S/opt/$name" "$W/$w"
    rm -rf "$S/opt/$name/bin"
    record "$spec" "$w (override if the machine's $name is not $req)"
    echo "$name $req" >>"$S/opt.txt"
done
rm -rf "$S/site/bin"   # console scripts with this machine's interpreter in their shebang: unused

echo "== stripping Ray"
R="$S/site/ray"
before=$(du -sm "$R" | cut -f1)
rm -rf "$R/jars" "$R/dashboard/client" "$R/rllib" "$R/llm" "$R/serve" "$R/core/include"
# Ray ships its binaries with their symbol tables (~35 MB of 119): drop what the dynamic linker does not use.
for f in "$R/_raylet.so" "$R/core/src/ray/raylet/raylet" "$R/core/src/ray/gcs/gcs_server"; do
    strip --strip-unneeded "$f"
done
find "$S/site" -type d \( -name tests -o -name __pycache__ \) -prune -exec rm -rf {} +
find "$S" -name '*.pyc' -delete
echo "ray: ${before} MB -> $(du -sm "$R" | cut -f1) MB unpacked"

echo "== packing"
du -sm "$S/site" "$S"/opt/* | sort -rn
rm -f "$B/bundle.tar.xz"
# -T2: the dev machine's cores are shared (-6, the default preset: -9 gains ~1 MB here at twice the time).
tar -C "$S" -cf - site opt manifest.txt opt.txt | xz -T2 -6 >"$B/bundle.tar.xz"
size=$(stat -c %s "$B/bundle.tar.xz")
echo "== $(realpath --relative-to="$ROOT" "$B/bundle.tar.xz"): $size bytes ($(awk -v s="$size" 'BEGIN{printf "%.1f", s/1048576}') MiB)"
if [ "$size" -gt $((56 * 1048576)) ]; then
    echo "WARNING: over 56 MiB; the run tool carries 64 MiB in all, working tree included" >&2
fi
cat "$S/manifest.txt"
