"""The Trainer settings both entry points share: one schema (``TrainerConfig``), each with its own defaults."""

from __future__ import annotations

import pytest

from eqvae_composer.config import ConfigError, TrainerConfig, trainer_kwargs, validate_structured
from eqvae_composer.diffusion.train import DiffusionTrainConfig
from eqvae_composer.train import TrainConfig

SHARED = {'max_duration': '2ba', 'global_train_batch_size': 8, 'train_loader': {'dataset': {'local': 'unused'}}}
MINIMAL = {TrainConfig: SHARED, DiffusionTrainConfig: {**SHARED, 'num_classes': 10}}


@pytest.mark.parametrize(
    ('schema', 'seed', 'device_eval_batch_size'),
    [(TrainConfig, 17, 8), (DiffusionTrainConfig, 0, 32)],
)
def test_each_entry_point_keeps_its_own_defaults_on_the_shared_fields(schema, seed, device_eval_batch_size):
    cfg = validate_structured(schema, MINIMAL[schema])
    assert isinstance(cfg, TrainerConfig)
    assert (cfg.seed, cfg.device_eval_batch_size) == (seed, device_eval_batch_size)
    assert (cfg.max_duration, cfg.save_interval, cfg.console_log_interval) == ('2ba', '1ep', '1ba')


@pytest.mark.parametrize('schema', [TrainConfig, DiffusionTrainConfig])
def test_a_misspelt_shared_key_names_the_key_and_the_schema(schema):
    with pytest.raises(ConfigError, match=rf"unknown config key 'save_intervall'.*{schema.__name__}"):
        validate_structured(schema, {**MINIMAL[schema], 'save_intervall': '2ep'})


def test_trainer_kwargs_without_eval_loader_microbatch_or_progress_bar():
    cfg = validate_structured(DiffusionTrainConfig, {**MINIMAL[DiffusionTrainConfig], 'run_name': 'probe'})
    kwargs = trainer_kwargs(cfg, per_device_batch=4, evaluates=False)
    assert kwargs['eval_interval'] == 0  # no eval loader: the Trainer must not try to evaluate
    assert kwargs['device_train_microbatch_size'] == 4  # none set: the whole per-device batch
    assert (kwargs['seed'], kwargs['run_name'], kwargs['max_duration']) == (0, 'probe', '2ba')
    assert kwargs['parallelism_config'] is None
    assert (kwargs['progress_bar'], kwargs['log_to_console']) == (False, True)


def test_trainer_kwargs_with_eval_loader_microbatch_fsdp_and_progress_bar():
    overrides = {
        'eval_interval': '3ba',
        'device_train_microbatch_size': 2,
        'fsdp': {'reshard_after_forward': True},
        'progress_bar': True,
        'save_folder': 'runs/x',
        'autoresume': True,
    }
    cfg = validate_structured(TrainConfig, {**SHARED, **overrides})
    kwargs = trainer_kwargs(cfg, per_device_batch=4, evaluates=True)
    assert (kwargs['eval_interval'], kwargs['device_train_microbatch_size']) == ('3ba', 2)
    assert kwargs['parallelism_config'] == {'fsdp': {'reshard_after_forward': True}}
    assert type(kwargs['parallelism_config']['fsdp']) is dict  # a plain dict, as Composer expects
    assert (kwargs['progress_bar'], kwargs['log_to_console']) == (True, False)
    assert (kwargs['save_folder'], kwargs['autoresume'], kwargs['seed']) == ('runs/x', True, 17)
