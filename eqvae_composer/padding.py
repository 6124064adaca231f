"""The padding mode of an autoencoder's convolutions, and where a saved autoencoder records it.

Some EQ-VAE reproductions (the MS-LC-EQ-D-VR SDXL and FLUX VAEs) were trained with
``padding_mode='reflect'`` on every padded ``Conv2d``; loaded with PyTorch's default zero padding,
their reconstructions show artifacts along the borders. "Every padded Conv2d" means what their
authors' patch does: each ``nn.Conv2d`` whose ``padding`` is non-zero. diffusers' ``Downsample2D``
convolutions have ``padding=0`` and pad asymmetrically themselves (``F.pad(x, (0, 1, 0, 1))`` with
zeros) before their stride-2 convolution: they keep that zero pad, as in those VAEs.

A diffusers config has no field for this, so ``set_padding_mode`` records it as an extra
``padding_mode`` key of the config: ``save_pretrained`` writes it to ``config.json``, a Composer
checkpoint's ``AutoencoderConfigRecorder`` keeps it, and ``apply_recorded_padding_mode`` (called by
``load_autoencoder``) restores it. Plain ``from_pretrained`` loads such a folder with zero padding
and a warning naming the ignored key; ``apply_recorded_padding_mode(vae)`` is the one call that
restores the mode there.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Mapping
from typing import Any

from torch import nn

__all__ = [
    'PADDING_CONFIG_KEY',
    'PADDING_MODES',
    'apply_recorded_padding_mode',
    'padded_convolutions',
    'recorded_padding_mode',
    'resume_padding_mode',
    'set_padding_mode',
    'smallest_image_side',
    'tolerate_padding_key',
]

#: ``nn.Conv2d``'s padding modes; ``'zeros'`` is PyTorch's default and the paper's.
PADDING_MODES = ('zeros', 'reflect', 'replicate', 'circular')
#: The config key that records a non-default padding mode (``config.json``, Composer checkpoints).
PADDING_CONFIG_KEY = 'padding_mode'


def _check_mode(mode: Any, where: str) -> str:
    if mode not in PADDING_MODES:
        raise ValueError(f'{where}: unknown padding mode {mode!r}; choose one of {", ".join(PADDING_MODES)}.')
    return mode


def padded_convolutions(module: nn.Module) -> list[nn.Conv2d]:
    """Every ``nn.Conv2d`` inside ``module`` that pads its input (``padding`` non-zero)."""
    convolutions = []
    for conv in module.modules():
        if isinstance(conv, nn.Conv2d):
            padding = conv.padding
            padded = padding != 'valid' if isinstance(padding, str) else any(p > 0 for p in padding)
            if padded:
                convolutions.append(conv)
    return convolutions


def smallest_image_side(vae: nn.Module, downsample_factor: int) -> int:
    """The smallest image side ``vae`` can encode, or decode to, with its padding: 1 unless it reflects.

    PyTorch's reflection padding needs each side of its input to be larger than the padding, and an
    autoencoder's deepest convolutions (the encoder's last level, the decoder's first) run at the latent's
    size: a 1-cell latent (a 32 px image at the reference grid's smallest scale 8/32, f8) stops a
    reflection-padded VAE with "Padding size should be less than the corresponding input dimension".

    Args:
        vae: the autoencoder.
        downsample_factor: pixels per latent cell.
    """
    reflected = [
        max(conv.padding)
        for conv in padded_convolutions(vae)
        if conv.padding_mode == 'reflect' and not isinstance(conv.padding, str)
    ]
    return (max(reflected) + 1) * downsample_factor if reflected else 1


def set_padding_mode(vae: nn.Module, mode: str) -> int:
    """Pad every padded ``Conv2d`` of ``vae`` with ``mode``, and record it in the config (a diffusers model's).

    Args:
        vae: the autoencoder (a diffusers ``ModelMixin``: ``register_to_config`` records the mode).
        mode: one of ``PADDING_MODES``.

    Returns:
        How many convolutions pad with ``mode`` now.

    Raises:
        ValueError: an unknown mode.
    """
    _check_mode(mode, 'padding_mode')
    convolutions = padded_convolutions(vae)
    for conv in convolutions:
        conv.padding_mode = mode
    if hasattr(vae, 'register_to_config'):
        vae.register_to_config(**{PADDING_CONFIG_KEY: mode})
    return len(convolutions)


def recorded_padding_mode(config: Mapping[str, Any]) -> str:
    """The padding mode a diffusers config records (``'zeros'`` when it records none).

    Raises:
        ValueError: the config records an unknown mode.
    """
    return _check_mode(config.get(PADDING_CONFIG_KEY, 'zeros'), f'config key {PADDING_CONFIG_KEY!r}')


def apply_recorded_padding_mode(vae: nn.Module) -> nn.Module:
    """Give ``vae`` the padding mode its config records; returns ``vae``.

    The one call for code that loads an autoencoder with plain diffusers::

        vae = apply_recorded_padding_mode(AutoencoderKL.from_pretrained(folder))

    A config without the key (every stock VAE) leaves the model untouched.
    """
    mode = recorded_padding_mode(getattr(vae, 'config', {}))
    if mode != 'zeros':
        set_padding_mode(vae, mode)
    return vae


_ONLY_PADDING_KEY = re.compile(rf"The config attributes \{{'{PADDING_CONFIG_KEY}': '\w+'\}} were passed")


def resume_padding_mode(vae: nn.Module, recorded: Mapping[str, Any]) -> None:
    """Give a resumed run's ``vae`` the padding mode its checkpoint recorded (``recorded``: that config).

    A run that sets no mode (its config has no ``padding_mode`` key) takes the checkpoint's; one that
    sets another mode than the checkpoint's is stopped: the weights were trained with the recorded one.

    Raises:
        ValueError: the run and the checkpoint name different modes.
    """
    resumed = recorded_padding_mode(recorded)
    config = getattr(vae, 'config', {})
    if PADDING_CONFIG_KEY not in config:
        if resumed != 'zeros':
            set_padding_mode(vae, resumed)
        return
    if config[PADDING_CONFIG_KEY] != resumed:
        raise ValueError(
            f'the checkpoint was trained with model.vae.padding_mode {resumed!r} and this run sets '
            f'{config[PADDING_CONFIG_KEY]!r}: set model.vae.padding_mode: {resumed} (or leave it unset) to resume, or '
            'export the checkpoint (scripts/export.py) and start a new run from that folder with the new mode.'
        )


class _DropPaddingKeyWarning(logging.Filter):
    """Drops diffusers' "config attributes ... not expected" warning when ``padding_mode`` is the only such key."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _ONLY_PADDING_KEY.match(record.getMessage()) is None


@contextlib.contextmanager
def tolerate_padding_key() -> Iterator[None]:
    """Inside the context, diffusers does not warn that it ignores ``padding_mode``: this project restores it.

    diffusers keeps the key in the model's config (``register_to_config`` of the keys ``__init__`` does
    not take) but warns, for any caller, that it is "not expected and will be ignored".
    """
    logger = logging.getLogger('diffusers.configuration_utils')
    quiet = _DropPaddingKeyWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
