"""Every seed method end to end on Fashion-MNIST with a ResNet-20-style CNN.

    python benchmarks/train_methods.py [--epochs 4] [--train-samples 60000]
        [--stem-stride 2] [--swp-alpha 2e-3] [--round-to 4] [--clip-grad 5] [--methods ...]

(`make bench-train` runs the command recorded in RESULTS.md.)

Each method gets the same epoch budget and aims at about 50% fewer MACs (SWP reports
its own reduction). Each ends as an ONNX model, hard-pruned with onnxprune surgery, and
is measured with onnxruntime on the full 10k test split: top-1 accuracy, params, MACs,
and latency (median, alternating with the baseline in one process, 1 thread, batch 1).

- baseline: E epochs.
- l1+ft: E/2 epochs, one-shot L1 to 0.5 MACs (--target-macs), E/2 epochs of fine-tuning
  the pruned architecture (removed channels masked with zero gradients: the same
  function and updates as the physically smaller model).
- sfp, asfp, fpgm: soft pruning from epoch 0 at the uniform ratio whose selection comes
  closest to 0.5 MACs (fpgm: FPGM ranking with gradient masking, as its official code;
  asfp: asymptotic schedule over the E epochs); after the last step the BN statistics
  are recomputed on 50 training batches (forward only), then hard-pruned.
- taylor: the iterative Taylor pruner (every 30 minibatches, n channels, kept counts
  aligned to --round-to) down to 0.5 MACs during the first half, training on for the rest.
- swp: filter skeletons (α from --swp-alpha, δ=0.01) for E epochs; reports its own
  reduction, with params and MACs counted by live stripes.
- hgsr: E/2 epochs with the HGSR penalty (λ 1e-4), loss-based greedy selection on 64
  training samples until 0.5 MACs (aligned blocks of --round-to), E/2 epochs of
  fine-tuning.

Ratio- and MACs-based selections round channel counts to --round-to (4: with 8, the
16-channel layers can only lose 0 or 8 channels and 50% MACs is out of reach). Every
method's gradient norm is clipped at --clip-grad (RESULTS.md says why).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "models"))
from train_default import NORM, load_fashion_mnist, normalize  # noqa: E402

from onnxprune import load_normalized, score, select  # noqa: E402
from onnxprune.adapters.torch.batchnorm import recalibrate_batchnorm  # noqa: E402
from onnxprune.adapters.torch.hgsr import HierarchicalGroupSparsity  # noqa: E402
from onnxprune.adapters.torch.mapping import TorchGroups, export_preserving_names  # noqa: E402
from onnxprune.adapters.torch.soft import SoftFilterPruner  # noqa: E402
from onnxprune.adapters.torch.taylor import TaylorPruner  # noqa: E402
from onnxprune.metrics import total_macs, total_params  # noqa: E402
from onnxprune.plan import MacsModel  # noqa: E402
from onnxprune.validate import latency, median, run_batches, session  # noqa: E402


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.short is None else self.short(x)))


class ResNet20(nn.Module):
    def __init__(self, n=3, widths=(16, 32, 64), classes=10, stem_stride=1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, stem_stride, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(n):
                layers.append(Block(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def batches(x, y, size, rng):
    order = rng.permutation(len(x))
    for i in range(0, len(x), size):
        idx = order[i:i + size]
        yield torch.from_numpy(x[idx]), torch.from_numpy(y[idx])


CLIP = None  # --clip-grad


def train(model, x, y, epochs, *, rng, lr=0.05, hooks=None, penalty=None, on_epoch=None,
          start_epoch=0, total_epochs=None):
    """SGD with momentum and a cosine schedule over `total_epochs` (gradient norm clipped
    to --clip-grad when given)."""
    total_epochs = total_epochs or epochs
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4,
                          nesterov=True)
    steps_per_epoch = -(-len(x) // 128)
    for epoch in range(start_epoch, start_epoch + epochs):
        model.train()
        for step, (xb, yb) in enumerate(batches(x, y, 128, rng)):
            t = (epoch + step / steps_per_epoch) / total_epochs
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + np.cos(np.pi * min(t, 1.0)))
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            if penalty is not None:
                loss = loss + penalty()
            loss.backward()
            for hook in (hooks or {}).get("after_backward", []):
                hook()
            if CLIP:
                torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
            for hook in (hooks or {}).get("after_step", []):
                hook()
        if on_epoch:
            on_epoch(epoch + 1)


def uniform_ratio_for(model, example, target=0.5, round_to=1):
    """The uniform per-group ratio whose L2 selection, with the pruner's rounding, comes
    closest to `target` of the MACs (rounding makes the MACs a step function of the
    ratio, so the closest step, not the first one under the target)."""
    groups = TorchGroups(model, example)
    a = groups.analysis
    scores = score(a, "l2", groups=groups.prunable)
    macs = MacsModel(a)
    grid = np.arange(0.0, 0.9, 0.0025)
    gaps = [abs(macs.of(a, select(a, scores, r, round_to)) / macs.total0 - target)
            for r in grid]
    return float(grid[int(np.argmin(gaps))])


def bn_batches(x, rng, count=50):
    """Training batches for recalibrating BN statistics after the last pruning step."""
    return (xb for xb, _ in itertools.islice(batches(x, x[:, 0, 0, 0], 128, rng), count))


def mask_fixed(model, example, selection_groups):
    """Keep a hard-pruning selection masked while fine-tuning: zero the members and their
    gradients (the same function and updates as the smaller model)."""
    groups, selection = selection_groups
    masks = groups.masks(selection, members=True)
    groups.zero(masks)
    return {"after_backward": [lambda: groups.zero(masks, grads=True)],
            "after_step": [lambda: groups.zero(masks)]}


XT = YT = None  # the test split, set by main()
SWP_ALPHA = 1e-5  # --swp-alpha
ROUND_TO = 4  # --round-to
STEM_STRIDE = 1  # --stem-stride


def fashion_mnist(train_samples: int, seed: int, test_samples: int | None = None):
    """Normalized Fashion-MNIST: a seeded subset of the training split (x, y) and the
    test split (xt, yt), with the generator that drew the subset."""
    mean, std = NORM["fashion-mnist"]
    data, missing = load_fashion_mnist("/usr/share/datasets/fashion-mnist")
    if data is None:
        raise SystemExit(f"Fashion-MNIST missing ({', '.join(missing)}): "
                         "apt-get install dataset-fashion-mnist")
    xtr, ytr, xte, yte = data
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(xtr), size=min(train_samples, len(xtr)), replace=False)
    xte, yte = xte[:test_samples], yte[:test_samples]
    return (normalize(xtr[pick], mean, std), ytr[pick].astype(np.int64),  # [N, 1, 28, 28]
            normalize(xte, mean, std), yte.astype(np.int64)), rng


def torch_accuracy(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(torch.from_numpy(x[i:i + 1000])).argmax(1)
                          for i in range(0, len(x), 1000)])
    return float((pred.numpy() == y).mean())


def run_method(name, x, y, epochs, example, rng, workdir, seed):
    torch.manual_seed(seed)
    model = ResNet20(stem_stride=STEM_STRIDE)
    half = max(1, epochs // 2)
    out = workdir / f"{name}.onnx"
    info = {}
    if name == "baseline":
        train(model, x, y, epochs, rng=rng)
        export_preserving_names(model.eval(), example, out)
    elif name == "l1+ft":
        train(model, x, y, half, rng=rng, total_epochs=epochs)
        groups = TorchGroups(model, example)
        a = groups.analysis
        selection = select(a, score(a, "l1", groups=groups.prunable), 0.0, ROUND_TO,
                           target_macs=0.5)
        hooks = mask_fixed(model, example, (groups, selection))
        train(model, x, y, epochs - half, rng=rng, hooks=hooks, start_epoch=half,
              total_epochs=epochs)
        groups.export_pruned(out, selection)
    elif name in ("sfp", "asfp", "fpgm"):
        ratio = uniform_ratio_for(model, example, round_to=ROUND_TO)
        info["ratio"] = round(ratio, 3)
        pruner = SoftFilterPruner(model, example, method="fpgm" if name == "fpgm" else "l2",
                                  ratio=ratio, schedule="asymptotic" if name == "asfp" else
                                  "constant", epochs=epochs, grad_mask=name == "fpgm",
                                  round_to=ROUND_TO)
        pruner.step(0)
        hooks = {"after_backward": [pruner.mask_gradients]} if name == "fpgm" else {}
        if name == "fpgm":
            hooks["after_step"] = [pruner.reapply]
        train(model, x, y, epochs, rng=rng, hooks=hooks, on_epoch=pruner.step)
        # the last step zeroed filters the network used: fresh BN statistics first
        info["stale_bn_accuracy"] = torch_accuracy(model, XT, YT)
        recalibrate_batchnorm(model, bn_batches(x, rng))
        # SFP's soft model keeps BN β on zeroed filters; the export removes the channel
        # whole (β folded into the readers' biases): both accuracies are reported.
        info["soft_accuracy"] = torch_accuracy(model, XT, YT)
        pruner.export(out)
    elif name == "taylor":
        # n per step so that the MACs target is reached within the first half of training
        steps = max(1, (half * -(-len(x) // 128)) // 30)
        estimate = TorchGroups(model, example)
        uniform = uniform_ratio_for(model, example)
        total = sum(int(uniform * g.channels) for g in estimate.prunable)
        pruner = TaylorPruner(model, example, n=max(1, -(-total // steps)), frequency=30,
                              target_macs=0.5, round_to=ROUND_TO)
        hooks = {"after_backward": [pruner.step], "after_step": [pruner.after_optimizer_step]}
        train(model, x, y, epochs, rng=rng, hooks=hooks)
        info["pruned_channels"] = pruner._removed()
        pruner.export(out)
    elif name == "hgsr":
        reg = HierarchicalGroupSparsity(model, example, lam=1e-4)
        train(model, x, y, half, rng=rng, penalty=reg.penalty, total_epochs=epochs)
        from onnxprune.greedy import greedy_select, sample
        from onnxprune.masks import MaskedModel

        groups = TorchGroups(model, example)
        source = workdir / "hgsr.unpruned.onnx"
        export_preserving_names(model.eval(), example, source)
        masked = MaskedModel(source)
        scores = score(masked.analysis, "hgsr")
        xs, ys = sample(x, y, 64, seed)
        selection, trace = greedy_select(masked, scores, xs, ys, 0.0, candidates=1,
                                         max_layer_ratio=0.9, target_macs=0.5,
                                         round_to=ROUND_TO)
        info["greedy_steps"] = len(trace)
        hooks = mask_fixed(model, example, (groups, selection))
        train(model, x, y, epochs - half, rng=rng, hooks=hooks, start_epoch=half,
              total_epochs=epochs)
        groups.export_pruned(out, selection)
    elif name == "swp":
        from onnxprune.adapters.torch.swp import FilterSkeleton, export as swp_export

        skeleton = FilterSkeleton(model, alpha=SWP_ALPHA)
        hooks = {"after_backward": [skeleton.after_backward],
                 "after_step": [skeleton.after_step]}
        train(skeleton.model, x, y, epochs, rng=rng, hooks=hooks)
        result = swp_export(skeleton, example, out)
        info["stripe_sparsity"] = round(skeleton.sparsity(), 4)
        # the paper's count: params and MACs of the live stripes only
        info["params_stripes"] = result.params_stripes
        info["macs_stripes"] = result.macs_stripes
        info["removed_filters"] = len(result.removed_filters)
        info["kernel_cuts"] = len(result.kernel_cuts)
    else:
        raise SystemExit(f"unknown method {name}")
    return out, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-samples", type=int, default=60000)
    parser.add_argument("--methods", default="baseline,l1+ft,sfp,asfp,fpgm,taylor,swp,hgsr")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--swp-alpha", type=float, default=1e-5,
                        help="SWP's L1 weight on the skeletons (the paper's 1e-5 assumes "
                             "~160 epochs; scale it up for short runs)")
    parser.add_argument("--round-to", type=int, default=4,
                        help="channel-count rounding for every ratio- or MACs-based "
                             "selection (8 cannot reach 50%% MACs with 16-channel layers)")
    parser.add_argument("--stem-stride", type=int, default=1,
                        help="2 runs the blocks at 14x14: 4x fewer MACs, for CPU budgets")
    parser.add_argument("--clip-grad", type=float, default=5.0,
                        help="clip every method's gradient norm (0: off); without it, "
                             "filters zeroed on a trained network blow up (RESULTS.md)")
    parser.add_argument("--json", default=str(HERE / "_work" / "train_methods.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    (x, y, xt, yt), _ = fashion_mnist(args.train_samples, args.seed)
    global XT, YT, SWP_ALPHA, ROUND_TO, STEM_STRIDE, CLIP
    XT, YT, SWP_ALPHA = xt, yt, args.swp_alpha
    ROUND_TO, STEM_STRIDE, CLIP = args.round_to, args.stem_stride, args.clip_grad or None
    example = torch.from_numpy(x[:2])
    workdir = Path(tempfile.mkdtemp(prefix="train-methods-", dir=HERE / "_work"))
    rows = []
    for name in args.methods.split(","):
        start = time.time()
        path, info = run_method(name, x, y, args.epochs, example, np.random.default_rng(
            args.seed), workdir, args.seed)
        seconds = time.time() - start
        sess = session(path, 1)
        accuracy = float((run_batches(sess, xt, 500)[0].argmax(1) == yt).mean())
        model = load_normalized(path)
        rows.append({"method": name, "accuracy": accuracy, "params": total_params(model),
                     "macs": total_macs(model), "train_s": round(seconds, 1),
                     "path": str(path), **info})
        print(json.dumps(rows[-1]), flush=True)
    base = next((r for r in rows if r["method"] == "baseline"), rows[0])
    sessions = [session(r["path"], 1) for r in rows]
    feeds = {sessions[0].get_inputs()[0].name: xt[:1]}
    times = latency(sessions, feeds, repeat=200, warmup=20)
    for r, t in zip(rows, times):
        r["latency_ms"] = median(t) * 1e3
    print("\n| method | top-1 | params | MACs | MACs vs baseline | latency ms (median) | "
          "latency vs baseline | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['accuracy']:.4f} | {r['params']:,} | {r['macs']:,} | "
              f"{r['macs'] / base['macs']:.2f} | {r['latency_ms']:.3f} | "
              f"{r['latency_ms'] / base['latency_ms']:.2f} | {r['train_s']} |")
    Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
