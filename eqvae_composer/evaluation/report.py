"""Results of ``evaluate`` as markdown: the paper's reconstruction row, then equivariance and the rest."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ['format_markdown']

# The paper's table columns (spec section 5), in its order.
_RECONSTRUCTION = (('rfid', 'rFID'), ('psnr', 'PSNR'), ('lpips', 'LPIPS'), ('ssim', 'SSIM'))


def _number(value: float) -> str:
    return f'{value:.4g}' if abs(value) < 1e4 else f'{value:.3e}'


def format_markdown(results: Mapping[str, Any], name: str = 'autoencoder') -> str:
    """Markdown tables for a result of ``evaluate``.

    Args:
        results (Mapping): ``evaluate``'s return value (or the JSON written from it).
        name (str): the row label of the reconstruction table. Default: ``'autoencoder'``.
    """
    metrics = dict(results['metrics'])
    lines = []
    columns = [(key, title) for key, title in _RECONSTRUCTION if key in metrics]
    if columns:
        lines += [
            '| ' + ' | '.join(['autoencoder'] + [title for _, title in columns]) + ' |',
            '|' + '---|' * (len(columns) + 1),
            '| ' + ' | '.join([name] + [_number(metrics.pop(key)) for key, _ in columns]) + ' |',
            '',
        ]
    if metrics:
        lines += ['| metric | value |', '|---|---|']
        lines += [f'| {key} | {_number(value)} |' for key, value in sorted(metrics.items())]
        lines.append('')
    protocol = results.get('protocol', {})
    num_images, num_evaluated = results.get('num_images', '?'), results.get('num_evaluated')
    repeats = f" ({num_evaluated} with the sampler's repeats)" if num_evaluated not in (None, num_images) else ''
    source = f"the reference's protocol ({protocol['source']}), " if protocol.get('name') == 'reference' else ''
    lines.append(
        f'{source}{num_images} images{repeats} at {protocol.get("resolution", "?")} px, '
        f'reconstruction from the {protocol.get("reconstruction_latent", "?")}, '
        f'{results.get("world_size", 1)} process(es), {results.get("images_per_second", float("nan")):.2f} images/s.'
    )
    return '\n'.join(lines)
