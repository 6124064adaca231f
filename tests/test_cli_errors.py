"""The command-line entry points, run as a person runs them: a known error is one line on stderr, no traceback.
Also: loading a diffusers folder prints nothing about `accelerate`."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eqvae_composer.checkpoints import load_autoencoder
from tests.conftest import tiny_vae
from tests.test_train_eval import write_pngs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def files(tmp_path):
    """A checkpoint file that is not one, a small MDS dataset, a YAML training on it from that file."""
    broken = tmp_path / 'broken.ckpt'
    broken.write_bytes(b'not a checkpoint')
    data = write_pngs(tmp_path / 'data', 4)
    (tmp_path / 'run.yaml').write_text(
        f'model: {{vae: {{pretrained: {broken}}}, loss: {{lpips_weight: 0.0}}}}\n'
        f'train_loader: {{dataset: {{local: {data}, resolution: 32}}}}\n'
        'global_train_batch_size: 2\nmax_duration: 1ba\n'
    )
    return tmp_path


CASES = {
    # entry point and arguments, exit status, what the line must name
    'train': (['train.py', '{tmp}/run.yaml'], 2, '{tmp}/broken.ckpt is not a readable checkpoint'),
    'convert_dataset': (
        ['convert_dataset.py', '--source', 'folder', '--input', '{tmp}/missing', '--out', '{tmp}/o'],
        1,
        '{tmp}/missing',
    ),
    'eval': (
        [
            'scripts/eval.py',
            '--vae',
            '{tmp}/broken.ckpt',
            '--data',
            '{tmp}/data',
            '--out',
            '{tmp}/r.json',
            '--metrics',
            'psnr',
        ],
        2,
        '{tmp}/broken.ckpt is not a readable checkpoint',
    ),
    'eval_weights': (
        [
            'scripts/eval.py',
            '--vae',
            '{tmp}/broken.ckpt',
            '--data',
            '{tmp}/data',
            '--out',
            '{tmp}/r.json',
            '--metrics',
            'psnr,lpips',
        ],
        2,
        'vgg16-397923af.pth',
    ),
    'export': (
        ['scripts/export.py', '--checkpoint', '{tmp}/broken.ckpt', '--out', '{tmp}/vae'],
        2,
        '{tmp}/broken.ckpt is not a readable checkpoint',
    ),
    'latent_stats': (
        ['scripts/latent_stats.py', '--vae', '{tmp}/broken.ckpt', '--data', '{tmp}/data'],
        2,
        '{tmp}/broken.ckpt is not a readable checkpoint',
    ),
    'encode_latents': (
        ['scripts/encode_latents.py', '--vae', '{tmp}/broken.ckpt', '--data', '{tmp}/data', '--out', '{tmp}/lat'],
        2,
        '{tmp}/broken.ckpt is not a readable checkpoint',
    ),
    'vis_latent': (
        ['scripts/vis_latent.py', '--vae', '{tmp}/broken.ckpt', '--image', '{tmp}/x.png', '--out', '{tmp}/l.png'],
        2,
        '{tmp}/broken.ckpt is not a readable checkpoint',
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize('name', list(CASES))
def test_known_error_is_one_line_without_traceback(files, name):
    args, status, named = CASES[name]
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'TORCH_HOME': str(files / 'torch')}  # an empty weight cache
    env.pop('EQVAE_ALLOW_DOWNLOAD', None)
    result = subprocess.run(
        [sys.executable, *(a.format(tmp=files) for a in args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert 'Traceback' not in result.stdout + result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr[-3000:]
    assert named.format(tmp=files) in lines[0]
    assert result.returncode == status


def test_loading_a_diffusers_folder_does_not_ask_for_accelerate(tmp_path):
    tiny_vae().save_pretrained(tmp_path / 'vae')
    # diffusers' loggers write through their own handler (not to the root logger), so listen there.
    records: list[logging.LogRecord] = []
    listener = logging.Handler()
    listener.emit = records.append
    logging.getLogger('diffusers').addHandler(listener)
    try:
        load_autoencoder(tmp_path / 'vae')
    finally:
        logging.getLogger('diffusers').removeHandler(listener)
    assert not [r.getMessage() for r in records if 'accelerate' in r.getMessage()]
