"""The training-step benchmark as a library; ``scripts/bench_train.py`` is its command line.

* ``workload``: the model, images and EQ-VAE draws every contender trains on;
* ``reference_step``: the reference's two-optimizer step (LDM + Lightning 1.4), on our model;
* ``train_step``: the contenders (the Trainer with the algorithm, the reference loop, ...), their
  alternating timing and their peak memory;
* ``profiling``: where a step's CPU time goes, and Adam's kernels side by side;
* ``flops``: analytic FLOPs of a step on the meta device.

It needs only the package's own dependencies (the random-weight LPIPS comes from ``lpips``).
Submodules are not imported here: ``import eqvae_composer.benchmarks.flops`` and so on.
"""

__all__: list[str] = []
