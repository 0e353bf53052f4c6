"""Drop-in conversion of a model's torch conv/pool layers to the handmade ones.

:func:`convert` walks a model and replaces every :class:`torch.nn.Conv2d`,
:class:`torch.nn.MaxPool2d` and :class:`torch.nn.AvgPool2d` by :class:`handmade.nn.Conv2d`,
:class:`handmade.nn.MaxPool2d` and :class:`handmade.nn.AvgPool2d`.  The handmade modules
subclass torch's and keep their state (parameters, buffers, hyper-parameters, hooks,
training flag), so the converted model holds the same weights, on the same device and in
the same dtype, with the same ``state_dict`` keys.
"""

from __future__ import annotations

import copy

from torch import nn

from . import nn as handmade_nn

__all__ = ["REPLACEMENTS", "convert"]

#: Exact torch type -> handmade replacement.
REPLACEMENTS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv2d: handmade_nn.Conv2d,
    nn.MaxPool2d: handmade_nn.MaxPool2d,
    nn.AvgPool2d: handmade_nn.AvgPool2d,
}


def _swap(module: nn.Module) -> nn.Module:
    """The handmade counterpart of ``module``, sharing its parameters and buffers.

    The new module is created without running ``__init__`` (no re-initialization, no RNG
    use): it gets a copy of the old module's attribute dict, whose parameter/buffer dicts
    are copied too (so the two modules can diverge structurally) while the
    :class:`~torch.nn.Parameter` and buffer tensors themselves are shared.
    """
    cls = REPLACEMENTS[type(module)]
    new = cls.__new__(cls)
    state = dict(module.__dict__)
    for key in ("_parameters", "_buffers", "_modules"):
        if key in state:
            state[key] = dict(state[key])
    new.__dict__.update(state)
    return new


def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace torch's Conv2d/MaxPool2d/AvgPool2d in ``model`` with the handmade modules.

    Args:
        model: any module (the root itself may be one of the three layers).
        inplace: if ``True``, modify ``model`` itself and share its
            :class:`~torch.nn.Parameter` objects (training the result trains ``model``'s
            weights); if ``False`` (default), work on a :func:`copy.deepcopy` of it, so the
            result has its own copies of the weights and ``model`` is left untouched.

    Returns:
        The converted model (``model`` itself when ``inplace`` and the root is not a
        replaced layer).  Training/eval mode, device, dtype, ``padding_mode``, hooks and
        every other module are kept as they are.

    Only modules whose type is *exactly* ``torch.nn.Conv2d``, ``torch.nn.MaxPool2d`` or
    ``torch.nn.AvgPool2d`` are replaced: a subclass may have its own ``forward`` or extra
    behaviour that the handmade module would silently drop, so subclasses (including the
    handmade modules themselves) are left alone.  A module registered at several places
    (shared) is replaced by one shared handmade module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert() expects an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    replaced: dict[int, nn.Module] = {}

    def replacement(module: nn.Module) -> nn.Module:
        if id(module) not in replaced:
            replaced[id(module)] = _swap(module)
        return replaced[id(module)]

    if type(model) in REPLACEMENTS:
        return replacement(model)
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            if child is not None and type(child) in REPLACEMENTS:
                parent._modules[name] = replacement(child)
    return model
