"""The diffusability probe: class-conditional DiT/SiT trained on a VAE's latents, and how its samples score.

It reads what the autoencoder side writes (MDS latents with ``latents.json``, an exported VAE folder)
and imports none of its training code; the autoencoder side never imports this package.
"""
