"""Launched by tests/test_train_eval.py under `composer -n N`: train one step with eval, then evaluate another set.

Usage: composer -n N tests/distributed/eval_ranks.py OUT_DIR TRAIN_MDS EVAL_MDS OTHER_EVAL_MDS

``train()`` evaluates EVAL_MDS after its one step and exports the VAE to OUT_DIR/vae; the trainer then
evaluates OTHER_EVAL_MDS. For each set, OUT_DIR/results.json holds the PSNR and how many images the
ranks' metrics took in, summed over ranks: StreamingDataset pads the ranks' shares with repeats, and
each image must still count once.
"""

import json
import os
import sys

import torch
from composer import Evaluator
from composer.utils import dist

from eqvae_composer.data.dataset import build_image_dataloader
from eqvae_composer.train import train
from tests.conftest import tiny_vae_config

EVAL_BATCH = 2


def main(out_dir: str, train_dir: str, eval_dir: str, other_eval_dir: str) -> None:
    trainer = train(
        {
            'model': {
                'vae': {'config': tiny_vae_config()},
                'loss': {'lpips_weight': 0.0, 'disc_num_filters': 8, 'disc_num_layers': 1},
                'eval_sample_posterior': False,
                'eval_metrics': ['PSNR', 'EquivarianceErrorR'],
            },
            'train_loader': {'dataset': {'local': train_dir, 'resolution': 32}},
            'eval_loader': {'dataset': {'local': eval_dir, 'resolution': 32}},
            'global_train_batch_size': 4,
            'device_eval_batch_size': EVAL_BATCH,
            'max_duration': '1ba',
            'eval_interval': '1ba',
            'precision': 'fp32',
            'export_folder': os.path.join(out_dir, 'vae'),
        }
    )
    other = build_image_dataloader(
        batch_size=EVAL_BATCH, drop_last=False, local=other_eval_dir, resolution=32, train=False
    )
    trainer.eval(eval_dataloader=Evaluator(label='other', dataloader=other))
    results = {}
    for label in ('eval', 'other'):
        metrics = trainer.state.eval_metrics[label]
        # compute() syncs across ranks, then gives each rank its own state back, summed here.
        count = torch.tensor(int(metrics['EquivarianceErrorR'].count))
        dist.all_reduce(count)
        results[label] = {
            'psnr': float(metrics['PSNR'].compute()),
            'images_counted': int(count) // 3,  # three rotations per image
        }
    if dist.get_global_rank() == 0:
        with open(os.path.join(out_dir, 'results.json'), 'w') as f:
            json.dump({'world_size': dist.get_world_size(), **results}, f)


if __name__ == '__main__':
    main(*sys.argv[1:5])
