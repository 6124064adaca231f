"""Imports point down: the model, checkpoints and evaluation know nothing of the Algorithm module."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'eqvae_composer'
TRANSFORMS = 'eqvae_composer.algorithms.equivariance.transforms'


def _imports(folder: str) -> dict[str, set[str]]:
    found = {}
    for path in (PACKAGE / folder).rglob('*.py'):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        found[str(path.relative_to(PACKAGE))] = names
    return found


@pytest.mark.parametrize('folder', ['models', 'checkpoints'])
def test_no_import_from_algorithms(folder):
    offending = {
        path: sorted(n for n in names if n.startswith('eqvae_composer.algorithms'))
        for path, names in _imports(folder).items()
    }
    assert not {path: names for path, names in offending.items() if names}


def test_evaluation_imports_only_the_functional_transforms():
    offending = {
        path: sorted(n for n in names if n.startswith('eqvae_composer.algorithms') and n != TRANSFORMS)
        for path, names in _imports('evaluation').items()
    }
    assert not {path: names for path, names in offending.items() if names}


# The diffusion probe reads what the autoencoder side writes (latents + latents.json, an exported VAE)
# and shares only neutral plumbing; the autoencoder side knows nothing of it.
DIFFUSION_MAY_IMPORT = (
    'eqvae_composer.diffusion',
    'eqvae_composer.latents',
    'eqvae_composer.config',
    'eqvae_composer.registry',
    'eqvae_composer.callbacks.checkpointing',
    'eqvae_composer.ema',
    'eqvae_composer.padding',
)


def test_the_autoencoder_side_never_imports_the_diffusion_probe():
    found = {
        path: sorted(n for n in names if n.startswith('eqvae_composer.diffusion'))
        for path, names in _imports('.').items()
        if not path.startswith('diffusion')
    }
    assert found and not {path: names for path, names in found.items() if names}


def test_the_diffusion_probe_imports_no_autoencoder_training_code():
    modules = _imports('diffusion')
    offending = {
        path: sorted(n for n in names if n.startswith('eqvae_composer') and not n.startswith(DIFFUSION_MAY_IMPORT))
        for path, names in modules.items()
    }
    assert modules and not {path: names for path, names in offending.items() if names}
