"""Adaptive clipping: unit-wise AGC (``adaptive_clip_``), and clippers whose bound follows the history
of the gradient norm (``AutoClip``, ``ZClip``), with their state in device tensors.

Data flows as in ``clip.py``: argument checks -> grouping by device -> ``torch.ops.segclip.*`` or the
pure-PyTorch backend (``segclip.reference``). ``AutoClip`` and ``ZClip`` take the norm with
:func:`segclip.total_norm` and scale with the fused scale op; their statistics never leave the device
(no ``.item()``, no Python float per step), so a step costs no host synchronisation.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from . import clip, distributed, reference
from .clip import _TensorOrTensors
from .value import _kernel_for

_OP = "multi_tensor_adaptive_clip_"

KERNEL_NORM_TYPES = (2.0, 1.0, math.inf)


def _real(value, name: str, *, low: float = 0.0, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}: {value!r}")
    value = float(value)
    if not low <= value <= high:  # NaN fails too
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------
# Unit-wise adaptive gradient clipping (Brock et al. 2021)
# ---------------------------------------------------------------------------------------------------

def _pairs_of(params: list) -> tuple[list[Tensor], list[Tensor]]:
    weights, grads = [], []
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"parameters[{i}] is a {type(p).__name__}, expected a Tensor (AGC reads the weights)")
        g = p.grad
        if g is None:
            continue
        if not isinstance(g, Tensor):
            raise TypeError(f"the gradient of parameters[{i}] is a {type(g).__name__}, expected a Tensor")
        if not g.dtype.is_floating_point or g.layout != torch.strided:
            raise TypeError(f"the gradient of parameters[{i}] is a {g.layout} {g.dtype} tensor; adaptive "
                            "clipping takes dense floating-point gradients")
        if g.shape != p.shape:
            raise ValueError(f"the gradient of parameters[{i}] has shape {tuple(g.shape)}, its parameter "
                             f"{tuple(p.shape)}")
        weights.append(p.detach())
        grads.append(g)
    return weights, grads


def adaptive_clip_(parameters: _TensorOrTensors, clip_factor: float = 0.01, eps: float = 1e-3,
                   norm_type: float = 2.0, *, backend: str = "auto") -> None:
    """Unit-wise adaptive gradient clipping (AGC, Brock et al. 2021), in place, with the semantics of
    timm's ``adaptive_clip_grad``.

    A unit is a slice along dim 0 of a parameter (an output channel or row), or the whole parameter
    when it has at most one dimension. Per unit, with ``W`` its weights and ``G`` its gradient, the
    gradient is scaled by ``m / max(||G||, 1e-6)`` where ``m = clip_factor * max(||W||, eps)``, unless
    ``||G|| < m``. One fused pass over all weights and gradients (CPU and CUDA kernels), instead of
    about eight PyTorch ops per parameter.

    Args:
        parameters: a Tensor or an iterable of Tensors (a generator is consumed once); parameters
            whose ``.grad`` is None are skipped.
        clip_factor: the largest allowed ratio of gradient to weight norm per unit (>= 0).
        eps: the smallest weight norm used for the bound (>= 0), so that zero-initialised units can
            still learn.
        norm_type: the p of the unit norms: 1, 2 and inf run in the kernels, any other value that
            ``torch.linalg.vector_norm`` takes goes through PyTorch.
        backend: as for :func:`segclip.fused_clip_`.

    Differences from timm's loop: norms and ratios are taken in float32 (float64 for float64
    tensors) also for float16/bfloat16 parameters, which timm rounds at each step; the result is
    within a few float32 roundings of a float64 computation.

    Raises:
        ValueError: ``clip_factor`` or ``eps`` negative or NaN, a gradient whose shape is not its
            parameter's, or an unknown ``backend``. No gradient is changed.
        TypeError: a parameter that is not a Tensor, or a sparse or non-floating gradient.
    """
    clip._check_backend(backend)
    clip_factor = _real(clip_factor, "clip_factor")
    eps = _real(eps, "eps")
    norm_type = float(norm_type)
    params = clip._as_list(parameters)
    weights, grads = _pairs_of(params)
    if not grads:
        return
    if distributed.any_dtensor(grads):
        return _adaptive_clip_dtensor(weights, grads, clip_factor, eps, norm_type, backend)
    with torch.no_grad():
        if norm_type in KERNEL_NORM_TYPES and _kernel_for(_OP, grads[0].device, backend):
            try:  # the whole list in one op call; its checks run before any write
                torch.ops.segclip.multi_tensor_adaptive_clip_(weights, grads, clip_factor, eps, norm_type)
                return
            except RuntimeError:
                pass
        by_device: dict[torch.device, tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]] = {}
        for w, g in zip(weights, grads):
            kw, kg, ow, og = by_device.setdefault(g.device, ([], [], [], []))
            fits = (norm_type in KERNEL_NORM_TYPES and w.device == g.device and w.dtype == g.dtype
                    and g.dtype in clip.KERNEL_DTYPES)
            (kw if fits else ow).append(w)
            (kg if fits else og).append(g)
        for device, (kw, kg, ow, og) in by_device.items():
            if kg and _kernel_for(_OP, device, backend):
                torch.ops.segclip.multi_tensor_adaptive_clip_(kw, kg, clip_factor, eps, norm_type)
            else:
                ow, og = kw + ow, kg + og
            reference.adaptive_clip_(ow, og, clip_factor, eps, norm_type)


def _adaptive_clip_dtensor(weights: list[Tensor], grads: list[Tensor], clip_factor: float, eps: float,
                           norm_type: float, backend: str) -> None:
    """AGC on DTensor parameters (FSDP2: ``Shard(0)``; or replicated). A unit of a parameter with 2 or
    more dimensions is a slice along dim 0, which ``Shard(0)`` keeps whole on one rank: those go
    through the local path on each rank's shards. A parameter with at most one dimension is one unit
    that ``Shard(0)`` splits across ranks: its weight and gradient norms are reduced over the mesh
    (one all-reduce for all of them: the sums of |x|^p, or the max for inf, in float64), then each
    rank scales its shard by that unit's factor, so the result is that of one process.

    Raises:
        ValueError: a DTensor sharded on another dim than 0 (its units would be split), a
            ``Partial`` placement, or weights and gradients on other placements or meshes.
    """
    from torch.distributed.tensor import Replicate, Shard

    mesh = grads[0].device_mesh
    coordinate = mesh.get_coordinate()
    rows_w, rows_g, whole = [], [], []
    for i, (w, g) in enumerate(zip(weights, grads)):
        if not (distributed.is_dtensor(w) and distributed.is_dtensor(g)) or w.device_mesh != mesh \
                or g.device_mesh != mesh or tuple(w.placements) != tuple(g.placements):
            raise ValueError(f"adaptive_clip_: parameter {i} and its gradient are not DTensors on one mesh "
                             "with the same placements; pass all parameters sharded alike (e.g. by fully_shard)")
        if not all(isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim == 0) for pl in g.placements):
            raise ValueError(f"adaptive_clip_: parameter {i} has placements {tuple(g.placements)}; AGC's units "
                             "are slices along dim 0, so only Shard(0) and Replicate placements keep them whole")
        if g.ndim >= 2:
            rows_w.append(w.to_local())
            rows_g.append(g.to_local())
        else:
            # counted by the ranks at coordinate 0 of the dims it is replicated on (as the norms are)
            counted = all(coordinate[d] == 0 for d, pl in enumerate(g.placements) if isinstance(pl, Replicate))
            whole.append((w.to_local(), g.to_local(), counted))
    if rows_g:
        adaptive_clip_(_Pairs(rows_w, rows_g), clip_factor, eps, norm_type, backend=backend)
    if not whole:
        return
    device = whole[0][1].device
    inf = math.isinf(norm_type)
    with torch.no_grad():
        parts = torch.zeros(2, len(whole), dtype=torch.float64, device=device)
        for j, (w, g, counted) in enumerate(whole):
            if not counted or g.numel() == 0:
                continue
            for row, t in ((0, w), (1, g)):
                a = t.detach().double().abs()
                parts[row, j] = a.max() if inf else a.pow(norm_type).sum()
        for d in range(mesh.ndim):
            torch.distributed.all_reduce(parts, op=torch.distributed.ReduceOp.MAX if inf else torch.distributed.ReduceOp.SUM,
                                         group=mesh.get_group(d))
        norms = parts if inf else parts.pow(1.0 / norm_type)
        bound = norms[0].clamp(min=eps) * clip_factor
        factor = torch.where(norms[1] < bound, torch.ones_like(bound), bound / norms[1].clamp(min=1e-6))
        for j, (_, g, _) in enumerate(whole):
            if g.numel():
                g.mul_(factor[j].to(g.dtype))


class _Pairs(list):
    """Local shards as ``adaptive_clip_``'s parameters: each weight tensor carries its gradient."""

    def __init__(self, weights: list[Tensor], grads: list[Tensor]):
        items = []
        for w, g in zip(weights, grads):
            w = w.detach()
            w.grad = g
            items.append(w)
        super().__init__(items)


# ---------------------------------------------------------------------------------------------------
# Clippers with a history: AutoClip and ZClip
# ---------------------------------------------------------------------------------------------------

def _grads(parameters: _TensorOrTensors) -> list[Tensor]:
    return clip._grads_of(clip._as_list(parameters))


def _measure(parameters: _TensorOrTensors, backend: str) -> tuple[Tensor, list[Tensor], Tensor] | None:
    """The clippers' shared start: ``(norm, grads, local norm)`` of ``parameters``' gradients (see
    :func:`_local`), or None without gradients. Call under ``torch.no_grad()``."""
    grads = _grads(parameters)
    if not grads:
        return None
    norm = clip.total_norm(grads, backend=backend)
    return (norm, *_local(grads, norm))


def _local(grads: list[Tensor], norm: Tensor) -> tuple[list[Tensor], Tensor]:
    """DTensor gradients (FSDP2, tensor parallel): ``total_norm`` returned the global norm as a DTensor
    replicated on their mesh, the same on every rank. The statistics take its local value (so every
    rank keeps the same history and bound) and the coefficient scales each rank's local shards."""
    if distributed.is_dtensor(norm):
        return [g.to_local() for g in grads], norm.to_local()
    return grads, norm


def _clip_to(grads: list[Tensor], norm: Tensor, coef: Tensor, backend: str) -> None:
    """Scales ``grads`` by the device tensor ``coef`` (the fused scale: nothing written when >= 1)."""
    clip._scale(clip._plan(grads, backend), coef.to(norm.dtype))


class AutoClip:
    """AutoClip (Seetharaman et al. 2020): clips the gradient norm to a percentile of the norms seen
    so far (this step's included), like ``torch.nn.utils.clip_grad_norm_(parameters, max_norm)`` with
    ``max_norm = percentile(history)``.

    ``clipper(parameters) -> norm``: the total L2 norm before clipping (a 0-dim tensor on the first
    gradient's device). The history lives in a float64 tensor on that device and the percentile is
    taken there (``torch.nanquantile``, linear interpolation as ``numpy.percentile``): no host
    synchronisation per step.

    Args:
        percentile: in [0, 100]; 10 clips nine steps in ten (the paper's choice for audio models).
        history: keep only the last ``history`` norms (a window); None keeps them all (the paper).
            A percentile over all the norms sorts them every step: about n log n work per step.
        backend: as for :func:`segclip.fused_clip_`.

    Non-finite norms are not added to the history (one would otherwise poison every later bound);
    the gradients of that step are scaled as ``clip_grad_norm_`` scales them (NaN for a NaN norm).
    """

    def __init__(self, percentile: float = 10.0, history: int | None = None, *, backend: str = "auto"):
        self.percentile = _real(percentile, "percentile", high=100.0)
        if history is not None and (isinstance(history, bool) or not isinstance(history, int) or history < 1):
            raise ValueError(f"history must be None or a positive int, got {history!r}")
        clip._check_backend(backend)
        self.history = history
        self.backend = backend
        self._norms: Tensor | None = None  # float64, NaN where no norm is stored
        self._seen = 0  # norms offered so far (a host count: no synchronisation)

    def _slot(self, device: torch.device) -> int:
        """Where this step's norm goes; grows or moves the buffer first."""
        if self._norms is None:
            self._norms = torch.full((self.history or 64,), math.nan, dtype=torch.float64, device=device)
        elif self._norms.device != device:
            self._norms = self._norms.to(device)
        if self.history is not None:
            return self._seen % self.history
        if self._seen == self._norms.numel():  # unbounded: double the capacity
            grown = torch.full((2 * self._seen,), math.nan, dtype=torch.float64, device=device)
            grown[: self._seen] = self._norms
            self._norms = grown
        return self._seen

    def __call__(self, parameters: _TensorOrTensors) -> Tensor:
        with torch.no_grad():
            measured = _measure(parameters, self.backend)
            if measured is None:
                return torch.tensor(0.0)
            norm, grads, local = measured
            n64 = local.double()
            slot = self._slot(local.device)
            self._norms[slot] = torch.where(torch.isfinite(n64), n64, math.nan)
            self._seen += 1
            window = self._norms if self.history is not None else self._norms[: self._seen]
            bound = torch.nanquantile(window, self.percentile / 100.0).to(local.dtype)
            coef = torch.clamp(bound / (local + 1e-6), max=1.0)
            coef = torch.where(torch.isnan(bound), torch.ones_like(coef), coef)  # no finite norm yet
            _clip_to(grads, local, coef, self.backend)
        return norm

    def state_dict(self) -> dict:
        """The history (a tensor on its device, oldest to newest), and the settings."""
        return {"percentile": self.percentile, "history": self.history, "seen": self._seen,
                "norms": None if self._norms is None else self._norms.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("history") != self.history:
            raise ValueError(f"the state was saved with history={state.get('history')!r}, this AutoClip has "
                             f"history={self.history!r}")
        self.percentile = _real(state["percentile"], "percentile", high=100.0)
        self._seen = int(state["seen"])
        norms = state["norms"]
        self._norms = None if norms is None else norms.detach().to(torch.float64).clone()


class ZClip:
    """ZClip (Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training"): tracks the
    gradient norm's mean and variance by exponential moving averages and clips a spike, a norm whose
    z-score ``(norm - mean) / (std + eps)`` exceeds ``z_thresh``.

    The published algorithm, with its defaults:
      * the first ``warmup_steps`` norms are collected unclipped (clipped to ``max_grad_norm`` when
        given); then mean and (population) variance are initialised from them;
      * ``mode="zscore"``, ``clip_option="adaptive_scaling"``: a spike is clipped to
        ``mean + z_thresh * std / (z / z_thresh)`` (the larger the spike, the lower the bound);
        ``clip_option="mean"``: to the mean;
      * ``mode="percentile"``: a norm above ``mean + z_thresh * std`` is clipped to that bound;
      * the EMAs are then updated with the norm after clipping:
        ``mean = alpha * mean + (1 - alpha) * n``, ``var = alpha * var + (1 - alpha) * (n - mean)**2``
        (with the new mean);
      * ``max_grad_norm``, when given, caps every step's bound as well (the published default is 1.0;
        None here, so that ZClip alone decides).
    Clipping scales the gradients by ``bound / (norm + 1e-6)`` when ``norm > bound``, as published.

    ``clipper(parameters) -> norm``: the total L2 norm before clipping. Mean, variance and the warmup
    norms are float64 tensors on the gradients' device: no host synchronisation per step (the
    published implementation calls ``.item()`` every step). A NaN norm leaves the statistics as they
    are (published: they become NaN for good) and the gradients unscaled.
    """

    MODES = ("zscore", "percentile")
    CLIP_OPTIONS = ("adaptive_scaling", "mean")

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, warmup_steps: int = 25, *, eps: float = 1e-6,
                 mode: str = "zscore", clip_option: str = "adaptive_scaling", max_grad_norm: float | None = None,
                 backend: str = "auto"):
        self.alpha = _real(alpha, "alpha", high=1.0)
        self.z_thresh = _real(z_thresh, "z_thresh")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be a positive int, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        self.eps = _real(eps, "eps")
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if clip_option not in self.CLIP_OPTIONS:
            raise ValueError(f"clip_option must be one of {self.CLIP_OPTIONS}, got {clip_option!r}")
        self.mode, self.clip_option = mode, clip_option
        self.max_grad_norm = None if max_grad_norm is None else _real(max_grad_norm, "max_grad_norm")
        clip._check_backend(backend)
        self.backend = backend
        self._steps = 0  # a host count: no synchronisation
        self._warmup: Tensor | None = None  # float64 norms of the warmup steps
        self._mean: Tensor | None = None
        self._var: Tensor | None = None

    def _to(self, device: torch.device) -> None:
        if self._warmup is None:
            self._warmup = torch.full((self.warmup_steps,), math.nan, dtype=torch.float64, device=device)
        for name in ("_warmup", "_mean", "_var"):
            t = getattr(self, name)
            if t is not None and t.device != device:
                setattr(self, name, t.to(device))

    def _bound(self, n: Tensor) -> Tensor:
        """This step's clipped norm (``n`` when it is no spike), from the current statistics."""
        std = self._var.sqrt()
        if self.mode == "percentile":
            bound = self._mean + self.z_thresh * std
            return torch.where(n > bound, bound, n)
        z = (n - self._mean) / (std + self.eps)
        if self.clip_option == "mean":
            bound = self._mean
        else:
            bound = self._mean + (self.z_thresh * std) / (z / self.z_thresh)
        return torch.where(z > self.z_thresh, bound, n)

    def __call__(self, parameters: _TensorOrTensors) -> Tensor:
        with torch.no_grad():
            measured = _measure(parameters, self.backend)
            if measured is None:
                return torch.tensor(0.0)
            norm, grads, local = measured
            n = local.double()
            self._to(local.device)
            if self._steps < self.warmup_steps:
                self._warmup[self._steps] = torch.where(torch.isnan(n), math.nan, n)
                self._steps += 1
                if self._steps == self.warmup_steps:
                    self._mean = self._warmup.nanmean()
                    self._var = (self._warmup - self._mean).square().nanmean()
                limit = None if self.max_grad_norm is None else n.new_tensor(self.max_grad_norm)
            else:
                self._steps += 1
                clipped = self._bound(n)
                keep = torch.isnan(clipped)
                mean = self.alpha * self._mean + (1 - self.alpha) * clipped
                var = self.alpha * self._var + (1 - self.alpha) * (clipped - mean).square()
                self._mean = torch.where(keep, self._mean, mean)
                self._var = torch.where(keep, self._var, var)
                limit = clipped if self.max_grad_norm is None else torch.clamp(clipped, max=self.max_grad_norm)
            if limit is not None:
                coef = torch.where(n > limit, limit / (n + 1e-6), torch.ones_like(n))
                _clip_to(grads, local, coef, self.backend)
        return norm

    def state_dict(self) -> dict:
        """Step count, warmup norms, mean and variance (tensors on their device), and the settings."""
        return {"steps": self._steps, "warmup_norms": None if self._warmup is None else self._warmup.clone(),
                "mean": None if self._mean is None else self._mean.clone(),
                "var": None if self._var is None else self._var.clone(),
                "settings": self._settings()}

    def _settings(self) -> dict:
        return {"alpha": self.alpha, "z_thresh": self.z_thresh, "warmup_steps": self.warmup_steps, "eps": self.eps,
                "mode": self.mode, "clip_option": self.clip_option, "max_grad_norm": self.max_grad_norm}

    def load_state_dict(self, state: dict) -> None:
        if state["settings"] != self._settings():
            raise ValueError(f"the state was saved by ZClip{state['settings']}, this is ZClip{self._settings()}")
        self._steps = int(state["steps"])
        clone = (lambda t: None if t is None else t.detach().to(torch.float64).clone())
        self._warmup, self._mean, self._var = clone(state["warmup_norms"]), clone(state["mean"]), clone(state["var"])
