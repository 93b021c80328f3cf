"""Model presets of the main job at GPT scale: GPT-2 124M/350M/774M and a 1.3B shape.

Each preset is a :class:`~pagedopt.train.model.ModelConfig` of the GPT-2 layout (learned
position embeddings, tied output head, biases, 4x MLP, the GPT-2 vocabulary of 50257 tokens
and 1024 positions), so its parameter count matches the published model's. The 1.3B shape is
GPT-3 XL's (d_model 2048, 24 layers). ``numel`` counts come from the same layout without
building the model (:func:`preset_numels`); :func:`build_on_meta` builds it on the meta device
(no memory) to check the count.

Example:
    >>> from pagedopt.train.presets import PRESETS, preset_numels
    >>> round(sum(preset_numels("gpt2-124m")) / 1e6)
    124
    >>> sorted(PRESETS)
    ['gpt-1.3b', 'gpt2-124m', 'gpt2-350m', 'gpt2-774m']
"""

from __future__ import annotations

from ..paging.estimate import gpt2_numels
from .model import ModelConfig

GPT2_VOCAB = 50257
GPT2_POSITIONS = 1024


def _gpt(d_model: int, layers: int, heads: int) -> ModelConfig:
    return ModelConfig(vocab_size=GPT2_VOCAB, d_model=d_model, layers=layers, heads=heads,
                       max_seq_len=GPT2_POSITIONS, stable_embedding=False, tie_weights=True)


PRESETS: dict[str, ModelConfig] = {
    "gpt2-124m": _gpt(768, 12, 12),
    "gpt2-350m": _gpt(1024, 24, 16),
    "gpt2-774m": _gpt(1280, 36, 20),
    "gpt-1.3b": _gpt(2048, 24, 16),
}


def preset(name: str) -> ModelConfig:
    """The :class:`ModelConfig` of preset ``name`` (a ``ValueError`` lists the presets)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_numels(name: str) -> list[int]:
    """Element counts of every tensor of preset ``name`` (tied head counted once)."""
    cfg = preset(name)
    return gpt2_numels(cfg.d_model, cfg.layers, cfg.vocab_size, cfg.max_seq_len, cfg.mlp_ratio, cfg.tie_weights)


def build_on_meta(name: str):
    """The preset's :class:`~pagedopt.train.model.DecoderLM` on the meta device (no memory)."""
    import torch

    from .model import DecoderLM

    with torch.device("meta"):
        return DecoderLM(preset(name))
