"""The BRPG plug-in: one code path for both frameworks, SemiMethod's delegating attributes.

Machine: exact, bound. Checkpoint keys, the order of the plug-in's calls and the loss scale are
exact; that the sampling steps of the tiny runs push rows and that prototypes form depends on
trained confidences (bound).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_semi import _run, tiny

from brpg.config import load_config
from brpg.frameworks.semi_method import SemiMethod
from brpg.method import plugin as plugin_module
from brpg.method.plugin import BRPGPlugin
from brpg.models import build_model

UM = ("train.framework=unimatch", "semi.eval_model=student", "semi.conf_thresh=0.1")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("digits")


def _method(data_root: Path, method: str, *extra: str) -> SemiMethod:
    cfg = load_config("digits_suponly_1_16", tiny(data_root, method, extra))
    model = build_model(cfg.model, cfg.data.num_classes)
    return SemiMethod(cfg, model, torch.device("cpu"))


def test_the_plugin_holds_brpg_state_and_checkpoint_keys_are_unchanged(data_root):
    m = _method(data_root, "brpg", "proto.threshold_type=csp")
    assert isinstance(m.plugin, BRPGPlugin) and m.plugin.csp is not None
    assert m.plugin.memory is None  # allocated at the sampling window's start
    assert list(m.state_dict()) == ["teacher", "memory", "back", "bank", "csp"]  # checkpoints
    assert "bank" not in m._modules and not hasattr(m, "memory")  # no forwarding attributes

    mt = _method(data_root, "meanteacher")
    assert mt.plugin is None
    assert list(mt.state_dict()) == ["teacher", "memory", "back", "bank", "csp"]
    assert all(mt.state_dict()[k] is None for k in ("memory", "back", "bank", "csp"))


def test_the_same_plugin_code_serves_both_frameworks(data_root, tmp_path, monkeypatch):
    """Mean teacher + BRPG and UniMatch + BRPG call the same ``BRPGPlugin.observe`` / ``loss``
    once per step after the warm-up, with the same effect per phase: rows pushed in the
    sampling window (4-6), ``L_pro`` from the clustering (7) on."""
    calls: list[tuple[str, int, bool]] = []
    real_observe, real_loss = BRPGPlugin.observe, BRPGPlugin.loss

    def observe(self, step, *a):
        before = (
            None if self.memory is None else sum(int(c.sum()) for c in self.memory.count.values())
        )
        real_observe(self, step, *a)
        after = (
            None if self.memory is None else sum(int(c.sum()) for c in self.memory.count.values())
        )
        calls.append(("observe", step, after is not None and after > before))

    def loss(self, step, *a):
        out = real_loss(self, step, *a)
        calls.append(("loss", step, out[0] is not None))
        return out

    monkeypatch.setattr(BRPGPlugin, "observe", observe)
    monkeypatch.setattr(BRPGPlugin, "loss", loss)
    seen = {}
    for name, extra in (("meanteacher", ()), ("unimatch", UM)):
        cfg = load_config("digits_suponly_1_16", tiny(data_root, "brpg", (*extra, "train.steps=9")))
        calls.clear()
        tr = _run(cfg, tmp_path / name)
        assert tr.method.plugin.bank.valid.any()
        seen[name] = list(calls)
    want = []
    for s in range(3, 9):
        want += [("observe", s, 4 <= s <= 6), ("loss", s, s >= 7)]
    assert seen["meanteacher"] == want
    assert seen["unimatch"] == want


@pytest.mark.parametrize("extra", [(), ("train.grad_accum=2",), ("train.batch_size=16",)])
def test_faithful_loss_scale_gives_the_official_quarter(data_root, monkeypatch, extra):
    """The official effective λ_pro is 1/4 (its loss / world_size on 4 GPUs, spec §12 Q3):
    ``faithful_loss_scale`` must give 1/4 whatever the process count and batch policy of this
    run, and a single process (``accumulate`` / ``batch`` policies) used to get 1."""
    m = _method(data_root, "brpg", *extra)
    plugin, p = m.plugin, m.cfg.proto
    monkeypatch.setattr(plugin_module, "prototype_loss", lambda *a, **k: torch.tensor(1.5))
    step = p.sample_start_step + p.sample_steps  # the first step of the proto phase
    torch.manual_seed(0)
    args = (
        torch.randn(2, 16, 8, 8),  # rep_l
        torch.randint(0, 11, (2, 32, 32)),  # labels_l
        torch.randn(2, 16, 8, 8),  # rep_u
        torch.rand(2, 32, 32),  # conf_u
        torch.randint(0, 11, (2, 32, 32)),  # pseudo_u
    )
    plain, logs, _ = plugin.loss(step, *args)
    assert plain == p.loss_weight * 3.0 and logs["loss_proto"] == 3.0
    p.faithful_loss_scale = True
    faithful, logs, _ = plugin.loss(step, *args)
    assert plugin_module.OFFICIAL_WORLD_SIZE == 4
    assert faithful == plain / 4 and logs["loss_proto"] == 3.0  # the logged L_pro is unscaled


def test_the_clustering_logs_high_and_low_prototypes_per_class(data_root):
    """``prototypes_high_low`` splits ``prototypes_per_class`` by memory kind, so a run can show
    that a class got both kinds and not only that some class got some prototype."""
    m = _method(data_root, "brpg")
    plugin, p = m.plugin, m.cfg.proto
    plugin.memory = plugin.new_memory()
    torch.manual_seed(0)
    rows = torch.randn(20, m.cfg.model.rep_dim)
    for kind, cls in (("high", 0), ("low", 0), ("high", 1), ("low", 2)):
        plugin.memory.push(kind, rows + cls, torch.full((20,), cls))
    logs = plugin.before_step(p.sample_start_step + p.sample_steps)  # the clustering step
    high_low, total = logs["prototypes_high_low"], logs["prototypes_per_class"]
    assert [h + lo for h, lo in high_low] == total
    (h0, l0), (h1, l1), (h2, l2) = high_low[:3]
    assert h0 >= p.num_high and l0 >= p.num_low  # class 0: both memories filled
    assert h1 >= p.num_high and l1 == 0  # class 1: high memory only
    assert h2 == 0 and l2 >= p.num_low  # class 2: low memory only
    assert all(h == lo == 0 for h, lo in high_low[3:])  # empty memories: no prototype
