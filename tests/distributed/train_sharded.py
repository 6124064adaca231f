"""Launched by tests/test_export_sharded.py under `composer -n 2`: an FSDP2 run that saves sharded checkpoints.

Usage: FSDP_VERSION=2 composer -n 2 tests/distributed/train_sharded.py RUN_DIR

RUN_DIR holds the MDS folders `train/` and `val/`. `train()` trains 2 batches with EMA, saves a sharded
checkpoint at batch 2 (`RUN_DIR/checkpoints/ep0-ba2/`) and exports the gathered EMA weights
(`RUN_DIR/run/vae`); rank 0 then also saves the gathered raw weights (`RUN_DIR/raw.pt`).
"""

import sys
from pathlib import Path

import torch
from composer.utils import dist

from eqvae_composer.checkpoints import trained_autoencoder
from eqvae_composer.train import train
from tests.test_train import run_config


def main(run_dir: Path) -> None:
    cfg = run_config(
        run_dir,
        run_dir / 'train',
        run_dir / 'val',
        fsdp={'state_dict_type': 'sharded', 'reshard_after_forward': True},
        algorithms={'equivariance': {}, 'ema': {'half_life': '1ba'}},
        eval_loader=None,
        metrics_file=None,
        save_folder=str(run_dir / 'checkpoints'),
        save_interval='2ba',
    )
    trainer = train(cfg)
    raw, which = trained_autoencoder(trainer.state, ema=False)  # a collective: every rank
    assert which == 'raw'
    if dist.get_global_rank() == 0:
        torch.save(raw.state_dict(), run_dir / 'raw.pt')


if __name__ == '__main__':
    main(Path(sys.argv[1]))
