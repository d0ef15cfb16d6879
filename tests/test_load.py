"""Loading and normalization: weights from Constant nodes, constant subgraphs and shared
constants are scored, sliced, and named in the plan as in the input model."""

from __future__ import annotations

import numpy as np
import onnx

from onnxprune import analyze, apply, load_normalized, score, select
from onnxprune.load import origin
from zoo_onnx import ONNX_CASES


def _prune(tmp_path, name, ratio=0.5, seed=0):
    model = ONNX_CASES[name].make()
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    a = analyze(load_normalized(path))
    surgery = apply(a, select(a, score(a, "random", seed=seed), ratio))
    return model, surgery


def _constant_outputs(model):
    return {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}


def test_constant_node_weights_are_named_by_the_constant_output(tmp_path):
    model, surgery = _prune(tmp_path, "chain_constant_nodes")
    assert not model.graph.initializer
    names = {s["tensor"] for s in surgery.slices}
    assert names and names <= _constant_outputs(model)


def test_folded_constant_subgraph_weights_are_sliced(tmp_path):
    model, surgery = _prune(tmp_path, "const_subgraph_weights")
    produced = {o for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}
    names = {s["tensor"] for s in surgery.slices}
    # every name exists in the input model, as an initializer or a node output
    assert names <= inits | produced
    # a weight reached through Identity/Cast is named by its source initializer
    sources = {n.input[0] for n in model.graph.node if n.op_type in ("Identity", "Cast")
               and n.input[0] in inits}
    assert sources & names


def test_shared_initializer_is_unshared_per_consumer(tmp_path):
    model, surgery = _prune(tmp_path, "shared_weight_identity")
    tied = [s for s in surgery.slices if s["tensor"] == "tied.weight"]
    assert {s["consumer"] for s in tied} == {"conv_a", "conv_b"}
    graph = surgery.model.graph
    users = [n for n in graph if n.op_type == "Conv" and n.name in ("conv_a", "conv_b")]
    assert users[0].inputs[1] is not users[1].inputs[1]
    assert all(origin(n.inputs[1]) == "tied.weight" for n in users)


def test_shared_zero_bias_stays_correct(tmp_path):
    # One zero bias used by two convs of different groups (the onnxsim failure).
    for seed in range(3):
        _, surgery = _prune(tmp_path, "shared_zero_bias", seed=seed)
        for node in surgery.model.graph:
            if node.op_type == "Conv" and len(node.inputs) > 2:
                assert node.inputs[2].const_value.shape[0] == node.inputs[1].const_value.shape[0]


def test_normalization_lifts_and_folds(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(ONNX_CASES["const_subgraph_weights"].make(), str(path))
    model = load_normalized(path)
    ops = {n.op_type for n in model.graph}
    assert not ops & {"Constant", "Identity", "Cast", "ConstantOfShape"}
    for node in model.graph:
        if node.op_type == "Conv":
            assert node.inputs[1].const_value is not None
            assert node.inputs[1].const_value.numpy().dtype == np.float32


def test_large_external_tensors_are_sliced_while_streaming(tmp_path, monkeypatch):
    """External weights are sliced window by window as the output is written; the result
    must still be exactly the oracle's."""
    import sys

    from conftest import residual_model
    from oracle import check_prune

    apply_module = sys.modules["onnxprune.apply"]
    monkeypatch.setattr(apply_module, "_STREAM_BYTES", 1)
    monkeypatch.setattr(apply_module, "_WINDOW_BYTES", 200)  # a few rows per window
    path = tmp_path / "ext.onnx"
    onnx.save(residual_model(channels=24), str(path), save_as_external_data=True,
              location="ext.onnx.data", size_threshold=0)
    result = check_prune(path, tmp_path, method="fpgm", ratio=0.4)
    assert (result.path.parent / (result.path.name + ".data")).is_file()
    streamed = [n.inputs[1].const_value for n in result.surgery.model.graph
                if n.op_type == "Conv"]
    assert any(isinstance(t, apply_module._StreamedSlice) for t in streamed)
