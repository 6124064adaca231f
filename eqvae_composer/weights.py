"""Find pretrained weight files (LPIPS' VGG, FID's Inception) without ever falling back to random ones.

Lookup order: an explicit path, then the torch hub cache (``$TORCH_HOME/hub/checkpoints``, where
torchvision and torch-fidelity themselves cache downloads). Downloading is opt-in
(``allow_download=True`` or ``EQVAE_ALLOW_DOWNLOAD=1``) because offline machines would otherwise
hang on a network call or, worse, train against an untrained network.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ['MissingWeightsError', 'downloads_allowed', 'hub_checkpoint_dir', 'resolve_weights']


class MissingWeightsError(FileNotFoundError):
    """A required pretrained weight file is not on this machine."""


def hub_checkpoint_dir() -> Path:
    """Where torchvision / torch-fidelity cache downloaded weights."""
    return Path(torch.hub.get_dir()) / 'checkpoints'


def downloads_allowed(allow_download: bool | None = None) -> bool:
    """``allow_download`` if given, else the ``EQVAE_ALLOW_DOWNLOAD`` environment variable."""
    if allow_download is not None:
        return allow_download
    return os.environ.get('EQVAE_ALLOW_DOWNLOAD', '').lower() in ('1', 'true', 'yes')


def resolve_weights(
    filename: str,
    url: str,
    what: str,
    path: str | os.PathLike | None = None,
    allow_download: bool | None = None,
) -> Path:
    """The local path of the weight file ``filename``, or a ``MissingWeightsError`` saying how to get it.

    Args:
        filename (str): the file's canonical name, e.g. ``vgg16-397923af.pth``.
        url (str): where the file can be downloaded from (used only when downloads are allowed,
            and quoted in the error otherwise).
        what (str): what the weights are for, for the error message.
        path (str | PathLike, optional): an explicit file, or a folder holding ``filename``.
        allow_download (bool, optional): download into the torch hub cache when missing. Default:
            the ``EQVAE_ALLOW_DOWNLOAD`` environment variable, else ``False``.
    """
    cached = hub_checkpoint_dir() / filename
    if path is not None:
        candidate = Path(path)
        candidate = candidate / filename if candidate.is_dir() else candidate
        if not candidate.is_file():
            raise MissingWeightsError(f'{what}: weight file {candidate} does not exist.')
        return candidate
    if cached.is_file():
        return cached
    if downloads_allowed(allow_download):
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(cached))
        return cached
    raise MissingWeightsError(
        f'{what} needs the pretrained weight file {filename!r}, which is not in {cached.parent}. '
        f'Download it from {url} on a machine with internet and either copy it to {cached} '
        f'or pass its path explicitly; or allow the download here with EQVAE_ALLOW_DOWNLOAD=1.',
    )
