"""Model architectures by name: kdpipe's small built-ins and any torchvision classifier.

Teachers and students are both built here, from a name and flat arguments, so a checkpoint
names its architecture with a string and nothing else in kdpipe needs to know the classes.
Built-ins are sized for the bundled 8x8 digits; torchvision names cover real images.
"""

from __future__ import annotations

from torch import nn

from kdpipe.errors import ConfigError

BUILTIN_ARCHS = ("mlp", "cnn", "wide_cnn", "small_mlp", "tiny_mlp", "tiny_cnn", "linear")


def _imported(arch: str, num_classes: int, input_shape: tuple[int, ...], allow_import: bool) -> nn.Module:
    import importlib

    module, _, function = arch.partition(":")
    if not allow_import:
        raise ConfigError(f"architecture {arch!r} imports module {module!r} and runs its code: set "
                         "`allow_import: true` at the top of the config to allow it (only for code you trust)")
    try:
        fn = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"architecture {arch!r}: cannot import {function!r} from {module!r} ({e})") from e
    model = fn(num_classes, tuple(input_shape))
    if not isinstance(model, nn.Module):
        raise ConfigError(f"architecture {arch!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _mlp(in_features: int, hidden: list[int], num_classes: int, dropout: float) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _cnn(channels: int, widths: tuple[int, int], hidden: int, num_classes: int) -> nn.Module:
    c1, c2 = widths
    return nn.Sequential(
        nn.Conv2d(channels, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c2, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(c2 * 4, hidden), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(hidden, num_classes),
    )


def build_model(arch: str, num_classes: int, input_shape: tuple[int, ...], allow_import: bool = False) -> nn.Module:
    """Build an untrained classifier mapping [B, *input_shape] to logits [B, num_classes].

    `arch` is a kdpipe built-in (see BUILTIN_ARCHS), a torchvision model name (e.g. "resnet18"),
    built with random weights (kdpipe never downloads weights), or "package.module:function",
    called as function(num_classes, input_shape) -> nn.Module. That imports and runs the module's
    code, so it needs the explicit opt-in `allow_import` (the config's top-level allow_import).
    """
    if ":" in arch:
        return _imported(arch, num_classes, input_shape, allow_import)
    channels = input_shape[0]
    in_features = 1
    for d in input_shape:
        in_features *= d
    if arch == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))
    if arch == "small_mlp":  # the demo's student: one hidden layer, no dropout
        return _mlp(in_features, [256], num_classes, dropout=0.0)
    if arch == "tiny_mlp":
        return _mlp(in_features, [16], num_classes, dropout=0.0)
    if arch == "mlp":
        return _mlp(in_features, [256, 256], num_classes, dropout=0.2)
    if arch == "tiny_cnn":
        return nn.Sequential(
            nn.Conv2d(channels, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(4 * (input_shape[1] // 2) * (input_shape[2] // 2), num_classes),
        )
    if arch == "cnn":
        return _cnn(channels, (16, 32), 64, num_classes)
    if arch == "wide_cnn":
        return _cnn(channels, (48, 96), 128, num_classes)
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ConfigError(
            f"unknown architecture {arch!r}: use one of {', '.join(BUILTIN_ARCHS)} "
            "or a torchvision classification model name such as 'resnet18'"
        )
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)

