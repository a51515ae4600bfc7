"""Named parts of a model: its stages (blocks), its classifier and its embedding.

Methods that need to know a model's structure (hints at stage outputs, head sharing, grafting) ask
:func:`model_parts`. Zoo models declare their parts (``kd_stages`` and ``kd_classifier`` attributes);
for any other model the parts are given as module paths in the config, or, for the classifier, found as
the last ``nn.Linear``. The embedding is always the input of the classifier (tap ``"<classifier>:input"``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ModelError
from ..taps import resolve


@dataclass(frozen=True)
class ModelParts:
    stages: tuple[str, ...]
    classifier: str

    @property
    def embedding(self) -> str:
        """Tap path of the embedding: the input of the classifier."""
        return f"{self.classifier}:input"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        else:
            return model


def model_parts(model: nn.Module, stages: list[str] | None = None, classifier: str | None = None) -> ModelParts:
    """The parts of `model`: given paths win, then the model's own declaration, then a search."""
    model = unwrap(model)
    found_stages = tuple(stages) if stages else tuple(getattr(model, "kd_stages", ()) or ())
    head = classifier or getattr(model, "kd_classifier", None)
    if head is None:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ModelError(
                f"{type(model).__name__} has no nn.Linear classifier to find; give its module path "
                "(e.g. student.classifier_path or the method's classifier option)"
            )
        head = linears[-1]
    for p in (*found_stages, head):
        resolve(model, p)  # raises with the closest valid paths
    return ModelParts(found_stages, head)


def require_stages(model: nn.Module, what: str) -> tuple[str, ...]:
    """Stage paths of `model`, or a clear error asking for them."""
    parts = model_parts(model)
    if not parts.stages:
        raise ModelError(
            f"{what}: {type(unwrap(model)).__name__} does not declare its stages; list the module paths "
            "of its blocks in the method options"
        )
    return parts.stages
