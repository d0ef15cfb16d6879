"""Shared fixtures: small hand-built models for the CLI, scorer and loader tests."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parent.parent
SHARED_MODELS = ROOT.parent / "shared" / "models"


def residual_model(opset: int = 17, channels: int = 16, seed: int = 0) -> onnx.ModelProto:
    """x → conv1 → relu → conv2 (+ conv1's output) → relu → GAP → flatten → gemm → y."""
    rng = np.random.default_rng(seed)

    def init(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.3, name)

    c = channels
    inits = [init("w1", c, 3, 3, 3), init("b1", c), init("w2", c, c, 3, 3), init("b2", c),
             init("w3", c, c, 1, 1), init("fc_w", 10, c), init("fc_b", 10)]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
        helper.make_node("Conv", ["r2", "w3"], ["c3"], name="conv3"),
        helper.make_node("GlobalAveragePool", ["c3"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture
def residual_path(tmp_path: Path) -> Path:
    path = tmp_path / "residual.onnx"
    onnx.save(residual_model(), str(path))
    return path


def export_cached(case_name: str, dynamo: bool, keep_bn: bool = False) -> Path:
    """Export a torch zoo case once per source version; shared by all test workers."""
    import hashlib
    import os

    import zoo_torch

    source = Path(zoo_torch.__file__).read_bytes()
    key = hashlib.sha256(source).hexdigest()[:12]
    folder = ROOT / ".pytest_cache" / "onnxprune-exports" / key
    folder.mkdir(parents=True, exist_ok=True)
    mode = ("dynamo" if dynamo else "torchscript") + ("-keepbn" if keep_bn else "")
    path = folder / f"{case_name}-{mode}.onnx"
    if not path.exists():
        tmp = folder / f".{path.name}.{os.getpid()}"
        zoo_torch.export(zoo_torch.TORCH_CASES[case_name], tmp, dynamo=dynamo, keep_bn=keep_bn)
        os.replace(tmp, path)
    return path
