"""transformers integration: `OpenAutoGLMForCausalLM` as a `PreTrainedModel` + `GenerationMixin`.

After `import autoglm`, a saved directory loads with plain
`AutoModelForCausalLM.from_pretrained(path)`; weights are safetensors, `generate()` uses
the HF `Cache` API (a `DynamicCache` holding every layer's K/V), and projection names
follow HF conventions so PEFT can target `q_proj`, `v_proj`, `o_proj`, experts, ...

The task-adapter registry lives here too: `register_task_adapter(name, module)`,
`set_task_adapter(name)`, `save_task_adapter` / `load_task_adapter` (see `autoglm.adapters`); the names
keep clear of transformers' PEFT `load_adapter` / `set_adapter`, which this class does not shadow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from . import adapters as _adapters
from .config import OpenAutoGLMConfig
from .losses import lm_loss, moe_aux_loss
from .model import AutoGLMBackbone, build_metadata
from .modules import LearnedPositionEmbedding, RouterOutput
from .modules.position import LearnableRotary, RelativePositionBias

__all__ = ["OpenAutoGLMForCausalLM", "OpenAutoGLMPreTrainedModel", "AutoGLMCausalLMOutput"]


def _mask_2d(mask: torch.Tensor, length: int) -> torch.Tensor:
    """HF's 4D attention mask (B, 1, Tq, Tk), boolean (True: may attend) or additive (0: may
    attend), as the 2D key mask (B, length) this model reads: a key is real when the last
    query may attend to it (padding keys are hidden from every query; causality is the
    model's own)."""
    last = mask[:, 0, -1, :length]
    return last if last.dtype == torch.bool else last == 0


@dataclass
class AutoGLMCausalLMOutput(CausalLMOutputWithPast):
    aux_loss: torch.Tensor | None = None  # weighted MoE load-balancing + z-loss
    routing: list[RouterOutput] | None = None  # per MoE layer routing decisions
    adapter_output: object | None = None  # output of the active task adapter, if any


class OpenAutoGLMPreTrainedModel(PreTrainedModel):
    config_class = OpenAutoGLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, LearnedPositionEmbedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RelativePositionBias):
            nn.init.zeros_(module.weight)
        elif isinstance(module, LearnableRotary):
            module.inv_freq.copy_(module.initial_frequencies())
        elif isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)

    @property
    def is_gradient_checkpointing(self) -> bool:
        # PEFT still reads this alias, which transformers 5 deprecates with a FutureWarning on
        # every read (each `get_peft_model`, each merge): answer it without the warning
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, **kwargs) -> None:
        # HF's gradient_checkpointing_enable()/activation_checkpointing_enable() land here; the
        # backbone always uses torch.utils.checkpoint(use_reentrant=False) on every block
        self.model.gradient_checkpointing = enable


class OpenAutoGLMForCausalLM(OpenAutoGLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: OpenAutoGLMConfig) -> None:
        super().__init__(config)
        self.model = AutoGLMBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.task_adapters = nn.ModuleDict()
        self.active_task_adapter: str | None = None
        self.post_init()

    # ------------------------------------------------------------------ compute
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        use_cache: bool | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> AutoGLMCausalLMOutput:
        """labels: (B, T) next-token targets aligned with input_ids (HF convention: the
        model shifts them), -100 to ignore. Returns logits (B, T, V) and, with labels,
        loss = LM loss + MoE aux loss. `inputs_embeds` (B, T, d) may replace `input_ids`
        (exactly one of the two): embeddings the caller computed, e.g. a soft prompt."""
        inputs_embeds = kwargs.pop("inputs_embeds", None)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (batch, sequence) token ids or inputs_embeds (batch, "
                             f"sequence, {self.config.hidden_size}) embeddings, got "
                             f"{'both' if input_ids is not None else 'neither'}")
        d = self.config.hidden_size
        if inputs_embeds is not None and (inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != d):
            raise ValueError(f"inputs_embeds must be (batch, sequence, {d}), got "
                             f"{tuple(inputs_embeds.shape)}")
        shape_ids = input_ids if input_ids is not None else inputs_embeds[..., 0]  # (B, T): shape and device
        cache = kwargs.pop("past_key_values", cache)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        # a Python int: a static cache's length is a tensor that its update() then moves in place
        past_len = int(cache.get_seq_length()) if cache is not None else 0
        static_len = cache.get_max_length() if cache is not None and cache.is_compileable else -1
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = _mask_2d(attention_mask, past_len + shape_ids.shape[1])
        total = past_len + shape_ids.shape[1]
        if total > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {total} tokens is longer than the model supports "
                f"(max_position_embeddings={self.config.max_position_embeddings}); shorten the prompt, "
                f"lower max_new_tokens, or call model.extend_context({total}) to interpolate the "
                f"learned position table")
        pos, meta = build_metadata(shape_ids, attention_mask, past_len)
        if position_ids is not None and meta.contiguous:
            pos = position_ids
        if static_len > total and not meta.contiguous:  # a static cache returns all its slots: the rest is invalid
            pad = static_len - total
            meta.k_pos = nn.functional.pad(meta.k_pos, (0, pad), value=0)
            meta.k_valid = nn.functional.pad(meta.k_valid, (0, pad), value=False)
        out = self.model(input_ids, pos, meta, cache if use_cache is not False else None,
                         output_hidden_states=bool(output_hidden_states), inputs_embeds=inputs_embeds)
        hidden = out.last_hidden_state
        adapter_output = None
        if self.active_task_adapter is not None:
            adapter_output = self.task_adapters[self.active_task_adapter](hidden, attention_mask)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = aux = None
        if out.routing:
            aux = moe_aux_loss(out.routing, self.config.num_experts, self.config.router_aux_loss_coef,
                               self.config.router_z_loss_coef)
        if labels is not None:
            shifted = nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
            loss = lm_loss(logits, shifted) + (aux if aux is not None else 0.0)
        output = AutoGLMCausalLMOutput(loss=loss, logits=logits, cache=cache if use_cache is not False else None,
                                       hidden_states=out.hidden_states, aux_loss=aux, routing=out.routing,
                                       adapter_output=adapter_output)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        return output if return_dict else output.to_tuple()  # HF convention: the non-None fields in order

    def exit_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The shared final norm + LM head on an intermediate hidden state (an early exit):
        (..., d) -> (..., V). The last layer's output gives the ordinary logits."""
        return self.lm_head(self.model.norm(hidden))

    def extend_context(self, new_len: int) -> None:
        """Grow the context to `new_len` by interpolating the learned position table."""
        self.model.extend_context(new_len)

    def num_parameters_summary(self) -> dict[str, int]:
        """Total and active (per token) parameter counts; tied weights counted once."""
        total = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        inactive = 0
        for layer in self.model.layers:
            if layer.is_moe:
                per_expert = sum(p.numel() for p in layer.mlp.experts[0].parameters())
                inactive += per_expert * (layer.mlp.num_experts - layer.mlp.top_k)
        adapters = sum(p.numel() for p in self.task_adapters.parameters())
        return {"total": total - adapters, "active": total - adapters - inactive, "adapters": adapters}

    # ----------------------------------------------------------------- adapters
    def register_task_adapter(self, name: str, module: nn.Module) -> None:
        _adapters.check_name(name)
        if name in self.task_adapters:
            raise ValueError(f"adapter {name!r} is already registered; pick another name or remove it first")
        self.task_adapters[name] = module.to(self.device)

    def set_task_adapter(self, name: str | None) -> None:
        if name is not None and name not in self.task_adapters:
            raise KeyError(f"no adapter named {name!r}; registered: {sorted(self.task_adapters) or 'none'}")
        self.active_task_adapter = name

    def list_task_adapters(self) -> list[str]:
        return sorted(self.task_adapters)

    def save_task_adapter(self, name: str, directory: str | Path) -> Path:
        if name not in self.task_adapters:
            raise KeyError(f"no adapter named {name!r}; registered: {sorted(self.task_adapters) or 'none'}")
        return _adapters.save_adapter(self.task_adapters[name], directory)

    def load_task_adapter(self, name: str, directory: str | Path, activate: bool = True) -> nn.Module:
        module = _adapters.load_adapter(directory)
        self.register_task_adapter(name, module)
        if activate:
            self.set_task_adapter(name)
        return module

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # the backbone checkpoint never holds adapters: their keys are not "missing"
        res = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in res.missing_keys if not k.startswith("task_adapters.")]
        if strict and (missing or res.unexpected_keys):
            raise RuntimeError(f"error loading state_dict: missing keys {missing}, "
                               f"unexpected keys {res.unexpected_keys}")
        return res

    def state_dict(self, *args, **kwargs):
        # adapters are saved on their own (save_task_adapter), never inside the backbone checkpoint
        sd = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        return {k: v for k, v in sd.items() if not k.startswith(prefix + "task_adapters.")}


AutoConfig.register(OpenAutoGLMConfig.model_type, OpenAutoGLMConfig, exist_ok=True)
AutoModelForCausalLM.register(OpenAutoGLMConfig, OpenAutoGLMForCausalLM, exist_ok=True)
