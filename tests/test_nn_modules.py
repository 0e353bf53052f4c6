"""handmade.nn modules are drop-in for torch.nn's: same init under the same seed, same
repr and state_dict keys, state_dicts load either way, same outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import handmade.nn as hnn


def _pair_of_modules(cls_name: str, *args, **kwargs) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(1234)
    ours = getattr(hnn, cls_name)(*args, **kwargs)
    torch.manual_seed(1234)
    theirs = getattr(nn, cls_name)(*args, **kwargs)
    return ours, theirs


def _assert_same_outputs_and_grads(ours: nn.Module, theirs: nn.Module, x: torch.Tensor) -> None:
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    if isinstance(y1, tuple):  # return_indices=True
        assert torch.equal(y1[1], y2[1])
        y1, y2 = y1[0], y2[0]
    torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-10)
    upstream = torch.randn_like(y1)
    y1.backward(upstream)
    y2.backward(upstream)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-10)
    for (name, p1), (_, p2) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-10, atol=1e-10, msg=name)


CONV_ARGS = [
    ((3, 8, 3), dict()),
    ((4, 6, (3, 2)), dict(stride=2, padding=1, groups=2, bias=False)),
    ((3, 5, 4), dict(padding="same", dilation=2)),
    ((4, 4, 3), dict(groups=4, padding="valid")),
]


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("args, kwargs", CONV_ARGS)
def test_conv2d_module_matches_torch(args, kwargs, padding_mode: str) -> None:
    if padding_mode != "zeros" and kwargs.get("padding") == "valid":
        kwargs = dict(kwargs, padding=1)
    ours, theirs = _pair_of_modules("Conv2d", *args, padding_mode=padding_mode, **kwargs)
    ours.double(), theirs.double()
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), f"different init for {key}"
    _assert_same_outputs_and_grads(ours, theirs, torch.randn(2, args[0], 9, 8, dtype=torch.float64))


def test_state_dict_loads_either_way() -> None:
    torch.manual_seed(0)
    ours, theirs = hnn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
    ours.load_state_dict(theirs.state_dict())
    assert all(
        torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters(), strict=True)
    )
    with torch.no_grad():
        ours.weight.mul_(2)
    theirs.load_state_dict(ours.state_dict())
    assert torch.equal(theirs.weight, ours.weight)


POOL_ARGS = [
    ("MaxPool2d", (2,), dict()),
    ("MaxPool2d", (3,), dict(stride=2, padding=1, ceil_mode=True, return_indices=True)),
    ("MaxPool2d", ((2, 3),), dict(stride=1, padding=(1, 1), dilation=(2, 1))),
    ("AvgPool2d", (2,), dict()),
    ("AvgPool2d", (3,), dict(stride=2, padding=1, ceil_mode=True, count_include_pad=False)),
    ("AvgPool2d", ((3, 2),), dict(stride=(2, 1), padding=(1, 0), divisor_override=4)),
]


@pytest.mark.parametrize("cls_name, args, kwargs", POOL_ARGS)
def test_pool_module_matches_torch(cls_name: str, args, kwargs) -> None:
    ours, theirs = _pair_of_modules(cls_name, *args, **kwargs)
    assert repr(ours) == repr(theirs)
    _assert_same_outputs_and_grads(ours, theirs, torch.randn(2, 3, 9, 8, dtype=torch.float64))
    _assert_same_outputs_and_grads(ours, theirs, torch.randn(3, 9, 8, dtype=torch.float64))
