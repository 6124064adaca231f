"""The diffusability probe: class-conditional DiT/SiT trained on a VAE's latents, and how its samples score.

It reads what the autoencoder side writes (MDS latents with ``latents.json``, an exported VAE folder)
and imports none of its training code; the autoencoder side never imports this package.
"""

from eqvae_composer.diffusion.callbacks import SampleGridCallback
from eqvae_composer.diffusion.ddpm import DDPMSchedule, ddpm_loss, linear_betas, q_sample
from eqvae_composer.diffusion.flow import flow_matching_loss, linear_path, sample_times
from eqvae_composer.diffusion.guidance import drop_labels, guided, label_drop_mask
from eqvae_composer.diffusion.model import ComposerLatentDiffusion, Objective
from eqvae_composer.diffusion.network import build_dit, dit_config
from eqvae_composer.diffusion.sampling import ddpm_scheduler, sample_ddpm, sample_ode
from eqvae_composer.diffusion.swd import swd
from eqvae_composer.diffusion.vae import LatentDecoder

__all__ = [
    'ComposerLatentDiffusion',
    'DDPMSchedule',
    'LatentDecoder',
    'Objective',
    'SampleGridCallback',
    'build_dit',
    'ddpm_loss',
    'ddpm_scheduler',
    'dit_config',
    'drop_labels',
    'flow_matching_loss',
    'guided',
    'label_drop_mask',
    'linear_betas',
    'linear_path',
    'q_sample',
    'sample_ddpm',
    'sample_ode',
    'sample_times',
    'swd',
]
