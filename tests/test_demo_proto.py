"""brpg.book.demo_proto: the helpers of the prototype chapters (bank, pixel rows, accuracies).

Machine: exact, same-machine, fp32-tolerance. The bank of build_bank equals the memories clustered
directly, and a second build (same-machine); pixel rows, class means and accuracies are exact; the
rep head recomputed from its captured input is fp32-tolerance.
"""

import math

import pytest
import torch

from brpg.book import demo, demo_proto
from brpg.method.prototype_ema import PrototypeBank

# A private, small DigitScenes and a tiny run, as in tests/test_demo.py.
TINY = [
    "data.digits_train=64",
    "data.digits_val=8",
    "train.batch_size=4",
    "train.ckpt_every=0",
    "optim.warmup_steps=1",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("demo_proto")
    overrides = [*TINY, f"data.root={root / 'digits'}"]
    return demo.warm_model(steps=3, run_root=root / "runs", overrides=overrides)


def test_build_bank_matches_memories_and_cluster(run):
    bank = demo_proto.build_bank(run, n_batches=2, batch_size=4)
    memory = demo.fill_memories(run, 2, 4)
    protos, valid = demo.cluster(memory, run.cfg, apo=True)
    assert isinstance(bank, PrototypeBank)
    assert bank.shape == tuple(protos.shape)
    assert torch.equal(bank.prototypes, protos) and torch.equal(bank.valid, valid)
    assert bank.momentum == run.cfg.proto.ema_momentum
    again = demo_proto.build_bank(run, n_batches=2, batch_size=4)
    assert torch.equal(again.prototypes, bank.prototypes)  # deterministic


def test_pixel_rows_order_and_shape_check():
    rep = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    labels = torch.tensor([[[0, 1], [2, 255]], [[3, 4], [5, 6]]])
    feats, targets = demo_proto.pixel_rows(rep, labels)
    assert feats.shape == (8, 3) and targets.tolist() == [0, 1, 2, 255, 3, 4, 5, 6]
    assert torch.equal(feats[5], rep[1, :, 0, 1])  # (b, y, x) order
    with pytest.raises(ValueError):
        demo_proto.pixel_rows(rep, labels[:, :1])


def test_class_means_skip_ignore_and_empty_classes():
    feats = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0], [0.0, 4.0]])
    targets = torch.tensor([0, 0, 255, 2])
    means, counts = demo_proto.class_means(feats, targets, 3)
    assert counts.tolist() == [2, 0, 1]
    assert torch.equal(means, torch.tensor([[2.0, 1.0], [0.0, 0.0], [0.0, 4.0]]))


def test_accuracies_pixel_and_mean_class():
    targets = torch.tensor([0, 0, 0, 1, 255, 2])
    pred = torch.tensor([0, 0, 1, 1, 2, 0])
    acc = demo_proto.accuracies(pred, targets, 4)
    assert acc.pixel == pytest.approx(3 / 5)
    assert acc.per_class[:3].tolist() == pytest.approx([2 / 3, 1.0, 0.0])
    assert math.isnan(float(acc.per_class[3]))  # class 3 absent
    assert acc.mean_class == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)


def test_rep_head_inputs_recompute_rep(run):
    x, batch = demo_proto.rep_head_inputs(run, "val", n_images=3, start=1)
    assert x.shape[0] == 3 and x.shape[2:] == batch["rep_bdhw"].shape[2:]
    with torch.no_grad():
        rep = run.model.decoder.rep_head(x)
    torch.testing.assert_close(rep, batch["rep_bdhw"])
    assert not run.model.decoder.rep_head._forward_pre_hooks  # the hook is gone
