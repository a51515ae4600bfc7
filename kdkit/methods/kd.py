"""Vanilla knowledge distillation (Hinton, Vinyals & Dean, 2015).

    L = ce_weight * CE(z_s, y) + kd_weight * T^2 * KL( softmax(z_t/T) || softmax(z_s/T) )

Defaults T=4, kd_weight=0.9, ce_weight=0.1 (the common CIFAR benchmark setting).
"""

from __future__ import annotations

from . import register
from .distiller import Distiller, DistillOptions


@register
class KD(Distiller):
    name = "kd"
    Options = DistillOptions
    tasks = ("classification", "segmentation", "detection")
