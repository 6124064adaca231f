"""Launched by tests/test_distributed.py under `composer -n N`: train a tiny model, save each rank's weights.

Usage: [STEPS=2] [LR_SCALE=1] [GAN_UPDATES=joint] [PRECISION=fp32] composer -n N tests/distributed/train_ranks.py
OUT_DIR {ddp,fsdp} MICROBATCH. GAN_UPDATES=alternating runs the reference's two passes per batch
(``AlternatingGANUpdates``); PRECISION is the Trainer's (unset: Composer's default).

Every microbatch takes the same deterministic EQ-VAE transform and the posterior mean, so a run on
N processes and a run on one process with N microbatches of the same samples must agree: the GAN's
BatchNorm sees the same per-microbatch batches either way.
"""

import os
import sys

import torch
from composer import Trainer
from composer.utils import dist, reproducibility
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.utils.data import DataLoader

from eqvae_composer import ComposerAutoencoderKL, EquivarianceAlgorithm, VAEGANLoss
from eqvae_composer.models import AlternatingGANUpdates
from tests.conftest import tiny_vae

GLOBAL_BATCH, SAMPLES, SIZE = 8, 16, 64


class AlternatingSGD(AlternatingGANUpdates, torch.optim.SGD):
    """SGD with the reference's alternating updates."""


def main(out_dir: str, mode: str, microbatch: int) -> None:
    reproducibility.seed_all(0)
    images = torch.rand(SAMPLES, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    world, rank = dist.get_world_size(), dist.get_global_rank()
    dataset = [{'image': x} for x in images]
    if world > 1:  # rank r takes samples r, r + W, r + 2W, ...
        sampler = dist.get_sampler(dataset, shuffle=False)
        loader = DataLoader(dataset, batch_size=GLOBAL_BATCH // world, sampler=sampler)
    else:  # the same samples, ordered so that microbatch m of each batch holds what rank m would
        order = [
            b * GLOBAL_BATCH + r + 2 * k
            for b in range(SAMPLES // GLOBAL_BATCH)
            for r in range(2)
            for k in range(GLOBAL_BATCH // 2)
        ]
        loader = DataLoader([dataset[i] for i in order], batch_size=GLOBAL_BATCH)

    vae = tiny_vae(seed=1)
    model = ComposerAutoencoderKL(
        vae, VAEGANLoss(lpips_weight=0, disc_num_filters=8, disc_num_layers=2), sample_posterior=False
    )
    if rank == 0:
        init = {k: v.clone() for k, v in model.state_dict().items()}
        torch.save(init, os.path.join(out_dir, f'{mode}_w{world}_init.pt'))
    lr = 1e-5 * float(os.environ.get('LR_SCALE', '1'))
    alternating = os.environ.get('GAN_UPDATES', 'joint') == 'alternating'
    # SGD: the update is proportional to the gradient, so any gradient mismatch shows in the weights
    optimizer = (
        AlternatingSGD(model.parameters(), lr=lr, model=model)
        if alternating
        else torch.optim.SGD(model.parameters(), lr=lr)
    )
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        max_duration=os.environ.get('STEPS', '2') + 'ba',  # two steps: the second sees weights the first updated
        optimizers=optimizer,
        ddp_sync_strategy='forced_sync' if alternating else None,  # see AlternatingGANUpdates
        algorithms=[EquivarianceAlgorithm(p_equivariance=1.0, scales=[0.5], rotations=[1])],
        device_train_microbatch_size=microbatch,
        parallelism_config={'fsdp': {}} if mode == 'fsdp' else None,
        precision=os.environ.get('PRECISION'),  # unset: Composer's default (fp32 on CPU, amp_fp16 on GPU)
        seed=0,
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    state = get_model_state_dict(trainer.state.model, options=StateDictOptions(full_state_dict=True))
    lr_scale = os.environ.get('LR_SCALE', '1')
    path = os.path.join(out_dir, f'{mode}_w{world}_lr{lr_scale}_rank{rank}.pt')
    torch.save({k: v.detach().cpu() for k, v in state.items()}, path)


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
