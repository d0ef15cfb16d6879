"""The correctness oracle: a pruned model computes exactly what the original computes
with the plan's entries zeroed.

Two halves, so that nothing here trusts the code under test more than it must:
normalization (constant folding, lifting) must not change what the model computes,
and the pruned model must equal the normalized original with the plan's slices zeroed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune import analyze, apply, load_normalized, save_model, score, select
from onnxprune.load import to_proto_bytes
from onnxprune.metrics import total_params
from onnxprune.validate import random_inputs, zero_slices


def _session(model_or_path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    source = model_or_path if isinstance(model_or_path, (str, bytes)) else str(model_or_path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def assert_close(expected: list[np.ndarray], got: list[np.ndarray], what: str) -> None:
    assert len(expected) == len(got)
    for k, (a, b) in enumerate(zip(expected, got)):
        assert a.shape == b.shape, f"{what}: output {k} shape {b.shape} != {a.shape}"
        scale = max(1.0, float(np.abs(a).max(initial=0)))
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=2e-5 * scale, err_msg=f"{what}: output {k}")


def _io(model: onnx.ModelProto) -> list[tuple]:
    init = {i.name for i in model.graph.initializer}
    def dims(v):
        return tuple(d.dim_value if d.HasField("dim_value") else d.dim_param
                     for d in v.type.tensor_type.shape.dim)
    return ([(v.name, v.type.tensor_type.elem_type, dims(v)) for v in model.graph.input
             if v.name not in init],
            [(v.name, v.type.tensor_type.elem_type, dims(v)) for v in model.graph.output])


@dataclass
class Result:
    analysis: object
    selection: dict
    surgery: object
    path: Path


def check_prune(path: str | Path, tmp_path: Path, *, ratio: float = 0.5, method: str = "random",
                seed: int = 0, round_to: int = 1, prunable: bool = True, batch: int = 2) -> Result:
    path = Path(path)
    original = _session(str(path))
    feeds = random_inputs(original, batch=batch, seed=seed)
    expected = original.run(None, feeds)

    # 1. normalization computes what the input model computes
    normalized = load_normalized(path)
    assert_close(expected, _session(to_proto_bytes(normalized)).run(None, feeds), "normalized")

    # 2. prune
    model = load_normalized(path)
    a = analyze(model)
    selection = select(a, score(a, method, seed=seed), ratio, round_to)
    if prunable:
        assert selection, f"nothing pruned; groups: {[(g.channels, g.frozen) for g in a.groups]}"
    params_before = total_params(model)
    surgery = apply(a, selection)
    out = tmp_path / f"{path.stem}.pruned.onnx"
    save_model(surgery.model, out)
    onnx.checker.check_model(str(out), full_check=True)
    if selection:
        assert total_params(surgery.model) < params_before

    # 3. same inputs and outputs: names, element types, (symbolic) shapes
    assert _io(onnx.load(str(out), load_external_data=False)) == \
        _io(onnx.load(str(path), load_external_data=False))

    # 4. the oracle: pruned == original with the plan's entries zeroed
    zeroed = zero_slices(load_normalized(path), surgery.slices)
    want = _session(to_proto_bytes(zeroed)).run(None, feeds)
    got = _session(str(out)).run(None, feeds)
    assert_close(want, got, "pruned vs zeroed original")
    return Result(a, selection, surgery, out)
