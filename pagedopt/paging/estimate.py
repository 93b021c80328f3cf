"""Memory estimates for ``pagedopt plan``: bytes per rank of parameters, gradients and optimizer
state for each optimizer/paging choice, and whether it fits a GPU. Pure functions, no torch.

State bytes follow the optimizers exactly: a tensor with at least ``min_8bit_size`` elements
gets 8-bit state (one byte per element and moment, plus one fp32 absmax per moment and block of
256), smaller ones 32-bit state (4 bytes per element and moment). Moments per element: 2 for
Adam/AdamW/LAMB, 3 for AdEMAMix, 1 for Lion/SGD/RMSprop/Adagrad/LARS. With FSDP each rank holds
``ceil(numel / world_size)`` of every tensor (the 8-bit decision uses the global size).

Device bytes of paged state (``resident``): ``on_demand``/``pipelined`` keep what fits (the
driver migrates the rest), ``budgeted`` gets the room left after parameters, gradients,
activations and the headroom, ``offload`` keeps only the stream window (the running chunk and
``prefetch_depth`` parameters ahead: ``2 * prefetch_depth`` of the largest tensor's state).

Example:
    >>> from pagedopt.paging.estimate import plan, gpt2_numels
    >>> result = plan(gpt2_numels(768, 12, 50257, 1024), gpu_memory=3 * 2**29, world_size=1)
    >>> [(o.optimizer, o.paging, o.fits) for o in result.options][:3]
    [('AdamW32bit', 'none', False), ('AdamW8bit', 'none', True), ('PagedAdamW8bit', 'on_demand', True)]
    >>> result.options[result.recommended].optimizer
    'AdamW8bit'
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

BLOCK = 256
MOMENTS = {"adam": 2, "adamw": 2, "lamb": 2, "ademamix": 3, "lion": 1, "sgd": 1, "rmsprop": 1, "adagrad": 1, "lars": 1}
FAMILIES = {"adam": "Adam", "adamw": "AdamW", "lamb": "LAMB", "ademamix": "AdEMAMix", "lion": "Lion", "sgd": "SGD",
            "rmsprop": "RMSprop", "adagrad": "Adagrad", "lars": "LARS"}
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
PAGED_POLICIES = ("on_demand", "pipelined", "budgeted", "offload")


def family_of(optimizer: str) -> str:
    """``"PagedAdamW8bit"`` -> ``"adamw"`` (a ``ValueError`` names the known families)."""
    name = optimizer.lower()
    for prefix in ("paged",):
        if name.startswith(prefix):
            name = name[len(prefix):]
    for suffix in ("8bit", "32bit"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name not in MOMENTS:
        raise ValueError(f"--optimizer {optimizer!r}: unknown; use one of {', '.join(FAMILIES.values())}")
    return name


def tensor_state_bytes(numel: int, moments: int, bits: int, min_8bit_size: int = 4096) -> int:
    """Optimizer state bytes of one tensor of ``numel`` (global) elements."""
    if numel == 0:
        return 0
    if bits == 8 and numel >= min_8bit_size:
        return moments * (numel + 4 * math.ceil(numel / BLOCK))
    return moments * 4 * numel


def gpt2_numels(d_model: int, layers: int, vocab_size: int, max_seq_len: int, mlp_ratio: int = 4,
                tie_weights: bool = True) -> list[int]:
    """Element counts of every tensor of a GPT-2-shaped model (biases and LayerNorms included)."""
    d, h = d_model, mlp_ratio * d_model
    out = [vocab_size * d, max_seq_len * d]
    for _ in range(layers):
        out += [d, d, 3 * d * d, 3 * d, d * d, d, d, d, h * d, h, d * h, d]
    out += [d, d]
    if not tie_weights:
        out.append(vocab_size * d)
    return out


def llama_numels(d_model: int, layers: int, vocab_size: int, intermediate: int, heads: int, kv_heads: int,
                 tie_weights: bool = False) -> list[int]:
    """Element counts of a Llama-shaped model (RMSNorm, no biases, gated MLP, grouped KV)."""
    d, head_dim = d_model, d_model // heads
    kv = kv_heads * head_dim
    out = [vocab_size * d]
    for _ in range(layers):
        out += [d, d * d, kv * d, kv * d, d * d, d, intermediate * d, intermediate * d, d * intermediate]
    out.append(d)
    if not tie_weights:
        out.append(vocab_size * d)
    return out


def numels_from_hf_config(cfg: Mapping[str, Any]) -> list[int]:
    """Tensor sizes from a Hugging Face-style ``config.json`` (GPT-2 or Llama-style keys)."""
    def get(*keys: str, default: Any = None) -> Any:
        for k in keys:
            if k in cfg:
                return cfg[k]
        if default is None:
            raise ValueError(f"model config has none of the keys {', '.join(keys)}")
        return default

    d = int(get("hidden_size", "n_embd", "d_model"))
    layers = int(get("num_hidden_layers", "n_layer", "num_layers"))
    vocab = int(get("vocab_size"))
    if "intermediate_size" in cfg and cfg.get("model_type") != "gpt2":
        heads = int(get("num_attention_heads", "n_head"))
        return llama_numels(d, layers, vocab, int(cfg["intermediate_size"]), heads,
                            int(cfg.get("num_key_value_heads", heads)), bool(cfg.get("tie_word_embeddings", False)))
    inner = cfg.get("n_inner") or cfg.get("intermediate_size") or 4 * d
    return gpt2_numels(d, layers, vocab, int(get("n_positions", "max_position_embeddings", default=1024)),
                       mlp_ratio=int(inner) // d, tie_weights=bool(cfg.get("tie_word_embeddings", True)))


@dataclass
class Option:
    """One choice: optimizer class, paging policy, bytes per rank, whether it fits.

    Example:
        >>> Option("AdamW8bit", "none", 4, 4, 2, 2, True).total
        10
    """

    optimizer: str
    paging: str
    parameters: int
    gradients: int
    optimizer_state: int
    resident_state: int
    fits: bool
    device_budget_bytes: int | None = None

    @property
    def total(self) -> int:
        """Device bytes per rank: parameters + gradients + device-resident optimizer state."""
        return self.parameters + self.gradients + self.resident_state

    def as_json(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer, "paging": self.paging,
            "per_rank_bytes": {"parameters": self.parameters, "gradients": self.gradients,
                               "optimizer_state": self.optimizer_state, "total": self.total},
            "fits": self.fits,
            "resident_state_bytes": self.resident_state,
            "host_state_bytes": self.optimizer_state - self.resident_state,
            "device_budget_bytes": self.device_budget_bytes,
        }


@dataclass
class Plan:
    """All options, the recommended one's index, and the inputs that shaped them.

    Example:
        >>> p = plan([1 << 20], gpu_memory=1 << 30)
        >>> p.as_json()["options"][p.recommended]["optimizer"]
        'AdamW8bit'
    """

    options: list[Option]
    recommended: int
    usable_bytes: int
    headroom_bytes: int
    inputs: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"options": [o.as_json() for o in self.options], "recommended": self.recommended,
                "usable_bytes": self.usable_bytes, "headroom_bytes": self.headroom_bytes, "inputs": self.inputs}


def plan(numels: Sequence[int], gpu_memory: int, world_size: int = 1, fsdp: bool = False, optimizer: str = "AdamW",
         param_dtype: str = "fp32", activation_bytes: int = 0, headroom_fraction: float = 0.05,
         min_8bit_size: int = 4096, prefetch_depth: int = 2) -> Plan:
    """Every sensible option for a model with tensors of ``numels`` (see the module docstring).

    ``headroom_fraction`` of the GPU stays free (CUDA context, fragmentation; it becomes the
    written config's ``memory.target_free_bytes``); ``activation_bytes`` are reserved for
    activations per rank."""
    if world_size < 1:
        raise ValueError(f"--world-size must be at least 1 (got {world_size})")
    if param_dtype not in DTYPE_BYTES:
        raise ValueError(f"--param-dtype {param_dtype!r}: use one of {', '.join(DTYPE_BYTES)}")
    fam = family_of(optimizer)
    name, moments = FAMILIES[fam], MOMENTS[fam]
    shard = (lambda n: math.ceil(n / world_size)) if fsdp else (lambda n: n)
    local = [shard(n) for n in numels]
    pbytes = DTYPE_BYTES[param_dtype]
    params = sum(local) * pbytes
    grads = params
    # per-rank state: sharded tensors keep the precision their global size gives them
    state = {bits: sum(_local_state(n, moments, bits, min_8bit_size, shard) for n in numels) for bits in (8, 32)}
    largest8 = max((_local_state(n, moments, 8, min_8bit_size, shard) for n in numels), default=0)
    headroom = int(gpu_memory * headroom_fraction)
    usable = gpu_memory - headroom
    room = usable - params - grads - activation_bytes  # what optimizer state may use on the device
    window = 2 * prefetch_depth * largest8  # offload's stream window
    options = [
        Option(f"{name}32bit", "none", params, grads, state[32], state[32], room >= state[32]),
        Option(f"{name}8bit", "none", params, grads, state[8], state[8], room >= state[8]),
    ]
    for policy in PAGED_POLICIES:
        if policy == "offload":
            resident = min(state[8], window)
            budget = None
        else:
            resident = max(0, min(state[8], room))
            budget = resident if policy == "budgeted" else None
        fits = room >= (largest8 if policy != "offload" else resident) and room >= 0
        options.append(Option(f"Paged{name}8bit", policy, params, grads, state[8], resident, fits, budget))
    recommended = _recommend(options)
    inputs = {"params": sum(numels), "tensors": len(numels), "gpu_memory": gpu_memory, "world_size": world_size,
              "fsdp": fsdp, "param_dtype": param_dtype, "activation_bytes": activation_bytes}
    return Plan(options, recommended, usable, headroom, inputs)


def _local_state(numel: int, moments: int, bits: int, min_8bit_size: int, shard: Any) -> int:
    if bits == 8 and numel >= min_8bit_size:
        return tensor_state_bytes(shard(numel), moments, 8, min_8bit_size=0)
    return tensor_state_bytes(shard(numel), moments, 32)


def _recommend(options: list[Option]) -> int:
    """Fastest that fits: unpaged 8-bit, else budgeted, else offload; none fits: offload."""
    preference = [("none", "8bit"), ("budgeted", "8bit"), ("offload", "8bit")]
    for paging, suffix in preference:
        for i, o in enumerate(options):
            if o.paging == paging and o.optimizer.endswith(suffix) and o.fits:
                return i
    return next(i for i, o in enumerate(options) if o.paging == "offload")


def config_for(option: Option, plan_: Plan) -> dict[str, Any]:
    """A pagedopt config document (``pagedopt config check`` accepts it) for ``option``."""
    doc: dict[str, Any] = {"optimizer": {"name": option.optimizer}}
    if option.paging != "none":
        paging: dict[str, Any] = {"policy": option.paging}
        if option.device_budget_bytes is not None:
            paging["device_budget_bytes"] = max(1, option.device_budget_bytes)
        doc["paging"] = paging
    doc["memory"] = {"target_free_bytes": plan_.headroom_bytes}
    return doc
