"""Kept for imports that predate ``eqvae_composer.ema``, where the EMA now lives (the diffusion probe uses it too)."""

from eqvae_composer.ema import EMA, EMACopy, UnresumableEMACheckpointError, explain_unresumable_ema_checkpoint

__all__ = ['EMA', 'EMACopy', 'UnresumableEMACheckpointError', 'explain_unresumable_ema_checkpoint']
