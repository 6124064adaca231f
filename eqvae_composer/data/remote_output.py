"""The object-store prefix a conversion writes to (``s3://bucket/mds/train``), seen through streaming.

Whether a conversion refuses, resumes or starts over depends on what its output already holds.
For a remote output that is decided by the remote itself, not by a local staging folder that may
be gone or belong to another run; this module lists, reads, uploads and deletes objects under the
prefix with streaming's own uploaders and downloaders, so the same credentials and endpoints apply
as when writing shards and streaming them (for S3: boto3's ``AWS_*`` variables and files, and
``S3_ENDPOINT_URL`` for an S3-compatible server).
"""

from __future__ import annotations

import os
import urllib.parse

from botocore.exceptions import BotoCoreError, ClientError
from streaming.base.storage import CloudDownloader, CloudUploader

from eqvae_composer.compat import boto3_client

__all__ = ['RemoteOutput', 'RemoteOutputError']


class RemoteOutputError(OSError):
    """A remote output cannot be opened, listed or cleared."""


class RemoteOutput:
    """Objects under one remote prefix, uploaded from and downloaded to a local staging folder.

    A name is a path relative to both: ``name`` is ``<staging>/<name>`` here and ``<remote>/<name>``
    there.

    Args:
        remote: URI of the prefix, e.g. ``s3://bucket/mds/train``.
        staging: Local folder the files are uploaded from and downloaded to.

    Raises:
        RemoteOutputError: An S3 (or GCS HMAC) bucket does not exist or cannot be reached with these
            credentials. Other stores raise their client library's errors.
    """

    def __init__(self, remote: str, staging: str) -> None:
        self.remote = remote.rstrip('/')
        self.staging = staging
        try:
            self._uploader = CloudUploader.get((staging, self.remote), keep_local=True, exist_ok=True)
        except (BotoCoreError, ClientError) as exc:  # no such bucket, no credentials, no endpoint (S3, GCS HMAC)
            raise RemoteOutputError(
                f'cannot open {self.remote}: {exc}. Check that the bucket exists and that the credentials '
                f'(AWS_* variables or files) and the endpoint (S3_ENDPOINT_URL, if not AWS) reach it.'
            ) from exc
        self._downloader = CloudDownloader.get(self.remote)

    def _key_prefix(self) -> str:
        path = urllib.parse.urlparse(self.remote).path.strip('/')
        return f'{path}/' if path else ''

    def names(self) -> list[str]:
        """Every object under the prefix, relative to it, sorted.

        Raises:
            RemoteOutputError: streaming cannot list this kind of store.
        """
        try:
            keys = self._uploader.list_objects() or []
        except NotImplementedError:
            raise RemoteOutputError(
                f'cannot list {self.remote}: streaming lists s3://, gs:// and oci:// prefixes only, and a conversion '
                f'must see what its output holds to resume it or to refuse to mix two datasets. Convert to a '
                f'local folder and copy it to {self.remote} yourself.'
            ) from None
        prefix = self._key_prefix()
        return sorted(key[len(prefix) :] for key in keys if key.startswith(prefix))

    def download(self, name: str) -> str:
        """Download ``name`` into the staging folder (replacing a local copy) and return its local path."""
        local = os.path.join(self.staging, name)
        if os.path.exists(local):
            os.remove(local)  # the downloader keeps an existing file as it is
        os.makedirs(os.path.dirname(local), exist_ok=True)
        self._downloader.download(f'{self.remote}/{name}', local)
        return local

    def upload(self, name: str) -> None:
        """Upload ``<staging>/<name>`` to ``<remote>/<name>``, keeping the local file."""
        self._uploader.upload_file(name)

    def delete_all(self) -> None:
        """Delete every object under the prefix.

        Raises:
            RemoteOutputError: This kind of store has no delete here, or a deletion failed.
        """
        client = boto3_client(self._uploader)
        if client is None:
            raise RemoteOutputError(
                f'--overwrite cannot delete objects under {self.remote}: only s3:// prefixes are cleared here. '
                f'Delete them with your object store tools, then run again without --overwrite.'
            )
        bucket = urllib.parse.urlparse(self.remote).netloc
        prefix = self._key_prefix()
        names = self.names()
        for start in range(0, len(names), 1000):  # the most one DeleteObjects request takes
            batch = [{'Key': prefix + name} for name in names[start : start + 1000]]
            response = client.delete_objects(Bucket=bucket, Delete={'Objects': batch, 'Quiet': True})
            if response.get('Errors'):
                error = response['Errors'][0]
                raise RemoteOutputError(
                    f'cannot delete {self.remote}/{error["Key"][len(prefix) :]}: {error.get("Message", error)}'
                    + (f' (and {len(response["Errors"]) - 1} more)' if len(response['Errors']) > 1 else '')
                )
