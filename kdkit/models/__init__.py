"""kdkit's model zoo and model helpers.

``create(name, num_classes=..., in_channels=...)`` builds a zoo model; ``zoo_names()`` lists them;
``model_parts(model)`` tells a model's stages, classifier and embedding.
"""

from . import detection, face, lenet, mlp, mobilenetv2, resnet, segmentation, vgg, wrn  # noqa: F401  (registers the zoo)
from .parts import ModelParts, model_parts, require_stages, unwrap
from .registry import build, check_factory_args, create, entry, import_factory, zoo_names

__all__ = [
    "ModelParts",
    "build",
    "check_factory_args",
    "create",
    "entry",
    "import_factory",
    "model_parts",
    "require_stages",
    "unwrap",
    "zoo_names",
]
