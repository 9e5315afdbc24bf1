"""brpg.book.demo.run_state: a committed BRPG run re-run to its clustering step or later.

Machine: exact, same-machine. A tiny BRPG run (one thread) plays the committed run; its replay
in the same process must log the same numbers (gap 0), hold the memories the run clustered (the
clustering of the replay's memories gives the committed run's logged prototype counts), and be
reused on a second call. Step arithmetic and the log comparison's errors are exact.
"""

import dataclasses
import json

import pytest
import torch
from test_semi import STEPS, tiny

from brpg.book import demo, demo_proto
from brpg.config import load_config
from brpg.engine.trainer import Trainer
from brpg.method.clustering import cluster_prototypes

# test_semi's tiny BRPG run (warm-up 0-2, semi 3, sampling 4-6, clustering before 7, proto
# 7-11), evaluated at step 5 (before the clustering) and with no periodic checkpoint, so that
# the one at the clustering step is the replay's own
REPLAY_SETS = ("train.eval_every=5", "train.ckpt_every=0", "train.amp=off")


@pytest.fixture(scope="module")
def committed(tmp_path_factory):
    """A finished tiny BRPG run standing in for a committed study run."""
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("replay")
    cfg = load_config("digits_suponly_1_16", tiny(root / "digits", extra=REPLAY_SETS))
    run_dir = root / "committed" / "seed0"
    Trainer(cfg, run_dir, progress=False).fit()
    yield run_dir
    torch.set_num_threads(threads)  # the trainer set train.threads for the whole process


def test_clustering_step_is_the_end_of_the_sampling_window():
    cfg = load_config("digits_brpg_1_16", ["proto.sample_start_step=500", "proto.sample_steps=100"])
    assert demo.clustering_step(cfg) == 600
    with pytest.raises(ValueError, match="not a BRPG run"):
        demo.clustering_step(load_config("digits_meanteacher_1_16"))


def test_replay_follows_the_committed_run_and_holds_its_memories(committed, tmp_path):
    run = demo.clustering_state(committed, run_root=tmp_path, replay=True)
    assert run.step == 7 and run.summary["steps"] == STEPS
    assert run.log_gap and set(run.log_gap) >= {"loss_sup", "loss_unsup", "val_miou"}
    assert all(v == 0.0 for v in run.log_gap.values()), run.log_gap  # same process, same numbers
    assert demo.last_eval(run)["step"] == 5  # the evaluation before the clustering
    assert not run.model.training and all(p.device.type == "cpu" for p in run.model.parameters())
    # the replay's memories are the ones the committed run clustered: the same clustering
    # (seed train.seed + step) gives the prototype counts the committed run logged
    protos, valid = cluster_prototypes(run.memory, run.cfg, seed=run.cfg.train.seed + run.step)
    logged = [
        json.loads(line)
        for line in (committed / "log.jsonl").read_text().splitlines()
        if "prototypes_per_class" in line
    ]
    assert len(logged) == 1 and logged[0]["step"] == 7
    assert valid.sum(1).tolist() == logged[0]["prototypes_per_class"]
    assert sum(int(run.memory.count[k].sum()) for k in run.memory.kinds) > 0
    # the book's bank of a replay is the run's own: its memories, its clustering seed
    bank = demo_proto.build_bank(run)
    assert torch.equal(bank.valid, valid) and torch.equal(bank.prototypes, protos)
    # a second call loads the checkpoint at step 7 instead of training again
    ckpt = run.run_dir / "last.pt"
    mtime = ckpt.stat().st_mtime
    again = demo.clustering_state(committed, run_root=tmp_path, replay=True)
    assert ckpt.stat().st_mtime == mtime and again.step == 7
    a, b = run.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    assert all(torch.equal(run.memory.feats(k), again.memory.feats(k)) for k in run.memory.kinds)


def test_the_saved_state_is_the_replay_exactly_and_is_read_by_default(committed, tmp_path):
    """save_run_state packs the filled slots of every ring; clustering_state() then
    reads that file (no training) and gives the replay's weights, rings (layout included:
    k-means++ seeding depends on the row order) and clustering. A packing that dropped or
    reordered rows, or a loader that ignored ptr / count, fails it."""
    run = demo.clustering_state(committed, run_root=tmp_path, replay=True)
    path = demo.save_run_state(run, committed)
    try:
        assert path == committed / demo.state_file(7)
        loaded = demo.clustering_state(committed, run_root=tmp_path / "unused")
        assert not (tmp_path / "unused").exists()  # read, not trained
        assert loaded.step == run.step and loaded.log_gap == run.log_gap
        assert loaded.run_dir == committed and demo.last_eval(loaded)["step"] == 5
        _assert_same_weights(run.model, loaded.model)
        _assert_same_weights(run.teacher, loaded.teacher)
        assert run.bank is None and loaded.bank is None  # not clustered yet
        for k in run.memory.kinds:
            assert torch.equal(run.memory.count[k], loaded.memory.count[k])
            assert torch.equal(run.memory.ptr[k], loaded.memory.ptr[k])
            assert torch.equal(run.memory.get(k)[0], loaded.memory.get(k)[0])
        seed = run.cfg.train.seed + run.step
        pa, va = cluster_prototypes(run.memory, run.cfg, seed=seed)
        pb, vb = cluster_prototypes(loaded.memory, loaded.cfg, seed=seed)
        assert torch.equal(pa, pb) and torch.equal(va, vb)
        # a state written for another config is refused, not silently used
        state = torch.load(path, weights_only=True)
        torch.save({**state, "config_hash": "other"}, path)
        with pytest.raises(ValueError, match="another config"):
            demo.clustering_state(committed, run_root=tmp_path)
        run.log_gap["loss_sup"] = 0.1  # a drifted replay is not written
        with pytest.raises(ValueError, match="differs from the committed log"):
            demo.save_run_state(run, committed)
    finally:
        path.unlink(missing_ok=True)  # the other tests replay the run


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(v, sb[k]) for k, v in sa.items())


def test_a_state_after_the_clustering_holds_the_bank_the_run_fed(committed, tmp_path):
    """run_state at step 9 (two prototype steps after the clustering before step 7): the
    replay goes on from the step-7 replay and ends exactly where a replay from step 0 ends
    (weights, teacher, bank), follows the committed log, and its bank has the clustering's
    valid slots with prototypes the EMA moved. Saved and read back, it is the same. A replay
    that restarted the schedule, or a state that dropped the teacher or the bank, fails it."""
    at7 = demo.clustering_state(committed, run_root=tmp_path / "chained", replay=True)
    at9 = demo.run_state(committed, 9, run_root=tmp_path / "chained", replay=True)
    # it went on from the step-7 replay: its log starts with that one, wall times included
    assert at9.run_dir.name == at7.run_dir.name[: -len("7")] + "9"
    log7 = (at7.run_dir / "log.jsonl").read_text()
    assert (at9.run_dir / "log.jsonl").read_text().startswith(log7)
    straight = demo.run_state(committed, 9, run_root=tmp_path / "straight", replay=True)
    assert at9.step == 9 and at9.memory is None and at7.bank is None
    assert all(v == 0.0 for v in at9.log_gap.values()), at9.log_gap
    for a, b in ((at9.model, straight.model), (at9.teacher, straight.teacher)):
        _assert_same_weights(a, b)
    assert torch.equal(at9.bank.prototypes, straight.bank.prototypes)
    clustered = demo_proto.build_bank(at7)
    assert torch.equal(at9.bank.valid, clustered.valid)
    moved = (at9.bank.prototypes != clustered.prototypes).any(dim=2)
    assert bool(moved[at9.bank.valid].any()) and not bool(moved[~at9.bank.valid].any())
    teacher_p = dict(at9.teacher.named_parameters())
    assert any(not torch.equal(p, teacher_p[n]) for n, p in at9.model.named_parameters())
    path = demo.save_run_state(at9, committed)
    try:
        loaded = demo.run_state(committed, 9, run_root=tmp_path / "unused")
        assert not (tmp_path / "unused").exists()
        _assert_same_weights(at9.model, loaded.model)
        _assert_same_weights(at9.teacher, loaded.teacher)
        assert torch.equal(loaded.bank.prototypes, at9.bank.prototypes)
        assert torch.equal(loaded.bank.valid, at9.bank.valid) and loaded.memory is None
        t = demo.feature_batch(loaded, "unlabeled", 2, teacher=True)
        s = demo.feature_batch(loaded, "unlabeled", 2)
        assert not torch.equal(t["rep_bdhw"], s["rep_bdhw"])  # the teacher, not the student
        with pytest.raises(ValueError, match="unknown parts"):
            demo.save_run_state(at9, committed, keep=("optimizer",))
        demo.save_run_state(at9, committed, keep=())
        alone = demo.run_state(committed, 9, run_root=tmp_path / "unused")
        _assert_same_weights(at9.model, alone.model)
        assert alone.teacher is None and alone.bank is None and alone.memory is None
        with pytest.raises(ValueError, match="teacher=True needs a run with a teacher"):
            demo.feature_batch(alone, "unlabeled", 2, teacher=True)
    finally:
        path.unlink()
    with pytest.raises(ValueError, match="between the clustering step"):
        demo.run_state(committed, 5, run_root=tmp_path)


def test_log_gap_measures_and_refuses_other_runs(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"loss_sup": 1.0, "step": 1, "wall_s": 3}\n{"step": 2, "val_miou": 40.0}\n')
    b.write_text('{"loss_sup": 1.25, "step": 1, "wall_s": 9}\n{"step": 2, "val_miou": 39.5}\n')
    assert demo.log_gap(a, b, until=2) == {"loss_sup": 0.25, "val_miou": 0.5}
    assert demo.log_gap(a, b, until=1) == {"loss_sup": 0.25}  # later steps left out
    b.write_text('{"loss_sup": 1.0, "step": 1}\n')
    with pytest.raises(ValueError, match="logged different things"):
        demo.log_gap(a, b, until=2)


def test_a_missing_committed_run_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no committed run"):
        demo.clustering_state(tmp_path / "nowhere", run_root=tmp_path)


def test_head_alone_training_leaves_its_inputs_and_the_global_rng_alone(committed, tmp_path):
    """Chapter 7's experiment (brpg.book.demo_proto.train_head) on the tiny run's state at
    its clustering: it trains a copy of the head and of the bank (the inputs stay as they
    are, so every seed's check in the chapter starts from the clustered bank), records the
    curve at the steps asked for, gives the same numbers twice, and leaves torch's global
    RNG and thread count as they were."""
    run = demo.clustering_state(committed, run_root=tmp_path, replay=True)
    inputs = demo_proto.head_inputs(run, n_unlabeled=4, n_val=4)
    bank_before = inputs.bank.prototypes.clone()
    head_before = [p.clone() for p in run.model.decoder.rep_head.parameters()]
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    a = demo_proto.train_head(run, inputs, n_steps=4, every=2, batch=2)
    assert torch.equal(torch.get_rng_state(), rng) and torch.get_num_threads() == threads
    assert torch.equal(inputs.bank.prototypes, bank_before)
    assert all(
        torch.equal(p, q)
        for p, q in zip(run.model.decoder.rep_head.parameters(), head_before, strict=True)
    )
    assert [s for s, _ in a.curve] == [0, 2, 4] and a.losses.shape == (4, 2)
    assert any(not torch.equal(p, q) for p, q in zip(a.head.parameters(), head_before, strict=True))
    assert not torch.equal(a.bank.prototypes, bank_before)  # the EMA moved the copy
    b = demo_proto.train_head(run, inputs, n_steps=4, every=2, batch=2)
    assert torch.equal(a.losses, b.losses)
    assert [acc.pixel for _, acc in a.curve] == [acc.pixel for _, acc in b.curve]


def test_chapter6_tracking_on_the_tiny_run(committed, tmp_path):
    """brpg.book.demo_ema.track on the tiny run's states at its clustering (7) and at 9:
    both banks start from the run's clustering, exactly the slots that received a feature
    moved, the history has one entry per ``every`` updates plus the start, every claim is
    measured (a bool each), and the accuracy claims follow mean class accuracy on a
    hand-made case where pixel accuracy says the opposite."""
    from brpg.book import demo_ema

    at7 = demo.clustering_state(committed, run_root=tmp_path, replay=True)
    at9 = demo.run_state(committed, 9, run_root=tmp_path, replay=True)
    with pytest.raises(ValueError, match="needs a state at the clustering step"):
        demo_ema.track(at9, at7)
    tr = demo_ema.track(at7, at9, n_updates=4, every=2, n_val=2)
    clustered = demo_proto.build_bank(at7)
    assert torch.equal(tr.stale.prototypes, clustered.prototypes)
    moved = (tr.tracked.prototypes != tr.stale.prototypes).any(dim=2)
    assert torch.equal(moved, (tr.hits > 0) & tr.stale.valid)
    assert tr.history.shape == (3, *tr.stale.valid.shape) and tr.run is at9.bank
    assert set(tr.acc) == {
        f"{b} {f}" for b in ("stale", "control", "tracked", "run") for f in ("early", "late")
    }
    measured = demo_ema.claims(tr)
    assert len(measured) == 9 and all(isinstance(v, bool) for v in measured.values())

    # the accuracy claims read mean class accuracy, not pixel accuracy (seed 2's stale bank
    # called nearly every late pixel background): 9 background pixels and one digit
    targets = torch.tensor([0] * 9 + [1])
    all_background = demo_proto.accuracies(torch.zeros(10), targets, 2)  # pixel .9, class .5
    half = demo_proto.accuracies(torch.tensor([0] * 5 + [1] * 5), targets, 2)  # .6, (5/9 + 1)/2
    perfect = demo_proto.accuracies(targets, targets, 2)
    stale_worse = "the stale bank classifies the late features worse than the early ones"
    tracked_better = "the tracked bank classifies the late features better than the stale one"
    acc = {**tr.acc, "stale early": half, "stale late": all_background, "tracked late": half}
    m = demo_ema.claims(dataclasses.replace(tr, acc=acc))
    assert m[stale_worse] and m[tracked_better]  # both False in pixel accuracy
    acc = {**tr.acc, "stale early": half, "stale late": perfect, "tracked late": half}
    m = demo_ema.claims(dataclasses.replace(tr, acc=acc))
    assert not m[stale_worse] and not m[tracked_better]

    # the fit claim compares banks on the late features: seed 3's measured fits (early, late),
    # where the tracked bank itself still fits the early features a little better, hold it
    fits = "the tracked bank fits the late features best, stale and control the early ones"
    seed3 = {"stale": (0.964, -0.036), "control": (0.972, -0.059), "tracked": (0.659, 0.607)}
    fit = {
        **tr.fit,
        **{(b, f): v[i] for b, v in seed3.items() for i, f in enumerate(("early", "late"))},
    }
    assert demo_ema.claims(dataclasses.replace(tr, fit=fit))[fits]
    # a control bank that follows the late features as well as the tracked one breaks it, and
    # so does a stale bank that fits the late features better than the early ones
    control_follows = {**fit, ("control", "late"): 0.70}
    assert not demo_ema.claims(dataclasses.replace(tr, fit=control_follows))[fits]
    stale_late = {**fit, ("stale", "early"): 0.3, ("stale", "late"): 0.5}  # below tracked
    assert not demo_ema.claims(dataclasses.replace(tr, fit=stale_late))[fits]


def test_the_save_run_states_tool_writes_every_step_asked_for(committed, tmp_path):
    """tools/save_run_states.py on the tiny run: one file per step, each read back as that
    step's state (a later step from the earlier replay), the replays under --run-root."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "save_run_states.py"
    spec = importlib.util.spec_from_file_location("save_run_states", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    written = [committed / demo.state_file(s) for s in (7, 9)]
    try:
        assert tool.main([str(committed), "--steps", "9", "7", "--run-root", str(tmp_path)]) == 0
        assert all(p.exists() for p in written)
        at7 = demo.run_state(committed, 7, run_root=tmp_path / "unused")
        at9 = demo.run_state(committed, 9, run_root=tmp_path / "unused")
        assert at7.memory is not None and at7.bank is None and at9.bank is not None
        assert not (tmp_path / "unused").exists() and len(list(tmp_path.glob("replay_*"))) == 2
    finally:
        for p in written:
            p.unlink(missing_ok=True)


def test_every_seed_walks_the_committed_seeds_with_the_states_a_claim_reads(committed, tmp_path):
    """EverySeed over a preset folder of copies of the tiny run: numeric seed order (seed2
    before seed10), unfinished runs and seeds without states left out of the walk and named by
    the report, a state saved without a part the claim reads skipped, a seed whose body
    failed not counted as checked, a state whose replay drifted refused."""
    import shutil

    preset = tmp_path / "preset"
    seed0 = preset / "seed0"
    shutil.copytree(committed, seed0)
    for step in (7, 9):
        demo.save_run_state(demo.run_state(seed0, step, run_root=tmp_path, replay=True), seed0)
    shutil.copytree(seed0, preset / "seed10")
    shutil.copytree(seed0, preset / "seed2")
    for step in (7, 9):  # seed2: the student alone
        state = demo.run_state(preset / "seed2", step)
        demo.save_run_state(state, preset / "seed2", keep=())
    shutil.copytree(committed, preset / "seed1")  # finished, no states saved
    shutil.copytree(seed0, preset / "seed3")
    (preset / "seed3" / "summary.json").unlink()  # unfinished: not a committed seed

    walk = demo.EverySeed(preset, {7: ()})
    assert walk.committed == ["seed0", "seed1", "seed2", "seed10"]
    seen = [(name, [s.step for s in states]) for name, states in walk]
    assert seen == [("seed0", [7]), ("seed2", [7]), ("seed10", [7])]
    assert walk.checked == ["seed0", "seed2", "seed10"] and walk.unchecked == ["seed1"]
    assert walk.report() == ("checked on 3 of 4 committed seeds; without saved states yet: seed1")

    walk = demo.EverySeed(preset, {7: ("memory",), 9: ("bank",)})
    names = []
    for name, (early, late) in walk:
        assert early.memory is not None and late.bank is not None and late.step == 9
        names.append(name)
    assert names == ["seed0", "seed10"] and walk.unchecked == ["seed1", "seed2"]

    walk = demo.EverySeed(preset, {7: ()})
    with pytest.raises(AssertionError):
        for name, _ in walk:
            assert name != "seed2"  # a claim that fails on seed2
    assert walk.checked == ["seed0"]

    drifted = torch.load(seed0 / demo.state_file(7), weights_only=True)
    drifted["log_gap"] = {**drifted["log_gap"], "loss_sup": 1e-6}
    torch.save(drifted, preset / "seed10" / demo.state_file(7))
    with pytest.raises(ValueError, match="seed10.*differs from the committed log"):
        list(demo.EverySeed(preset, {7: ()}))
    with pytest.raises(ValueError, match="unknown"):
        demo.EverySeed(preset, {7: ("teachr",)})
