"""``MDSWriter`` with the same output bytes and no copy of a sample before the kernel's.

Converting images is a copying job: the JPEG bytes are kept as they are, so nothing is decoded,
and after hashing and writing, the rate is set by how many times each byte is moved. streaming
0.13's ``MDSWriter`` copies a sample twice while encoding it (``b''.join`` of the columns, then
``head + body``) and a whole shard twice while assembling it (``b''.join`` of the samples, then
``header + data``: two fresh 64 MB buffers per shard), before hashing it and writing it.
``LeanMDSWriter`` keeps each sample as its list of column pieces, hashes the pieces in order and
hands them to the file as they are: the bytes leave the process exactly once, in ``write(2)``.
``tests/test_data_convert.py`` checks that shards and index are byte-identical to ``MDSWriter``'s.
It overrides streaming 0.13's writer methods and reads its fields (``new_samples``, ``shards``, ...);
the private methods it calls go through ``eqvae_composer.compat``, whose version check covers this class.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import xxhash
from streaming import MDSWriter
from streaming.base.format.mds.encodings import mds_encode

from eqvae_composer.compat import next_shard_name, reset_shard_cache

__all__ = ['LeanMDSWriter']


def _hex_digest(algo: str, pieces: Iterable[bytes]) -> str:
    """``streaming.base.hashing.get_hash(algo, b''.join(pieces))`` without the join."""
    digest = getattr(xxhash, algo)() if algo in xxhash.algorithms_available else hashlib.new(algo)
    for piece in pieces:
        digest.update(piece)
    return digest.hexdigest()


class LeanMDSWriter(MDSWriter):
    """Drop-in ``MDSWriter`` (same arguments, same files) that never copies sample bytes itself.

    ``new_samples`` holds each sample as its list of pieces (the sizes header, then one encoded
    value per column) instead of one ``bytes``; ``new_shard_size`` is counted as ``MDSWriter`` counts
    it, so shards end at the same samples.
    """

    def encode_sample_pieces(self, sample: dict[str, Any]) -> list[bytes]:
        """A sample's bytes as ``MDSWriter.encode_sample`` lays them out, unjoined.

        Args:
            sample: One value per column.

        Returns:
            list[bytes]: The variable-size columns' sizes (uint32), then each column's encoded value.

        Raises:
            KeyError: A fixed-size column's value does not have its encoding's size.
        """
        sizes = []
        pieces = [b'']  # replaced by the sizes header below
        for key, encoding, size in zip(self.column_names, self.column_encodings, self.column_sizes):
            datum = mds_encode(encoding, sample[key])
            if size is None:
                sizes.append(len(datum))
            elif size != len(datum):
                raise KeyError(f'Column {key!r} has {len(datum)} bytes, not the {size} its encoding {encoding} takes.')
            pieces.append(datum)
        pieces[0] = np.array(sizes, np.uint32).tobytes()
        return pieces

    def write(self, sample: dict[str, Any]) -> None:
        # ``Writer.write`` with the sample kept in pieces (its size is the sum of theirs).
        if self.event.is_set():
            self.cancel_future_jobs()
            raise Exception('One of the threads failed. Check other traceback for more details.')
        pieces = self.encode_sample_pieces(sample)
        new_sample_size = sum(map(len, pieces)) + self.extra_bytes_per_sample
        if self.size_limit and self.size_limit < self.new_shard_size + new_sample_size:
            self.flush_shard()
            reset_shard_cache(self)
        self.new_samples.append(pieces)  # type: ignore[arg-type]  # pieces, not bytes: see the class docstring
        self.new_shard_size += new_sample_size

    def _shard_pieces(self) -> list[bytes]:
        """The shard file ``MDSWriter.encode_joint_shard`` builds, as the list of its pieces."""
        samples: list[list[bytes]] = self.new_samples  # type: ignore[assignment]
        count = np.uint32(len(samples)).tobytes()
        offsets = np.array([0, *(sum(map(len, sample)) for sample in samples)]).cumsum().astype(np.uint32)
        offsets += len(count) + offsets.nbytes + len(self.config_data)
        return [count, offsets.tobytes(), self.config_data, *(piece for sample in samples for piece in sample)]

    def encode_joint_shard(self) -> bytes:
        return b''.join(self._shard_pieces())

    def flush_shard(self) -> None:
        if self.compression:  # the compressor needs the shard in one buffer anyway
            super().flush_shard()
            return
        # ``MDSWriter.flush_shard`` + ``Writer._process_file`` without the joined buffer.
        basename = next_shard_name(self)
        pieces = self._shard_pieces()
        hashes = {algo: _hex_digest(algo, pieces) for algo in self.hashes}
        with open(os.path.join(self.local, basename), 'wb') as out:
            out.writelines(pieces)
        raw_data = {'basename': basename, 'bytes': sum(map(len, pieces)), 'hashes': hashes}
        self.shards.append(
            {'samples': len(self.new_samples), 'raw_data': raw_data, 'zip_data': None, **self.get_config()}
        )
        future = self.executor.submit(self.cloud_writer.upload_file, basename)
        future.add_done_callback(self.exception_callback)
