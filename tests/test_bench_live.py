"""`tokenfab bench` end to end against a live tokenfab server (tiny model): a small sweep writes JSON, Markdown
and plots with real numbers; unreachable servers, servers that refuse and workloads that don't fit are reported
clearly; an interrupted sweep keeps its finished points."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from live_server import LiveServer


@pytest.fixture(scope="module")
def model_path(tiny_model):
    return tiny_model("llama")


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokenfab.cli", "bench", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_sweep_against_a_live_server(model_path, tmp_path):
    server = LiveServer(model_path, "--max-num-seqs", "8")
    try:
        proc = bench("sweep", "--url", server.url, "--system", "tokenfab", "--model", str(model_path),
                     "--workload", "random", "--isl", "24", "--osl", "8", "--concurrency", "1,4",
                     "--num-requests", "8", "--out", str(tmp_path))
        assert proc.returncode == 0, proc.stderr
        doc = json.loads((tmp_path / "sweep.json").read_text())
        assert doc["schema_version"] == 1 and doc["workload"] == {"name": "random", "isl": 24, "osl": 8}
        (entry,) = doc["systems"]
        assert entry["status"] == "ok" and [p["concurrency"] for p in entry["points"]] == [1, 4]
        for point in entry["points"]:
            s = point["summary"]
            assert s["completed"] == 8 and s["failed"] == {}
            assert 6 * 8 <= s["output_tokens"] <= 8 * 8  # osl uniform in [0.8, 1] x 8
            assert s["ttft_s"]["p50"] > 0 and s["output_tok_s"] > 0
            assert s["server_usd"] > 0 and s["energy_source"] == "modelled"
            assert s["usd_per_mtok_output"] == pytest.approx(
                doc["price_per_hour"] * 1e6 / (s["output_tok_s"] * 3600), rel=1e-6)
            assert point["server_counters"]["tokenfab:cost_usd_total"] > 0
        md = (tmp_path / "report.md").read_text()
        assert "tokenfab" in md and "random" in md
        for png in ("throughput_vs_interactivity.png", "cost_vs_interactivity.png"):
            assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        assert server.stop() == 0


def test_unreachable_url_is_a_clear_error(tmp_path):
    proc = bench("serve", "--url", "http://127.0.0.1:9", "--concurrency", "1", "--out", str(tmp_path / "x.json"),
                 "--workload", "random", "--isl", "8", "--osl", "4", "--model", "/nonexistent")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "not found" in proc.stderr or "cannot reach" in proc.stderr


def test_errors_and_context_limits_are_reported(model_path, tmp_path):
    server = LiveServer(model_path, "--max-num-seqs", "1", "--max-queued-requests", "0")
    try:
        # Six requests at once against room for one: one is served, the others are refused (no retries).
        proc = bench("serve", "--url", server.url, "--model", str(model_path), "--concurrency", "6",
                     "--num-requests", "6", "--warmup", "0", "--isl", "16", "--osl", "64",
                     "--out", str(tmp_path / "busy.json"))
        assert proc.returncode == 0, proc.stderr
        s = json.loads((tmp_path / "busy.json").read_text())["systems"][0]["points"][0]["summary"]
        assert s["failed"].get("http_429", 0) >= 3 and s["completed"] >= 1 and s["sent"] == 6
        too_long = bench("serve", "--url", server.url, "--model", str(model_path), "--concurrency", "1",
                         "--isl", "2000", "--osl", "8", "--out", str(tmp_path / "long.json"))
        assert too_long.returncode != 0 and "context" in too_long.stderr and "Traceback" not in too_long.stderr
        unreachable = bench("serve", "--url", "http://127.0.0.1:9", "--model", str(model_path), "--concurrency",
                            "1", "--isl", "8", "--osl", "4", "--out", str(tmp_path / "none.json"))
        assert unreachable.returncode != 0 and "cannot reach" in unreachable.stderr
    finally:
        assert server.stop() == 0


def test_interrupted_sweep_keeps_finished_points(model_path, tmp_path):
    server = LiveServer(model_path)
    try:
        out = tmp_path / "sweep"
        proc = subprocess.Popen([sys.executable, "-m", "tokenfab.cli", "bench", "sweep", "--url", server.url,
                                 "--model", str(model_path), "--isl", "16", "--osl", "200", "--concurrency",
                                 "1,1,1,1,1,1,1,1", "--num-requests", "3", "--out", str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (out / "sweep.json").exists():
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        doc = json.loads((out / "sweep.json").read_text())
        points = doc["systems"][0]["points"]
        assert 1 <= len(points) < 8 and points[0]["summary"]["completed"] == 3
    finally:
        server.stop()


def test_agentic_sessions_reuse_their_prefixes_and_open_loop_runs(model_path, tmp_path):
    server = LiveServer(model_path, "--max-num-seqs", "8")
    try:
        proc = bench("serve", "--url", server.url, "--model", str(model_path), "--workload", "agentic",
                     "--sessions", "4", "--turns", "3", "--prefix-len", "48", "--isl", "12", "--osl", "6",
                     "--think-time", "0", "--concurrency", "2", "--warmup", "0",
                     "--out", str(tmp_path / "agentic.json"))
        assert proc.returncode == 0, proc.stderr
        s = json.loads((tmp_path / "agentic.json").read_text())["systems"][0]["points"][0]["summary"]
        assert s["sent"] == 4 * 3 and s["completed"] == 12  # max(4, 2 x 2) sessions x 3 turns
        assert s["prefix_cache_hit_rate"] > 0.3  # later turns find the conversation so far cached
        proc = bench("serve", "--url", server.url, "--model", str(model_path), "--rate", "40", "--num-requests",
                     "10", "--warmup", "0", "--isl", "16", "--osl", "4", "--out", str(tmp_path / "open.json"))
        assert proc.returncode == 0, proc.stderr
        doc = json.loads((tmp_path / "open.json").read_text())
        point = doc["systems"][0]["points"][0]
        assert point["rate"] == 40 and point["concurrency"] is None and point["summary"]["completed"] == 10
    finally:
        assert server.stop() == 0


def test_simulate_validate_measures_and_simulates_each_configuration(model_path, tmp_path):
    from tokenfab.config import EngineConfig
    from tokenfab.sim.profile import profile
    from tokenfab.sim.validate import validate

    config = EngineConfig(model=str(model_path), max_num_seqs=8, kv_cache_memory_gb=0.05)
    profile(config, grid=[(24, 1), (24, 4), (64, 2), (16, 8)], max_tokens=8).save(tmp_path / "prof")
    doc = validate(tmp_path / "prof", tmp_path / "v", model=str(model_path),
                   configs={"random 24/8, c=2": ["--workload", "random", "--isl", "24", "--osl", "8",
                                                 "--concurrency", "2", "--num-requests", "8"]})  # fmt: skip
    (row,) = doc["rows"]
    for metric in ("output tok/s", "TTFT p50", "TPOT p50"):
        assert row[metric]["measured"] > 0 and row[metric]["simulated"] > 0
    # The server runs the profiled engine's limits, as the simulator does.
    flags = doc["serve_flags"]
    assert flags[flags.index("--max-num-seqs") + 1] == "8" and "--threads" in flags
    md = (tmp_path / "v.md").read_text()
    assert "| random 24/8, c=2 |" in md and "tokenfab simulate --validate" in md
