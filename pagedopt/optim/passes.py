"""The per-item passes of a step: percentile clipping, prepare (trust ratios, tensor-wise
maxima) and the fused update, batched over the parameters that are not in a prepared launch.

:mod:`pagedopt.optim.execute` decides which parameters take this path (see
:mod:`pagedopt.optim.plan`); each pass handles all of them at once and runs through the
state store's :meth:`~pagedopt.paging.store.StateStore.visit`, so paged state is resident
while it is read.

Example:
    >>> import torch, pagedopt
    >>> w = torch.nn.Parameter(torch.randn(4096))
    >>> opt = pagedopt.AdamW8bit([w], percentile_clipping=90)
    >>> opt.prepared_launches = False   # every parameter through the per-item passes
    >>> w.grad = torch.randn(4096); opt.step()
    >>> int(opt.state[w]["step"])
    1
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from ..distributed import sharding
from ..functional import dispatch
from ..functional.clipping import percentile_clip, trust_ratios
from ..functional.items import UpdateItem
from ..functional.kinds import UpdateKind
from ..functional.scalars import step_scalars
from ..telemetry.sink import ParamStepReport, StepReport
from .launch_prepare import needs_prepare
from .memory import precision_of


@dataclass
class Work:
    """One parameter's part of the current step (built fresh every step)."""

    key: torch.Tensor  # the parameter object (state key)
    param: torch.Tensor  # the tensor the kernels update (shard-local under FSDP2)
    grad: torch.Tensor
    group_index: int
    name: str
    hp: Mapping[str, Any]
    cfg: Mapping[str, Any]
    state: dict[str, Any]
    gnorm_scale: torch.Tensor | None = None
    grad_norm: torch.Tensor | None = None
    clip_threshold: torch.Tensor | None = None
    update_scale: torch.Tensor | None = None
    new_absmax1: torch.Tensor | None = None
    new_absmax2: torch.Tensor | None = None
    numerics: str = "fast"

    @property
    def quantized(self) -> bool:
        return self.state["state1"].dtype == torch.uint8

    @property
    def needs_prepare(self) -> bool:
        return needs_prepare(self.quantized, self.cfg["block_wise"], self.cfg["max_unorm"])

    def item(self, kind: UpdateKind, step: int | None = None) -> UpdateItem:
        """The backend's view; ``step`` replaces the state's step count (plan building)."""
        s = self.state
        return UpdateItem(
            param=self.param,
            grad=self.grad,
            state1=s["state1"],
            state2=s.get("state2"),
            absmax1=s.get("absmax1"),
            absmax2=s.get("absmax2"),
            scalars=step_scalars(kind, self.hp, s["step"] if step is None else step, skip_zeros=self.cfg["skip_zeros"]),
            block_wise=self.cfg["block_wise"],
            gnorm_scale=self.gnorm_scale,
            update_scale=self.update_scale,
            new_absmax1=self.new_absmax1,
            new_absmax2=self.new_absmax2,
            numerics=self.numerics,
        )


_Work = Work  # the name before the step was split into plan and execute


class PerItemPassesMixin:
    """The batched per-item passes (mixed into :class:`~pagedopt.optim.Optimizer8bit`)."""

    def _run_per_item(self, works: list[Work]) -> None:
        """Clipping, prepare and update for ``works`` (one batched pass each)."""
        if not works:
            return
        self._percentile_clipping([w for w in works if w.cfg["percentile_clipping"] < 100])
        prepared = [w for w in works if w.needs_prepare]
        if prepared:
            self.state_store.visit(prepared, self._prepare_chunk)
            self._reduce_tensorwise_maxima(prepared)
            self._apply_trust_ratios([w for w in prepared if w.cfg["max_unorm"] > 0.0])
        self.state_store.visit(works, self._update_chunk)

    def _reduce_sums(self, what: str, works: list[Work], values: list[torch.Tensor]) -> list[torch.Tensor]:
        """Turn shard-local sums of DTensor (FSDP2) parameters into global ones.

        ``what`` is ``"grad_norm_sq"``, ``"update_norm_sq"`` or ``"param_norm_sq"``. Called once
        per kind of sum per step with every parameter's value, so one collective per process
        group serves all; plain (replicated) parameters pass through untouched.
        """
        return sharding.all_reduce_over_shards([w.key for w in works], values, "sum")

    def _reduce_maxima(self, works: list[Work], values: list[torch.Tensor]) -> list[torch.Tensor]:
        """Tensor-wise absmax over all shards of DTensor parameters (batched like the sums)."""
        return sharding.all_reduce_over_shards([w.key for w in works], values, "max")

    def _reduce_tensorwise_maxima(self, works: list[Work]) -> None:
        """Make the prepare pass's tensor-wise maxima (both states) global, in one call for the
        whole step: outside the store's chunked visits, whose chunking may differ per rank."""
        pairs = [
            (w, attr)
            for attr in ("new_absmax1", "new_absmax2")
            for w in works
            if w.quantized and not w.cfg["block_wise"] and getattr(w, attr) is not None
        ]
        if not pairs:
            return
        maxima = self._reduce_maxima([w for w, _ in pairs], [getattr(w, attr) for w, attr in pairs])
        for (w, attr), m in zip(pairs, maxima):
            setattr(w, attr, m)

    def _percentile_clipping(self, works: list[Work]) -> None:
        if not works:
            return
        norms_sq = dispatch.grad_norm_sq([w.grad for w in works])
        norms_sq = self._reduce_sums("grad_norm_sq", works, norms_sq)
        result = percentile_clip(
            norms_sq,
            [w.state["gnorm_vec"] for w in works],
            [w.state["step"] for w in works],
            [w.cfg["percentile_clipping"] for w in works],
        )
        for w, scale, norm, threshold in zip(works, result.scales, result.norms, result.thresholds):
            w.gnorm_scale, w.grad_norm, w.clip_threshold = scale, norm, threshold

    def _prepare_chunk(self, works: list[Work]) -> None:
        want_norms = [w for w in works if w.cfg["max_unorm"] > 0.0]
        items = [w.item(self.kind) for w in works]
        results = dispatch.prepare(self.kind, items, want_norms=bool(want_norms))
        for w, r in zip(works, results):
            if w.quantized and not w.cfg["block_wise"]:
                w.new_absmax1, w.new_absmax2 = r.max1, r.max2
            w._prepared = r  # type: ignore[attr-defined]

    def _apply_trust_ratios(self, works: list[Work]) -> None:
        if not works:
            return
        unorm = self._reduce_sums("update_norm_sq", works, [w._prepared.unorm_sq for w in works])
        pnorm = self._reduce_sums("param_norm_sq", works, [w._prepared.pnorm_sq for w in works])
        scales = trust_ratios(unorm, pnorm, [w.cfg["max_unorm"] for w in works])
        for w, scale, u in zip(works, scales, unorm):
            w.update_scale = scale
            w.state["unorm_vec"].copy_(u.reshape(1), non_blocking=True)

    def _update_chunk(self, works: list[Work]) -> None:
        items = [w.item(self.kind) for w in works]
        probe = getattr(self, "_quant_probe", None)
        if probe is not None:
            probe.before(self.kind, [(w.name, w.group_index, w.key) for w in works], items)
        dispatch.update(self.kind, items)
        if probe is not None:
            probe.after()

    def _step_report(self, works: list[Work], started: float, launched: Sequence[Any] = ()) -> StepReport:
        """The sink's report: a row per parameter updated this step - the per-item ``works``,
        then the entries of the ``launched`` groups (clipped groups' rows carry their norms,
        thresholds and scales, trust-ratio groups' their update scales)."""
        report = StepReport(step=self.steps_taken, duration_seconds=time.perf_counter() - started)
        probe = getattr(self, "_quant_probe", None)
        if probe is not None:
            report.quant_errors = list(probe.samples)
        self._report_works(report, works)
        for lg in launched:
            n = len(lg.entries)
            clip, trust = lg.last_clip, lg.last_trust
            norms, thresholds, scales = (clip.norms, clip.thresholds, clip.scales) if clip is not None else ([None] * n,) * 3
            update_scales = list(trust.unbind(0)) if trust is not None else [None] * n
            report.params.extend(
                ParamStepReport(name=e.name, group=e.gindex, numel=e.key.numel(), precision=precision,
                                grad_norm=norm, clip_threshold=threshold, clip_scale=scale,
                                update_scale=update_scale, param=e.key)
                for e, precision, norm, threshold, scale, update_scale in zip(
                    lg.entries, lg.precisions, norms, thresholds, scales, update_scales)
            )
        return report

    @staticmethod
    def _report_works(report: StepReport, works: list[Work]) -> None:
        for w in works:
            report.params.append(
                ParamStepReport(
                    name=w.name,
                    group=w.group_index,
                    numel=w.key.numel(),
                    precision=precision_of(w.state, w.cfg["block_wise"]),
                    grad_norm=w.grad_norm,
                    clip_threshold=w.clip_threshold,
                    clip_scale=w.gnorm_scale,
                    update_scale=w.update_scale,
                    param=w.key,
                )
            )
