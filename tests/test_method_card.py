"""The algorithm's README method card: its code blocks run and its YAML block configures the algorithm."""

import re
from pathlib import Path

import yaml

from eqvae_composer import EquivarianceAlgorithm

CARD = Path(__file__).resolve().parents[1] / 'eqvae_composer' / 'algorithms' / 'equivariance' / 'README.md'


def _blocks(language):
    return re.findall(rf'```{language}\n(.*?)```', CARD.read_text(), flags=re.S)


def test_python_blocks_run():
    blocks = _blocks('python')
    assert len(blocks) == 3  # the functional core, a Trainer with a KL VAE, one with a VQGAN
    for block in blocks:
        exec(compile(block, str(CARD), 'exec'), {})


def test_yaml_block_builds_the_algorithm():
    (block,) = _blocks('yaml')
    kwargs = yaml.safe_load(block)['algorithms']['equivariance']
    algo = EquivarianceAlgorithm(**kwargs)
    assert algo.p_equivariance == 0.5 and algo.rotations == (1, 2, 3)
