"""Launchers run each peer in its best configuration for the CPU: vLLM's dtype and llama.cpp's build."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenfab.bench import launch
from tokenfab.platform import cpu_isa

ZEN3 = frozenset({"avx2", "fma", "f16c"})
ZEN4 = ZEN3 | {"avx512f", "avx512_vnni", "avx512_bf16"}
AMX_VM = ZEN4 | {"amx_tile", "amx_bf16"}


def _spec(system: str, peers: Path) -> launch.ServerSpec:
    return launch.server_spec(system, 8000, peers, threads=2, max_seqs=4, max_model_len=2048)


@pytest.mark.parametrize("flags,dtype", [(ZEN3, "float32"), (ZEN4, "bfloat16"), (AMX_VM, "bfloat16")])
def test_vllm_runs_bf16_where_the_cpu_computes_it(monkeypatch, tmp_path, flags, dtype) -> None:
    monkeypatch.setattr(cpu_isa, "cpu_flags", lambda: flags)
    cmd = _spec("vllm", tmp_path).cmd
    assert cmd[cmd.index("--dtype") + 1] == dtype


def test_llama_cpp_takes_the_build_without_amx_on_an_amx_cpu_where_it_exists(monkeypatch, tmp_path) -> None:
    native = tmp_path / "llamacpp" / "build" / "bin" / "llama-server"
    noamx = tmp_path / "llamacpp" / "build-noamx" / "bin" / "llama-server"
    monkeypatch.setattr(cpu_isa, "cpu_flags", lambda: AMX_VM)
    assert _spec("llama.cpp", tmp_path).cmd[0] == str(native)  # no such build: the native one (reported missing)
    noamx.parent.mkdir(parents=True)
    noamx.touch()
    assert _spec("llama.cpp", tmp_path).cmd[0] == str(noamx)
    monkeypatch.setattr(cpu_isa, "cpu_flags", lambda: ZEN4)
    assert _spec("llama.cpp", tmp_path).cmd[0] == str(native)


def test_a_tokenfab_variant_serves_its_weight_format(tmp_path) -> None:
    plain, int8 = _spec("tokenfab", tmp_path), _spec("tokenfab-int8", tmp_path)
    assert "--quantization" not in plain.cmd
    assert int8.cmd[int8.cmd.index("--quantization") + 1] == "int8"
    assert [a for a in int8.cmd if a not in ("--quantization", "int8")] == plain.cmd
