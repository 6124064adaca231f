"""Converting to and training from an S3 prefix, against an S3-compatible server on 127.0.0.1.

moto's server stands in for S3; everything talks to it as to AWS, through boto3 inside streaming,
configured by the variables a user sets: ``S3_ENDPOINT_URL`` and the ``AWS_*`` credentials.
"""

from __future__ import annotations

import importlib
import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from omegaconf import OmegaConf

import convert_dataset
from eqvae_composer.data.convert import ConvertOptions, OutputExistsError, convert, convert_split
from eqvae_composer.data.remote_output import RemoteOutputError
from eqvae_composer.data.sources import list_folder
from tests.data_fixtures import (
    dataset_files,
    read_mds,
    streaming_env,  # noqa: F401  (fixture, used by name)
    write_many_images,
)

# The module, not the function of the same name that eqvae_composer.data exports.
convert_module = importlib.import_module('eqvae_composer.data.convert')
QUIET = ConvertOptions(progress=False, workers=1, part_size=8, size_limit=1 << 12)  # 3 parts, several shards each


def _options(**kwargs: Any) -> ConvertOptions:
    return ConvertOptions(**{**QUIET.__dict__, **kwargs})


@pytest.fixture(scope='module')
def s3_endpoint() -> Iterator[str]:
    """An S3-compatible server on a free port of 127.0.0.1, stopped when the module's tests are done."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address='127.0.0.1', port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f'http://{host}:{port}'
    finally:
        server.stop()


@dataclass
class Bucket:
    """A fresh bucket on the test server, and a boto3 client to inspect it."""

    name: str
    client: Any

    def uri(self, prefix: str) -> str:
        return f's3://{self.name}/{prefix}'

    def objects(self, prefix: str) -> dict[str, bytes]:
        """Every object under ``prefix``, by name relative to it."""
        pages = self.client.get_paginator('list_objects_v2').paginate(Bucket=self.name, Prefix=f'{prefix}/')
        keys = [obj['Key'] for page in pages for obj in page.get('Contents', [])]
        return {
            key[len(prefix) + 1 :]: self.client.get_object(Bucket=self.name, Key=key)['Body'].read() for key in keys
        }

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=key, Body=data)


@pytest.fixture
def bucket(s3_endpoint, monkeypatch, tmp_path) -> Bucket:
    """Point boto3 (as streaming creates it) at the test server only, with throwaway credentials."""
    for name in ('AWS_PROFILE', 'AWS_SESSION_TOKEN', 'AWS_ENDPOINT_URL', 'AWS_ENDPOINT_URL_S3', 'S3_CANNED_ACL'):
        monkeypatch.delenv(name, raising=False)
    env = {
        'S3_ENDPOINT_URL': s3_endpoint,
        'AWS_ACCESS_KEY_ID': 'testing',
        'AWS_SECRET_ACCESS_KEY': 'testing',
        'AWS_DEFAULT_REGION': 'us-east-1',
        # no profile or credentials of the machine's user, no instance metadata look-up, no proxy
        'AWS_CONFIG_FILE': str(tmp_path / 'no-aws-config'),
        'AWS_SHARED_CREDENTIALS_FILE': str(tmp_path / 'no-aws-credentials'),
        'AWS_EC2_METADATA_DISABLED': 'true',
        'NO_PROXY': '127.0.0.1',
        'no_proxy': '127.0.0.1',
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    client = boto3.client('s3', endpoint_url=s3_endpoint)
    name = f'eqvae-{uuid.uuid4().hex[:12]}'
    client.create_bucket(Bucket=name)
    return Bucket(name, client)


@pytest.fixture
def images(tmp_path):
    return write_many_images(tmp_path / 'images')


def _dataset(objects: dict[str, bytes]) -> dict[str, bytes]:
    """The remote's objects without the conversion state, as :func:`dataset_files` reads a local dataset."""
    return {name: data for name, data in objects.items() if not name.startswith('.convert/')}


@pytest.fixture
def reference(images, tmp_path):
    """The same conversion written to a local folder: what the remote must hold, byte for byte."""
    convert('folder', str(tmp_path / 'reference'), input=str(images), options=QUIET)
    return tmp_path / 'reference'


@pytest.mark.slow
def test_convert_to_s3_writes_the_dataset_and_its_state(bucket, images, reference, tmp_path):
    staging = tmp_path / 'staging'
    (summary,) = convert(
        'folder', bucket.uri('mds/train'), input=str(images), options=_options(workers=2, local=str(staging))
    )
    assert summary.written == 23 and len(summary.skipped) == 1 and summary.out == bucket.uri('mds/train')
    remote = bucket.objects('mds/train')
    assert _dataset(remote) == dataset_files(reference)  # shards, part indexes, merged index, skipped report
    assert sorted(name for name in remote if name.startswith('.convert/')) == [
        '.convert/part_00000.json',
        '.convert/part_00001.json',
        '.convert/part_00002.json',
        '.convert/plan.json',
    ]
    assert json.loads(remote['.convert/plan.json']) == json.loads((reference / '.convert' / 'plan.json').read_text())
    assert len(json.loads(remote['index.json'])['shards']) > 3  # several shards per part
    # Shards are not kept in the staging folder once uploaded.
    assert not any(name.endswith('.mds') for _, _, names in os.walk(staging) for name in names)
    # The same command again finds the remote complete: every part kept, nothing rewritten.
    (again,) = convert('folder', bucket.uri('mds/train'), input=str(images), options=_options(local=str(staging)))
    assert again.resumed_parts == 3 and again.processed == 0 and again.written == 23
    assert bucket.objects('mds/train') == remote


@pytest.mark.slow
def test_other_conversion_into_the_same_prefix_is_refused(bucket, images, capsys):
    out = bucket.uri('mds/train')
    base = ['--source', 'folder', '--input', str(images), '--out', out, '--no-progress', '--workers', '1']
    assert convert_dataset.main(base) == 0
    capsys.readouterr()
    before = bucket.objects('mds/train')
    # Other options over the same prefix: refused with how to restart (exit 2), and nothing written.
    assert convert_dataset.main([*base, '--min-side', '16']) == 2
    err = capsys.readouterr().err
    assert out in err and 'other options' in err and '--overwrite' in err
    assert bucket.objects('mds/train') == before
    # A prefix holding a dataset written by another tool: refused too.
    bucket.put('mds/theirs/index.json', b'{"shards": [], "version": 2}')
    assert convert_dataset.main([*base[:5], bucket.uri('mds/theirs'), *base[6:]]) == 2
    assert 'files not written by it' in capsys.readouterr().err
    assert bucket.objects('mds/theirs') == {'index.json': b'{"shards": [], "version": 2}'}


@pytest.mark.slow
def test_interrupted_conversion_resumes_from_the_remote(bucket, images, reference, monkeypatch):
    out = bucket.uri('mds/train')
    listing = list_folder(str(images))[0]
    real_prepare = convert_module.prepare_image
    calls = []

    def crash_in_part_1(data, **kwargs):
        calls.append(1)
        if len(calls) == 13:  # the fifth file of part 1 (files 9-16), after shards of it were uploaded
            raise RuntimeError('simulated crash')
        return real_prepare(data, **kwargs)

    monkeypatch.setattr(convert_module, 'prepare_image', crash_in_part_1)
    with pytest.raises(RuntimeError, match='simulated crash'):
        convert_split(listing, out, QUIET)
    interrupted = bucket.objects('mds/train')
    assert 'index.json' not in interrupted and '.convert/part_00000.json' in interrupted
    assert '.convert/part_00001.json' not in interrupted
    assert any(name.startswith('part_00001/shard.') for name in interrupted)  # half of part 1 was uploaded

    # The same command again, from a fresh staging folder: part 0 is kept, parts 1 and 2 are done now.
    calls.clear()
    monkeypatch.setattr(convert_module, 'prepare_image', lambda data, **kw: calls.append(1) or real_prepare(data, **kw))
    summary = convert_split(listing, out, QUIET)
    assert len(calls) == len(listing.files) - 8 and summary.resumed_parts == 1
    assert summary.written == 23 and len(summary.skipped) == 1  # part 0's counts come from its remote marker
    assert summary.report == f'{out}/skipped.jsonl'  # not the temporary staging folder's copy, deleted by now
    assert _dataset(bucket.objects('mds/train')) == dataset_files(reference)


@pytest.mark.slow
def test_overwrite_clears_the_prefix_and_starts_again(bucket, images, reference, tmp_path):
    out = bucket.uri('mds/train')
    listing = list_folder(str(images))[0]
    convert_split(listing, out, _options(min_side=32))  # another conversion ...
    bucket.put('mds/train/notes/stale.txt', b'not part of any dataset')  # ... and an unrelated object
    with pytest.raises(OutputExistsError, match='--overwrite'):
        convert_split(listing, out, QUIET)
    summary = convert_split(listing, out, _options(overwrite=True))
    assert summary.resumed_parts == 0 and summary.processed == len(listing.files)
    remote = bucket.objects('mds/train')
    assert _dataset(remote) == dataset_files(reference)  # nothing left of the earlier contents
    assert json.loads(remote['.convert/plan.json'])['min_side'] is None


def test_remote_errors_are_named(bucket, images, tmp_path, capsys):
    args = ['--source', 'folder', '--input', str(images), '--no-progress', '--workers', '1']
    assert convert_dataset.main([*args, '--out', f's3://{bucket.name}-missing/mds']) == 2
    assert f'{bucket.name}-missing' in capsys.readouterr().err
    with pytest.raises(ValueError, match='drop --local'):
        convert_split(list_folder(str(images))[0], str(tmp_path / 'out'), _options(local=str(tmp_path / 'stage')))
    (tmp_path / 'stage').mkdir()
    (tmp_path / 'stage' / 'mine.txt').write_text('keep')
    with pytest.raises(OutputExistsError, match='mine.txt'):
        convert_split(list_folder(str(images))[0], bucket.uri('mds'), _options(local=str(tmp_path / 'stage')))
    assert (tmp_path / 'stage' / 'mine.txt').read_text() == 'keep'


def test_a_store_streaming_cannot_list_is_refused(images, monkeypatch, tmp_path):
    """streaming 0.13 cannot list hf:// or azure:// prefixes: refuse rather than write blind into one."""
    from streaming.base.storage.upload import CloudUploader

    # The base uploader stands in for HFUploader (whose constructor goes to the hub): no list_objects either.
    monkeypatch.setattr(CloudUploader, 'get', classmethod(lambda cls, *args, **kwargs: CloudUploader(*args, **kwargs)))
    with pytest.raises(RemoteOutputError, match='cannot list hf://datasets/me/mds'):
        convert_split(list_folder(str(images))[0], 'hf://datasets/me/mds', QUIET)


@pytest.mark.slow
@pytest.mark.usefixtures('streaming_env')
def test_train_streams_from_the_converted_prefix(bucket, images, tmp_path):
    from eqvae_composer.train import train
    from tests.test_train import run_config

    convert('folder', bucket.uri('mds/train'), input=str(images), options=QUIET)
    cfg = run_config(tmp_path, tmp_path / 'unused', tmp_path / 'unused')
    cfg = OmegaConf.merge(
        cfg,
        {
            'train_loader': {
                'dataset': {'remote': bucket.uri('mds/train'), 'local': str(tmp_path / 'cache' / 'train')}
            },
            'eval_loader': {'dataset': {'remote': bucket.uri('mds/train'), 'local': str(tmp_path / 'cache' / 'eval')}},
        },
    )
    trainer = train(cfg)
    assert int(trainer.state.timestamp.batch) == 2
    # The shards came from the server into the fresh cache, and they are the converted ones.
    cached = read_mds(tmp_path / 'cache' / 'eval')
    assert [s['key'] for s in cached] == [f.key for f in list_folder(str(images))[0].files if 'broken' not in f.key]
