"""The YAML's callbacks, loggers and schedulers: every Composer built-in by name, built through train()."""

from __future__ import annotations

import math

import pytest
from composer.callbacks import EarlyStopper, LRMonitor, OptimizerMonitor, SpeedMonitor
from composer.loggers import FileLogger, InMemoryLogger, MLFlowLogger, TensorboardLogger, WandBLogger
from composer.optim import CosineAnnealingScheduler, LinearWithWarmupScheduler

from eqvae_composer.callbacks import ImageGridCallback
from eqvae_composer.registry import CALLBACKS, LOGGERS, SCHEDULERS
from eqvae_composer.train import ConfigError, train
from tests.test_train import mds, run_config  # noqa: F401  (mds is a fixture)


def test_composer_builtins_are_named_after_their_modules():
    assert CALLBACKS['optimizer_monitor'] is OptimizerMonitor and CALLBACKS['early_stopper'] is EarlyStopper
    assert CALLBACKS['lr_monitor'] is LRMonitor and CALLBACKS['speed_monitor'] is SpeedMonitor
    assert CALLBACKS['image_grid'] is ImageGridCallback
    assert LOGGERS['mlflow'] is MLFlowLogger and LOGGERS['tensorboard'] is TensorboardLogger
    assert LOGGERS['wandb'] is WandBLogger and LOGGERS['file'] is FileLogger and LOGGERS['in_memory'] is InMemoryLogger
    assert len(CALLBACKS) >= 15 and len(LOGGERS) >= 10


def test_builtin_callbacks_and_loggers_configure_a_run(tmp_path, mds):  # noqa: F811
    cfg = run_config(
        tmp_path,
        *mds,
        callbacks={
            'optimizer_monitor': {},
            'early_stopper': {'monitor': 'PSNR', 'dataloader_label': 'eval', 'patience': 3},
            'lr_monitor': {},
        },
        loggers={'in_memory': {}, 'file': {'filename': str(tmp_path / 'log.txt')}},
    )
    trainer = train(cfg, fit=False)
    kinds = {type(c) for c in trainer.state.callbacks}
    assert {OptimizerMonitor, EarlyStopper, LRMonitor} <= kinds
    assert {InMemoryLogger, FileLogger} <= {type(d) for d in trainer.logger.destinations}


def test_unknown_callback_lists_the_known_ones(tmp_path, mds):  # noqa: F811
    with pytest.raises(ConfigError, match=r"unknown callbacks 'optimiser_monitor'.*optimizer_monitor"):
        train(run_config(tmp_path, *mds, callbacks={'optimiser_monitor': {}}), fit=False)


def test_schedulers_are_named_after_their_classes():
    assert SCHEDULERS['cosine_annealing'] is CosineAnnealingScheduler
    assert SCHEDULERS['linear_with_warmup'] is LinearWithWarmupScheduler
    assert 'constant' in SCHEDULERS and len(SCHEDULERS) >= 10


def test_a_scheduler_decays_both_parameter_groups(tmp_path, mds):  # noqa: F811
    cfg = run_config(
        tmp_path,
        *mds,
        max_duration='4ba',
        optimizer={'lr': 1e-3},
        schedulers={'cosine_annealing': {'alpha_f': 0.1}},
        callbacks={'lr_monitor': {}},
        loggers={'in_memory': {}},
    )
    trainer = train(cfg)
    logger = next(d for d in trainer.logger.destinations if type(d).__name__ == 'InMemoryLogger')
    groups = sorted(k for k in logger.data if k.startswith('lr-'))
    assert len(groups) == 2, groups  # the autoencoder's and the discriminator's
    # Composer's cosine annealing over the whole run, from lr to alpha_f * lr, one value per batch.
    expected = [1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t / 4))) for t in range(4)]
    for key in groups:
        assert [value for _, value in logger.data[key]] == pytest.approx(expected, rel=1e-6), key


def test_unknown_scheduler_lists_the_known_ones(tmp_path, mds):  # noqa: F811
    with pytest.raises(ConfigError, match=r"unknown schedulers 'cosine'.*cosine_annealing"):
        train(run_config(tmp_path, *mds, schedulers={'cosine': {}}), fit=False)
