"""Our latents exported for fast-DiT, REPA and LightningDiT, read back by transcriptions of their loaders."""

import json

import numpy as np
import pytest
import torch

from eqvae_composer.diffusion.handoff import export_fast_dit, export_lightningdit, export_repa
from eqvae_composer.latents import StreamingLatentDataset, center_crop_arr
from tests.diffusion_fixtures import latents, make_latents  # noqa: F401  (fixture, used by name)
from tests.handoff_references import FastDiTDataset, LightningDiTDataset, RepaDataset, repa_sample_posterior


def test_fast_dit_reads_our_scaled_samples_in_pairs(latents, tmp_path):  # noqa: F811
    import scripts.export_latents as script

    folder, _ = latents
    script.main(['fast-dit', str(folder), str(tmp_path / 'features'), '--seed', '3'])
    theirs = FastDiTDataset(
        tmp_path / 'features' / 'imagenet256_features', tmp_path / 'features' / 'imagenet256_labels'
    )
    ours = StreamingLatentDataset(local=str(folder), shuffle=False, shuffle_seed=3)
    assert len(theirs) == 16
    for k in range(16):
        x, y = theirs[k]
        i = int(theirs.features_files[k].split('.')[0])  # their sorted order is by name: 0, 1, 10, 11, ...
        x, y = x[None].squeeze(dim=1), y[None].squeeze(dim=1)  # a batch of one, as their loop squeezes it
        assert x.shape == (1, 4, 4, 4) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(x[0], ours[i]['latent']) and int(y[0]) == int(ours[i]['label'])


def test_repa_reads_our_posterior_and_images_and_scales_as_we_do(latents, tmp_path):  # noqa: F811
    folder, _ = latents
    assert export_repa(str(folder), str(tmp_path / 'repa')) == 16
    handoff = json.loads((tmp_path / 'repa' / 'handoff.json').read_text())
    theirs = RepaDataset(str(tmp_path / 'repa'))
    ours = StreamingLatentDataset(local=str(folder), shuffle=False, sample_posterior=False, flip='never')
    metadata = ours.metadata
    assert len(theirs) == 16
    for i in range(16):
        image, moments, label = theirs[i]
        raw = ours.get_item(i)
        assert torch.equal(moments, torch.cat([torch.tensor(raw['mean']), torch.tensor(raw['std'])]))
        assert int(label) == int(raw['label']) and image.shape == (3, 32, 32) and image.dtype == torch.uint8
        # Their posterior sample, scaled by handoff.json's values, is ours for the same noise.
        torch.manual_seed(i)
        z = repa_sample_posterior(moments[None], handoff['latents_scale'], handoff['latents_bias'])
        torch.manual_seed(i)
        noise = torch.randn(1, *metadata['latent_shape'])
        mean, std = torch.tensor(raw['mean']), torch.tensor(raw['std'])
        expected = (mean + std * noise - ours.shift_factor) * ours.scaling_factor
        assert torch.allclose(z, expected, atol=1e-6)
    # The images are the centre crops the latents were encoded from.
    from eqvae_composer.latents.inputs import open_images

    source = open_images(metadata['input']['data'])[int(ours.get_item(5)['key'])].image
    assert np.array_equal(theirs[5][0].permute(1, 2, 0).numpy(), np.array(center_crop_arr(source.convert('RGB'), 32)))


def test_lightningdit_reads_our_latents_their_flips_and_stats(tmp_path):
    folder, _ = make_latents(tmp_path / 'src', count=6, flip=True)
    assert export_lightningdit(str(folder), str(tmp_path / 'ldit'), shard_size=4, seed=2) == 6
    straight = StreamingLatentDataset(local=str(folder), shuffle=False, shuffle_seed=2, flip='never')
    flipped = StreamingLatentDataset(local=str(folder), shuffle=False, shuffle_seed=2, flip='always')
    theirs = LightningDiTDataset(str(tmp_path / 'ldit'), latent_norm=False, latent_multiplier=1.0)
    assert len(theirs) == 6 and len(theirs.files) == 2  # shards of 4 and 2
    seen = set()
    np.random.seed(0)
    for _ in range(4):
        for i in range(6):
            feature, label = theirs[i]
            is_straight = torch.equal(feature, straight[i]['latent'])
            assert is_straight or torch.equal(feature, flipped[i]['latent'])
            assert int(label) == int(straight[i]['label'])
            seen.add(is_straight)
    assert seen == {True, False}
    # latents_stats.pt holds what their loader computes when it has none.
    ours = torch.load(tmp_path / 'ldit' / 'latents_stats.pt')
    computed = theirs.compute_latent_stats()
    assert ours['mean'].shape == (1, 4, 1, 1)
    assert torch.allclose(ours['mean'], computed['mean'], atol=1e-5) and torch.allclose(
        ours['std'], computed['std'], atol=1e-5
    )


def test_exports_refuse_what_the_target_cannot_read(tmp_path):
    folder, _ = make_latents(tmp_path / 'src', count=3)
    meta = json.loads((folder / 'latents.json').read_text())
    meta['labelled'] = False
    (folder / 'latents.json').write_text(json.dumps(meta))
    with pytest.raises(ValueError, match='has no labels'):
        export_fast_dit(str(folder), str(tmp_path / 'out'))
