"""``scripts/bench_generate.py`` dry run: every model arm and context is measured and the JSON is written."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_generate.py"


def test_generate_benchmark_dry_run(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_generate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "generate.json"
    report = module.main(["--dry-run", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["dry_run"] and {"device", "versions", "machine", "config", "models"} <= report.keys()
    rows = {(r["model"], r["context"]): r for r in report["results"]}
    assert set(rows) == {(m, c) for m in ("hybrid", "full_attention", "linear_only") for c in (32, 96)}
    assert {r["prefill"] for r in rows.values()} == {"real", "synthetic"}
    assert all(r["decode_tokens_per_s"] > 0 for r in rows.values())
    # The synthetic fill reaches the cache: attention layers hold the longer context, linear ones the same state.
    linear_sizes = [rows[("linear_only", c)]["cache_numel_per_layer"] for c in (32, 96)]
    assert linear_sizes[0] == linear_sizes[1]
    full_sizes = [sum(rows[("full_attention", c)]["cache_numel_per_layer"]) for c in (32, 96)]
    assert full_sizes[1] > full_sizes[0]
