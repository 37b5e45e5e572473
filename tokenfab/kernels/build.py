"""Build the C++ CPU kernels once per machine and load them with ctypes.

One library of every csrc/*.cpp is compiled for the host (-march=native) into the cache directory, keyed by the
sources, the compiler and the CPU's flags, so a changed source or a different machine never loads a stale build.
Anything that stops the build (no compiler, no AVX2/FMA/F16C) leaves the pure-torch paths in charge.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from functools import cache
from pathlib import Path

from tokenfab.loader.default_model import cache_dir

SOURCE_DIR = Path(__file__).with_name("csrc")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
REQUIRED_CPU_FLAGS = ("avx2", "fma", "f16c")
DISABLE_ENV = "TOKENFAB_DISABLE_CPU_KERNELS"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _sources() -> list[Path]:
    """Every C++ file in csrc/, compiled together into the one library."""
    return sorted(SOURCE_DIR.glob("*.cpp"))


def _headers() -> list[Path]:
    return sorted(SOURCE_DIR.glob("*.h"))


def _key(compiler: str, flags: set[str]) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    h = hashlib.sha256()
    for source in _sources() + _headers():
        h.update(source.name.encode())
        h.update(source.read_bytes())
    for part in (version, " ".join(FLAGS), " ".join(sorted(flags))):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _compile(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        command = [compiler, *FLAGS, "-o", str(out), *map(str, _sources())]
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        os.replace(out, target)  # atomic: a concurrent builder sees the old file or the whole new one


@cache
def load_library() -> ctypes.CDLL | None:
    """The kernel library, or None where it can't be built here (the reason is warned once)."""
    if os.environ.get(DISABLE_ENV):
        return None
    flags = _cpu_flags()
    missing = [f for f in REQUIRED_CPU_FLAGS if f not in flags]
    compiler = _compiler()
    if missing or compiler is None:
        reason = f"CPU lacks {', '.join(missing)}" if missing else "no C++ compiler found"
        warnings.warn(f"tokenfab CPU kernels unavailable ({reason}); using torch paths", stacklevel=2)
        return None
    target = cache_dir() / "kernels" / _key(compiler, flags) / "libtokenfab_cpu.so"
    try:
        if not target.exists():
            _compile(compiler, target)
        return _declare(ctypes.CDLL(str(target)))
    except (OSError, RuntimeError) as exc:
        warnings.warn(f"tokenfab CPU kernels failed to build ({exc}); using torch paths", stacklevel=2)
        return None


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    shape = [i64, i64, i64, i32]
    signatures = {
        "tf_linear_bf16": [p, p, p, *shape],
        "tf_linear_i8": [p, p, p, p, *shape],
        "tf_linear_fp8": [p, p, p, p, *shape],
        "tf_linear_lut4": [p, p, p, i64, p, p, f32, p, *shape],
        "tf_linear_lut4_q8": [p, p, p, i64, i32, p, p, f32, p, *shape],
        "tf_linear_i8_q8": [p, p, p, p, *shape],
        "tf_rmsnorm": [p, p, p, i64, i64, f32, i32],
        "tf_add_rmsnorm": [p, p, p, p, p, i64, i64, f32, i32],
        "tf_argmax_rows": [p, i64, i64, p],
        "tf_gated_act": [p, p, i64, i64, i32, i32],
        "tf_gated_mlp_bf16": [p, p, p, p, i64, i64, i64, i64, i32, i32],
        "tf_qk_norm_rope": [p, i64, i64, i64, i64, i64, p, p, f32, p, p, i32],
        "tf_paged_decode_attention": [p, p, p, p, i64, p, p, i64, i64, i64, i64, i64, f32, p, i32],
        "tf_decode_attention_step": [p, i64, i64, i64, i64, i64, p, p, f32, p, p, p, p, p, p, i64, p, p, i64, f32, p,
                                     i32],
        "tf_dequant_bf16": [p, p, i64, i64, i32],
        "tf_dequant_i8": [p, p, p, i64, i64, i32],
        "tf_dequant_fp8": [p, p, p, i64, i64, i32],
        "tf_dequant_lut4": [p, p, i64, p, p, f32, p, i64, i64, i32],
        "tf_gguf_linear": [p, i32, p, p, p, p, *shape],
        "tf_gguf_dequantize": [i32, p, p, i64, i64, p, i32],
    }
    for name, args in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = None
    lib.tf_decode_layers.argtypes = [p, p, i64, p, p, p, p, p, i64, i32]
    lib.tf_decode_layers.restype = None
    lib.tf_gguf_row_bytes.argtypes = [i32, i64]
    lib.tf_gguf_row_bytes.restype = i64
    lib.tf_gguf_repack.argtypes = [i32, p, p, i64, i64, i32]
    lib.tf_gguf_repack.restype = i32
    return lib
