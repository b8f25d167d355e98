"""TrainConfig validation, the lr schedule vs hand-computed values, weight-decay groups."""

import dataclasses
import json
import math
import re

import pytest
import torch

from autoglm.training import TrainConfig, build_optimizer, build_scheduler, lr_lambda, param_groups
from training_helpers import make_model


def test_config_roundtrips_through_json():
    cfg = TrainConfig(batch_size=4, betas=(0.8, 0.99), max_seconds=12.5)
    back = TrainConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert back == cfg and back.betas == (0.8, 0.99)


@pytest.mark.parametrize("kwargs,needle", [
    ({"warmup_steps": 200, "max_steps": 100}, "warmup_steps (200) must be <= max_steps (100)"),
    ({"precision": "fp8"}, "precision must be one of"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"min_lr_ratio": 1.5}, "min_lr_ratio"),
    ({"max_seconds": 0}, "max_seconds"),
    ({"betas": (0.9, 1.0)}, "betas"),
])
def test_config_rejects_bad_values_with_clear_message(kwargs, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        TrainConfig(**kwargs)


def test_from_dict_names_unknown_fields():
    with pytest.raises(ValueError, match="bogus"):
        TrainConfig.from_dict({"bogus": 1})


def test_lr_schedule_matches_hand_computation():
    cfg = TrainConfig(warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_lambda(0, cfg) == 0.0  # warmup starts at 0
    assert lr_lambda(5, cfg) == pytest.approx(0.5)
    assert lr_lambda(10, cfg) == pytest.approx(1.0)  # warmup end = peak
    # cosine midpoint: 0.1 + 0.9 * 0.5 * (1 + cos(pi/2)) = 0.55
    assert lr_lambda(60, cfg) == pytest.approx(0.55)
    # quarter of the decay: 0.1 + 0.45 * (1 + cos(pi/4)) = 0.1 + 0.45 * 1.7071067811865475
    assert lr_lambda(35, cfg) == pytest.approx(0.868198051533946)
    assert lr_lambda(110, cfg) == pytest.approx(0.1)  # floor at max_steps
    assert lr_lambda(500, cfg) == pytest.approx(0.1)  # and stays there
    assert lr_lambda(0, TrainConfig(warmup_steps=0, max_steps=10)) == pytest.approx(1.0)


def test_scheduler_drives_optimizer_lr():
    cfg = TrainConfig(lr=2e-3, warmup_steps=4, max_steps=20, min_lr_ratio=0.2)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=cfg.lr)
    sched = build_scheduler(opt, cfg)
    seen = []
    for _ in range(25):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [2e-3 * (s / 4 if s < 4 else 0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * min(1, (s - 4) / 16))))
                for s in range(25)]
    assert seen == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_weight_decay_groups():
    model = make_model()
    named = dict(model.named_parameters())
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids_no = {id(p) for p in no_decay["params"]}
    no_names = {n for n, p in named.items() if id(p) in ids_no}
    # every norm gain is excluded from decay, and only 1-D tensors are
    assert {n for n in named if "norm" in n} <= no_names
    assert all(named[n].dim() == 1 for n in no_names)
    # matrices and the (tied) embedding are decayed; tied weights appear once overall
    ids_decay = {id(p) for p in decay["params"]}
    assert id(model.model.embed_tokens.weight) in ids_decay
    assert id(model.model.layers[0].self_attn.q_proj.weight) in ids_decay
    assert len(ids_decay) + len(ids_no) == len({id(p) for p in model.parameters()})


def test_frozen_parameters_are_left_out():
    model = make_model()
    model.model.embed_tokens.weight.requires_grad_(False)
    opt = build_optimizer(model, TrainConfig())
    assert all(p is not model.model.embed_tokens.weight for g in opt.param_groups for p in g["params"])
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, TrainConfig())
