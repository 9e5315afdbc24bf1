"""brpg.book.demo: the warm model, its features and the CPG memories the method chapters use.

Machine: exact, same-machine, bound. The warm model of a 3-step run (one thread) is reused, and its
features, memory fills and class counts routed by hand from the same features are compared with a
second computation in the same process (same-machine). Run folder names, boundary distances,
budgets, shapes and the annotation modes are exact; that the memories receive rows is bound.
"""

import json

import pytest
import torch

from brpg.book import demo
from brpg.book.tools import show_source
from brpg.config import load_config

# A private, small DigitScenes (64 train scenes: 4 labeled at 1/16, 8 val) and a tiny run.
TINY = [
    "data.digits_train=64",
    "data.digits_val=8",
    "train.batch_size=4",
    "train.ckpt_every=0",
    "optim.warmup_steps=1",
    "train.threads=1",  # tiny tensors: one thread is fastest, and robust on a busy machine
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return root / "runs", [*TINY, f"data.root={root / 'digits'}"]


@pytest.fixture(scope="module")
def run(tiny):
    threads = torch.get_num_threads()
    run_root, overrides = tiny
    yield demo.warm_model(steps=3, run_root=run_root, overrides=overrides)
    torch.set_num_threads(threads)  # the trainer set train.threads for the whole process


def test_warm_model_trains_once_then_reuses(run, tiny):
    assert (run.run_dir / "summary.json").exists()
    assert run.summary["steps"] == 3
    assert run.cfg.model.rep_head and run.cfg.train.steps == 3
    assert not run.model.training
    assert all(p.device.type == "cpu" for p in run.model.parameters())
    mtime = (run.run_dir / "summary.json").stat().st_mtime
    again = demo.warm_model(steps=3, run_root=tiny[0], overrides=tiny[1])
    assert again.run_dir == run.run_dir
    assert (run.run_dir / "summary.json").stat().st_mtime == mtime  # not re-trained
    state, state_again = run.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(v, state_again[k]) for k, v in state.items())


def test_run_dir_name_and_resolution(tmp_path):
    assert demo.run_dir_for("p", 300, 1, tmp_path) == tmp_path / "p_s300_seed1"
    named = demo.run_dir_for("p", 300, 1, tmp_path, ["a=1"])
    assert named.parent == tmp_path and named.name.startswith("p_s300_seed1_")
    assert named != demo.run_dir_for("p", 300, 1, tmp_path, ["a=2"])
    assert demo.run_dir_for("p", 3, 0).is_absolute()  # relative roots: the checkout


def test_feature_batch_shapes_and_determinism(run):
    fb = demo.feature_batch(run, "val", n_images=3, start=2)
    b, c, h, w = fb["logits_bchw"].shape
    assert (b, c) == (3, 11) and fb["images_b3hw"].shape == (3, 3, 64, 64)
    assert fb["labels_bhw"].shape == (3, 64, 64)
    assert fb["labels_small_bhw"].shape == fb["conf_bhw"].shape == fb["pred_bhw"].shape == (3, h, w)
    assert fb["rep_bdhw"].shape == (3, run.cfg.model.rep_dim, h, w)
    assert torch.equal(fb["labels_small_bhw"], fb["labels_bhw"][:, :: 64 // h, :: 64 // w])
    assert torch.equal(fb["conf_bhw"], fb["logits_bchw"].softmax(1).amax(1))
    again = demo.feature_batch(run, "val", n_images=3, start=2)
    assert all(torch.equal(fb[k], again[k]) for k in fb)
    # train mode: dropout changes features, seeded; the model's BN statistics are untouched
    bn_before = {k: v.clone() for k, v in run.model.state_dict().items()}
    t1 = demo.feature_batch(run, "labeled", 4, train_mode=True, seed=1)
    t2 = demo.feature_batch(run, "labeled", 4, train_mode=True, seed=1)
    t3 = demo.feature_batch(run, "labeled", 4, train_mode=True, seed=2)
    assert torch.equal(t1["rep_bdhw"], t2["rep_bdhw"])
    assert not torch.equal(t1["rep_bdhw"], t3["rep_bdhw"])
    assert all(torch.equal(v, run.model.state_dict()[k]) for k, v in bn_before.items())
    assert not run.model.training
    # the unlabeled set keeps its masks (diagnostics), and indices wrap around
    n_lab = len(run.labeled)
    wrap = demo.feature_batch(run, "labeled", 2, start=n_lab - 1)
    first = demo.feature_batch(run, "labeled", 1, start=0)
    assert torch.equal(wrap["labels_bhw"][1], first["labels_bhw"][0])
    assert demo.feature_batch(run, "unlabeled", 1)["labels_bhw"].shape == (1, 64, 64)


def test_boundary_distance():
    lab = torch.zeros(1, 8, 8, dtype=torch.long)
    lab[0, :, 4:] = 3  # a vertical edge between columns 3 and 4
    d = demo.boundary_distance(lab)
    assert d.shape == (1, 8, 8)
    assert torch.equal(d[0, 0], torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0, 1.0, 2.0, 3.0]))
    band = torch.zeros(1, 8, 8, dtype=torch.long)
    band[0, :, 3] = 255  # an ignore band is a boundary, too
    assert torch.equal(demo.boundary_distance(band)[0, 0, :5], torch.tensor([3.0, 2, 1, 0, 1]))
    small = demo.boundary_distance(lab, size=4)
    assert torch.equal(small[0, 0], d[0, 0, ::2])
    assert torch.isnan(demo.boundary_distance(torch.zeros(1, 4, 4, dtype=torch.long))).all()


def test_fill_memories_routes_correct_pixels(run):
    mem = demo.fill_memories(run, n_batches=2, batch_size=4, capacity=500)
    assert mem.capacity == 500 and mem.dim == run.cfg.model.rep_dim
    total = int(mem.count["high"].sum() + mem.count["low"].sum())
    # each step keeps at most sample_pixel_num·2B high and sample_pixel_num·B low rows
    assert 0 < total <= 2 * (demo.DEMO_SAMPLE_PIXEL_NUM * 3 * 4)
    again = demo.fill_memories(run, n_batches=2, batch_size=4, capacity=500)
    for kind in ("high", "low"):
        assert torch.equal(mem.count[kind], again.count[kind])
        assert torch.equal(mem.get(kind)[0], again.get(kind)[0])
    # routing by hand on the first step's features gives the same class counts (budget large)
    fb = demo.feature_batch(run, "labeled", 4, start=0, train_mode=True, seed=0)
    correct = (fb["pred_bhw"] == fb["labels_small_bhw"]) & (fb["labels_small_bhw"] != 255)
    one = demo.fill_memories(run, 1, 4, capacity=5000, sample_pixel_num=10_000)
    hi = correct & (fb["conf_bhw"] >= 0.8)
    lo = correct & (fb["conf_bhw"] < 0.8)
    assert torch.equal(one.count["high"], torch.bincount(fb["labels_small_bhw"][hi], minlength=11))
    assert torch.equal(one.count["low"], torch.bincount(fb["labels_small_bhw"][lo], minlength=11))
    with_u = demo.fill_memories(run, 1, 4, capacity=5000, sample_pixel_num=10_000, unlabeled=True)
    assert int(with_u.count["high"].sum()) >= int(one.count["high"].sum())
    assert torch.equal(with_u.count["low"], one.count["low"])


def test_cluster_shapes(run):
    mem = demo.fill_memories(run, n_batches=1, batch_size=4, capacity=200)
    protos, valid = demo.cluster(mem, run.cfg, apo=False)
    assert protos.shape == (11, 4, run.cfg.model.rep_dim) and valid.shape == (11, 4)
    protos_apo, valid_apo = demo.cluster(mem, run.cfg, apo=True)
    assert protos_apo.shape[1] == 6 and valid_apo.shape == (11, 6)


def test_demo_budgets_match_the_digits_brpg_preset():
    p = load_config("digits_brpg_1_16").proto
    assert (demo.DEMO_SAMPLE_PIXEL_NUM, demo.DEMO_CAPACITY) == (p.sample_pixel_num, p.queue_len)


def test_show_source_renders_a_fenced_block():
    md = show_source(demo.boundary_distance)
    text = md.data
    assert text.startswith("```python\ndef boundary_distance(")
    assert text.rstrip().endswith("```")
    json.dumps(text)  # plain text


def test_appearance_modes_follow_the_annotations(run):
    n = len(run.labeled)
    modes = demo.appearance_modes(run, "labeled", n_images=n)
    labels = demo.feature_batch(run, "labeled", n_images=n)["labels_bhw"]
    assert modes.shape == labels.shape
    multimodal = (labels == 2) | (labels == 5) | (labels == 8)  # digits 1, 4, 7
    assert bool(multimodal.any())
    assert not bool(modes[~multimodal].any())  # only pixels of multi-modal digits get a mode
    assert bool((modes[multimodal] != 0).all())  # and each of them one (their boxes cover them)
    assert set(modes.unique().tolist()) <= {0, 1, 2, demo.MIXED_MODES}
