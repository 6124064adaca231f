"""Launched by tests/test_fsdp1.py under `composer -n 2`: the loss of a model whose VAE is an FSDP1 FULL_SHARD unit.

Usage: composer -n 2 tests/distributed/fsdp1_loss.py OUT_DIR

Composer's FSDP1 needs CUDA, so this wraps the same units the way Composer does (each child of the
``ComposerModel``, ``FULL_SHARD``, ``use_orig_params=True``) with PyTorch's FSDP1 on CPU (gloo). After
the VAE unit's forward, the decoder's last-layer weight is a 1-D view of this rank's shard; the loss,
which runs outside that forward, must still give each rank the adaptive weight of its own microbatch.
Each rank writes what it saw and the unsharded model's loss on the same microbatch.
"""

import copy
import json
import os
import sys

import torch
from composer.utils import dist
from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

from eqvae_composer import ComposerAutoencoderKL, VAEGANLoss
from tests.conftest import tiny_vae


def _shard(module: torch.nn.Module) -> FullyShardedDataParallel:
    return FullyShardedDataParallel(
        module, sharding_strategy=ShardingStrategy.FULL_SHARD, use_orig_params=True, device_id=torch.device('cpu')
    )


def main(out_dir: str) -> None:
    dist.initialize_dist('cpu')
    rank = dist.get_global_rank()
    model = ComposerAutoencoderKL(
        tiny_vae(seed=1), VAEGANLoss(lpips_weight=0, disc_num_filters=8, disc_num_layers=2), sample_posterior=False
    )
    unsharded = copy.deepcopy(model)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(rank)) * 2 - 1
    batch = {'image': images}
    expected = unsharded.loss(unsharded(batch), batch)

    model.autoencoder = _shard(model.autoencoder)
    model.loss_fn = _shard(model.loss_fn)
    outputs = model(batch)
    weight_seen = list(model.vae.decoder.conv_out.weight.shape)  # what the loss is handed
    # Forward only: FSDP1's backward on CPU is not supported by PyTorch (it crashed in torch 2.7).
    losses = model.loss(outputs, batch)
    result = {
        'weight_shape_outside_forward': weight_seen,
        'full_weight_shape': list(unsharded.vae.decoder.conv_out.weight.shape),
        'disc_weight': losses['disc_weight'].item(),
        'expected_disc_weight': expected['disc_weight'].item(),
        'total': losses['total'].item(),
        'expected_total': expected['total'].item(),
    }
    with open(os.path.join(out_dir, f'rank{rank}.json'), 'w') as f:
        json.dump(result, f)


if __name__ == '__main__':
    main(sys.argv[1])
