"""Build the C++ CPU kernels once per ISA level and load them with ctypes.

One library of every csrc/*.cpp is compiled per instruction-set level (tokenfab.platform.cpu_isa: explicit -m flags,
never -march=native) into the cache directory, keyed by the sources, the compiler and the level, so a changed
source never loads a stale build and a library copied to another machine runs wherever its level does. The level
is the best the CPU has, or $TOKENFAB_CPU_ISA; `use_level` switches it for a block (tests and benchmarks compare
levels in one process). Anything that stops the build (no compiler, no AVX2/FMA/F16C) leaves the torch paths in
charge.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from tokenfab.loader.default_model import cache_dir
from tokenfab.platform import cpu_isa
from tokenfab.platform.cpu_isa import IsaLevel

log = logging.getLogger("tokenfab.kernels")

SOURCE_DIR = Path(__file__).with_name("csrc")
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
DISABLE_ENV = "TOKENFAB_DISABLE_CPU_KERNELS"


@dataclass(frozen=True, slots=True)
class KernelPath:
    """Which kernels run and why: the level, or None with the reason the torch paths run instead."""

    level: str | None
    reason: str

    def as_dict(self) -> dict[str, object]:
        return {"kernel_isa": self.level or "torch", "kernel_isa_reason": self.reason, **cpu_isa.describe()}


_forced: list[str] = []
"""Levels set by use_level, innermost last."""


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _sources() -> list[Path]:
    """Every C++ file in csrc/, compiled together into the one library."""
    return sorted(SOURCE_DIR.glob("*.cpp"))


def _headers() -> list[Path]:
    return sorted(SOURCE_DIR.glob("*.h"))


def _key(compiler: str, level: IsaLevel) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    h = hashlib.sha256()
    for source in _sources() + _headers():
        h.update(source.name.encode())
        h.update(source.read_bytes())
    for part in (version, " ".join(FLAGS), " ".join(level.compiler_flags)):
        h.update(part.encode())
    return f"{level.name}-{h.hexdigest()[:16]}"


def _compile(compiler: str, level: IsaLevel, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        command = [compiler, *FLAGS, *level.compiler_flags, "-o", str(out), *map(str, _sources())]
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        os.replace(out, target)  # atomic: a concurrent builder sees the old file or the whole new one


@cache
def _default_path() -> KernelPath:
    if os.environ.get(DISABLE_ENV):
        return KernelPath(None, f"{DISABLE_ENV} is set")
    choice = cpu_isa.choose()
    if choice.level is None:
        return KernelPath(None, choice.reason)
    if _compiler() is None:
        return KernelPath(None, "no C++ compiler found")
    return KernelPath(choice.level.name, choice.reason)


@cache
def _library(name: str) -> ctypes.CDLL | None:
    level, compiler = cpu_isa.level(name), _compiler()
    if compiler is None:
        return None
    target = cache_dir() / "kernels" / _key(compiler, level) / "libtokenfab_cpu.so"
    try:
        if not target.exists():
            log.info("building the CPU kernels for %s (once per ISA level and compiler)", name)
            started = time.monotonic()
            _compile(compiler, level, target)
            log.info("CPU kernels for %s built in %.0f s", name, time.monotonic() - started)
        return _declare(ctypes.CDLL(str(target)))
    except (OSError, RuntimeError) as exc:
        warnings.warn(f"tokenfab CPU kernels ({name}) failed to build ({exc}); using torch paths", stacklevel=2)
        return None


def kernel_path() -> KernelPath:
    """The level the kernels run at now (after use_level) and why; level None where the torch paths run."""
    if _forced:
        return KernelPath(_forced[-1], "use_level")
    path = _default_path()
    if path.level is None:
        return path
    lib = _library(path.level)
    if lib is None:
        return KernelPath(None, f"the {path.level} build failed (see the warning)")
    if path.level in cpu_isa.TILE_LEVELS and not lib.tf_amx_tiles():
        refused = "the OS refused AMX tile state, so bf16 and W8A8 run the AVX-512 kernels"
        return KernelPath(path.level, f"{path.reason}; {refused}")
    return path


def load_library() -> ctypes.CDLL | None:
    """The kernel library of the current level, or None where none can run here (the reason: kernel_path())."""
    if _forced:
        return _library(_forced[-1])
    path = _default_path()
    if path.level is None:
        _warn_once(path.reason)
        return None
    return _library(path.level)


def library() -> ctypes.CDLL:
    """The kernel library, for callers that checked `available()` first; RuntimeError (with the reason) if none."""
    lib = load_library()
    if lib is None:
        raise RuntimeError(f"tokenfab's CPU kernels cannot run here: {kernel_path().reason}")
    return lib


@cache
def _warn_once(reason: str) -> None:
    warnings.warn(f"tokenfab CPU kernels unavailable ({reason}); using torch paths", stacklevel=3)


@contextmanager
def use_level(name: str) -> Iterator[ctypes.CDLL]:
    """Run the kernels at `name` (which this CPU must support) inside the block. Kernels already bound to weights
    (BoundLinear, decode steps) keep the level they were bound at."""
    level = cpu_isa.level(name)
    if level not in cpu_isa.supported():
        raise ValueError(f"this CPU does not run the {name} level")
    lib = _library(name)
    if lib is None:
        raise RuntimeError(f"the {name} kernels could not be built")
    _forced.append(name)
    try:
        yield lib
    finally:
        _forced.pop()


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    shape = [i64, i64, i64, i32]
    signatures = {
        "tf_linear_bf16": [p, p, p, *shape],
        "tf_linear_bf16_act": [p, p, p, *shape],
        "tf_linear_i8": [p, p, p, p, *shape],
        "tf_linear_fp8": [p, p, p, p, *shape],
        "tf_linear_lut4": [p, p, p, i64, p, p, f32, p, *shape],
        "tf_linear_lut4_q8": [p, p, p, i64, i32, p, p, f32, p, *shape],
        "tf_linear_i8_q8": [p, p, p, p, *shape],
        "tf_rmsnorm": [p, p, p, i64, i64, f32, i32],
        "tf_add_rmsnorm": [p, p, p, p, p, i64, i64, f32, i32],
        "tf_argmax_rows": [p, i64, i64, p],
        "tf_gated_act": [p, p, i64, i64, i32, i32],
        "tf_gated_mlp_bf16": [p, p, p, p, i64, i64, i64, i64, i32, i32, i32],
        "tf_qk_norm_rope": [p, i64, i64, i64, i64, i64, p, p, f32, p, p, i32],
        "tf_paged_decode_attention": [p, p, p, p, i64, p, p, i64, i64, i64, i64, i64, f32, p, i32],
        "tf_paged_prefill_attention": [p, p, p, p, i64, p, p, i64, i64, i64, i64, i64, f32, p, i32],
        "tf_decode_attention_step": [
            p,
            i64,
            i64,
            i64,
            i64,
            i64,
            p,
            p,
            f32,
            p,
            p,
            p,
            p,
            p,
            p,
            i64,
            p,
            p,
            i64,
            f32,
            p,
            i32,
        ],
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
    lib.tf_amx_tiles.argtypes = []
    lib.tf_amx_tiles.restype = i32
    lib.tf_bf16_activations.argtypes = []
    lib.tf_bf16_activations.restype = i32
    return lib
