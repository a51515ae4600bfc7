"""Small helpers shared by the zoo models."""

from __future__ import annotations

from torch import nn


def scaled(channels: int, width: float, divisor: int = 1) -> int:
    """`channels * width`, rounded to a multiple of `divisor`, at least `divisor`."""
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    c = channels * width
    return max(divisor, int(c / divisor + 0.5) * divisor)


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, bn: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU(inplace=True))
    return layers


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs, unit BatchNorm, small-normal linears (the usual CIFAR-zoo initialisation)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
