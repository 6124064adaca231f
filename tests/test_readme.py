"""The README's "Adding EquivarianceAlgorithm() to a trainer you already have" example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / 'README.md'


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f'## {title}')
    end = text.index('\n## ', start + 1)
    return text[start:end]


def test_own_trainer_example_runs_and_its_train_metric_sees_consistent_pairs():
    section = _section('Adding `EquivarianceAlgorithm()` to a trainer you already have')
    first_block = re.findall(r'```python\n(.*?)```', section, flags=re.S)[0]
    namespace: dict = {}
    exec(compile(first_block, str(README), 'exec'), namespace)
    trainer = namespace['trainer']
    assert int(trainer.state.timestamp.batch) == 2
    assert 'MSE' in trainer.state.train_metric_values
    assert trainer.state.train_metric_values['MSE'] >= 0


def test_readme_replication_summary_quotes_only_numbers_that_results_md_shows():
    """The README's summary of docs/RESULTS.md must not drift from the generated report it summarises."""
    text = README.read_text()
    start = text.index('A small-scale replication on CPU is in')
    testbed = text.index('On a wider testbed', start)
    summaries = {
        'docs/RESULTS.md': text[start:testbed],
        'docs/testbed/RESULTS.md': text[testbed : text.index('Under the hood', testbed)],
    }
    for report, summary in summaries.items():
        results = (README.parent / report).read_text()
        numbers = re.findall(r'[-+]?\d+\.\d+%?', summary)
        assert len(numbers) >= 6, summary
        missing = [n for n in numbers if n not in results]
        assert not missing, f'README quotes {missing}, which {report} does not show'


def test_latents_example_reads_what_encode_latents_wrote(tmp_path, monkeypatch):
    """The README's StreamingLatentDataset block, on latents of an SD-VAE-shaped (f8, 4 channels) VAE at 256 px."""
    import torch

    from eqvae_composer.latents import EncodeOptions, encode_latents
    from tests.conftest import tiny_vae
    from tests.data_fixtures import photo, write_image

    for i in range(32):
        write_image(tmp_path / 'images' / f'{i:02d}.png', photo(300, 260, seed=i))
    tiny_vae().save_pretrained(tmp_path / 'vae')
    monkeypatch.chdir(tmp_path)
    encode_latents('vae', 'images', 'mds/latents-train', EncodeOptions(resolution=256, progress=False))
    block = re.findall(r'```python\n(.*?)```', _section('Latents for diffusion training'), flags=re.S)[0]
    namespace: dict = {}
    exec(compile(block, str(README), 'exec'), namespace)
    assert namespace['batch']['latent'].shape == torch.Size([32, 4, 32, 32])
    assert 'label' not in namespace['batch']  # an unlabelled folder


def test_recipes_beyond_the_paper_blocks_configure_and_run(monkeypatch):
    """The loss and transform menus' YAML blocks pass the config checks; the user-defined pair example runs."""
    import yaml
    from omegaconf import OmegaConf

    from eqvae_composer.algorithms.equivariance import TRANSFORM_PAIRS
    from eqvae_composer.train import ALGORITHMS, LossConfig, _check_loss_settings, _instantiate

    section = _section('Recipes beyond the paper').split('### Loss menu')[1]  # the menus' subsections
    loss_block, algorithm_block = (yaml.safe_load(b) for b in re.findall(r'```yaml\n(.*?)```', section, flags=re.S))
    loss = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LossConfig), loss_block['model']['loss']))
    _check_loss_settings(loss)
    assert (loss.l1_weight, loss.l2_weight, loss.ssim_weight, loss.lpips_weight) == (0.3, 0.5, 0.5, 0.5)
    (algorithm,) = _instantiate(ALGORITHMS, 'algorithms', algorithm_block['algorithms'])
    assert algorithm._menu.names == ['scale_rotate', 'hflip', 'crop']

    monkeypatch.setitem(TRANSFORM_PAIRS, 'transpose', None)  # the example registers it; taken out afterwards
    (block,) = re.findall(r'```python\n(.*?)```', section, flags=re.S)
    namespace: dict = {}
    exec(compile(block, str(README), 'exec'), namespace)
    algorithm = namespace['algorithm']
    drawn = {type(algorithm.draw(0, batch, 0)[1]).__name__ for batch in range(60)}
    assert 'Transpose' in drawn and 'SpatialTransform' in drawn
    assert TRANSFORM_PAIRS['transpose'] is namespace['RandomTranspose']
