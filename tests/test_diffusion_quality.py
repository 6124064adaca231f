"""gFID and SWD of samples against references, with a tiny feature extractor in place of Inception."""

import json

import pytest
import torch
import yaml

from eqvae_composer.diffusion.quality import sample_quality, to_uint8
from eqvae_composer.diffusion.train import load_config, train
from tests.data_fixtures import photo, write_image
from tests.diffusion_fixtures import NUM_CLASSES, latents  # noqa: F401  (fixture, used by name)
from tests.test_diffusion_model import TINY


class _Features(torch.nn.Module):
    """uint8 images -> 8 pooled random-conv features (a stand-in for Inception's 2048)."""

    num_features = 8

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return self.conv(x.float() / 255).mean(dim=(2, 3)).double()


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=32, mode='bilinear') * 2 - 1


def test_to_uint8_is_dits_quantization():
    # DiT sample_ddp.py: clamp(127.5 * x + 128, 0, 255) then uint8 (truncation)
    assert to_uint8(torch.tensor([-1.0, 0.0, 0.999, 1.0, 2.0])).tolist() == [0, 128, 255, 255, 255]


def test_identical_sets_score_zero_and_a_shifted_set_scores_worse():
    real = _images(32, 0)
    same = sample_quality([real[:16], real[16:]], [real], _Features(), swd_images=32)
    assert abs(same['gfid']) < 1e-3 and same['swd_avg'] == 0
    assert same['num_samples'] == same['num_references'] == 32
    near = sample_quality([(real + 0.1 * torch.randn_like(real)).clamp(-1, 1)], [real], _Features(), swd_images=32)
    far = sample_quality([(real + 0.5 * torch.randn_like(real)).clamp(-1, 1)], [real], _Features(), swd_images=32)
    assert 0 < near['gfid'] < far['gfid'] and 0 < near['swd_avg'] < far['swd_avg']


def test_too_few_images_is_a_clear_error():
    with pytest.raises(ValueError, match='at least two images'):
        sample_quality([_images(1, 0)], [_images(4, 1)], _Features())


def test_eval_script_scores_a_checkpoint_against_reference_images(latents, tmp_path, monkeypatch):  # noqa: F811
    import scripts.eval_diffusion as script

    folder, _ = latents
    cfg = tmp_path / 'run.yaml'
    cfg.write_text(
        yaml.safe_dump(
            {
                'num_classes': NUM_CLASSES,
                'network': {'name': 'DiT-S/2', 'overrides': TINY},
                'train_loader': {'dataset': {'local': str(folder)}},
                'max_duration': '1ba',
                'global_train_batch_size': 4,
                'save_folder': str(tmp_path / 'ckpt'),
                'save_interval': '1ba',
            }
        )
    )
    train(load_config(cfg))
    references = tmp_path / 'refs'
    for i in range(6):
        write_image(references / f'{i}.png', photo(40, 36, seed=i))
    monkeypatch.setattr(script, 'load_inception', lambda weights=None: _Features())
    out = tmp_path / 'quality.json'
    script.main(
        [str(cfg), '--checkpoint', str(tmp_path / 'ckpt' / 'ep0-ba1-rank0.pt'), '--references', str(references)]
        + ['--num-samples', '6', '--num-steps', '2', '--batch-size', '4', '--out', str(out)]
    )
    metrics = json.loads(out.read_text())['metrics']
    assert metrics['num_samples'] == 6 and metrics['num_references'] == 6
    assert metrics['gfid'] > 0 and metrics['swd_avg'] > 0


def test_eval_script_stops_on_missing_inception_weights_before_sampling(tmp_path):
    import scripts.eval_diffusion as script
    from eqvae_composer.weights import MissingWeightsError

    cfg = tmp_path / 'run.yaml'
    minimal = {'train_loader': {'dataset': {'local': str(tmp_path)}}, 'max_duration': '1ba'}
    cfg.write_text(yaml.safe_dump({'num_classes': 4, 'global_train_batch_size': 4, **minimal}))
    with pytest.raises(MissingWeightsError, match='weights-inception-2015-12-05'):
        script.main([str(cfg), '--checkpoint', 'x.pt', '--references', 'y', '--inception-weights', str(tmp_path)])
