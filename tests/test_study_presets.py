"""The presets of the DigitScenes v3 study (results/digits_v3/PLAN.md): each variant differs
from BRPG at the same split only where the plan says, and "plain prototypes" is one
prototype per class, the mean of its memory.

Machine: exact, fp32-tolerance. Exact for the config checks; fp32-tolerance for the
prototype-equals-mean check (a k-means centre against torch's mean, rel 1e-5).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from brpg.config import load_config
from brpg.method.clustering import cluster_prototypes
from brpg.method.memory import PrototypeMemory

SPLITS = ("1_16", "1_8", "1_4")
# variant -> the keys (besides `name`) where it differs from digits_brpg_<split>
EXPECTED_DIFF = {
    "meanteacher": {"train.brpg": False},
    "plainproto": {
        "proto.memory": "random",
        "proto.num_high": 1,
        "proto.num_low": 0,
        "proto.apo": False,
    },  # fmt: skip
    "brpg_nocpg": {"proto.memory": "random"},
    "brpg_noapo": {"proto.apo": False},
}


def _flat(cfg) -> dict:
    out = {}
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                out[f"{section.name}.{f.name}"] = getattr(value, f.name)
        else:
            out[section.name] = value
    return out


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("variant", sorted(EXPECTED_DIFF))
def test_a_study_variant_differs_from_brpg_only_where_the_plan_says(variant, split):
    brpg = _flat(load_config(f"digits_brpg_{split}"))
    other = _flat(load_config(f"digits_{variant}_{split}"))
    diff = {k: v for k, v in other.items() if brpg[k] != v and k != "name"}
    assert diff == EXPECTED_DIFF[variant]
    assert other["name"] == f"digits_{variant}_{split}"
    assert other["data.labeled_split"] == f"splits/{split}/labeled.txt"
    assert other["train.amp"] == "off"


@pytest.mark.parametrize("split", SPLITS)
def test_suponly_at_a_study_split_uses_the_same_labels_and_loss(split):
    sup = load_config(f"digits_suponly_{split}")
    brpg = load_config(f"digits_brpg_{split}")
    assert sup.data.labeled_split == brpg.data.labeled_split
    assert (sup.loss, sup.optim, sup.train.steps) == (brpg.loss, brpg.optim, brpg.train.steps)
    assert sup.train.framework == "suponly" and sup.train.amp == "off"


def test_plain_prototypes_are_the_class_means_of_one_memory():
    """k-means with k = 1 on each class's memory rows is the mean of those rows: one valid
    prototype per class that has rows, none for a class without."""
    cfg = load_config("digits_plainproto_1_8")
    c, d = 4, 8
    memory = PrototypeMemory(c, d, capacity=50, kinds=("all",), sync=False)
    g = torch.Generator().manual_seed(0)
    rows = {0: 30, 1: 7, 3: 50}  # class 2 has no row
    for cls, n in rows.items():
        feats = torch.randn(n, d, generator=g) + 3 * cls
        memory.push("all", feats, torch.full((n,), cls))
    protos, valid = cluster_prototypes(memory, cfg, seed=0)
    assert protos.shape == (c, 1, d)
    assert valid[:, 0].tolist() == [True, True, False, True]
    feats, fvalid = memory.get("all")
    for cls in rows:
        want = feats[cls][fvalid[cls]].mean(0)
        torch.testing.assert_close(protos[cls, 0], want, rtol=1e-5, atol=1e-5)
