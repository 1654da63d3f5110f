"""Building the network and the one preprocessing path shared by train, predict and explain.

`AttributeNet` = a convolutional backbone (`features`) + a head mapping to one output per rated
attribute (standardised units). `embed` gives the penultimate features the report's manifold view
uses; `last_conv` is the layer Grad-CAM attributes to.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from psyface.errors import PsyfaceError

WEIGHTS_FILE = "weights.safetensors"
SPEC_FILE = "spec.json"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_VGGS = ("vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn")
# VGG16-BN's layer layout with every width divided by 8 (1/64 of the convolution cost): the same
# blocks and pooling, cheap enough for many-cell experiments on a CPU; batch norm lets it train
# from scratch in a few epochs.
NARROW_VGG16 = "vgg16_bn_narrow"
_VGG16_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]

Head = Literal["gap", "paper"]


@dataclass
class ModelSpec:
    """Everything needed to rebuild a trained model and put its outputs back on the rating scale."""

    arch: str = "vgg16"
    head: Head = "gap"
    attributes: list[str] = field(default_factory=list)
    image_size: int = 64
    target_mean: list[float] = field(default_factory=list)
    target_std: list[float] = field(default_factory=list)
    scales: dict[str, list[float]] = field(default_factory=dict)
    per_attribute: bool = False  # one single-output network per attribute (an AttributeEnsemble)
    last_conv_stride: int = 16  # input pixels per step of the last convolution's grid (VGG's own: 16)
    # The input normalisation the (initial) weights expect; specs written before it existed were ImageNet's.
    input_mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    input_std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    taps: list[str] = field(default_factory=list)  # linear probe: backbone layers pooled into its features
    probe: bool = False  # a ProbeNet: frozen backbone, pooled features (+ taps), linear head
    flip_average: bool = False  # predictions are the mean over each image and its mirror image

    def to_rating_scale(self, standardised: np.ndarray) -> np.ndarray:
        """Model outputs (standardised) -> ratings on each attribute's scale."""
        return standardised * np.asarray(self.target_std) + np.asarray(self.target_mean)


class AttributeNet(nn.Module):
    """Backbone + head; `forward` returns (batch, n_attributes) standardised predictions."""

    def __init__(self, features: nn.Module, pre_logits: nn.Module, last_layer: nn.Linear):
        super().__init__()
        self.features = features
        self.pre_logits = pre_logits
        self.last_layer = last_layer

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate representation (input to the last linear layer)."""
        return self.pre_logits(self.features(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.embed(images))

    @property
    def last_conv(self) -> nn.Conv2d:
        """Grad-CAM's layer. A network whose only convolution is its input stem (a transformer's
        patch embedding) has no convolutional feature map to attribute to."""
        convs = [m for m in self.features.modules() if isinstance(m, nn.Conv2d)]
        if len(convs) < 2:
            raise PsyfaceError("Grad-CAM is not available for this architecture: it has no convolution past its input stem")
        return convs[-1]


class ProbeNet(AttributeNet):
    """A linear probe: the backbone's globally pooled output, concatenated with the pooled outputs of
    the `taps` (module names inside the torchvision/timm model, or indices of a VGG `features`
    stack), standardised with the training faces' mean and SD (buffers: folding them into the linear
    weights loses float32 precision on near-constant features), read by one linear layer. An
    AttributeNet like any other, so predict, serve, explain and the report use it unchanged; forward
    hooks collect the taps, so the backbone runs once."""

    def __init__(self, features: nn.Module, taps: list[str], last_layer: nn.Linear):
        super().__init__(features, nn.Identity(), last_layer)
        self.register_buffer("feature_mean", torch.zeros(last_layer.in_features))
        self.register_buffer("feature_std", torch.ones(last_layer.in_features))
        self.taps = list(taps)
        self._tapped: list[torch.Tensor] = []
        inner = backbone(features)
        modules = dict(inner.named_modules())
        unknown = [name for name in self.taps if name not in modules or not name]
        if unknown:
            raise PsyfaceError(f"train.probe.layers {unknown} are not layers of this backbone; some that are: "
                               f"{[n for n, _ in inner.named_children()]}")
        for name in self.taps:
            modules[name].register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        self._tapped.append(output)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        self._tapped = []
        final = self.features(images)
        pooled = torch.cat([global_pool(t) for t in (*self._tapped, final)], dim=1)
        self._tapped = []
        return (pooled - self.feature_mean) / self.feature_std

    def pooled(self, images: torch.Tensor) -> torch.Tensor:
        """The raw (unstandardised) features the ridge is fitted on."""
        return self.embed(images) * self.feature_std + self.feature_mean


def global_pool(output: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) feature maps, (N, tokens, C) sequences or (N, C) vectors -> (N, C) means."""
    if output.ndim == 4:
        return output.mean((2, 3))
    if output.ndim == 3:
        return output.mean(1)
    return output.flatten(1)


def backbone(features: nn.Module) -> nn.Module:
    """The torchvision/timm model inside an adapter, or a VGG `features` stack itself."""
    return getattr(features, "backbone", features)


class SkippedPool(nn.Identity):
    """A VGG max-pool taken out so later blocks keep their resolution; it still ends its block
    (VGG layer names, `freeze`), and it has no weights, so state dicts stay interchangeable."""


def is_block_end(layer: nn.Module) -> bool:
    return isinstance(layer, nn.MaxPool2d | SkippedPool)


def keep_resolution(features: nn.Sequential, last_conv_stride: int) -> None:
    """Replace the max-pools that would make the last convolution's grid coarser than one step per
    `last_conv_stride` input pixels (VGG's own is 16; the final pool, after it, stays). At 64 px the
    last convolution is then 16 / last_conv_stride times finer than 4x4: Grad-CAM's resolution."""
    pools = [index for index, layer in enumerate(features) if isinstance(layer, nn.MaxPool2d)][:-1]
    strides = [2**kept for kept in range(len(pools) + 1)]
    if last_conv_stride not in strides:
        raise PsyfaceError(f"train.last_conv_stride must be one of {strides}, not {last_conv_stride!r}")
    for index in pools[int(math.log2(last_conv_stride)):]:
        features[index] = SkippedPool()


def build_model(arch: str, head: Head, n_outputs: int, last_conv_stride: int = 16) -> AttributeNet:
    """A randomly initialised network (weights are loaded by the caller when asked)."""
    if last_conv_stride != 16 and arch not in (*TORCHVISION_VGGS, NARROW_VGG16):
        raise PsyfaceError(f"train.last_conv_stride {last_conv_stride} needs a VGG architecture, not {arch!r}")
    if arch in TORCHVISION_VGGS:
        import torchvision

        vgg = getattr(torchvision.models, arch)(weights=None)
        features: nn.Module = vgg.features
        keep_resolution(features, last_conv_stride)
        channels = 512
        if head == "paper":
            # The peer's network: original classifier, last Linear(4096, 1000) -> Linear(4096, n).
            pre_logits: nn.Module = nn.Sequential(vgg.avgpool, nn.Flatten(1), *list(vgg.classifier)[:-1])
            return AttributeNet(features, pre_logits, nn.Linear(4096, n_outputs))
    elif arch == NARROW_VGG16:
        from torchvision.models.vgg import make_layers

        if head == "paper":
            raise PsyfaceError(f"head 'paper' needs a full-width VGG {TORCHVISION_VGGS}, not {arch!r}")
        features = make_layers([c if c == "M" else c // 8 for c in _VGG16_LAYOUT], batch_norm=True)
        keep_resolution(features, last_conv_stride)
        channels = 512 // 8
    elif arch in torchvision_classifiers():
        if head == "paper":
            raise PsyfaceError(f"head 'paper' exists only for VGG architectures {TORCHVISION_VGGS}, not {arch!r}")
        features, channels = _torchvision_features(arch)
        return AttributeNet(features, nn.Dropout(0.2), nn.Linear(channels, n_outputs))
    else:
        import timm

        try:
            backbone = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="")
        except RuntimeError as error:
            raise PsyfaceError(f"unknown architecture {arch!r}: {error}") from None
        if head == "paper":
            raise PsyfaceError(f"head 'paper' exists only for VGG architectures {TORCHVISION_VGGS}, not {arch!r}")
        features = _TimmFeatures(backbone)  # type: ignore[assignment]
        channels = backbone.num_features
    pre_logits = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Dropout(0.2))
    return AttributeNet(features, pre_logits, nn.Linear(channels, n_outputs))


def torchvision_classifiers() -> set[str]:
    """Names of torchvision's image classification architectures (VGGs have their own path)."""
    import torchvision

    return set(torchvision.models.list_models(module=torchvision.models)) - set(TORCHVISION_VGGS)


class _TorchvisionFeatures(nn.Module):
    """A torchvision classifier with its final 1000-class Linear replaced by an identity: images in,
    the pooled penultimate vector out. Its keys sit under `features.backbone.` as timm's do."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)


def _torchvision_features(arch: str) -> tuple[nn.Module, int]:
    import torchvision

    options = {"aux_logits": False, "init_weights": False} if arch in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(arch, weights=None, **options)
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise PsyfaceError(f"torchvision's {arch!r} has no linear classifier to replace (it classifies with a convolution)")
    name, classifier = linears[-1]
    model.set_submodule(name, nn.Identity())
    return _TorchvisionFeatures(model), classifier.in_features


def build_probe(arch: str, n_outputs: int, taps: list[str], image_size: int) -> ProbeNet:
    """A ProbeNet on `arch`'s backbone (random weights; the caller loads them); its head's width
    is measured with one dry forward pass at `image_size`."""
    features = build_model(arch, "gap", 1).features
    with torch.no_grad():
        width = ProbeNet(features, taps, nn.Linear(1, 1)).eval().embed(torch.zeros(1, 3, image_size, image_size)).shape[1]
    return ProbeNet(features, taps, nn.Linear(width, n_outputs))


def freeze_blocks(net: AttributeNet, blocks: int) -> int:
    """Stop training the first `blocks` convolution blocks of a VGG `features` stack (a block ends at
    a max-pool; 0 freezes nothing): no gradients, and batch-norm running statistics kept (momentum 0).
    Returns how many parameter tensors were frozen."""
    if blocks == 0:
        return 0
    if not isinstance(net.features, nn.Sequential):
        raise PsyfaceError("freeze needs a VGG architecture (its features split into pooled blocks)")
    pools = [i for i, layer in enumerate(net.features) if is_block_end(layer)]
    if not 0 < blocks <= len(pools):
        raise PsyfaceError(f"freeze: {blocks} blocks asked, the network has {len(pools)}")
    block = net.features[: pools[blocks - 1] + 1]
    frozen = list(block.parameters())
    for parameter in frozen:
        parameter.requires_grad_(False)
    for module in block.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.0
    return len(frozen)


class AttributeEnsemble(nn.Module):
    """One single-output AttributeNet per attribute (the peer's protocol), used like one network.
    Grad-CAM on attribute k uses `members[k].last_conv`."""

    def __init__(self, members: list[AttributeNet]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([member.embed(images) for member in self.members], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([member(images) for member in self.members], dim=1)


def build_for_spec(spec: ModelSpec) -> AttributeNet | AttributeEnsemble:
    """The (random) network a spec describes: multi-task, or one network per attribute."""
    if spec.probe:
        return build_probe(spec.arch, len(spec.attributes), spec.taps, spec.image_size)
    if spec.per_attribute:
        return AttributeEnsemble([build_model(spec.arch, spec.head, 1, spec.last_conv_stride) for _ in spec.attributes])
    return build_model(spec.arch, spec.head, len(spec.attributes), spec.last_conv_stride)


def imagenet_weights_file(arch: str) -> Path:
    """Where `init: imagenet` expects the weights: torch hub's checkpoints folder, file named as the
    download would name it. Missing -> an error naming the exact file and folder."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    if arch in TORCHVISION_VGGS or arch in torchvision_classifiers():
        import torchvision

        enum = torchvision.models.get_model_weights(arch)
        # The default weights first, then other ImageNet classifiers of the same architecture (not VGG's
        # features-only IMAGENET1K_FEATURES: another normalisation and no classifier).
        urls = [enum.DEFAULT.url, *(w.url for w in enum if w is not enum.DEFAULT and "FEATURES" not in w.name)]
        found = [folder / u.rsplit("/", 1)[-1] for u in urls if (folder / u.rsplit("/", 1)[-1]).is_file()]
        if found:
            return found[0]
        url = enum.IMAGENET1K_V1.url if arch in TORCHVISION_VGGS else enum.DEFAULT.url
    else:
        import timm

        config = timm.models.get_pretrained_cfg(arch) if timm.is_model(arch) else None
        url = config.url if config else None
        if not url:
            raise PsyfaceError(f"no single-file ImageNet weights known for {arch!r}: use init: PATH.safetensors instead")
    path = folder / url.rsplit("/", 1)[-1]
    if not path.is_file():
        raise PsyfaceError(f"init: imagenet needs {path.name} in {folder} (from {url}); put the file there or use init: scratch")
    return path


def weights_normalisation(arch: str) -> tuple[list[float], list[float]]:
    """(mean, std) the architecture's published weights were trained with (torchvision's weight enum
    or timm's pretrained config); ImageNet's where none is known."""
    if arch in TORCHVISION_VGGS or arch in torchvision_classifiers():
        import torchvision

        transforms = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
        return list(transforms.mean), list(transforms.std)
    if arch != NARROW_VGG16:
        import timm

        config = timm.models.get_pretrained_cfg(arch) if timm.is_model(arch) else None
        if config is not None and config.mean and config.std:
            return list(config.mean), list(config.std)
    return list(IMAGENET_MEAN), list(IMAGENET_STD)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a `.safetensors` file or a `.pth`/`.pt` state dict (loaded with weights_only)."""
    if not path.is_file():
        raise PsyfaceError(f"init weights file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else {}


def load_matching(net: nn.Module, state: dict[str, torch.Tensor], arch: str) -> tuple[int, int]:
    """Copy every tensor whose (renamed) key and shape match; returns (loaded, skipped).

    Accepts psyface state dicts as they are, torchvision VGG ones (`classifier.0/3` -> `pre_logits.2/5`,
    the 1000-class layer dropped) and timm ones (under `features.backbone.`)."""
    own = net.state_dict()
    renamed = {}
    for key, tensor in state.items():
        if key not in own:
            if arch in TORCHVISION_VGGS:
                key = key.replace("classifier.0.", "pre_logits.2.").replace("classifier.3.", "pre_logits.5.")
            else:
                key = f"features.backbone.{key}"
        if key in own and own[key].shape == tensor.shape:
            renamed[key] = tensor
    if not renamed:
        raise PsyfaceError(f"none of the {len(state)} tensors in the init weights fit architecture {arch!r}")
    net.load_state_dict(renamed, strict=False)
    return len(renamed), len(own) - len(renamed)


class _TimmFeatures(nn.Module):
    """Adapter so a timm model's `forward_features` looks like a `features` stack."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(images)


def to_unit(images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (N, H, W, 3) images -> float (N, 3, H, W) in [0, 1] (where augmentation happens)."""
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = images.copy()  # torch cannot wrap read-only memory (memory-mapped arrays, PIL buffers)
    batch = torch.as_tensor(images).to(device)
    if batch.ndim == 3:
        batch = batch.unsqueeze(0)
    return batch.permute(0, 3, 1, 2).float().div_(255.0)


def normalise(batch: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """[0, 1] float (N, 3, H, W) -> normalised with the weights' `mean`/`std` (ImageNet's by default), channels_last."""
    mean_ = torch.tensor(mean, device=batch.device, dtype=batch.dtype).view(1, 3, 1, 1)
    std_ = torch.tensor(std, device=batch.device, dtype=batch.dtype).view(1, 3, 1, 1)
    return ((batch - mean_) / std_).contiguous(memory_format=torch.channels_last)


def to_input(images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu",
             mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """uint8 (N, H, W, 3) images -> normalised float (N, 3, H, W) tensor in channels_last memory."""
    return normalise(to_unit(images, device), mean, std)


def save_trained(net: AttributeNet | AttributeEnsemble, spec: ModelSpec, folder: Path) -> dict[str, Path]:
    """Write weights (safetensors: no pickle) and spec (JSON) into `folder`; returns both paths."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    paths = {"weights": folder / WEIGHTS_FILE, "spec": folder / SPEC_FILE}
    save_file({name: tensor.contiguous() for name, tensor in net.state_dict().items()}, paths["weights"])
    paths["spec"].write_text(json.dumps(dataclasses.asdict(spec), indent=2), encoding="utf-8")
    return paths


def load_trained(weights: Path, spec_file: Path) -> tuple[AttributeNet | AttributeEnsemble, ModelSpec]:
    """Rebuild a model written by `save_trained`, in eval mode, without unpickling anything."""
    from safetensors.torch import load_file

    from psyface.config import from_dict

    spec = from_dict(ModelSpec, json.loads(Path(spec_file).read_text(encoding="utf-8")), where=str(spec_file))
    net = build_for_spec(spec)
    net.load_state_dict(load_file(weights))
    return net.to(memory_format=torch.channels_last).eval(), spec


def predict_standardised(net: nn.Module, images: np.ndarray, batch_size: int = 64, device: torch.device | None = None,
                         autocast: bool = False, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                         flip_average: bool = False) -> np.ndarray:
    """uint8 (N, H, W, 3) images -> the network's (N, outputs) outputs, in batches, in eval mode, with
    the input normalisation its weights expect (`flip_average`: mean over each image and its mirror)."""
    device = device or next(net.parameters()).device
    net.eval()
    outputs = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        for start in range(0, len(images), batch_size):
            batch = to_input(images[start : start + batch_size], device, mean, std)
            output = net(batch)
            if flip_average:
                output = (output + net(batch.flip(3))) / 2
            outputs.append(output.float().cpu().numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0, n_outputs_of(net)), np.float32)


def n_outputs_of(net: nn.Module) -> int:
    """Outputs of an AttributeNet (its last layer) or an AttributeEnsemble (one per member)."""
    if isinstance(net, AttributeEnsemble):
        return len(net.members)
    return int(net.last_layer.out_features)  # type: ignore[union-attr]


def predict_ratings(net: AttributeNet | AttributeEnsemble, spec: ModelSpec, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """uint8 (N, H, W, 3) images -> (N, n_attributes) predictions on the rating scale (the spec's input
    normalisation, mirror-averaged when the spec says so)."""
    return spec.to_rating_scale(predict_standardised(net, images, batch_size, mean=spec.input_mean, std=spec.input_std,
                                                     flip_average=spec.flip_average))
