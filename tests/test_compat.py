"""``eqvae_composer.compat``: each wrapper works on the installed versions, and other versions are refused."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from eqvae_composer import compat
from tests.conftest import tiny_vae
from tests.data_fixtures import streaming_env  # noqa: F401  (fixture, used by name)

ROOT = pathlib.Path(__file__).resolve().parents[1]


# --- the version check ------------------------------------------------------------------------------------


def _setup_py_requirements() -> dict[str, str]:
    tree = ast.parse((ROOT / 'setup.py').read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, 'id', None) == 'install_requires' for t in node.targets):
            requirements = [Requirement(line) for line in ast.literal_eval(node.value)]
            return {requirement.name: str(requirement.specifier) for requirement in requirements}
    raise AssertionError('setup.py has no install_requires list')


def test_supported_versions_are_setup_pys_ranges():
    required = _setup_py_requirements()
    for name, supported in compat.SUPPORTED_VERSIONS.items():
        assert name in required, f'{name} is checked by compat but not required by setup.py'
        assert SpecifierSet(supported) == SpecifierSet(required[name]), name


def test_the_installed_versions_pass():
    compat.check_versions()


def _pretend_installed(monkeypatch, **versions: str | None) -> None:
    real = importlib.metadata.version

    def version(name: str) -> str:
        if name in versions:
            if versions[name] is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return versions[name]
        return real(name)

    monkeypatch.setattr(importlib.metadata, 'version', version)


def test_another_version_fails_naming_the_package_the_version_and_the_range(monkeypatch):
    monkeypatch.delenv(compat.ALLOW_UNTESTED_VERSIONS_ENV, raising=False)
    _pretend_installed(monkeypatch, diffusers='0.40.1', **{'mosaicml-streaming': '0.12.9'})
    with pytest.raises(compat.UnsupportedVersionError) as info:
        compat.check_versions()
    message = str(info.value)
    assert 'diffusers 0.40.1 is installed, diffusers>=0.39.0,<0.40 is supported' in message
    assert 'mosaicml-streaming 0.12.9 is installed, mosaicml-streaming>=0.13.0,<0.14 is supported' in message
    assert 'EQVAE_ALLOW_UNTESTED_VERSIONS=1' in message
    assert 'torchmetrics' not in message  # only the packages that differ


def test_the_check_runs_at_import(monkeypatch):
    monkeypatch.delenv(compat.ALLOW_UNTESTED_VERSIONS_ENV, raising=False)
    _pretend_installed(monkeypatch, lpips='0.1.5')
    # A fresh copy of the module, so the imported one (and its classes) stay as they are.
    spec = importlib.util.spec_from_file_location('eqvae_composer_compat_copy', compat.__file__)
    with pytest.raises(ImportError, match=r'lpips 0\.1\.5 is installed, lpips==0\.1\.4') as info:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert type(info.value).__name__ == 'UnsupportedVersionError'  # the copy's own class


def test_the_escape_hatch_turns_the_error_into_a_warning(monkeypatch):
    monkeypatch.setenv(compat.ALLOW_UNTESTED_VERSIONS_ENV, '1')
    _pretend_installed(monkeypatch, torch='2.8.0')
    with pytest.warns(compat.UntestedVersionWarning, match=r'torch 2\.8\.0 is installed, torch==2\.7\.0'):
        compat.check_versions()
    monkeypatch.setenv(compat.ALLOW_UNTESTED_VERSIONS_ENV, '0')  # 0 is "not allowed"
    with pytest.raises(compat.UnsupportedVersionError):
        compat.check_versions()


def test_a_package_that_is_not_installed_is_left_to_its_import(monkeypatch):
    monkeypatch.delenv(compat.ALLOW_UNTESTED_VERSIONS_ENV, raising=False)
    _pretend_installed(monkeypatch, **{'pytorch-fid': None})
    compat.check_versions()


@pytest.mark.slow
def test_importing_the_package_runs_the_check():
    code = 'import sys, eqvae_composer; assert "eqvae_composer.compat" in sys.modules'
    subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True, timeout=300)


def test_local_version_labels_match():
    assert SpecifierSet(compat.SUPPORTED_VERSIONS['torch']).contains('2.7.0+cu126')


# --- Composer ----------------------------------------------------------------------------------------------


def _tiny_trainer(tmp_path: pathlib.Path, **kwargs):
    from composer import Trainer
    from composer.models import ComposerModel

    class Tiny(ComposerModel):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(2, 1)

        def forward(self, batch):
            return self.linear(batch[0])

        def loss(self, outputs, batch):
            return (outputs - batch[1]).pow(2).mean()

    data = torch.utils.data.TensorDataset(torch.randn(8, 2), torch.randn(8, 1))
    model = Tiny()
    return Trainer(
        model=model,
        train_dataloader=torch.utils.data.DataLoader(data, batch_size=2),
        optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
        loggers=[],
        progress_bar=False,
        log_to_console=False,
        seed=3,
        **kwargs,
    )


def test_composer_wrappers(tmp_path):
    from composer.callbacks import CheckpointSaver
    from composer.utils import PartialFilePath

    class StagedSaver(compat.SaveCheckpointHook, CheckpointSaver):
        """Writes each checkpoint under a staging name, then renames it: what ResumableCheckpointSaver does."""

        def save_checkpoint(self, state, logger):
            final = self.filename
            staged = compat.save_checkpoint_unlinked(
                self, state, logger, PartialFilePath('staged-' + final.filename, final.folder)
            )
            assert self.filename is final and self.latest_filename is not None  # restored
            path = final.format(state)
            os.replace(staged, path)
            compat.rename_saved_checkpoint(self, staged, path, state.timestamp)

    folder = tmp_path / 'checkpoints'
    saver = StagedSaver(folder=str(folder), filename='ba{batch}.pt', save_interval='1ba')
    trainer = _tiny_trainer(tmp_path, max_duration='2ba', callbacks=[saver])
    assert compat.loaded_rng_state(trainer) is None  # nothing was loaded
    trainer.fit()
    # Every save went through save_checkpoint, which wrote no `latest` link; the records follow the renames.
    assert sorted(os.listdir(folder)) == ['ba1.pt', 'ba2.pt']
    assert saver.saved_checkpoints == [str(folder / 'ba1.pt'), str(folder / 'ba2.pt')]
    batches = {path: int(time.batch) for path, time in saver.all_saved_checkpoints_to_timestamp.items()}
    assert batches == {str(folder / 'ba1.pt'): 1, str(folder / 'ba2.pt'): 2}

    resumed = _tiny_trainer(tmp_path, max_duration='4ba', load_path=str(folder / 'ba1.pt'))
    stored = torch.load(folder / 'ba1.pt', weights_only=False)['rng']
    loaded = compat.loaded_rng_state(resumed)
    assert len(loaded) == 1 and loaded[0]['python'] == stored[0]['python']
    assert torch.equal(loaded[0]['torch'], stored[0]['torch'])
    compat.forget_loaded_rng_state(resumed)
    assert compat.loaded_rng_state(resumed) is None


# --- streaming ---------------------------------------------------------------------------------------------


@pytest.mark.usefixtures('streaming_env')
def test_streaming_writer_wrappers_and_the_epoch_partition(tmp_path):
    from streaming import MDSWriter, StreamingDataset
    from streaming.base.storage import CloudUploader

    out = str(tmp_path / 'mds')
    with MDSWriter(out=out, columns={'id': 'int'}) as writer:
        assert compat.next_shard_name(writer) == 'shard.00000.mds'
        writer.write({'id': 0})
        writer.flush_shard()
        compat.reset_shard_cache(writer)
        assert writer.new_samples == [] and compat.next_shard_name(writer) == 'shard.00001.mds'
        assert compat.pending_uploads(writer) >= 0
        for i in range(1, 10):
            writer.write({'id': i})
    assert compat.boto3_client(CloudUploader.get(str(tmp_path / 'local-only'))) is None  # not an S3 store

    class Recording(compat.EpochWorkHook, StreamingDataset):
        def epoch_work(self, epoch, sample_in_epoch):
            self.partition, self.place = compat.epoch_partition(self, epoch, sample_in_epoch)

    dataset = Recording(local=out, batch_size=4, shuffle=True, shuffle_seed=5)
    ids = [int(sample['id']) for sample in dataset]  # sample i holds id i
    assert sorted(ids) == list(range(10))
    mine = dataset.partition[dataset.place].reshape(-1)
    assert ids == [int(i) for i in mine if i != -1]  # the partition this worker iterated


# --- diffusers ---------------------------------------------------------------------------------------------


def test_diffusers_wrappers():
    from eqvae_composer.checkpoints.ldm import LDM_PREFIX, diffusers_to_ldm

    vae = tiny_vae()
    state = vae.state_dict()
    ldm = {LDM_PREFIX + key: value for key, value in diffusers_to_ldm(state, vae.config).items()}
    assert LDM_PREFIX in compat.LDM_VAE_PREFIXES
    back = compat.convert_ldm_vae_state_dict(ldm, dict(vae.config))
    assert set(back) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(back[key], value, rtol=0, atol=0, msg=key)
    posterior = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist
    assert isinstance(posterior, compat.DiagonalGaussianDistribution)


# --- lpips, torchmetrics, pytorch-fid, torch --------------------------------------------------------------------


def test_lpips_backbone_layers_are_vgg16_features_by_index():
    import lpips

    net = lpips.LPIPS(net='vgg', pretrained=True, pnet_rand=True, verbose=False)
    layers = compat.lpips_backbone_layers(net)
    assert sorted(layers) == list(range(30))  # vgg16().features up to its last ReLU; the last pool is unused
    # torchvision's VGG16 convolutions sit at these indices (3->64 first, 512->512 last).
    convs = {i: (m.in_channels, m.out_channels) for i, m in layers.items() if isinstance(m, torch.nn.Conv2d)}
    assert sorted(convs) == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    assert convs[0] == (3, 64) and convs[28] == (512, 512)


def test_torchmetrics_inception_loads_the_file_given(tmp_path, monkeypatch):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    empty, weights = tmp_path / 'empty.pth', tmp_path / 'weights.pth'
    torch.save({}, empty)
    with monkeypatch.context() as patch:  # a randomly initialised network, to have a file of the right layout
        patch.setattr(FeatureExtractorInceptionV3, 'load_state_dict', lambda self, state, strict=True: None)
        state = compat.torchmetrics_inception(str(empty)).state_dict()
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, weights)
    net = compat.torchmetrics_inception(str(weights))
    torch.testing.assert_close(net.Conv2d_1a_3x3.conv.weight, state['Conv2d_1a_3x3.conv.weight'])
    assert not net.train(True).training  # NoTrainInceptionV3 stays in eval mode
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).shape == (1, 2048)


def test_pytorch_fid_inception_uses_the_state_dict_given():
    import torchvision

    fake = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in fake.state_dict().items()}
    net = compat.pytorch_fid_inception(state, [3])
    torch.testing.assert_close(net.blocks[0][0].conv.weight, state['Conv2d_1a_3x3.conv.weight'])
    with pytest.raises(RuntimeError, match='Missing key'):
        compat.pytorch_fid_inception({'Conv2d_1a_3x3.conv.weight': state['Conv2d_1a_3x3.conv.weight']}, [3])


def test_torch_dispatch_mode_sees_every_op():
    class Ops(compat.TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Ops() as ops:
        torch.ones(2) + torch.ones(2)
    assert 'aten.add' in ops.seen
