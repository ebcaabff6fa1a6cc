"""Clipping an optimizer's gradients in fewer passes: AMP unscale + clip in one write, or the clip
folded into one of torch's fused optimizer steps.

``clip_optimizer_(optimizer, max_norm, scaler=...)`` gives the results of torch's recipe
``scaler.unscale_(optimizer); clip_grad_norm_(params, max_norm)`` (or the clip alone without a scaler),
followed by the user's usual ``scaler.step(optimizer); scaler.update()`` or ``optimizer.step()``.
How (see note: [three paths]):

* folded (torch's fused Adam / AdamW / SGD): one read pass takes the norm; the clip coefficient times
  the inverse loss scale goes to the fused step as ``optimizer.grad_scale``, on the device;
* one pass (a scaler, no fold): one read pass takes the norm of the scaled gradients, one write
  multiplies them by coefficient x inverse scale;
* plain: ``scaler.unscale_`` then ``fused_clip_``, public API only (the fallback).

The data still flows one way: checks here, then the op calls of ``segclip.clip`` /
``torch.ops.segclip.*``; this module is imported by ``segclip/__init__.py`` and by nothing in
``segclip`` that it imports.
"""

from __future__ import annotations

import inspect
import itertools
import os
import warnings

import torch
from torch import Tensor

from . import clip, norm_math, partials
from . import groups as _groups

FOLD_CHOICES = ("auto", True, False)
# NOTE: [fold contract]
# Folding relies on torch code that is not documented API (torch/amp/grad_scaler.py,
# torch/optim/{adam,sgd}.py):
#  * torch's fused Adam/AdamW/SGD set ``_step_supports_amp_scaling`` and pass
#    ``getattr(self, "grad_scale")`` / ``getattr(self, "found_inf")`` to their fused kernel, which
#    divides every gradient by grad_scale (and writes the quotient back into .grad) and skips the
#    whole update, undoing the step count, when found_inf is 1;
#  * GradScaler keeps ``_per_optimizer_states[id(optimizer)]`` = {"stage": OptState, "found_inf_per_device":
#    {device: found_inf}}; ``step`` on such an optimizer in stage UNSCALED hands ``optimizer.grad_scale``
#    to the step unchanged, sets ``optimizer.found_inf`` to the sum of found_inf_per_device, and deletes
#    both attributes after the step; ``update`` consumes found_inf_per_device; ``unscale_`` in stage
#    UNSCALED raises.
# It is tested (tests/test_fold.py) on the torch versions below only; on any other, or where one of
# these names is missing, clip_optimizer_ takes the plain path with a one-time warning.
# SEGCLIP_FOLD_UNTESTED_TORCH=1 lifts the version pin (the names are still checked): for running
# tests/test_fold.py on another torch (benchmarks/gpu_check.sh does, on the GPU image's torch), to
# find out whether the contract holds there before that version is added below.
TESTED_TORCH = ((2, 14),)
UNTESTED_TORCH_ENV = "SEGCLIP_FOLD_UNTESTED_TORCH"
# The torch optimizers whose fused step takes grad_scale/found_inf as described above.
FOLDABLE = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)

_contract_reason: list[str | None] = []  # computed once: [reason] (None when the contract holds)
_warned: set[str] = set()


def _torch_minor() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def _check_contract() -> str | None:
    if _torch_minor() not in TESTED_TORCH and os.environ.get(UNTESTED_TORCH_ENV) != "1":
        tested = ", ".join(f"{a}.{b}" for a, b in TESTED_TORCH)
        return f"torch {torch.__version__} is not a version where segclip tested it (tested: {tested})"
    gs = getattr(torch.amp, "grad_scaler", None)
    opt_state = getattr(gs, "OptState", None)
    if opt_state is None or not all(hasattr(opt_state, s) for s in ("READY", "UNSCALED", "STEPPED")):
        return "torch.amp.grad_scaler.OptState (READY/UNSCALED/STEPPED) is missing"
    for name in ("_check_scale_growth_tracker", "_get_scale_async"):
        if not hasattr(getattr(gs, "GradScaler", None), name):
            return f"torch.amp.GradScaler.{name} is missing"
    probe = torch.zeros(1, requires_grad=True)
    for cls in FOLDABLE:
        try:
            fused = cls([probe], lr=0.1, fused=True)
        except (TypeError, RuntimeError, ValueError) as e:
            return f"torch.optim.{cls.__name__}(fused=True) is unavailable on the CPU ({e})"
        if not getattr(fused, "_step_supports_amp_scaling", False):
            return f"torch.optim.{cls.__name__}(fused=True) does not set _step_supports_amp_scaling"
    return None


def contract_problem() -> str | None:
    """Why the torch internals that folding relies on are unusable here, or None when they are
    usable (see note: [fold contract]). Computed once per process."""
    if not _contract_reason:
        _contract_reason.append(_check_contract())
    return _contract_reason[0]


def _scaler_problem(scaler) -> str | None:
    reason = contract_problem()
    if reason is None and not isinstance(getattr(scaler, "_per_optimizer_states", None), dict):
        reason = f"{type(scaler).__name__} has no _per_optimizer_states dict"
    return reason


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"segclip.clip_optimizer_: {reason}; using the plain path (scaler.unscale_ + fused_clip_), "
                      "which gives the same results in more passes", stacklevel=3)


def _unfused_reason(optimizer: torch.optim.Optimizer) -> str | None:
    """Why ``optimizer``'s step cannot take the folded coefficient, or None when it can."""
    name = type(optimizer).__name__
    base = next((c for c in type(optimizer).__mro__ if c in FOLDABLE), None)
    if base is None:
        return f"{name} is not one of torch's fused optimizers (Adam, AdamW or SGD with fused=True)"
    if inspect.unwrap(type(optimizer).step) is not inspect.unwrap(base.step):
        return f"{name} overrides step(), so segclip cannot know that it applies grad_scale"
    if not all(group.get("fused") for group in optimizer.param_groups) or \
            not getattr(optimizer, "_step_supports_amp_scaling", False):
        return f"{name} was not created with fused=True"
    return None


def _grad_reason(grads: list[Tensor], norm_type: float) -> str | None:
    """Why the gradients need the plain path (the one-pass and folded paths take one device's
    dense gradients, with a norm in which a non-finite gradient gives a non-finite total)."""
    for i, g in enumerate(grads):
        if g.layout != torch.strided:
            return f"the gradient number {i} is sparse ({g.layout})"
        if type(g) is not Tensor:  # DTensor and friends: a local norm is not theirs
            return f"the gradient number {i} is a {type(g).__name__}, not a plain Tensor"
    devices = {g.device for g in grads}
    if len(devices) > 1:
        return f"the gradients sit on several devices ({', '.join(sorted(map(str, devices)))})"
    if not norm_type > 0:
        return f"norm_type={norm_type:g} does not make an inf/NaN gradient give a non-finite norm"
    return None


def _norm(grads: list[Tensor], norm_type: float) -> Tensor:
    """The total norm of one device's dense gradients: the kernel's fused read pass when it takes them."""
    device = grads[0].device
    if norm_type in clip.KERNEL_NORM_TYPES and clip._resolve("auto", device) and \
            all(g.dtype in clip.KERNEL_DTYPES for g in grads):
        return torch.ops.segclip.multi_tensor_norm(grads, norm_type)
    return clip.total_norm(grads, norm_type)


# NOTE: [pending fold]
# A folded call changes nothing visible: it records the pending fold in optimizer.__dict__[_PENDING].
# Two step hooks, registered once per optimizer (a hook cannot remove itself while torch iterates
# over the hooks), apply it to the next step only: the pre-hook sets optimizer.grad_scale (times a
# grad_scale already there: the user's own, which GradScaler.step hands over unchanged in stage
# UNSCALED) and, for skip_nonfinite, found_inf; the post-hook puts both back as they were, and
# GradScaler.step then deletes them as it always does. The pre-hook applies the fold only while it
# still belongs to these gradients:
#  * every gradient is the tensor the call saw, with the same version counter; all new tensors
#    (zero_grad(set_to_none=True) and a new backward since) make it stale: dropped, the step sees the
#    new, unclipped gradients, as in torch's recipe; the same tensors changed in place raise (the
#    coefficient was computed from values that are gone, and torch's recipe cannot be reproduced);
#  * with a scaler, GradScaler still holds the iteration that the call marked UNSCALED
#    (scaler.update() without a step starts a new one: stale).
# A second call while a fold is pending raises, as torch's second unscale_ does; on a stale one it
# starts afresh.
_PENDING = "_segclip_pending_fold"
_HOOKED = "_segclip_fold_hooks"
_MISSING = object()


class _Pending:
    def __init__(self, grads, grad_scale, found_inf, scaler, optimizer):
        self.grads = [(g, g._version) for g in grads]
        self.grad_scale = grad_scale
        self.found_inf = found_inf  # set on the optimizer without a scaler only (GradScaler sets its own)
        self.scaler = scaler
        self.scaler_state = scaler._per_optimizer_states[id(optimizer)] if scaler is not None else None
        self.saved = None  # what grad_scale / found_inf were before the pre-hook set them


def _current_grads(optimizer) -> list[Tensor]:
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def _state(pending: _Pending, optimizer) -> str:
    """"valid", "stale" or "changed" (see note: [pending fold])."""
    if pending.scaler is not None:
        state = pending.scaler._per_optimizer_states.get(id(optimizer))
        if state is not pending.scaler_state or state["stage"] is not torch.amp.grad_scaler.OptState.UNSCALED:
            return "stale"
    grads = _current_grads(optimizer)
    seen = {id(h) for h, _ in pending.grads}  # pending.grads keeps them alive: ids are not reused
    same = sum(id(g) in seen for g in grads)
    if same == 0:
        return "stale"
    if same != len(grads) or len(grads) != len(pending.grads) or \
            any(g._version != version for g, version in pending.grads):
        return "changed"
    return "valid"


def _before_step(optimizer, args, kwargs) -> None:
    pending = optimizer.__dict__.get(_PENDING)
    if pending is None:
        return
    state = _state(pending, optimizer)
    if state != "valid":
        optimizer.__dict__.pop(_PENDING)
        if state == "changed":
            raise RuntimeError("gradients changed between segclip.clip_optimizer_() and this step(), so its "
                               "folded coefficient no longer fits them; clip after changing the gradients")
        return
    pending.saved = (optimizer.__dict__.get("grad_scale", _MISSING), optimizer.__dict__.get("found_inf", _MISSING))
    prior_scale, prior_inf = (None if v is _MISSING else v for v in pending.saved)
    device = pending.grad_scale.device
    optimizer.grad_scale = pending.grad_scale if prior_scale is None else prior_scale.to(device) * pending.grad_scale
    if pending.found_inf is not None:
        optimizer.found_inf = pending.found_inf if prior_inf is None else \
            torch.maximum(prior_inf.to(device), pending.found_inf)


def _after_step(optimizer, args, kwargs) -> None:
    pending = optimizer.__dict__.pop(_PENDING, None)
    if pending is None or pending.saved is None:
        return
    for name, prior in zip(("grad_scale", "found_inf"), pending.saved):
        if prior is _MISSING:
            optimizer.__dict__.pop(name, None)
        else:
            setattr(optimizer, name, prior)


def _drop_stale_pending(optimizer) -> None:
    pending = optimizer.__dict__.get(_PENDING)
    if pending is None:
        return
    if _state(pending, optimizer) != "stale":
        raise RuntimeError("clip_optimizer_() was already called on this optimizer since its last step(); "
                           "its coefficient is folded into that step, so call the step first")
    optimizer.__dict__.pop(_PENDING)


def _active_scaler(scaler):
    if scaler is None:
        return None
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
    return scaler if scaler.is_enabled() else None  # a disabled scaler: unscale_ and step are no-ops


def _check_scaler_stage(scaler, optimizer) -> None:
    """Raises where torch's ``scaler.unscale_(optimizer)`` would, before anything is changed."""
    scaler._check_scale_growth_tracker("unscale_")
    stage = scaler._per_optimizer_states[id(optimizer)]["stage"]
    states = torch.amp.grad_scaler.OptState
    if stage is states.UNSCALED:
        raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
    if stage is states.STEPPED:
        raise RuntimeError("unscale_() is being called after step().")


def _inv_scale(scaler, device: torch.device) -> Tensor:
    scale = scaler._scale
    # as GradScaler.unscale_ computes it: the reciprocal in float64, then float32
    return scale.double().reciprocal().float().to(device, non_blocking=True)


def _mark_unscaled(scaler, optimizer, found_inf: Tensor) -> None:
    state = scaler._per_optimizer_states[id(optimizer)]
    state["found_inf_per_device"] = {found_inf.device: found_inf}
    state["stage"] = torch.amp.grad_scaler.OptState.UNSCALED


def _finite_or_raise(total: Tensor, norm_type: float) -> None:
    clip._check_finite(total, norm_type)  # the one documented host synchronisation


# NOTE: [groups under clip_optimizer_]
# ``groups=`` asks for each group's norm beside the total, from the same read. The groups name a
# subset of the optimizer's parameters, each in at most one group; the optimizer's other parameters
# form one hidden group, so the kernel still reads every gradient once and the total is the norm of
# all of them (what the call clips by). Folded and one-pass calls take the partials of that one pass
# (segclip.partials); the plain path is segclip.clip_groups_ over the same groups.

def _named_groups(groups, params: list) -> tuple[list[tuple[str, list]], list, dict[int, int]]:
    """``groups`` as ``[(name, [parameters])]``, the optimizer's parameters in no group (possibly
    none), and ``{id(parameter): group index}``; raises for a parameter the optimizer does not step
    or one in two groups."""
    named = _groups._named_groups(groups)
    known = set(map(id, params))
    index: dict[int, int] = {}
    for k, (name, ps) in enumerate(named):
        ids = list(map(id, ps))  # set and dict work in C: this runs every step (see note: [group fast path])
        if not known.issuperset(ids):
            raise ValueError(f"groups[{name!r}] holds a parameter that is not in the optimizer's param_groups")
        before = len(index)
        index.update(zip(ids, itertools.repeat(k)))
        if len(index) - before < len(set(ids)):  # an id already there: in an earlier group
            raise ValueError(f"a parameter is in two groups, {named[_earlier_group(named[:k], ids)][0]!r} and "
                             f"{name!r}: the total would count it twice")
    if len(index) < sum(len(ps) for _, ps in named):  # a parameter listed twice in its group: once
        named = [(n, list({id(p): p for p in ps}.values())) for n, ps in named]
    return named, [p for p in params if id(p) not in index], index


def _earlier_group(earlier: list[tuple[str, list]], ids: list[int]) -> int:
    """The index of the first of ``earlier`` groups that holds one of ``ids`` (an error message's detail)."""
    wanted = set(ids)
    return next(k for k, (_, ps) in enumerate(earlier) if not wanted.isdisjoint(map(id, ps)))


def _group_of(index: dict[int, int], num_groups: int, params: list) -> list[int]:
    """The group index of each of ``params``' gradients, in ``params`` order (num_groups: no group)."""
    return [index.get(id(p), num_groups) for p in params if p.grad is not None]


def _group_of_params(index: dict[int, int], num_groups: int, params: list) -> list[int]:
    """The group index of each of ``params`` (with or without a gradient), in order."""
    return [index.get(i, num_groups) for i in map(id, params)]


def _group_norms(grads: list[Tensor], group_of: list[int], num_groups: int, norm_type: float) -> Tensor:
    """The norms of ``num_groups`` groups and, last, of all gradients, from one read (see note:
    [group partials in one pass] in segclip/partials.py)."""
    vec = partials.local_partials(grads, group_of, num_groups + 1, norm_type, "auto")
    dtype = norm_math.accumulate_dtype(g.dtype for g in grads)
    norms = partials.finish(vec, norm_type, dtype)
    return torch.cat([norms[:num_groups], norms[-1:]])  # the hidden group dropped


def _fast_norm(optimizer, params: list, scaler, norm_type: float, fold, named, index) -> tuple[list[Tensor], Tensor] | None:
    """The folded path's common case: the gradients and their norm (with ``named``: the groups'
    norms, then the total) from one op call, or None when the general path must decide.

    NOTE: [fold fast path]
    As in clip.py's note: [fast path]: per-gradient checks in Python cost about as much as the norm
    pass of a small model. When the optimizer folds and the kernel takes the whole list, the op's own
    checks (one device, dense, a kernel dtype, in C++) are the general path's checks; the norm op
    writes nothing, so when it refuses the list the general path decides (and names the problem).
    """
    if fold is False or norm_type not in clip.KERNEL_NORM_TYPES or torch.compiler.is_compiling():
        return None
    if (contract_problem() if scaler is None else _scaler_problem(scaler)) is not None or \
            _unfused_reason(optimizer) is not None:
        return None
    try:
        entries = [p.grad for p in params]  # one read of .grad each, Nones kept for the group op
    except AttributeError:
        return None  # not a parameter: the general path names it
    grads = [g for g in entries if g is not None]
    if named is None:
        norms = clip._fast_norm(grads, norm_type, False, "auto")  # total_norm's fast path
    else:  # the groups, then a hidden group of the parameters in none (see note: [group fast path] in groups.py)
        result = _groups.group_op(entries, _group_of_params(index, len(named), params), len(named) + 1, norm_type,
                                  "auto")
        norms = None if result is None else torch.cat([result[0][:len(named)], result[1].reshape(1)])
    if norms is None or (scaler is not None and any(g.dtype == torch.float16 for g in grads)):
        return None  # (fp16 with a scaler: the general path raises as unscale_ does)
    return grads, norms


FOLDED, ONE_PASS, PLAIN = "folded", "one-pass", "plain"


def _choose(optimizer, grads: list[Tensor], scaler, norm_type: float, fold, skip_nonfinite: bool,
            warn: bool) -> str:
    """The path a call takes (see note: [three paths]); raises for a request that cannot be met,
    before anything is changed."""
    reason = (_unfused_reason(optimizer) if fold is not False else "fold=False") or \
        (_grad_reason(grads, norm_type) if grads else "there are no gradients")
    contract = (_scaler_problem(scaler) if scaler is not None else contract_problem()) if grads else None
    if fold is True:
        if reason is not None:
            raise ValueError(f"fold=True, but {reason}")
        if contract is not None:
            raise RuntimeError(f"fold=True, but folding is unavailable: {contract}")
    if reason is None and contract is None:
        return FOLDED
    if reason is None and warn:
        _warn_once(contract)
    if skip_nonfinite and grads and scaler is None:
        raise ValueError(f"skip_nonfinite=True needs the folded path or a scaler, but {reason or contract}")
    if scaler is not None and contract is None and grads and _grad_reason(grads, norm_type) is None:
        return ONE_PASS
    return PLAIN


def fold_path(optimizer: torch.optim.Optimizer, *, scaler: torch.amp.GradScaler | None = None,
              norm_type: float = 2.0, fold: bool | str = "auto", skip_nonfinite: bool = False) -> str:
    """Which path :func:`clip_optimizer_` would take now with these arguments: ``"folded"``,
    ``"one-pass"`` or ``"plain"`` (see note: [three paths]). Changes nothing; raises what that call
    would raise for an impossible ``fold=True`` or ``skip_nonfinite=True``."""
    if not any(fold is choice for choice in FOLD_CHOICES):
        raise ValueError(f"fold must be 'auto', True or False, got {fold!r}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return _choose(optimizer, clip._grads_of(params), _active_scaler(scaler), float(norm_type), fold,
                   skip_nonfinite, warn=False)


def clip_optimizer_(optimizer: torch.optim.Optimizer, max_norm: float, *, scaler: torch.amp.GradScaler | None = None,
                    norm_type: float = 2.0, error_if_nonfinite: bool = False, fold: bool | str = "auto",
                    skip_nonfinite: bool = False, groups=None) -> Tensor | _groups.GroupNorms:
    """Clips the gradients of every parameter of ``optimizer`` to a total norm of ``max_norm``, in as
    few passes as the optimizer allows, and returns the total norm before clipping (and, with
    ``groups``, each group's norm from the same pass).

    The results are those of torch's recipe: ``scaler.unscale_(optimizer)`` (when a scaler is given),
    then ``torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)``, then the caller's usual
    ``scaler.step(optimizer); scaler.update()`` or ``optimizer.step()``. The GradScaler ends in the
    state that recipe leaves: the step is skipped on an inf/NaN gradient, the scale and growth
    tracker move as usual, and ``scaler.unscale_(optimizer)`` raises until the next ``update()``.

    NOTE: [three paths]
    * **Folded** (``optimizer`` is torch's ``Adam``/``AdamW``/``SGD`` with ``fused=True``): one read
      pass takes the norm. ``optimizer.grad_scale`` is set to ``loss scale / coefficient`` (a device
      tensor, no host synchronisation) and the fused step divides each gradient by it. The
      coefficient applies to that one step only. **The gradients are untouched until the step**:
      ``p.grad`` read between this call and the step holds the unclipped (and, with a scaler, still
      scaled) values; after the step it holds the clipped, unscaled ones, as in torch's recipe (after
      a skipped step: still the scaled ones).
    * **One pass** (a scaler, an optimizer that cannot fold): one read pass takes the norm of the
      scaled gradients, divided by the loss scale (exact when the scale is a power of two, as
      GradScaler's are); one write multiplies them by ``coefficient x inverse scale``: unscale and clip
      share the write, and with a power-of-two scale each float32 gradient is rounded exactly as
      torch's two multiplications round it.
    * **Plain** (no scaler and no fold: this is ``fused_clip_``; or gradients on several devices,
      sparse gradients, ``norm_type <= 0``, or a torch without the internals folding relies on):
      ``scaler.unscale_(optimizer)`` then :func:`segclip.fused_clip_`.

    Non-finite gradients: with a scaler, every path skips the step (the inf/NaN check is the norm:
    a norm that overflows float32 counts as inf too). Without one, a NaN norm makes every gradient
    NaN and an inf norm makes the coefficient 0 (inf gradients become NaN, the others 0), as in
    torch; the step runs with those gradients. ``skip_nonfinite=True`` (folded path only) instead
    hands the fused step ``found_inf = (norm is not finite)``, so it skips the update without a host
    synchronisation. ``error_if_nonfinite=True`` raises torch's ``RuntimeError`` instead, at the
    cost of one host synchronisation, before any gradient or scaler state is changed.

    Args:
        optimizer: a ``torch.optim.Optimizer``; every parameter of its ``param_groups`` that has a
            ``.grad`` is clipped.
        max_norm: the largest allowed total norm; a non-negative number.
        scaler: the ``torch.amp.GradScaler`` that scaled the loss, or None. A disabled scaler counts
            as None (torch's ``unscale_`` does nothing then).
        norm_type: as for :func:`segclip.fused_clip_`. 1, 2 and inf run in the kernels.
        error_if_nonfinite: raise ``RuntimeError`` for a non-finite norm (one host synchronisation).
        fold: ``"auto"`` folds when ``optimizer`` is fused; ``True`` requires folding (``ValueError``
            saying why not, nothing changed); ``False`` never folds.
        skip_nonfinite: skip the folded step when the norm is not finite (see above). Needs the
            folded path when there is no scaler (``ValueError`` otherwise); implied by a scaler.
        groups: None, or named groups of the optimizer's parameters whose norms to report, as
            :func:`segclip.group_norms` takes them: ``{name: parameters}`` (e.g.
            ``{"backbone": model.backbone.parameters(), ...}``), a list of parameter iterables, or
            ``optimizer.param_groups`` itself. Each parameter in at most one group; parameters in no
            group still count in the total and are clipped. The norms come from the same read as
            the total: no extra pass (see note: [groups under clip_optimizer_]).

    Returns:
        The total norm of the (unscaled) gradients before clipping: a 0-dim float32 tensor (float64
        when any gradient is float64) on the gradients' device; ``tensor(0.)`` without gradients.
        With ``groups``, a :class:`segclip.GroupNorms` instead: ``.total`` is that tensor (the same
        value as without ``groups``: the group kernel combines the total as the norm kernel does),
        ``.norms`` the groups' norms before clipping, unscaled.

    Raises:
        TypeError: ``optimizer`` is no Optimizer, ``scaler`` no GradScaler, a gradient not floating point.
        ValueError: a bad ``max_norm``/``fold``; ``fold=True`` that cannot fold; fp16 gradients with a
            scaler (as ``unscale_`` raises); ``groups`` naming a parameter the optimizer does not
            step, or one parameter in two groups.
        RuntimeError: ``error_if_nonfinite`` and a non-finite norm; a second call before the step;
            ``unscale_`` already called in this iteration (as torch's second ``unscale_`` raises).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not any(fold is choice for choice in FOLD_CHOICES):
        raise ValueError(f"fold must be 'auto', True or False, got {fold!r}")
    max_norm = clip._parse_max_norm(max_norm)
    norm_type = float(norm_type)
    scaler = _active_scaler(scaler)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    named = rest = index = None
    if groups is not None:
        named, rest, index = _named_groups(groups, params)
    with torch.no_grad():
        fast = _fast_norm(optimizer, params, scaler, norm_type, fold, named, index)
    if fast is not None:
        path, (grads, norms) = FOLDED, fast
    else:
        grads = clip._grads_of(params)
        if scaler is not None and any(g.dtype == torch.float16 for g in grads):
            raise ValueError("Attempting to unscale FP16 gradients.")  # torch's unscale_ refuses them too
        path = _choose(optimizer, grads, scaler, norm_type, fold, skip_nonfinite, warn=True)
    if scaler is not None:
        _check_scaler_stage(scaler, optimizer)
    _drop_stale_pending(optimizer)

    if path == PLAIN:
        if scaler is not None:
            if error_if_nonfinite and grads:  # refuse before unscale_ changes anything
                with torch.no_grad():
                    _finite_or_raise(clip.total_norm(grads, norm_type), norm_type)
            scaler.unscale_(optimizer)
        if named is None:
            return clip.fused_clip_(params, max_norm, norm_type, error_if_nonfinite)
        names = {n for n, _ in named}
        hidden = next(f"_rest{i}" for i in range(len(names) + 1) if f"_rest{i}" not in names)
        result = _groups.clip_groups_(dict([*named, (hidden, rest)]), max_norm,
                                      norm_type, error_if_nonfinite)
        return _groups.GroupNorms(tuple(n for n, _ in named), result.norms[:len(named)], result.total)

    with torch.no_grad():
        device = grads[0].device
        if fast is not None:
            total = norms  # (with groups: the groups' norms, then the total)
        elif named is None:
            total = _norm(grads, norm_type)
        else:
            norms = _group_norms(grads, _group_of(index, len(named), params), len(named), norm_type)
        if scaler is not None:
            inv_scale = _inv_scale(scaler, device)
            if named is not None:
                norms = norms * inv_scale.to(norms.dtype)
            else:
                total = total * inv_scale.to(total.dtype)
        if named is not None:
            total = norms[-1]
        if error_if_nonfinite:
            _finite_or_raise(total, norm_type)
        coef = norm_math.clip_coefficient(total, max_norm)
        found_inf = (~torch.isfinite(total)).float() if (scaler is not None or skip_nonfinite) else None
        if path == ONE_PASS:
            torch._foreach_mul_(grads, coef * inv_scale.to(coef.dtype))
            _mark_unscaled(scaler, optimizer, found_inf)
            return _result(total, named, norms if named is not None else None)
        grad_scale = (1.0 / coef).float() if scaler is None else scaler._scale.to(device) / coef.float()
    if _HOOKED not in optimizer.__dict__:
        optimizer.__dict__[_HOOKED] = (optimizer.register_step_pre_hook(_before_step),
                                       optimizer.register_step_post_hook(_after_step))
    if scaler is not None:
        _mark_unscaled(scaler, optimizer, found_inf)
    optimizer.__dict__[_PENDING] = _Pending(grads, grad_scale, found_inf if scaler is None else None, scaler, optimizer)
    return _result(total, named, norms if named is not None else None)


def _result(total: Tensor, named, norms: Tensor | None):
    if named is None:
        return total
    return _groups.GroupNorms(tuple(n for n, _ in named), norms[:-1], total)


__all__ = ["clip_optimizer_", "fold_path", "contract_problem", "TESTED_TORCH", "FOLDABLE"]
