"""Soft pruning epoch by epoch: test accuracy before and after each step, and the largest
conv-weight norm, to see what a step does to a trained network.

    python benchmarks/soft_pruning_probe.py --schedule asymptotic [--clip-grad 5]

The ResNet-20-style CNN of train_methods.py (stem stride 2), SFP's L2 ranking at the
uniform ratio 0.312 (0.53 of the MACs with --round-to 4), 4 epochs on a Fashion-MNIST
subset; accuracy on 2,000 test images after recomputing BN statistics on 20 batches.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_methods as tm  # noqa: E402

from onnxprune.adapters.torch import SoftFilterPruner, recalibrate_batchnorm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedule", choices=["constant", "asymptotic"], default="asymptotic")
    parser.add_argument("--train-samples", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--clip-grad", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tm.CLIP = args.clip_grad or None
    (x, y, xt, yt), rng = tm.fashion_mnist(args.train_samples, 0, test_samples=2000)
    torch.manual_seed(0)
    model = tm.ResNet20(stem_stride=2)
    pruner = SoftFilterPruner(model, torch.from_numpy(x[:2]), method="l2", ratio=0.312,
                              round_to=4, schedule=args.schedule, epochs=args.epochs)
    pruner.step(0)
    print("| epoch | rate | top-1 before the step | after the step | largest conv-weight norm |")
    print("|---|---|---|---|---|")

    def on_epoch(epoch: int) -> None:
        before = tm.torch_accuracy(model, xt, yt)
        pruner.step(epoch)
        recalibrate_batchnorm(model, tm.bn_batches(x, rng, 20))
        after = tm.torch_accuracy(model, xt, yt)
        largest = max(float(m.weight.detach().norm()) for m in model.modules()
                      if isinstance(m, torch.nn.Conv2d))
        print(f"| {epoch} | {pruner.rate(epoch):.3f} | {before:.3f} | {after:.3f} | "
              f"{largest:.1f} |", flush=True)

    tm.train(model, x, y, args.epochs, rng=rng, on_epoch=on_epoch)


if __name__ == "__main__":
    main()
