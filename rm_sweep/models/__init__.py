"""The model zoo: ResNet-18/50, DenseNet-121, SENet-18 and VGG-19 with Random Mask built in.

    model = create_model("resnet18", mask=MaskConfig(shallow_ratio=0.7), width=0.25)
"""
from rm_sweep.models import densenet, resnet, senet, vgg  # noqa: F401  (registers the architectures)
from rm_sweep.models.checkpoint import (
    checkpoint_bytes,
    count_parameters,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from rm_sweep.models.registry import (
    Classifier,
    ModelConfig,
    build,
    check_arch,
    create_model,
    list_models,
    model_revision,
)

__all__ = [
    "Classifier",
    "ModelConfig",
    "build",
    "check_arch",
    "checkpoint_bytes",
    "count_parameters",
    "create_model",
    "list_models",
    "load_checkpoint",
    "model_revision",
    "read_checkpoint",
    "save_checkpoint",
]
