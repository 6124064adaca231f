"""The reference PatchGAN discriminator (taming-transformers' ``NLayerDiscriminator``, BatchNorm)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ['PatchGANDiscriminator']


class PatchGANDiscriminator(nn.Module):
    """A PatchGAN with the reference's layer layout, init and ``main.*`` parameter names.

    The names match LDM checkpoints (``loss.discriminator.main.*``), so a reference discriminator
    can be loaded into it.

    Args:
        in_channels (int): image channels. Default: ``3``.
        num_filters (int): filters of the first layer. Default: ``64``.
        num_layers (int): stride-2 layers. Default: ``3``.
    """

    def __init__(self, in_channels: int = 3, num_filters: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        self.num_layers = num_layers
        layers: list[nn.Module] = [nn.Conv2d(in_channels, num_filters, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < num_layers else 1
            layers += [
                nn.Conv2d(num_filters * prev, num_filters * mult, 4, stride, 1, bias=False),
                nn.BatchNorm2d(num_filters * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(num_filters * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(_reference_init)
        # Each stride-2 layer halves the size and the two stride-1 layers take one pixel off each.
        self.min_input_size = 3 * 2**num_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Patch logits for ``x`` (images in [-1, 1])."""
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f'the {self.num_layers}-layer discriminator needs images of at least {self.min_input_size} px, got '
                f'{tuple(x.shape[-2:])}. Under EquivarianceAlgorithm the smallest scale shrinks the training '
                'resolution: train at a larger resolution, use fewer disc_num_layers or larger scales.',
            )
        return self.main(x)


def _reference_init(module: nn.Module) -> None:
    # taming's weights_init: N(0, 0.02) convolutions, N(1, 0.02) norm scales, zero norm shifts.
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
