"""The functional ops take and refuse integer arguments as torch's argument parser does --
also after an equal-looking argument (``1``, ``True``, ``1.0``, ``np.int64(1)``) had its
verdict cached (:func:`handmade._utils.argument_cache`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import handmade.functional as HF

# plain ints first, so that every later value meets a cached verdict on its equal
VALUES: list[Any] = [
    1,
    (1, 2),
    True,
    1.0,
    np.int64(1),
    np.bool_(True),
    torch.tensor(1),
    torch.tensor(True),
    torch.tensor(1.0),
    torch.tensor([1, 1]),
    (1, True),
    (True, 1),
    (True, True),
    (np.int64(1), 2),
    (1, np.bool_(True)),
    (torch.tensor(1), 1),
    (1, 1.0),
    [1, 2],
    [True],
    (1,),
    (),
    (1, 1, 1),
    torch.Size([1, 2]),
    np.array([1, 1]),
    "ab",
]

OPS: dict[str, tuple[Callable[..., Any], Callable[..., Any], dict[str, Any]]] = {
    "conv2d": (F.conv2d, HF.conv2d, {"weight": torch.ones(2, 2, 3, 3)}),
    "max_pool2d": (F.max_pool2d, HF.max_pool2d, {"kernel_size": 2}),
    "avg_pool2d": (F.avg_pool2d, HF.avg_pool2d, {"kernel_size": 2}),
}
ARGS = {
    "conv2d": ["stride", "padding", "dilation", "groups"],
    "max_pool2d": ["kernel_size", "stride", "padding", "dilation"],
    "avg_pool2d": ["kernel_size", "stride", "padding"],
}


def outcome(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """The output's shape, or the type of the exception raised."""
    try:
        return tuple(fn(torch.ones(1, 2, 6, 6), **kwargs).shape)
    except Exception as e:  # noqa: BLE001 (any exception type is the outcome)
        return type(e)


@pytest.mark.parametrize("op, arg", [(op, arg) for op, args in ARGS.items() for arg in args])
def test_integer_arguments_are_taken_as_torch_takes_them(op: str, arg: str) -> None:
    torch_fn, handmade_fn, fixed = OPS[op]
    for value in VALUES:
        if arg == "groups" and isinstance(value, torch.Tensor) and value.dtype == torch.bool:
            continue  # (torch fails an internal assert there)
        kwargs = {**fixed, arg: value}
        expected = outcome(torch_fn, **kwargs)
        for _ in range(2):  # the second call meets its own cached verdict too
            assert outcome(handmade_fn, **kwargs) == expected, (op, arg, value)
