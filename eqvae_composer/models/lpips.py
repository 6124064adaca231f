"""LPIPS-VGG (the reference's perceptual loss and metric) with its backbone loaded from a local file.

The ``lpips`` package ships the linear calibration layers but fetches torchvision's VGG16 at run
time; here the backbone is built empty and filled from a file found by ``resolve_weights``, so an
offline machine fails fast with the file name instead of downloading or using random weights.

Beyond the paper, ``load_lpips_net`` builds the package's other calibrated networks (AlexNet,
SqueezeNet) the same way, as a lighter perceptual loss; the LPIPS metric stays VGG.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import lpips
import torch
import torchvision

from eqvae_composer.compat import lpips_backbone_layers
from eqvae_composer.weights import resolve_weights

__all__ = [
    'LPIPS_BACKBONES',
    'VGG16_FILENAME',
    'VGG16_URL',
    'dropout_active',
    'load_lpips',
    'load_lpips_net',
    'lpips_distance',
    'resolve_lpips_weights',
    'resolve_lpips_weights_of',
]

VGG16_FILENAME = 'vgg16-397923af.pth'
VGG16_URL = 'https://download.pytorch.org/models/vgg16-397923af.pth'
_TORCHVISION_MODELS = 'https://download.pytorch.org/models/'

#: ``lpips.LPIPS(net=...)`` name -> (torchvision builder, torchvision's weight file for it). The lpips
#: package ships the linear heads of all three; the backbones are torchvision's ImageNet weights.
LPIPS_BACKBONES: dict[str, tuple[Callable[[], torch.nn.Module], str]] = {
    'vgg': (torchvision.models.vgg16, VGG16_FILENAME),
    'alex': (torchvision.models.alexnet, 'alexnet-owt-7be5be79.pth'),
    'squeeze': (torchvision.models.squeezenet1_1, 'squeezenet1_1-b8a52dc0.pth'),
}


def resolve_lpips_weights(vgg_weights: str | os.PathLike | None = None, allow_download: bool | None = None) -> Path:
    """The path of torchvision's VGG16 weights for LPIPS, or a ``MissingWeightsError`` naming the file.

    Args:
        vgg_weights (str | PathLike, optional): the file, or a folder holding it. Default: the torch hub cache.
        allow_download (bool, optional): see ``eqvae_composer.weights.resolve_weights``.
    """
    return resolve_lpips_weights_of('vgg', vgg_weights, allow_download)


def resolve_lpips_weights_of(
    net: str, weights: str | os.PathLike | None = None, allow_download: bool | None = None
) -> Path:
    """The path of the torchvision backbone file of the LPIPS network ``net`` (see ``LPIPS_BACKBONES``).

    Raises:
        ValueError: ``net`` is not one of ``LPIPS_BACKBONES``.
        MissingWeightsError: the file is not here, naming it and where to get it.
    """
    if net not in LPIPS_BACKBONES:
        raise ValueError(f'the LPIPS network must be one of {sorted(LPIPS_BACKBONES)}, got {net!r}.')
    filename = LPIPS_BACKBONES[net][1]
    return resolve_weights(filename, _TORCHVISION_MODELS + filename, f'LPIPS ({net} backbone)', weights, allow_download)


def load_lpips(vgg_weights: str | os.PathLike | None = None, allow_download: bool | None = None) -> lpips.LPIPS:
    """A frozen LPIPS-VGG network in eval mode, inputs in [-1, 1], output shape ``(B, 1, 1, 1)``.

    Args:
        vgg_weights (str | PathLike, optional): torchvision's ``vgg16-397923af.pth`` (or a folder
            holding it). Default: looked up in the torch hub cache.
        allow_download (bool, optional): see ``eqvae_composer.weights.resolve_weights``.
    """
    return load_lpips_net('vgg', vgg_weights, allow_download)


def load_lpips_net(
    net: str = 'vgg', weights: str | os.PathLike | None = None, allow_download: bool | None = None
) -> lpips.LPIPS:
    """A frozen LPIPS network (``'vgg'``, ``'alex'`` or ``'squeeze'``) in eval mode, like ``load_lpips``.

    Args:
        net (str): the backbone, a key of ``LPIPS_BACKBONES``. Default: ``'vgg'``.
        weights (str | PathLike, optional): torchvision's weight file of that backbone (or a folder
            holding it). Default: looked up in the torch hub cache.
        allow_download (bool, optional): see ``eqvae_composer.weights.resolve_weights``.
    """
    path = resolve_lpips_weights_of(net, weights, allow_download)
    state = torch.load(path, map_location='cpu', weights_only=True)
    # Only the convolutional trunk is used; the classifier's keys may be absent (or present).
    features = LPIPS_BACKBONES[net][0]().features
    features.load_state_dict({k.removeprefix('features.'): v for k, v in state.items() if k.startswith('features.')})
    # pnet_rand=True builds the backbone without downloading; its layers are replaced below.
    model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    for index, layer in lpips_backbone_layers(model).items():
        layer.load_state_dict(features[index].state_dict())
    model.eval().requires_grad_(False)
    return model


def lpips_distance(net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, x_hat: torch.Tensor):
    """``net(x, x_hat)`` in fp32, shape ``(B, 1, 1, 1)``, moving a module ``net`` to the images' device.

    The network is frozen state kept outside the model's parameters, so ``model.to(device)`` does
    not move it; this does, once.
    """
    if isinstance(net, torch.nn.Module):
        param = next(net.parameters(), None)
        if param is not None and param.device != x.device:
            net.to(x.device)
    return net(x.float(), x_hat.float()).float()


@contextlib.contextmanager
def dropout_active(net: torch.nn.Module) -> Iterator[None]:
    """Run ``net``'s ``Dropout`` layers in training mode inside the context, and in eval mode after it.

    LPIPS has a ``Dropout`` before each linear calibration layer (``lpips.NetLinLayer``, as taming's).
    The reference builds its LPIPS with ``.eval()``, but Lightning's ``model.train()`` puts the whole
    module tree back in training mode, so its perceptual loss trains with dropout active. Only the
    ``Dropout`` layers are switched: the VGG trunk has no layer whose mode matters.

    Raises:
        ValueError: ``net`` has no ``Dropout`` layer (e.g. built with ``use_dropout=False``).
    """
    layers = [m for m in net.modules() if isinstance(m, torch.nn.Dropout)]
    if not layers:
        raise ValueError(
            f'{type(net).__name__} has no Dropout layer to activate (lpips_dropout needs an LPIPS '
            'built with use_dropout=True, as load_lpips does).'
        )
    for layer in layers:
        layer.train()
    try:
        yield
    finally:
        for layer in layers:
            layer.eval()  # the frozen network is shared with the LPIPS eval metric
