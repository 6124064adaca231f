"""Every use of a third-party internal, behind one door, checked against the versions it was written for.

Where Composer, streaming, diffusers, lpips, torchmetrics, pytorch-fid or torch offer no public way
to do a job, the project reaches into their internals here and nowhere else; each wrapper says
which internal it wraps and why no public API does. At import this module checks the installed
versions against ``SUPPORTED_VERSIONS`` (setup.py's ranges, which the tests keep equal) and raises
``UnsupportedVersionError`` naming each package, the version found and the range supported; set
``EQVAE_ALLOW_UNTESTED_VERSIONS=1`` to get a warning instead and run at your own risk.

The libraries are imported inside the wrappers, not here: the check reads package metadata only,
and a library (diffusers' single-file loaders, pytorch-fid, torch-fidelity) loads when its wrapper
is first used, not with this module.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import TYPE_CHECKING, Any

from packaging.specifiers import SpecifierSet

if TYPE_CHECKING:  # the lazy aliases below, as type checkers (and ``__all__``) should see them
    import numpy as np
    import torch
    from diffusers.loaders.single_file_utils import LDM_VAE_KEYS as LDM_VAE_PREFIXES
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from numpy.typing import NDArray
    from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    'ALLOW_UNTESTED_VERSIONS_ENV',
    'LDM_VAE_PREFIXES',
    'SUPPORTED_VERSIONS',
    'DiagonalGaussianDistribution',
    'EpochWorkHook',
    'ResumeMemoryHook',
    'SaveCheckpointHook',
    'TorchDispatchMode',
    'UnsupportedVersionError',
    'UntestedVersionWarning',
    'boto3_client',
    'check_versions',
    'convert_ldm_vae_state_dict',
    'epoch_partition',
    'init_streaming_dataset',
    'forget_loaded_rng_state',
    'loaded_rng_state',
    'lpips_backbone_layers',
    'next_shard_name',
    'pending_uploads',
    'pytorch_fid_inception',
    'release_shared_memory',
    'rename_saved_checkpoint',
    'reset_shard_cache',
    'save_checkpoint_unlinked',
    'torchmetrics_inception',
]

#: Distribution name -> the versions the wrappers below were written and tested against (setup.py's ranges).
SUPPORTED_VERSIONS: dict[str, str] = {
    'mosaicml': '==0.32.1',
    'mosaicml-streaming': '>=0.13.0,<0.14',
    'diffusers': '>=0.39.0,<0.40',
    'lpips': '==0.1.4',
    'torchmetrics': '>=1.7.0,<1.7.5',
    'torch-fidelity': '==0.4.0',
    'pytorch-fid': '>=0.3.0,<0.4',
    'torch': '==2.7.0',
}

#: Set to ``1`` to turn an unsupported version into a warning.
ALLOW_UNTESTED_VERSIONS_ENV = 'EQVAE_ALLOW_UNTESTED_VERSIONS'


class UnsupportedVersionError(ImportError):
    """An installed package is outside the versions whose internals ``eqvae_composer.compat`` was written for."""


class UntestedVersionWarning(UserWarning):
    """``UnsupportedVersionError``'s message, when ``EQVAE_ALLOW_UNTESTED_VERSIONS=1`` lets the run go on."""


def check_versions() -> None:
    """Check every installed package of ``SUPPORTED_VERSIONS`` against its range; run once at import.

    A package that is not installed is skipped: the wrapper that needs it fails on its import, naming it.

    Raises:
        UnsupportedVersionError: a version is outside its range, and ``EQVAE_ALLOW_UNTESTED_VERSIONS``
            is not set (with it set to anything but ``0``, an ``UntestedVersionWarning`` instead).
    """
    found = []
    for name, supported in SUPPORTED_VERSIONS.items():
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if not SpecifierSet(supported).contains(version, prereleases=True):
            found.append(f'{name} {version} is installed, {name}{supported} is supported')
    if not found:
        return
    message = (
        f'eqvae_composer uses internals of these packages (eqvae_composer/compat.py) and is tested only with '
        f'the versions setup.py names: {"; ".join(found)}. Install those (pip install -c requirements/constraints.txt '
        f'-e .), or set {ALLOW_UNTESTED_VERSIONS_ENV}=1 to run anyway with this as a warning.'
    )
    if os.environ.get(ALLOW_UNTESTED_VERSIONS_ENV, '0') not in ('', '0'):
        warnings.warn(message, UntestedVersionWarning, stacklevel=2)
        return
    raise UnsupportedVersionError(message)


# --- lazy aliases: a name here is imported from its library on first use ---------------------------------

_ALIASES = {
    # diffusers exports no public path for the posterior ``AutoencoderKL.encode`` returns; the loss
    # takes its ``mean``/``logvar``/``var`` for the reference's KL.
    'DiagonalGaussianDistribution': ('diffusers.models.autoencoders.vae', 'DiagonalGaussianDistribution'),
    # The prefixes diffusers strips from a full LDM / Stable Diffusion checkpoint's VAE keys.
    'LDM_VAE_PREFIXES': ('diffusers.loaders.single_file_utils', 'LDM_VAE_KEYS'),
    # torch's FlopCounterMode tracks modules with backward hooks that refuse ``autograd.grad`` with
    # respect to a leaf (the adaptive GAN weight); the benchmark's FLOP counter is a bare dispatch mode.
    'TorchDispatchMode': ('torch.utils._python_dispatch', 'TorchDispatchMode'),
}


def __getattr__(name: str) -> Any:
    if name in _ALIASES:
        module, attribute = _ALIASES[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


# --- Composer 0.32 ------------------------------------------------------------------------------------------


class SaveCheckpointHook:
    """Mixin for a ``composer.callbacks.CheckpointSaver`` subclass: every save goes through ``save_checkpoint``.

    Composer routes each save (``batch_checkpoint``, ``epoch_checkpoint``, ``iteration_checkpoint``,
    ``fit_end``) through the private ``CheckpointSaver._save_checkpoint``; overriding
    ``save_checkpoint`` changes how a checkpoint is saved without repeating when one is. List it
    before ``CheckpointSaver`` in the bases.
    """

    def _save_checkpoint(self, state: Any, logger: Any) -> None:
        self.save_checkpoint(state, logger)

    def save_checkpoint(self, state: Any, logger: Any) -> None:
        """Composer's save: write the file, upload it, link ``latest``, drop the oldest beyond the kept number."""
        from composer.callbacks import CheckpointSaver

        CheckpointSaver._save_checkpoint(self, state, logger)  # type: ignore[arg-type]


def save_checkpoint_unlinked(saver: Any, state: Any, logger: Any, filename: Any) -> str | None:
    """Composer's save under another file name, without the ``latest`` link and without rotation.

    The file is written, uploaded (under its final remote name) and recorded in
    ``saver.saved_checkpoints`` as Composer does; ``CheckpointSaver`` takes the name, the link and
    the number to keep from its attributes ``filename``, ``latest_filename`` and
    ``num_checkpoints_to_keep``, which are swapped for the call and restored after it.

    Args:
        saver (CheckpointSaver): the callback.
        state (State): the training state.
        logger (Logger): the logger.
        filename (PartialFilePath): the local file name template to write.

    Returns:
        The local path written, or ``None`` on a rank that writes no file (rank > 0, monolithic).
    """
    from composer.callbacks import CheckpointSaver

    final, latest, keep = saver.filename, saver.latest_filename, saver.num_checkpoints_to_keep
    saver.filename, saver.latest_filename, saver.num_checkpoints_to_keep = filename, None, -1
    saved_before = len(saver.saved_checkpoints)
    try:
        CheckpointSaver._save_checkpoint(saver, state, logger)
    finally:
        saver.filename, saver.latest_filename, saver.num_checkpoints_to_keep = final, latest, keep
    return saver.saved_checkpoints[-1] if len(saver.saved_checkpoints) > saved_before else None


def rename_saved_checkpoint(saver: Any, old: str, new: str, timestamp: Any) -> None:
    """Record that checkpoint ``old`` is now ``new`` in ``saver``'s bookkeeping (the kept list and its timestamps).

    ``CheckpointSaver.all_saved_checkpoints_to_timestamp`` (undocumented; saved in its state dict)
    maps each saved path to its time; ``old``'s entry moves to ``new``, or ``timestamp`` is recorded.
    """
    saver.saved_checkpoints[saver.saved_checkpoints.index(old)] = new
    saver.all_saved_checkpoints_to_timestamp[new] = saver.all_saved_checkpoints_to_timestamp.pop(old, timestamp)


def loaded_rng_state(trainer: Any) -> list[dict[str, Any]] | None:
    """The RNG state ``Trainer.__init__`` read from the checkpoint it resumed from, or ``None``.

    Composer keeps it in the private ``Trainer._rng_state`` and restores it only at an epoch
    boundary or while spinning the dataloader forward, never for a dataset that resumes itself
    mid-epoch (see ``eqvae_composer.callbacks.RestoreRNGMidEpoch``).
    """
    return getattr(trainer, '_rng_state', None)


def forget_loaded_rng_state(trainer: Any) -> None:
    """Stop ``trainer`` from restoring the loaded RNG state itself (it would, at its next epoch start)."""
    trainer._rng_state = None


# --- streaming 0.13 -----------------------------------------------------------------------------------------


class EpochWorkHook:
    """Mixin for a ``streaming.StreamingDataset`` subclass: ``epoch_work(epoch, sample_in_epoch)`` per epoch.

    ``StreamingDataset.__iter__`` partitions the epoch in the private ``_get_work`` and keeps only
    this worker's slice; the hook runs in the worker right after, where ``epoch_partition`` gives
    the whole partition. List it before ``StreamingDataset`` in the bases.
    """

    def _get_work(self, epoch: int, sample_in_epoch: int) -> NDArray[np.int64]:
        sample_ids = super()._get_work(epoch, sample_in_epoch)  # type: ignore[misc]
        self.epoch_work(epoch, sample_in_epoch)
        return sample_ids

    def epoch_work(self, epoch: int, sample_in_epoch: int) -> None:
        """Called in each worker when its share of the epoch is set. Default: nothing."""


#: How often a StreamingDataset is constructed again after losing the race for a shared-memory prefix.
SHM_PREFIX_ATTEMPTS = 10


def init_streaming_dataset(init: Callable[..., None], **kwargs: Any) -> None:
    """``init(**kwargs)`` (a ``StreamingDataset``'s bound ``__init__``), again after losing streaming's prefix race;
    the shared memory it opens is released when the dataset is garbage-collected (or ``release_shared_memory``).

    ``streaming.base.shared.get_shm_prefix`` looks for the first free prefix, then creates its
    ``/NNNNNN_locals`` shared memory: two processes that start a dataset at the same moment on one
    machine (two jobs, or a job and its evaluation) can pick the same prefix, and the second create
    fails with ``FileExistsError``. Nothing is registered before that create, so constructing again
    picks the next prefix. With several ``torch.distributed`` ranks they meet at barriers inside it,
    and one rank retrying alone would hang them, so the error is raised there as before; a process
    group of one (``composer -n 1``) has nobody to wait for and retries.

    streaming keeps every ``SharedMemory`` it creates or attaches to, with its file descriptor, in an
    ``atexit`` handler until the process exits: the dataset's own blocks, and each other live prefix's
    blocks it opened while looking for a free one. A prefix is free only once its blocks are unlinked, so
    in a long-lived process (a notebook, a service) that builds datasets in a loop every new dataset
    took the next prefix and opened the blocks of all earlier ones: the descriptors grew quadratically
    (5580 after 30 evaluations) towards ``OSError: Too many open files``. What the construction opened
    is recorded here and released with the dataset.
    """
    import time

    import torch.distributed as torch_dist

    dataset = init.__self__  # type: ignore[attr-defined]
    with _recording_shared_memory() as opened:
        for attempt in range(SHM_PREFIX_ATTEMPTS):
            try:
                init(**kwargs)
                break
            except FileExistsError as error:
                lost_race = str(error.filename or '').endswith('_locals')
                other_ranks = torch_dist.is_initialized() and torch_dist.get_world_size() > 1
                if not lost_race or other_ranks or attempt == SHM_PREFIX_ATTEMPTS - 1:
                    _release_blocks(opened, os.getpid())
                    raise
                time.sleep(0.05 * (1 + attempt) * (1 + os.getpid() % 7) / 4)  # staggered: racers diverge
            except BaseException:
                _release_blocks(opened, os.getpid())
                raise
    # The other prefixes' blocks it looked at are of no further use: only the dataset's own prefix stays open.
    own = _shm_block_name(dataset._shm_prefix_int, '')
    _release_blocks([shm for shm in opened if not shm.shm.name.lstrip('/').startswith(own)], os.getpid())
    kept = [shm for shm in opened if shm.shm.name.lstrip('/').startswith(own)]
    releaser = weakref.finalize(dataset, _release_blocks, kept, os.getpid())
    releaser.atexit = False  # at exit streaming's own handlers clean up; twice could unlink another's new block
    _RELEASERS[dataset] = releaser


def _shm_block_name(prefix: int, name: str) -> str:
    """streaming's name of block ``name`` of prefix ``prefix`` (``shared.prefix._get_path``): ``000003_locals``."""
    from streaming.base.shared.prefix import _get_path

    return _get_path(prefix, name)


#: dataset -> the finalizer that releases its shared memory (once: on ``release_shared_memory`` or collection).
_RELEASERS: weakref.WeakKeyDictionary[Any, weakref.finalize] = weakref.WeakKeyDictionary()
# Held while streaming's ``SharedMemory.__init__`` is replaced: one thread at a time records.
_RECORDING_LOCK = threading.RLock()


@contextlib.contextmanager
def _recording_shared_memory() -> Iterator[list[Any]]:
    """The ``streaming.base.shared.SharedMemory`` objects this thread constructs inside the block, in order.

    streaming constructs them in ``get_shm_prefix``, ``SharedArray`` and ``StreamingDataset`` itself,
    and returns none of the probes it makes while finding a free prefix, so construction is watched
    (by replacing ``SharedMemory.__init__`` for the block) rather than the dataset's attributes read.
    """
    from streaming.base.shared import memory

    opened: list[Any] = []
    thread = threading.get_ident()
    with _RECORDING_LOCK:
        real_init = memory.SharedMemory.__init__

        def init_and_record(self: Any, *args: Any, **kwargs: Any) -> None:
            real_init(self, *args, **kwargs)
            if threading.get_ident() == thread:
                opened.append(self)

        memory.SharedMemory.__init__ = init_and_record
        try:
            yield opened
        finally:
            memory.SharedMemory.__init__ = real_init


def _release_blocks(opened: list[Any], owner_pid: int) -> None:
    """What process exit does for ``opened`` (streaming's ``SharedMemory.cleanup``), now; in the owner process only.

    A forked DataLoader worker inherits the dataset and this finalizer: the blocks are the parent's to
    unlink. A block with a live view of its buffer (a numpy array of it someone kept) cannot close and
    is left to exit. A released block forgets its handles, so that a second cleanup (exit's, or a
    test's) cannot unlink a later dataset's block of the same name.
    """
    if os.getpid() != owner_pid:
        return
    for shm in reversed(opened):
        try:
            shm.cleanup()
        except BufferError:
            continue
        atexit.unregister(shm.cleanup)
        shm.created_shms, shm.opened_shms = [], []
    opened.clear()


class ResumeMemoryHook:
    """Mixin for a ``StreamingDataset`` subclass built by ``init_streaming_dataset``: its resume state is released too.

    ``load_state_dict`` creates the prefix's ``resume`` block for ``__iter__`` to read, and each
    ``__iter__`` attaches to it in the private ``_resume``; streaming keeps both until exit, so a
    process that resumes datasets in a loop gained a block per dataset and a descriptor pair per epoch.
    The created block now goes with the dataset's others, the attachment as soon as it is read. List it
    before ``StreamingDataset`` in the bases.
    """

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        with _recording_shared_memory() as opened:
            super().load_state_dict(obj)  # type: ignore[misc]
        releaser = _RELEASERS.get(self)
        if releaser is not None and releaser.alive:
            releaser.peek()[2][0].extend(opened)  # the finalizer's ``kept`` list

    def _resume(self, world: Any, epoch: int) -> tuple[int, int]:
        with _recording_shared_memory() as opened:
            resumed = super()._resume(world, epoch)  # type: ignore[misc]
        _release_blocks(opened, os.getpid())
        return resumed


def release_shared_memory(dataset: Any) -> None:
    """Release now the shared memory a dataset built through ``init_streaming_dataset`` opened.

    It happens anyway when the dataset is garbage-collected; this is for code that knows it is done
    with a dataset something may still reference. Idempotent; a dataset not built that way is ignored.
    The dataset must not be iterated or indexed afterwards (its shared state is gone).
    """
    releaser = _RELEASERS.pop(dataset, None)
    if releaser is not None:
        releaser()


def epoch_partition(dataset: Any, epoch: int, sample_in_epoch: int) -> tuple[NDArray[np.int64], tuple[int, int, int]]:
    """The epoch's sample ids for every node, rank and worker, and this worker's place in them.

    The partition is streaming's private ``generate_work`` over the dataset's private
    ``_parallel_worker_world`` (set once ``__iter__`` runs): the one ``StreamingDataset`` builds,
    deterministic, so rebuilding it gives the same. Needed to tell repeated (padding) samples from
    real ones, which only the whole partition shows.

    Returns:
        ``(ids, (node, rank_of_node, worker_of_rank))``; ``ids`` has shape ``(nodes, ranks per node,
        workers per rank, batches per worker, batch size)``, ``-1`` where there is no sample.
    """
    from streaming.base.batching import generate_work

    world = dataset._parallel_worker_world
    partition = generate_work(dataset.batching_method, dataset, world, epoch, sample_in_epoch)
    return partition, (world.node, world.rank_of_node, world.worker_of_rank)


def next_shard_name(writer: Any) -> str:
    """The file name of the shard ``writer`` (an ``MDSWriter``) writes next: its private ``_name_next_shard``."""
    return writer._name_next_shard()[0]


def reset_shard_cache(writer: Any) -> None:
    """Start a new shard after a flush: ``Writer.write`` calls the private ``_reset_cache`` after ``flush_shard``."""
    writer._reset_cache()


def pending_uploads(writer: Any) -> int:
    """Upload tasks ``writer`` has queued and not started: the private ``executor._work_queue``'s size.

    ``Writer.finish`` polls this with ``sleep(1)``; a conversion polls it faster.
    """
    return writer.executor._work_queue.qsize()


def boto3_client(uploader: Any) -> Any:
    """The boto3 S3 client of a streaming ``S3Uploader`` (its ``s3`` attribute), or ``None`` for other stores.

    streaming can list and upload but not delete; deleting a prefix takes the client itself.
    """
    return getattr(uploader, 's3', None)


# --- diffusers 0.39 -----------------------------------------------------------------------------------------


def convert_ldm_vae_state_dict(state: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """LDM/CompVis VAE key names -> diffusers ``AutoencoderKL`` names.

    diffusers' ``convert_ldm_vae_checkpoint`` (``diffusers.loaders.single_file_utils``, not
    exported): the public ``AutoencoderKL.from_single_file`` does the same but only builds a model,
    while ``eqvae_composer.checkpoints.ldm`` needs the mapping itself (to derive its inverse).

    Args:
        state: the VAE's state dict in LDM names, with or without a ``LDM_VAE_PREFIXES`` prefix.
        config: the diffusers config of the architecture.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return convert_ldm_vae_checkpoint(state, config)


# --- lpips 0.1.4 --------------------------------------------------------------------------------------------


def lpips_backbone_layers(net: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """An ``lpips.LPIPS``'s trunk: the torchvision ``features`` index (vgg16, alexnet, squeezenet1_1) -> its layer.

    lpips keeps the trunk in ``net.net.slice1`` .. ``slice5`` under torchvision's indices and has no
    argument for a local weight file, so ``load_lpips`` fills these layers from one.
    """
    return {int(index): layer for stage in net.net.children() for index, layer in stage.named_children()}


# --- torchmetrics 1.7 / torch-fidelity 0.4 ------------------------------------------------------------------


def torchmetrics_inception(weights_path: str, num_features: int = 2048) -> torch.nn.Module:
    """torchmetrics' Inception-v3 for FID (``NoTrainInceptionV3``: torch-fidelity's, kept in eval mode), from a file.

    ``FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=...)`` builds the same
    network, but inside one metric; the evaluation shares one network among several FIDs, so it
    builds it alone with the arguments ``FrechetInceptionDistance`` passes.

    Args:
        weights_path: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``, any name.
        num_features: the feature layer, one of 64, 192, 768, 2048. Default: 2048 (pool features).
    """
    from torchmetrics.image.fid import NoTrainInceptionV3

    return NoTrainInceptionV3(
        name='inception-v3-compat', features_list=[str(num_features)], feature_extractor_weights_path=weights_path
    )


# --- pytorch-fid 0.3 ----------------------------------------------------------------------------------------


def pytorch_fid_inception(state_dict: dict[str, torch.Tensor], output_blocks: list[int]) -> torch.nn.Module:
    """pytorch-fid's ``InceptionV3(output_blocks)`` with the FID weights given, not fetched.

    ``InceptionV3`` builds its network and fetches the weights through ``torch.hub`` in one call (its
    module-level ``load_state_dict_from_url``), which would download; that function is replaced by
    one returning ``state_dict`` while the network is built. The strict load inside still rejects a
    state dict whose keys or shapes are not the network's.
    """
    from unittest import mock

    import pytorch_fid.inception

    with mock.patch.object(pytorch_fid.inception, 'load_state_dict_from_url', lambda *args, **kwargs: state_dict):
        return pytorch_fid.inception.InceptionV3(output_blocks)


check_versions()
