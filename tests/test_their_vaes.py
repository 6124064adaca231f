"""Other EQ-VAEs as inputs (issue 26.5): zelaki/eq-vae, KBlueLeaf/EQ-SDXL-VAE and the MS-LC-EQ-D-VR VAEs load by
hub id (from the Hugging Face cache, offline) or local folder, and a further EQ fine-tune or a decoder-only stage
runs on them. Their folders are stood in for by tiny ones with the same config keys (conftest.KL_SHAPES)."""

import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from diffusers import AutoencoderKL
from omegaconf import OmegaConf
from torch import nn

from eqvae_composer.checkpoints import load_autoencoder
from eqvae_composer.train import train
from tests.conftest import tiny_kl_config
from tests.test_train import mds, run_config  # noqa: F401 (mds is a fixture)

#: Hub id -> the shape of its config (the SD-VAE for the paper's release, SDXL-VAE for Kohaku's).
HUB_IDS = {'zelaki/eq-vae': 'sd', 'KBlueLeaf/EQ-SDXL-VAE': 'sdxl'}


def cache_snapshot(cache: Path, repo_id: str, vae: AutoencoderKL) -> None:
    """``vae`` saved where huggingface_hub keeps a downloaded repo: ``models--owner--name/snapshots/<commit>``."""
    repo = cache / f'models--{repo_id.replace("/", "--")}'
    commit = '0' * 40
    vae.save_pretrained(repo / 'snapshots' / commit)
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(commit)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """A Hugging Face cache holding tiny stand-ins for the hub ids, and no network."""
    cache = tmp_path / 'hub'
    for seed, (repo_id, shape) in enumerate(HUB_IDS.items()):
        torch.manual_seed(seed)
        cache_snapshot(cache, repo_id, AutoencoderKL.from_config(tiny_kl_config(shape)))
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    return cache


@pytest.mark.parametrize('repo_id', HUB_IDS)
def test_their_hub_ids_load_offline_from_the_cache(offline_hub, repo_id):
    vae = load_autoencoder(repo_id)
    stored = json.loads(
        next(offline_hub.glob(f'models--{repo_id.replace("/", "--")}/snapshots/*/config.json')).read_text()
    )
    assert vae.config.scaling_factor == stored['scaling_factor'] == tiny_kl_config(HUB_IDS[repo_id])['scaling_factor']
    assert {m.padding_mode for m in vae.modules() if isinstance(m, nn.Conv2d)} == {'zeros'}  # nothing recorded


def test_an_eq_fine_tune_runs_on_eq_sdxl_vae_by_hub_id(tmp_path, mds, offline_hub):  # noqa: F811
    cfg = run_config(tmp_path, *mds, model={'vae': {'config': None, 'pretrained': 'KBlueLeaf/EQ-SDXL-VAE'}})
    cfg.eval_loader = None
    trainer = train(cfg)
    assert int(trainer.state.timestamp.batch) == 2
    exported = json.loads((tmp_path / 'run' / 'vae' / 'config.json').read_text())
    assert exported['scaling_factor'] == 0.13025 and exported['force_upcast'] is True


def test_a_decoder_stage_runs_on_a_flux_shaped_ms_lc_eq_d_vr_folder_with_reflection(tmp_path, mds):  # noqa: F811
    # Their config.json does not record the padding their weights were trained with: the run sets it.
    AutoencoderKL.from_config(tiny_kl_config('flux')).save_pretrained(tmp_path / 'ms-lc' / 'flux')
    cfg = run_config(
        tmp_path,
        *mds,
        model={
            'trainable': 'decoder',
            'vae': {
                'config': None,
                'pretrained': str(tmp_path / 'ms-lc'),
                'subfolder': 'flux',
                'padding_mode': 'reflect',
            },
        },
    )
    cfg.algorithms = OmegaConf.create({})
    cfg.eval_loader = None
    train(cfg)
    exported = load_autoencoder(tmp_path / 'run' / 'vae')
    assert exported.config.shift_factor == 0.1159 and exported.config.padding_mode == 'reflect'
    assert exported.decoder.conv_in.padding_mode == 'reflect'
    before = AutoencoderKL.from_pretrained(tmp_path / 'ms-lc' / 'flux').state_dict()
    assert all(torch.equal(before[k], v) for k, v in exported.state_dict().items() if k.startswith('encoder.'))
