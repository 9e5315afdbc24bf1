"""Committed-results helpers: loading, mean ± std, the Markdown table."""

import json
import math

import pytest

from brpg.results import format_table, load_runs, mean_std, summarise


def _write(dest, config, seed, miou):
    d = dest / config / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"val_miou": miou, "steps": 10, "wall_s": 2.0}))
    (d / "provenance.json").write_text(json.dumps({"command": "brpg train", "commit": "abc"}))


def test_summarise_mean_and_sample_std(tmp_path):
    for seed, v in enumerate([70.0, 72.0, 74.0]):
        _write(tmp_path, "full", seed, v)
    _write(tmp_path, "low", 0, 30.0)
    rows = {r["config"]: r for r in summarise(tmp_path)}
    assert rows["full"]["miou_mean"] == pytest.approx(72.0)
    assert rows["full"]["miou_std"] == pytest.approx(2.0)  # sample std of 70, 72, 74
    assert rows["low"]["miou_std"] == 0.0 and rows["low"]["seeds"] == 1
    runs = load_runs(tmp_path)
    assert runs["full"][0]["provenance"]["commit"] == "abc"
    table = format_table(list(rows.values()))
    assert "| full | 3 | 72.0 ± 2.0 | 70.0, 72.0, 74.0 | 10 | 2 |" in table


def test_mean_std_edge_cases():
    assert mean_std([5.0]) == (5.0, 0.0)
    m, s = mean_std([1.0, 3.0])
    assert m == 2.0 and math.isclose(s, math.sqrt(2.0))
    with pytest.raises(ValueError):
        mean_std([])
