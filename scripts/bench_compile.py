"""Does ``torch.compile`` speed up the VAE's training step, and does it survive EQ-VAE's changing latent sizes?

    python scripts/bench_compile.py                 # the bench_train model (SD-VAE layout, width 16), 128 px, CPU
    python scripts/bench_compile.py --device cuda --width 128 --resolution 256

Times an encode -> sample -> decode -> L1 -> backward step of the same ``AutoencoderKL``, eager and
with ``encoder``/``decoder`` compiled (inductor), alternating, and then decodes latents of the
sizes the equivariance branch produces (scales 0.25-1 on the s/32 grid) to see what recompiling
costs. Prints one JSON line per measurement; a failure to compile is reported, not raised.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eqvae_composer.algorithms.equivariance.transforms import GRID_SCALES, scaled_size  # noqa: E402
from eqvae_composer.benchmarks.train_step import sync  # noqa: E402
from eqvae_composer.benchmarks.workload import sd_vae_config  # noqa: E402
from eqvae_composer.introspection import vae_downsample_factor  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--width', type=int, default=16)
    parser.add_argument('--resolution', type=int, default=128)
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    parser.add_argument('--threads', type=int, default=1, help='CPU threads (see docs/BENCHMARKS.md)')
    parser.add_argument('--reps', type=int, default=5)
    parser.add_argument('--sizes', type=int, default=4, help='equivariance latent sizes to try after the first')
    parser.add_argument(
        '--backend',
        default='inductor',
        help="torch.compile's backend; 'eager' only traces, without generating code (a quick check)",
    )
    args = parser.parse_args()
    if args.device == 'cpu':
        torch.set_num_threads(args.threads)
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    config = sd_vae_config(args.width, resolution=args.resolution)
    eager = AutoencoderKL.from_config(config).to(args.device)
    compiled = AutoencoderKL.from_config(config).to(args.device)
    compiled.load_state_dict(eager.state_dict())
    x = torch.rand(args.batch_size, 3, args.resolution, args.resolution, device=args.device) * 2 - 1

    def step(vae: AutoencoderKL) -> float:
        sync(args.device)
        start = time.perf_counter()
        z = vae.encode(x).latent_dist.sample()
        (vae.decode(z).sample - x).abs().mean().backward()
        sync(args.device)
        return time.perf_counter() - start

    step(eager)
    compiled.encoder.compile(backend=args.backend)
    compiled.decoder.compile(backend=args.backend)
    first = step(compiled)
    print(json.dumps({'first_compiled_step_s': round(first, 2)}), flush=True)
    times: dict[str, list[float]] = {'eager': [], 'compiled': []}
    for rep in range(args.reps):
        for name, vae in (('eager', eager), ('compiled', compiled))[:: 1 if rep % 2 == 0 else -1]:
            times[name].append(step(vae))
    ratio = statistics.median(e / c for e, c in zip(times['eager'], times['compiled']))
    print(
        json.dumps(
            {
                'eager_step_s': round(statistics.median(times['eager']), 4),
                'compiled_step_s': round(statistics.median(times['compiled']), 4),
                'speedup_compiled_over_eager': round(ratio, 3),
            }
        ),
        flush=True,
    )

    latent = args.resolution // vae_downsample_factor(eager)
    sizes = sorted({scaled_size((latent, latent), s, s) for s in GRID_SCALES} - {(latent, latent)}, reverse=True)
    for size in sizes[: args.sizes]:
        z = torch.randn(args.batch_size, 4, *size, device=args.device)
        start = time.perf_counter()
        try:
            compiled.decode(z).sample.mean().backward()
            sync(args.device)
            print(
                json.dumps({'latent_size': size, 'first_decode_s': round(time.perf_counter() - start, 2)}), flush=True
            )
        except Exception as exc:  # report what the compiler did, whatever it raised
            reason = traceback.format_exception_only(type(exc), exc)[-1].strip()
            print(json.dumps({'latent_size': size, 'failed': reason[:300]}), flush=True)
            break


if __name__ == '__main__':
    main()
