"""DiT training-step benchmark: the probe in our Composer Trainer vs a plain PyTorch loop, side by side.

    python scripts/bench_diffusion.py                                   # CPU: DiT-S/2 on 16x16x4 latents, batch 8
    python scripts/bench_diffusion.py --device cuda --model DiT-B/2 --latent-size 32 --batch-size 64
    python scripts/bench_diffusion.py --smoke                           # seconds: checks that the benchmark runs

Both contenders train the same ``ComposerLatentDiffusion`` (same initial weights, the flow objective by
default), on the same in-memory latents through the same DataLoader, with the same fused AdamW, and bf16
autocast on CUDA (Composer's ``amp_bf16``; fp32 on CPU). The plain loop is what a DiT/SiT ``train.py``
does per step: forward, loss, ``zero_grad``, backward, ``step``. The Trainer adds its events, metrics
bookkeeping and the loss all-reduce. They alternate ``--steps``-step runs ``--reps`` times after a warm-up;
the ratio is the median over repetitions of plain time / Trainer time (1.0: the Trainer costs nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eqvae_composer.diffusion.model import ComposerLatentDiffusion  # noqa: E402
from eqvae_composer.diffusion.network import build_dit, dit_config  # noqa: E402

SEED = 0


class _Latents(torch.utils.data.Dataset):
    def __init__(self, latents: torch.Tensor, labels: torch.Tensor) -> None:
        self.latents, self.labels = latents, labels

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {'latent': self.latents[index], 'label': self.labels[index]}


def _sync(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def _model(args: argparse.Namespace) -> ComposerLatentDiffusion:
    torch.manual_seed(SEED)
    overrides = {'num_layers': args.depth} if args.depth else {}
    config = dit_config(
        args.model, args.channels, args.latent_size, 1000, learn_sigma=args.objective == 'ddpm', **overrides
    )
    return ComposerLatentDiffusion(build_dit(config), objective=args.objective)


def _optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=True)


class PlainLoop:
    """A DiT/SiT ``train.py`` step: forward, loss, zero_grad, backward, step."""

    def __init__(self, model: ComposerLatentDiffusion, loader, device: str) -> None:
        self.model, self.loader, self.device = model.to(device).train(), loader, device
        self.optimizer = _optimizer(self.model)
        self.autocast = (lambda: torch.autocast('cuda', torch.bfloat16)) if device == 'cuda' else contextlib.nullcontext
        self.batches = iter(())

    def _next(self) -> dict[str, torch.Tensor]:
        batch = next(self.batches, None)
        if batch is None:
            self.batches = iter(self.loader)
            batch = next(self.batches)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def run(self, steps: int) -> float:
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            batch = self._next()
            with self.autocast():
                loss = self.model.loss(self.model(batch), batch)['total']
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        _sync(self.device)
        return time.perf_counter() - start


class TrainerLoop:
    """The Composer Trainer, driven ``steps`` batches at a time; timed from the first dataloader event to the last
    batch end."""

    def __init__(self, model: ComposerLatentDiffusion, loader, device: str) -> None:
        from composer import Callback, Trainer

        bench = self

        class _Timer(Callback):
            def before_dataloader(self, state, logger):
                if bench.start is None:
                    bench.start = time.perf_counter()

            def batch_end(self, state, logger):
                _sync(device)
                bench.end = time.perf_counter()

        self.start: float | None = None
        self.end = 0.0
        self.trainer = Trainer(
            model=model,
            train_dataloader=loader,
            optimizers=_optimizer(model),
            max_duration='0ba',
            callbacks=[_Timer()],
            loggers=[],
            device='gpu' if device == 'cuda' else 'cpu',
            precision='amp_bf16' if device == 'cuda' else 'fp32',
            seed=SEED,
            progress_bar=False,
            log_to_console=False,
        )

    def run(self, steps: int) -> float:
        self.start = None
        self.trainer.fit(duration=f'{steps}ba')
        return self.end - self.start


def bench(args: argparse.Namespace) -> dict:
    g = torch.Generator().manual_seed(SEED)
    n = args.batch_size * 4
    data = _Latents(
        torch.randn(n, args.channels, args.latent_size, args.latent_size, generator=g),
        torch.randint(0, 1000, (n,), generator=g),
    )
    pin = args.device == 'cuda'
    loaders = [
        torch.utils.data.DataLoader(data, batch_size=args.batch_size, drop_last=True, pin_memory=pin) for _ in range(2)
    ]
    model = _model(args)
    plain = PlainLoop(copy.deepcopy(model), loaders[0], args.device)
    trainer = TrainerLoop(model, loaders[1], args.device)
    plain.run(args.warmup)
    trainer.run(args.warmup)
    times = {'plain': [], 'trainer': []}
    for _ in range(args.reps):
        times['plain'].append(plain.run(args.steps))
        times['trainer'].append(trainer.run(args.steps))
    ratios = [p / t for p, t in zip(times['plain'], times['trainer'])]
    params = sum(p.numel() for p in model.parameters())
    return {
        'command': ' '.join(sys.argv),
        'device': torch.cuda.get_device_name() if args.device == 'cuda' else platform.processor() or 'cpu',
        'threads': torch.get_num_threads(),
        'model': args.model,
        'parameters': params,
        'latent': [args.channels, args.latent_size, args.latent_size],
        'batch_size': args.batch_size,
        'objective': args.objective,
        'steps_per_rep': args.steps,
        'reps': args.reps,
        'plain_s_per_step': statistics.median(times['plain']) / args.steps,
        'trainer_s_per_step': statistics.median(times['trainer']) / args.steps,
        'ratio_plain_over_trainer': statistics.median(ratios),
        'ratios': ratios,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--model', default='DiT-S/2')
    parser.add_argument('--depth', type=int, default=None, help='override the number of blocks')
    parser.add_argument('--latent-size', type=int, default=16)
    parser.add_argument('--channels', type=int, default=4)
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--objective', default='flow', choices=['flow', 'ddpm'])
    parser.add_argument('--steps', type=int, default=10, help='steps per timed run')
    parser.add_argument('--reps', type=int, default=7, help='alternating repetitions')
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--smoke', action='store_true', help='a two-block model, 2 reps of 2 steps')
    parser.add_argument('--out', help='write the result as JSON')
    args = parser.parse_args(argv)
    if args.smoke:
        args.depth, args.latent_size, args.batch_size, args.steps, args.reps, args.warmup = 2, 8, 2, 2, 2, 1
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = bench(args)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == '__main__':
    main()
