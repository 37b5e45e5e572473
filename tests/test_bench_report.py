"""Sweep reports: exact Markdown cells, hand-computed Pareto frontiers, valid PNGs, merge and load rules."""

import copy
import json
import subprocess
import sys

import pytest

from tokenfab.bench import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _summary(itv, tput, cost, **kw):
    s = {
        "completed": 10, "failed": {}, "duration_s": 10.0,
        "input_tok_s": 8 * tput, "output_tok_s": tput, "total_tok_s": 9 * tput,
        "interactivity": itv,
        "ttft_s": {"mean": 0.2, "p50": 0.2, "p90": 0.3, "p99": 0.4},
        "tpot_s": {"mean": 0.03, "p50": 0.03, "p90": 0.04, "p99": 0.05},
        "itl_s": {"mean": 0.03, "p50": 0.03, "p90": 0.04, "p99": 0.05},
        "e2el_s": {"mean": 4.0, "p50": 4.0, "p90": 5.0, "p99": 6.0},
        "goodput_fraction": 1.0, "goodput_request_rate": 1.0,
        "usd_per_mtok_output": cost, "usd_per_mtok_total": None,
        "joules_per_token_output": 0.5, "energy_source": "modelled", "prefix_cache_hit_rate": None,
    }
    s.update(kw)
    return s


def _point(c, summary, rate=None):
    return {"concurrency": c, "rate": rate, "summary": summary}


def make_doc():
    # tokenfab: c=4 (20, 70) is beaten by c=2 (38.26, 75.04) on both axes; c=16 has no interactivity.
    tokenfab = [
        _point(1, _summary(40.0, 40.0, 0.625)),
        _point(2, _summary(
            38.26, 75.04, 1.234, completed=8, failed={"http_429": 1, "timeout": 0},
            ttft_s={"mean": 0.2, "p50": 0.1234, "p90": 0.3, "p99": 0.5},
            tpot_s={"mean": 0.03, "p50": 0.02614, "p90": 0.035, "p99": 0.0401},
            goodput_fraction=0.9, joules_per_token_output=0.7)),
        _point(4, _summary(20.0, 70.0, 0.01234)),
        _point(8, _summary(15.0, 110.0, 1234.7, energy_source="rapl")),
        _point(16, _summary(None, 120.0, None)),
    ]
    vllm = [_point(1, _summary(22.0, 22.0, 1.1)), _point(4, _summary(18.0, 60.0, 0.4))]
    return {
        "schema_version": 1, "kind": "tokenfab-bench-sweep", "created": "2026-11-22T23:00:00Z",
        "machine": {"cpu": "AMD EPYC 9R14", "cores": 2, "memory_gb": 24, "read_gb_s": 26.1, "fp32_gflops": 173.5},
        "workload": {"name": "random", "isl": 1024, "osl": 128, "num_prompts": 40},
        "slo": {"ttft_s": 2.0, "tpot_s": 0.1},
        "price_per_hour": 0.09,
        "systems": [
            {"system": "tokenfab", "version": "0.1.0", "model": "gemma-3-270m", "status": "ok", "points": tokenfab},
            {"system": "vllm", "version": "0.32", "model": "gemma-3-270m", "status": "ok", "points": vllm},
            {"system": "llama.cpp", "version": None, "model": "gemma-3-270m",
             "status": "missing: llama-server not built", "points": []},
        ],
    }


def _frontier_lines(md):
    section = md.split("## Pareto frontier", 1)[1]
    return [line for line in section.splitlines() if line.startswith("- ")]


def test_markdown_row_has_exact_formatted_numbers():
    md = report.markdown(make_doc())
    assert ("| tokenfab | c=2 | 8 / 1 (http_429 1) | 75.0 | 38.3 | 123.4 / 500.0 | 26.1 / 40.1 | 90% | 1.23 "
            "| 0.700 (modelled) |") in md.splitlines()
    # Three significant digits without exponents, at both ends of the cost range, and the energy source kept.
    assert "| tokenfab | c=4 | 10 / 0 | 70.0 | 20.0 | 200.0 / 400.0 | 30.0 / 50.0 | 100% | 0.0123 " in md
    assert "| 110.0 | 15.0 |" in md and "| 1,235 | 0.500 (rapl) |" in md
    # A point with no interactivity still gets its row, with dashes where values are missing.
    assert "| tokenfab | c=16 | 10 / 0 | 120.0 | — |" in md and "| 100% | — | 0.500 (modelled) |" in md


def test_markdown_has_one_row_per_point_and_header_facts():
    md = report.markdown(make_doc())
    rows = [line for line in md.splitlines() if line.startswith(("| tokenfab |", "| vllm |"))]
    assert len(rows) == 7
    assert not any(line.startswith("| llama.cpp |") for line in md.splitlines())
    header = md.split("| system |", 1)[0]
    assert "AMD EPYC 9R14, 2 cores, 24 GB, read 26.1 GB/s, fp32 173.5 GFLOP/s" in header
    assert "random (isl=1024, osl=128, num_prompts=40)" in header
    assert "TTFT ≤ 2 s, TPOT ≤ 100 ms" in header
    assert "$0.09 per device-hour" in header
    assert "2026-11-22T23:00:00Z" in header


def test_missing_system_is_listed_with_its_reason():
    md = report.markdown(make_doc())
    section = md.split("## Missing or failed", 1)[1].split("## Goodput", 1)[0]
    assert [line for line in section.splitlines() if line.startswith("- ")] == [
        "- **llama.cpp**: missing: llama-server not built"
    ]


def test_no_missing_section_when_all_systems_ran():
    doc = make_doc()
    doc["systems"] = doc["systems"][:2]
    assert "Missing or failed" not in report.markdown(doc)


def test_pareto_frontier_lines_match_hand_computation():
    # tokenfab: c=4 is dominated by c=2, c=16 has no tok/s/user; vllm: neither point beats the other.
    assert _frontier_lines(report.markdown(make_doc())) == [
        "- **tokenfab**: concurrency 1, 2, 8",
        "- **vllm**: concurrency 1, 4",
    ]


def test_throughput_is_per_device():
    doc = make_doc()
    doc["systems"][0]["devices"] = 2
    pts = report.plot_points(doc, doc["systems"][0])
    assert [p.throughput_per_device for p in pts] == [20.0, 37.52, 35.0, 55.0]
    assert [p.concurrency for p in report.frontier(pts)] == [8, 2, 1]
    doc["systems"][0].pop("devices")
    doc["machine"]["devices"] = 4
    assert [p.throughput_per_device for p in report.plot_points(doc, doc["systems"][0])] == [10.0, 18.76, 17.5, 27.5]


def test_rate_points_are_labelled_by_rate():
    doc = make_doc()
    doc["systems"] = [{"system": "tokenfab", "status": "ok", "points": [
        _point(None, _summary(30.0, 50.0, 1.0), rate=0.5),
        _point(64, _summary(25.0, 40.0, 1.0), rate=1.0),
    ]}]
    md = report.markdown(doc)
    assert "| tokenfab | 0.5 req/s |" in md and "| tokenfab | 1 req/s |" in md
    assert _frontier_lines(md) == ["- **tokenfab**: 0.5 req/s"]


@pytest.mark.parametrize("points, expected", [
    ([], []),
    ([(1.0, 1.0)], [0]),
    ([(40, 40), (38, 75), (20, 70), (15, 110)], [3, 1, 0]),
    ([(1, 5), (2, 4), (3, 3), (2, 2)], [0, 1, 2]),
    ([(1, 1), (2, 2), (3, 3)], [2]),
    ([(2, 5), (2, 3)], [0]),   # same x: the lower y is dominated
    ([(1, 4), (3, 4)], [1]),   # same y: the lower x is dominated
])
def test_pareto_front_used_by_the_report(points, expected):
    assert report.pareto_front(points) == expected


def test_wants_log_y_only_beyond_ten_x():
    assert report.wants_log_y([0.01, 1.0])
    assert not report.wants_log_y([1.0, 10.0])
    assert not report.wants_log_y([0.0, 5.0])
    assert not report.wants_log_y([])


def _assert_png(path, shape):
    from matplotlib.image import imread

    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC
    assert imread(path).shape == shape


def test_write_report_writes_markdown_pngs_and_json(tmp_path):
    doc = make_doc()
    paths = report.write_report(doc, tmp_path / "out")
    assert set(paths) == {"report", "sweep", "throughput_plot", "cost_plot"}
    assert paths["throughput_plot"].name == "throughput_vs_interactivity.png"
    assert paths["cost_plot"].name == "cost_vs_interactivity.png"
    for key in ("throughput_plot", "cost_plot"):
        assert paths[key].parent == tmp_path / "out"
        _assert_png(paths[key], (550, 800, 4))
    md = paths["report"].read_text()
    assert md.startswith(report.markdown(doc))
    assert "](throughput_vs_interactivity.png)" in md and "](cost_vs_interactivity.png)" in md
    assert json.loads(paths["sweep"].read_text()) == doc


def test_plots_differ_by_system_data(tmp_path):
    doc = make_doc()
    first = report.plots(doc, tmp_path / "a")
    doc["systems"][1]["points"][1]["summary"]["output_tok_s"] = 500.0
    second = report.plots(doc, tmp_path / "b")
    assert first[0].read_bytes() != second[0].read_bytes()
    assert first[1].read_bytes() == second[1].read_bytes()


def test_plots_survive_points_without_interactivity_or_cost(tmp_path):
    doc = make_doc()
    for system in doc["systems"]:
        for p in system["points"]:
            p["summary"]["interactivity"] = None
    paths = report.plots(doc, tmp_path)
    assert [p.name for p in paths] == ["throughput_vs_interactivity.png", "cost_vs_interactivity.png"]
    for p in paths:
        _assert_png(p, (550, 800, 4))


def test_plot_points_skip_null_interactivity():
    doc = make_doc()
    assert [p.label for p in report.plot_points(doc, doc["systems"][0])] == ["c=1", "c=2", "c=4", "c=8"]
    assert report.plot_points(doc, doc["systems"][2]) == []


def test_import_has_no_matplotlib_side_effect():
    code = "import sys, tokenfab.bench.report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _run(created, systems):
    doc = make_doc()
    doc["created"] = created
    doc["systems"] = systems
    return doc


def test_merge_concatenates_and_later_system_wins():
    base = make_doc()
    tf_old, vllm, llama = base["systems"]
    tf_new = copy.deepcopy(tf_old)
    tf_new["version"] = "0.2.0"
    tf_new["points"] = tf_new["points"][:1]
    runs = [_run("t1", [tf_old, vllm]), _run("t2", [tf_new, llama])]
    before = copy.deepcopy(runs)
    merged = report.merge(runs)
    assert [s["system"] for s in merged["systems"]] == ["tokenfab", "vllm", "llama.cpp"]
    assert merged["systems"][0]["version"] == "0.2.0" and len(merged["systems"][0]["points"]) == 1
    assert merged["created"] == "t2"
    assert runs == before
    merged["systems"][1]["points"].clear()
    assert runs[0]["systems"][1]["points"]


def test_merge_of_one_is_an_independent_copy():
    doc = make_doc()
    merged = report.merge([doc])
    assert merged == doc and merged is not doc and merged["systems"] is not doc["systems"]


@pytest.mark.parametrize("key, value", [
    ("workload", {"name": "random", "isl": 8192, "osl": 128, "num_prompts": 40}),
    ("slo", {"ttft_s": 1.0, "tpot_s": 0.1}),
    ("price_per_hour", 0.5),
])
def test_merge_refuses_incomparable_runs(key, value):
    other = make_doc()
    other[key] = value
    with pytest.raises(ValueError, match=key):
        report.merge([make_doc(), other])


def test_merge_refuses_nothing():
    with pytest.raises(ValueError, match="at least one"):
        report.merge([])


def test_load_runs_reads_sweeps(tmp_path):
    paths = []
    for i in range(2):
        doc = make_doc()
        doc["created"] = f"t{i}"
        paths.append(tmp_path / f"s{i}.json")
        paths[-1].write_text(json.dumps(doc))
    docs = report.load_runs(paths)
    assert [d["created"] for d in docs] == ["t0", "t1"]
    assert docs[0]["systems"] == make_doc()["systems"]


@pytest.mark.parametrize("content, message", [
    (lambda d: {**d, "kind": "something-else"}, "kind is 'something-else'"),
    (lambda d: {k: v for k, v in d.items() if k != "kind"}, "kind is None"),
    (lambda d: {**d, "schema_version": 2}, "schema_version 2"),
    (lambda d: {k: v for k, v in d.items() if k != "schema_version"}, "schema_version None"),
    (lambda d: [d], "kind is 'list'"),
])
def test_load_runs_rejects_unknown_documents(tmp_path, content, message):
    good = tmp_path / "good.json"
    good.write_text(json.dumps(make_doc()))
    bad = tmp_path / "bad-sweep.json"
    bad.write_text(json.dumps(content(make_doc())))
    with pytest.raises(ValueError, match=message) as err:
        report.load_runs([good, bad])
    assert "bad-sweep.json" in str(err.value)


def test_load_runs_rejects_invalid_json(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        report.load_runs([bad])


def test_goodput_section_names_the_best_point_within_slo():
    doc = {"schema_version": 1, "kind": "tokenfab-bench-sweep", "workload": {"name": "random"},
           "slo": {"ttft_s": 2.0, "tpot_s": 0.1}, "price_per_hour": 0.09, "machine": {},
           "systems": [{"system": "a", "status": "ok", "points": [
               {"concurrency": 1, "summary": {"goodput_fraction": 1.0, "request_rate": 0.5, "output_tok_s": 10.0}},
               {"concurrency": 4, "summary": {"goodput_fraction": 0.9, "request_rate": 1.25, "output_tok_s": 30.0}},
               {"concurrency": 8, "summary": {"goodput_fraction": 0.5, "request_rate": 2.0, "output_tok_s": 40.0}}]},
               {"system": "b", "status": "ok", "points": [
                   {"concurrency": 1, "summary": {"goodput_fraction": 0.2, "request_rate": 1.0}}]}]}
    md = report.markdown(doc)
    assert "- **a**: 1.25 req/s (c=4, 30.0 output tok/s)" in md
    assert "- **b**: no point met the SLO" in md
