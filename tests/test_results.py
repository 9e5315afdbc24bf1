"""Committed-results helpers: loading, mean ± std, the Markdown table.

Machine: exact. Arithmetic on given numbers, the tables, and the seeds command's bookkeeping (the
numbers of its two-step runs are not checked).
"""

import json
import math
from pathlib import Path

import pytest

from brpg import cli
from brpg.book import results
from brpg.book.results import format_table, load_runs, mean_std, summarise
from brpg.reproduce import report


def _write(dest, config, seed, miou, mbiou=None):
    d = dest / config / f"seed{seed}"
    d.mkdir(parents=True)
    summary = {"val_miou": miou, "steps": 10, "wall_s": 2.0}
    if mbiou is not None:
        summary["val_mbiou"] = mbiou
    (d / "summary.json").write_text(json.dumps(summary))
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
    assert "| full | 3 | 72.0 ± 2.0 | 70.0, 72.0, 74.0 | — | 10 | 2 |" in table


def test_table_with_and_without_mbiou(tmp_path, capsys):
    for seed, (v, b) in enumerate([(70.0, 40.0), (72.0, 44.0), (74.0, 48.0)]):
        _write(tmp_path, "new", seed, v, b)
    _write(tmp_path, "old", 0, 30.0)  # a summary from before Boundary IoU: no key
    _write(tmp_path, "mixed", 0, 50.0, 20.0)
    _write(tmp_path, "mixed", 1, 52.0)
    rows = {r["config"]: r for r in summarise(tmp_path)}
    assert rows["new"]["mbiou_mean"] == pytest.approx(44.0)
    assert rows["new"]["mbiou_std"] == pytest.approx(4.0)
    assert rows["old"]["mbiou_mean"] is None and rows["old"]["mbiou_seeds"] == 0
    table = format_table(list(rows.values()))
    assert "| new | 3 | 72.0 ± 2.0 | 70.0, 72.0, 74.0 | 44.0 ± 4.0 | 10 | 2 |" in table
    assert "| old | 1 | 30.0 (one seed) | 30.0 | — | 10 | 2 |" in table
    assert "| mixed | 2 | 51.0 ± 1.4 | 50.0, 52.0 | 20.0 (1 of 2 seeds) | 10 | 2 |" in table
    assert cli.main(["results", "--root", str(tmp_path)]) == 0  # the CLI path
    out = capsys.readouterr().out
    assert "| new | 3 | 72.0 ± 2.0 |" in out and "val mBIoU (%)" in out
    assert not list(tmp_path.glob("results_*"))  # a seed study is not a paper-cell report


def test_results_command_names_a_missing_folder(tmp_path, capsys):
    assert cli.main(["results", "--root", str(tmp_path / "nowhere")]) == 1
    assert "nowhere: no such folder" in capsys.readouterr().err


def test_seeds_command_trains_each_seed_once_and_keeps_provenance(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the runs' work folders go to ./runs/results
    sets = [
        f"data.root={tmp_path / 'digits'}",
        "data.digits_train=32",
        "data.digits_val=8",
        "model.width=8",
        "model.decoder_channels=16",
        "model.rep_dim=16",
        "train.batch_size=2",
        "train.steps=2",
        "train.threads=1",
        "train.tensorboard=never",
        "optim.warmup_steps=1",
        "eval.batch_size=8",
    ]
    argv = ["seeds", "--configs", "digits_suponly_1_16", "--seeds", "0", "1"]
    argv += ["--dest", "dest", *[a for s in sets for a in ("--set", s)]]
    assert cli.main(argv) == 0
    runs = load_runs(tmp_path / "dest")["digits_suponly_1_16"]
    assert sorted(r["config"]["train"]["seed"] for r in runs) == [0, 1]
    for seed in (0, 1):
        folder = tmp_path / "dest" / "digits_suponly_1_16" / f"seed{seed}"
        assert {"summary.json", "log.jsonl", "config.yaml", "provenance.json"} <= {
            f.name for f in folder.iterdir()
        }
        prov = json.loads((folder / "provenance.json").read_text())
        assert f"--set train.seed={seed}" in prov["command"]
    capsys.readouterr()
    assert cli.main(argv) == 0  # repeated: both runs are found done, nothing retrains
    assert capsys.readouterr().out.count("skip ") == 2


def test_committed_digits_results_predate_mbiou_and_still_table():
    rows = summarise(Path(__file__).resolve().parents[1] / "results" / "digits")
    assert rows
    table = format_table(rows)
    assert table.count("\n") == len(rows) + 1
    for r in rows:
        line = next(ln for ln in table.splitlines() if ln.startswith(f"| {r['config']} |"))
        assert (r["mbiou_mean"] is None) == ("| — |" in line), line


def _cell_summary(miou, mbiou=None):
    s = {"profile": "full", "table": "voc_classic", "method": "brpg", "cell": "92",
         "val_miou": miou, "steps": 5, "wall_s": 36.0, "eval_protocol": "full"}  # fmt: skip
    if mbiou is not None:
        s["val_mbiou"] = mbiou
    return s


def test_report_mbiou_column_with_and_without_the_key():
    col = report.COLUMNS.index("ours mBIoU")
    old = report.rows([_cell_summary(60.0)], "full")
    assert old[0]["mbiou"] is None
    line = [ln for ln in report.to_markdown(old, "full").splitlines() if "| voc_classic" in ln]
    assert line[0].strip("| ").split(" | ")[col] == "—"
    new = report.rows([_cell_summary(60.0, 30.0), _cell_summary(62.0, 34.0)], "full")
    assert new[0]["mbiou"] == pytest.approx(32.0)
    md = report.to_markdown(new, "full")
    line = [ln for ln in md.splitlines() if "| voc_classic" in ln]
    assert line[0].strip("| ").split(" | ")[col] == "32.00 ± 2.83"
    assert "<td>32.00 ± 2.83</td>" in report.to_html(new, "full")


def test_mean_std_edge_cases():
    assert mean_std([5.0]) == (5.0, 0.0)
    m, s = mean_std([1.0, 3.0])
    assert m == 2.0 and math.isclose(s, math.sqrt(2.0))
    with pytest.raises(ValueError):
        mean_std([])


def _run(dest, config, seed, miou):
    d = dest / config / f"seed{seed}"
    d.mkdir(parents=True)
    summary = {"val_miou": miou, "steps": 10, "wall_s": 2.0, "config": {"train": {"seed": seed}}}
    (d / "summary.json").write_text(json.dumps(summary))


def test_calibration_checks_pair_seeds_and_grade(tmp_path):
    # seed 2 of the mean teacher is missing: the 1/16 difference uses seeds 0 and 1 only
    for seed, (full, low, mt) in enumerate(
        [(72.0, 50.0, 54.0), (71.0, 55.0, 57.5), (69.0, 50.0, None)]
    ):
        _run(tmp_path, "digits_suponly_full", seed, full)
        _run(tmp_path, "digits_suponly_1_16", seed, low)
        if mt is not None:
            _run(tmp_path, "digits_meanteacher_1_16", seed, mt)
    got = {c["check"]: c for c in results.calibration_checks(tmp_path)}
    full = got["SupOnly full >= 70 % mIoU"]
    assert full["values"] == {0: 72.0, 1: 71.0, 2: 69.0} and full["status"] == "missed"
    gap = got["SupOnly full - SupOnly 1/16 >= 15 points"]
    assert gap["values"] == {0: 22.0, 1: 16.0, 2: 19.0} and gap["status"] == "met"
    mt = got["mean teacher - SupOnly, 1/16 >= 3 points"]
    assert mt["values"] == {0: 4.0, 1: 2.5} and mt["status"] == "missed"  # seed 1: 2.5 < 3
    assert got["SupOnly full - SupOnly 1/8 >= 15 points"]["status"] == "no runs"
    _run(tmp_path, "digits_suponly_1_8", 0, 40.0)
    _run(tmp_path, "digits_meanteacher_1_8", 0, 45.0)
    mt8 = {c["check"]: c for c in results.calibration_checks(tmp_path)}
    assert mt8["mean teacher - SupOnly, 1/8 >= 3 points"]["status"] == "holds so far"
    table = results.format_calibration(list(mt8.values()))
    assert "| mean teacher - SupOnly, 1/8 >= 3 points | seed 0: 5.0 | holds so far |" in table
    assert (
        "| SupOnly full >= 70 % mIoU | seed 0: 72.0, seed 1: 71.0, seed 2: 69.0 | missed |" in table
    )


def test_calibration_checks_read_each_config_from_the_first_folder_that_has_it(tmp_path):
    """Chapter 1 reads the study's runs, then the calibration's for SupOnly full: a config in
    both folders comes from the first only (no seed merged in from the second)."""
    study, budget = tmp_path / "study", tmp_path / "budget"
    for seed in (0, 1, 2):
        _run(study, "digits_suponly_1_16", seed, 20.0 + seed)
        _run(study, "digits_meanteacher_1_16", seed, 30.0)
    _run(budget, "digits_suponly_1_16", 3, 99.0)  # not read: the study has this config
    _run(budget, "digits_suponly_full", 0, 71.0)
    got = {c["check"]: c for c in results.calibration_checks([study, budget])}
    assert got["SupOnly full >= 70 % mIoU"]["values"] == {0: 71.0}
    assert got["SupOnly full - SupOnly 1/16 >= 15 points"]["values"] == {0: 51.0}
    mt = got["mean teacher - SupOnly, 1/16 >= 3 points"]
    assert mt["values"] == {0: 10.0, 1: 9.0, 2: 8.0} and mt["status"] == "met"
    assert got["mean teacher - SupOnly, 1/8 >= 3 points"]["status"] == "no runs"


def test_run_evidence_counts_classes_by_prototype_kind(tmp_path):
    """The evidence table says how many classes got high, low and both kinds of prototype; a
    log without the split (no BRPG, or an older run) shows a dash."""
    (tmp_path / "run").mkdir()
    summary = {"steps": 8, "config": {"train": {"steps": 8}}, "val_miou": 0.5}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    log = [
        {"step": 1, "loss_sup": 1.0},
        {"step": 5, "event": "prototypes_per_class", "prototypes_per_class": [5, 3, 0, 2]},
        {"step": 5, "event": "prototypes_high_low", "prototypes_high_low": [[3, 2], [3, 0], [0, 0], [0, 2]]},
    ]  # fmt: skip
    (tmp_path / "run" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    rows = dict(report.run_evidence(tmp_path))
    assert rows["prototypes formed"] == "10 in 3 classes"
    assert rows["classes with high / low / both kinds of prototype"] == "2 / 2 / 1"
    (tmp_path / "run" / "log.jsonl").write_text(json.dumps(log[0]) + "\n")
    rows = dict(report.run_evidence(tmp_path))
    assert rows["prototypes formed"] == "— (no BRPG)"
    assert rows["classes with high / low / both kinds of prototype"] == "—"
