"""``patch_torch()``: segclip inside frameworks that call torch's clipping functions.

Lightning (``Trainer(gradient_clip_val=...)``), accelerate (``Accelerator.clip_grad_norm_``), timm
(``dispatch_clip_grad``, ``NativeScaler``) and most training loops call
``torch.nn.utils.clip_grad_norm_`` by attribute at call time. ``patch_torch()`` puts segclip's
functions under torch's names, in ``torch.nn.utils`` and in ``torch.nn.utils.clip_grad``:

=========================  ==========================  ======================================
torch's name               replaced by                 in
=========================  ==========================  ======================================
``clip_grad_norm_``        ``segclip.fused_clip_``     ``torch.nn.utils``, ``...clip_grad``
``get_total_norm``         ``segclip.total_norm``      ``torch.nn.utils``
``clip_grads_with_norm_``  ``segclip.clip_with_norm_`` ``torch.nn.utils``
``clip_grad_value_``       ``segclip.clip_grad_value_`` ``torch.nn.utils``, ``...clip_grad``
=========================  ==========================  ======================================

(``torch.nn.utils.clip_grad`` defines ``get_total_norm`` and ``clip_grads_with_norm_`` under private
names, ``_get_total_norm`` and ``_clip_grads_with_norm_``, which only torch's own
``clip_grad_norm_`` calls; those are left alone, so torch's function, wherever it is still
called from, runs as torch's, whole. The deprecated ``clip_grad_norm`` calls the module's
``clip_grad_norm_`` and so reaches segclip. ``clip_grad_value_`` is replaced only when segclip
defines one.)

The one limit: a module that ran ``from torch.nn.utils import clip_grad_norm_`` before the patch
holds torch's function under its own name and keeps calling it. ``patch_torch()`` looks through the
modules already imported (``sys.modules``) and warns, naming each one that holds one of torch's
replaced functions; it cannot see a reference kept elsewhere (a local variable, a closure, a default
argument, an object's attribute). Patch before importing such code, or call segclip there.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterable

import torch.nn.utils
import torch.nn.utils.clip_grad

from . import clip

# torch's name -> (segclip's module, the replacement's name), looked up when patching.
REPLACEMENTS = {
    "clip_grad_norm_": ("segclip.clip", "fused_clip_"),
    "get_total_norm": ("segclip.clip", "total_norm"),
    "clip_grads_with_norm_": ("segclip.clip", "clip_with_norm_"),
    "clip_grad_value_": ("segclip.value", "clip_grad_value_"),
}
_MODULES = (torch.nn.utils, torch.nn.utils.clip_grad)

# NOTE: [patch stack] Every patch_torch() call returns its own handle and pushes it on this stack;
# torch's attributes hold the wrappers of the newest handle still active. undo() removes its handle
# wherever it is in the stack: the newest remaining one is installed again, and when none remains
# the objects that were there before the first patch are put back. So nested patches (two
# libraries, a context manager inside a patched script) undo in any order, and the originals are
# never mistaken for an earlier patch's wrappers.
_lock = threading.RLock()
_stack: list[TorchPatch] = []
_originals: dict[tuple[str, str], object] = {}  # (module name, attribute) -> the object before patching


class TorchPatch:
    """The handle ``patch_torch()`` returns: ``undo()`` it, or use it as a context manager.

    Attributes:
        backend: the backend segclip's functions are called with.
        functions: torch's names that this patch replaces (those segclip has a function for).
        calls: how many times each replaced name was called through this patch (a ``Counter``):
            a quick way to see that a framework really reaches segclip.
        active: whether the patch is still applied (False after ``undo()``).
    """

    def __init__(self, backend: str, functions: tuple[str, ...]):
        self.backend = backend
        self.functions = functions
        self.calls: Counter[str] = Counter()
        self.active = True
        self._wrappers = {name: _wrapper(name, _replacement(name), backend, self.calls) for name in functions}

    def undo(self) -> None:
        """Removes this patch (idempotent). When it was the last one active, the exact objects that
        torch's modules held before the first patch are put back."""
        with _lock:
            if not self.active:
                return
            self.active = False
            _stack.remove(self)
            _uninstall(self._wrappers)
            if _stack:
                _install(_stack[-1]._wrappers)
            else:
                _originals.clear()

    def __enter__(self) -> TorchPatch:
        return self

    def __exit__(self, *exc_info) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return f"<segclip.TorchPatch {state} backend={self.backend!r} functions={list(self.functions)}>"


def patch_torch(*, backend: str = "auto", functions: Iterable[str] | None = None,
                warn_stale: bool = True) -> TorchPatch:
    """Puts segclip's clipping functions under torch's names until the returned handle is undone.

    Example::

        import segclip
        patch = segclip.patch_torch()              # before the framework's training starts
        trainer.fit(model)                         # its clip_grad_norm_ calls run segclip's
        patch.undo()                               # or: with segclip.patch_torch(): ...

    Args:
        backend: passed to each of segclip's functions: ``"auto"`` (default), ``"torch"``, ``"cpu"``
            or ``"cuda"`` (see ``segclip.fused_clip_``).
        functions: torch's names to replace, a subset of ``clip_grad_norm_``, ``get_total_norm``,
            ``clip_grads_with_norm_``, ``clip_grad_value_``; default: all that segclip has.
        warn_stale: warn when an already-imported module holds one of torch's replaced functions
            under a name of its own (it imported it before the patch, and keeps calling torch's).

    Returns:
        A :class:`TorchPatch`. Calling ``patch_torch()`` again while patched is safe: segclip's
        functions are never wrapped in each other, the newest patch's options apply, and undoing
        every handle (in any order) restores torch's original objects.

    Raises:
        ValueError: an unknown ``backend`` or name in ``functions``, or ``clip_grad_value_``
            requested where segclip has none.
    """
    clip._check_backend(backend)
    available = tuple(name for name in REPLACEMENTS if _replacement(name, missing_ok=True) is not None)
    if functions is None:
        chosen = available
    else:
        chosen = tuple(dict.fromkeys(functions if not isinstance(functions, str) else [functions]))
        for name in chosen:
            if name not in REPLACEMENTS:
                raise ValueError(f"functions: {name!r} is not one of {tuple(REPLACEMENTS)}")
            if name not in available:
                raise ValueError(f"functions: segclip has no {REPLACEMENTS[name][1]} in this version")
    with _lock:
        handle = TorchPatch(backend, chosen)
        if not _stack:
            _save_originals()
        elif _stack[-1].functions != chosen:  # names the newer patch does not replace go back first
            _uninstall(_stack[-1]._wrappers)
        _install(handle._wrappers)
        _stack.append(handle)
        stale = _stale_references(chosen) if warn_stale else []
    if stale:
        listed = "; ".join(f"{mod}.{attr} (torch's {name})" for mod, attr, name in stale[:10])
        more = f" and {len(stale) - 10} more" if len(stale) > 10 else ""
        warnings.warn(f"segclip.patch_torch(): already-imported modules hold torch's function under a name of "
                      f"their own and will keep calling it, not segclip's: {listed}{more}. Patch before "
                      "importing them, or call segclip there.", UserWarning, stacklevel=2)
    return handle


def _replacement(name: str, missing_ok: bool = False) -> Callable | None:
    module_name, attr = REPLACEMENTS[name]
    try:
        fn = getattr(importlib.import_module(module_name), attr, None)
    except ImportError:  # segclip.value: a sibling module that older versions lack
        fn = None
    if fn is None and not missing_ok:
        raise ValueError(f"segclip has no {attr}")
    return fn


def _wrapper(name: str, fn: Callable, backend: str, calls: Counter) -> Callable:
    params = inspect.signature(fn).parameters
    takes_backend = "backend" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())

    @functools.wraps(fn)
    def patched(*args, **kwargs):
        calls[name] += 1
        if takes_backend and backend != "auto":
            kwargs.setdefault("backend", backend)
        return fn(*args, **kwargs)

    patched.__segclip_patch__ = name
    return patched


def _targets(names: Iterable[str]):
    """(module, attribute) pairs to patch: each of the names that the module defines."""
    return [(m, n) for m in _MODULES for n in names if n in vars(m)]


def _save_originals() -> None:
    _originals.clear()
    for module, name in _targets(REPLACEMENTS):
        _originals[(module.__name__, name)] = getattr(module, name)


def _install(wrappers: dict[str, Callable]) -> None:
    for module, name in _targets(wrappers):
        setattr(module, name, wrappers[name])


def _uninstall(wrappers: dict[str, Callable]) -> None:
    """Puts the originals back where these wrappers are installed; an attribute that someone else
    replaced after the patch is left as it is, with a warning (restoring it would undo their patch)."""
    for module, name in _targets(wrappers):
        current, original = getattr(module, name), _originals[(module.__name__, name)]
        if current is wrappers[name]:
            setattr(module, name, original)
        elif current is not original and getattr(current, "__segclip_patch__", None) is None:
            warnings.warn(f"segclip: {module.__name__}.{name} was replaced by something else after "
                          "segclip.patch_torch(); it is left as it is", UserWarning, stacklevel=3)


def _stale_references(names: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """(module, attribute, torch's name) for each already-imported module, other than torch's patched
    ones and segclip's, whose globals hold one of the original functions being replaced."""
    originals = {id(_originals[(m.__name__, n)]): n for m, n in _targets(names)}
    skip = {m.__name__ for m in _MODULES}
    found = []
    for mod_name, module in list(sys.modules.items()):
        if mod_name in skip or mod_name == "segclip" or mod_name.startswith("segclip."):
            continue
        try:
            items = list(vars(module).items())
        except Exception:  # noqa: BLE001  (not a module: some packages put other objects there)
            continue
        found.extend((mod_name, attr, originals[id(value)]) for attr, value in items if id(value) in originals)
    return found
