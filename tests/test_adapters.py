"""Task adapters on the causal LM: registry, forward, save/load, errors, frozen-backbone training."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from autoglm import OpenAutoGLMConfig, OpenAutoGLMForCausalLM, SequenceClassificationAdapter


def make_model(seed: int = 0) -> OpenAutoGLMForCausalLM:
    torch.manual_seed(seed)
    return OpenAutoGLMForCausalLM(OpenAutoGLMConfig.from_name("tiny")).eval()


def right_padded(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    lengths = [20, 13, 7]
    x = torch.full((3, 20), 1)
    mask = torch.zeros(3, 20, dtype=torch.long)
    for i, n in enumerate(lengths):
        x[i, :n] = torch.randint(2, 512, (n,), generator=g)
        mask[i, :n] = 1
    return x, mask, lengths


def by_hand(model, head, x, mask, last):
    """Head applied to the final-normed hidden state of each row's last real token."""
    with torch.no_grad():
        out = model(x, attention_mask=mask, output_hidden_states=True)
        normed = model.model.norm(out.hidden_states[-1])  # hidden_states are before the final norm
        pooled = normed[torch.arange(x.shape[0]), torch.as_tensor(last)]
        return head.score(pooled), out


@pytest.mark.parametrize("padding", ["right", "left", "none"])
def test_adapter_output_is_head_on_last_real_token(padding):
    model = make_model()
    head = SequenceClassificationAdapter(model.config.hidden_size, num_labels=3)
    model.register_task_adapter("cls", head)
    assert model.list_task_adapters() == ["cls"]
    with torch.no_grad():
        assert model(torch.tensor([[5, 6, 7]])).adapter_output is None  # not active yet
    model.set_task_adapter("cls")
    x, mask, lengths = right_padded()
    if padding == "left":
        x = torch.stack([row.roll(20 - n) for row, n in zip(x, lengths)])
        mask = torch.stack([row.roll(20 - n) for row, n in zip(mask, lengths)])
        last = [19] * 3
    elif padding == "right":
        last = [n - 1 for n in lengths]
    else:
        mask, last = None, [19] * 3
    expected, out = by_hand(model, head, x, mask, last)
    assert out.adapter_output.shape == (3, 3)
    torch.testing.assert_close(out.adapter_output, expected, atol=1e-5, rtol=1e-5)
    # independent of the padding: row 2 alone gives the same prediction
    with torch.no_grad():
        alone = model(x[2:3][mask[2:3].bool()][None] if mask is not None else x[2:3]).adapter_output
    torch.testing.assert_close(alone[0], expected[2], atol=1e-4, rtol=1e-4)
    model.set_task_adapter(None)
    with torch.no_grad():
        assert model(x, attention_mask=mask).adapter_output is None


def test_save_load_adapter_round_trip(tmp_path):
    model = make_model()
    head = SequenceClassificationAdapter(model.config.hidden_size, num_labels=4, pooling="mean")
    with torch.no_grad():
        head.score.weight.normal_()
        head.score.bias.normal_()
    model.register_task_adapter("sent", head)
    model.set_task_adapter("sent")
    x, mask, _ = right_padded()
    with torch.no_grad():
        ref = model(x, attention_mask=mask).adapter_output
    path = model.save_task_adapter("sent", tmp_path / "sent")
    assert {p.name for p in path.iterdir()} == {"adapter_config.json", "adapter.safetensors"}

    fresh = make_model()  # same backbone weights, no adapters
    assert fresh.list_task_adapters() == []
    loaded = fresh.load_task_adapter("sent2", tmp_path / "sent")
    assert isinstance(loaded, SequenceClassificationAdapter) and loaded.pooling == "mean"
    assert fresh.active_task_adapter == "sent2"
    with torch.no_grad():
        got = fresh(x, attention_mask=mask).adapter_output
    torch.testing.assert_close(got, ref)


def test_adapters_not_in_backbone_checkpoint(tmp_path):
    model = make_model()
    model.register_task_adapter("cls", SequenceClassificationAdapter(model.config.hidden_size, 2))
    model.set_task_adapter("cls")
    assert not any(k.startswith("task_adapters.") for k in model.state_dict())
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("adapter" in k for k in keys), keys
    assert "adapter" not in (tmp_path / "config.json").read_text()
    reloaded = OpenAutoGLMForCausalLM.from_pretrained(tmp_path)
    assert reloaded.list_task_adapters() == [] and reloaded.active_task_adapter is None


def test_adapter_errors(tmp_path):
    model = make_model()
    d = model.config.hidden_size
    model.register_task_adapter("a", SequenceClassificationAdapter(d, 2))
    with pytest.raises(ValueError, match="already registered"):
        model.register_task_adapter("a", SequenceClassificationAdapter(d, 2))
    model.register_task_adapter("b", SequenceClassificationAdapter(d, 2))
    with pytest.raises(KeyError) as err:
        model.set_task_adapter("c")
    assert "'a'" in str(err.value) and "'b'" in str(err.value)
    with pytest.raises(ValueError, match="invalid"):
        model.register_task_adapter("bad name!", SequenceClassificationAdapter(d, 2))

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        model.load_task_adapter("x", empty)

    saved = model.save_task_adapter("a", tmp_path / "a")
    cfg = json.loads((saved / "adapter_config.json").read_text())
    cfg["type"] = "no-such-adapter"
    (saved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as err:
        model.load_task_adapter("x", saved)
    assert "no-such-adapter" in str(err.value) and "sequence-classification" in str(err.value)
    assert "x" not in model.list_task_adapters()


def test_train_adapter_with_frozen_backbone():
    model = make_model()
    for p in model.parameters():
        p.requires_grad_(False)
    backbone = {k: v.clone() for k, v in model.state_dict().items()}
    head = SequenceClassificationAdapter(model.config.hidden_size, num_labels=2)
    with torch.no_grad():  # start from chance: equal logits, argmax picks class 0
        head.score.weight.zero_()
        head.score.bias.zero_()
    model.register_task_adapter("cls", head)
    model.set_task_adapter("cls")
    model.train()

    # toy task: the label is which half of a token set the last token comes from
    g = torch.Generator().manual_seed(0)
    x = torch.randint(2, 512, (64, 12), generator=g)
    y = torch.arange(64) % 2
    x[:, -1] = torch.where(y == 1, 10 + torch.randint(0, 8, (64,), generator=g),
                           300 + torch.randint(0, 8, (64,), generator=g))

    def accuracy():
        with torch.no_grad():
            return float((model(x).adapter_output.argmax(-1) == y).float().mean())

    before = accuracy()
    assert before == 0.5
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(40):
        loss = F.cross_entropy(model(x).adapter_output, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = accuracy()
    assert after >= 0.95, after
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("task_adapters."))
    for k, v in model.state_dict().items():
        assert torch.equal(v, backbone[k]), k
