"""``handmade.convert`` and model-level parity (``python -m parity models``)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import handmade.nn as hnn
from handmade.convert import convert
from parity import models

pytestmark = pytest.mark.usefixtures("one_thread")


class FancyConv(nn.Conv2d):
    """A user subclass with its own forward: convert must leave it alone."""

    def forward(self, x):
        return super().forward(x) * 2


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    shared = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        shared,
        nn.Sequential(shared, nn.MaxPool2d(2, ceil_mode=True)),
        FancyConv(4, 4, 1),
        nn.AvgPool2d(2, count_include_pad=False, padding=1),
    )


def test_convert_replaces_exact_types_and_keeps_everything_else():
    model = _net().double().eval()
    x = torch.randn(2, 3, 11, 13, dtype=torch.float64)
    converted = convert(model)
    assert type(converted[0]) is hnn.Conv2d and type(converted[3]) is hnn.Conv2d
    assert type(converted[4][1]) is hnn.MaxPool2d and type(converted[6]) is hnn.AvgPool2d
    assert type(converted[5]) is FancyConv, "subclasses are left alone"
    assert type(converted[1]) is nn.BatchNorm2d and type(converted[2]) is nn.ReLU
    assert converted[3] is converted[4][0], "a shared module stays shared"
    assert converted[3].padding_mode == "reflect" and converted[4][1].ceil_mode
    assert not converted.training and not converted[0].training
    assert converted[0].weight.dtype == torch.float64
    assert converted.state_dict().keys() == model.state_dict().keys()
    # a copy: the original is untouched and owns different (equal) tensors
    assert type(model[0]) is nn.Conv2d
    assert converted[0].weight is not model[0].weight
    assert torch.equal(converted[0].weight, model[0].weight)
    torch.testing.assert_close(converted(x), model(x), rtol=1e-12, atol=1e-12)


def test_convert_inplace_shares_parameters():
    model = _net()
    weight = model[0].weight
    result = convert(model, inplace=True)
    assert result is model and type(model[0]) is hnn.Conv2d
    assert model[0].weight is weight
    with torch.no_grad():
        weight.add_(1.0)
    assert torch.equal(model[0].weight, weight)


def test_convert_keeps_training_mode_hooks_and_root_layers():
    conv = nn.Conv2d(2, 3, 3).train()
    calls = []
    conv.register_forward_hook(lambda m, i, o: calls.append(type(m)))
    root = convert(conv)
    assert type(root) is hnn.Conv2d and root.training
    root(torch.randn(1, 2, 5, 5))
    assert calls == [hnn.Conv2d]
    assert convert(nn.ReLU()).__class__ is nn.ReLU
    with pytest.raises(TypeError, match="nn.Module"):
        convert("not a module")


def test_converted_model_trains_like_the_original():
    torch.manual_seed(1)
    model = _net().double().train()
    copy = convert(model)
    x = torch.randn(3, 3, 9, 9, dtype=torch.float64)
    losses = []
    for m in (model, copy):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            loss = m(x).square().mean()
            loss.backward()
            opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-10, abs=1e-12)


# Small inputs, each architecture in about a second (vgg11 is left to the CLI: its float64
# classifier alone is 1 GB). Eval mode: with so few pixels left in the last stages, a
# train-mode BatchNorm normalizes over a handful of values and amplifies rounding noise
# (torch against torch in channels_last differs by up to 5e-3 there), which would hide what
# is being compared. Train mode (batch statistics, seeded dropout) is checked at the CLI's
# sizes below and on squeezenet (dropout, no BatchNorm).
SMALL = {
    "resnet18": (2, 3, 32, 32),
    "mobilenet_v2": (2, 3, 32, 32),
    "squeezenet1_0": (2, 3, 33, 33),
    "googlenet": (2, 3, 32, 32),
    "densenet121": (2, 3, 40, 40),
}


@pytest.mark.parametrize("name", list(SMALL))
def test_model_parity(name):
    result = models.compare_model(name, "eval", input_shape=SMALL[name])
    assert result.replaced["torch_left"] == 0 and result.replaced["Conv2d"] > 0
    assert result.passed, result


@pytest.mark.parametrize(
    ("name", "shape"), [("squeezenet1_0", (2, 3, 33, 33)), ("resnet18", (2, 3, 64, 64))]
)
def test_model_parity_train_mode(name, shape):
    result = models.compare_model(name, "train", input_shape=shape)
    assert result.passed, result


def test_model_parity_detects_a_difference(monkeypatch):
    forward = hnn.MaxPool2d.forward
    monkeypatch.setattr(hnn.MaxPool2d, "forward", lambda self, x: forward(self, x) * (1 + 1e-8))
    result = models.compare_model("squeezenet1_0", "eval", input_shape=SMALL["squeezenet1_0"])
    assert not result.passed and result.out_rel > 1e-10


def test_models_cli(tmp_path, capsys):
    out = tmp_path / "models.json"
    code = models.main(
        ["--models", "squeezenet1_0,resnet18", "--mode", "eval", "--size", "33", "--json", str(out)]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert report["passed"] and [r["model"] for r in report["results"]] == [
        "squeezenet1_0",
        "resnet18",
    ]
    assert "squeezenet1_0" in capsys.readouterr().out
    assert models.main(["--models", "alexnet"]) == 2
