"""Stripe-wise pruning (SWP): the filter skeleton in torch, and the ONNX stripe surgery."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from onnxprune.adapters.torch.swp import (  # noqa: E402
    FilterSkeleton,
    SkeletonConv2d,
    export,
    fold_skeletons,
)


def tiny_cnn(bn: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 8, 3, padding=1, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(8))
    layers += [nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)]
    return nn.Sequential(*layers)


def run_onnx(path, x: torch.Tensor) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x.numpy()})[0]


def torch_out(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(x).numpy()


def weights(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def conv_nodes(path) -> dict[str, onnx.NodeProto]:
    return {n.input[1]: n for n in onnx.load(str(path)).graph.node if n.op_type == "Conv"}


def attr(node, name):
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


# --------------------------------------------------------------------------- training

def test_skeleton_wraps_convs_with_ones_and_skips_grouped():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8),
                          nn.Conv2d(8, 4, (1, 3), groups=2), nn.Conv2d(4, 6, 5))
    with pytest.warns(UserWarning, match="grouped/depthwise"):
        fs = FilterSkeleton(model)
    assert set(fs.layers) == {"0", "3"}
    assert "depthwise" in fs.skipped["1"] and "grouped" in fs.skipped["2"]
    assert isinstance(model[0], SkeletonConv2d) and isinstance(model[1], nn.Conv2d)
    assert fs.layers["0"].fs.shape == (8, 3, 3) and fs.layers["3"].fs.shape == (6, 5, 5)
    assert all(torch.equal(p, torch.ones_like(p)) for p in fs.parameters())
    # the skeletons are parameters of the model: the optimizer sees them
    assert {id(p) for p in fs.parameters()} <= {id(p) for p in model.parameters()}
    assert fs.sparsity() == 0.0


@pytest.mark.parametrize("hook", [False, True])
def test_sign_term_is_added_to_the_gradient(hook):
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    w0, b0 = conv.weight.detach().clone(), conv.bias.detach().clone()
    fs = FilterSkeleton(conv, alpha=0.3, hook=hook)
    layer = fs.layers[""]
    with torch.no_grad():
        layer.fs.copy_(torch.randn(4, 3, 3))
    x = torch.randn(2, 3, 6, 6)
    (fs.model(x) ** 2).sum().backward()
    fs.after_backward()

    # by hand: dL/dFS[n,i,j] = Σ_c W[n,c,i,j]·dL/dW_eff[n,c,i,j], plus alpha·sign(FS)
    w_eff = (w0 * layer.fs.detach()[:, None]).requires_grad_()
    (F.conv2d(x, w_eff, b0, padding=1) ** 2).sum().backward()
    expected = (w0 * w_eff.grad).sum(1) + 0.3 * torch.sign(layer.fs.detach())
    torch.testing.assert_close(layer.fs.grad, expected, rtol=1e-5, atol=1e-5)


def test_dead_stripes_and_their_gradients_stay_zero_through_training():
    torch.manual_seed(0)
    model = tiny_cnn(bn=True)
    fs = FilterSkeleton(model, alpha=2.0, delta=0.3)
    first = fs.layers["0"].fs
    with torch.no_grad():
        first[1, 0, 0] = 0.2   # <= delta: dies at the first after_step
        first[5] = -0.1        # a whole filter
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 5, (16,))
    dead_history = []
    for _ in range(6):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        fs.after_backward()
        opt.step()
        fs.after_step()
        dead = {name: (layer.fs.detach() == 0) for name, layer in fs.layers.items()}
        for name, layer in fs.layers.items():
            assert torch.equal(layer.fs.detach()[~layer.alive], torch.zeros(int((~layer.alive).sum())))
            assert torch.all(layer.fs.grad[dead[name]] == 0)
            assert torch.all(layer.fs.detach()[layer.alive].abs() > fs.delta)
        for before in dead_history:  # once dead, dead for good
            for name in before:
                assert torch.all(dead[name][before[name]])
        dead_history.append(dead)
    assert first[1, 0, 0] == 0 and torch.all(first[5] == 0)
    # alpha large enough to kill more than the two we set
    counts = fs.stripe_counts()
    n_dead = sum(d for d, _ in counts.values())
    assert n_dead > 10
    assert fs.sparsity() == pytest.approx(n_dead / sum(t for _, t in counts.values()))
    assert 5 in fs.dead_filters()["0"]


def test_fold_equals_the_wrapped_model():
    model = tiny_cnn(bn=True)
    fs = FilterSkeleton(model)
    torch.manual_seed(3)
    for layer in fs.layers.values():
        with torch.no_grad():
            layer.fs.copy_(torch.randn_like(layer.fs) * (torch.rand_like(layer.fs) > 0.4))
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    want = torch_out(fs.model, x)
    copy = fs.fold(inplace=False)  # training can go on
    assert isinstance(fs.model[0], SkeletonConv2d)
    np.testing.assert_allclose(torch_out(copy, x), want, rtol=1e-5, atol=1e-6)
    plain = fs.fold()
    assert not any(isinstance(m, SkeletonConv2d) for m in plain.modules())
    assert set(plain.state_dict()) == set(tiny_cnn(bn=True).state_dict())
    np.testing.assert_allclose(torch_out(plain, x), want, rtol=1e-5, atol=1e-6)
    assert fold_skeletons(plain) is plain


def test_wrapped_model_is_exportable(tmp_path):
    model = tiny_cnn()
    fs = FilterSkeleton(model)
    with torch.no_grad():
        fs.layers["0"].fs[:, 1] = 0.5
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path / "wrapped.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"])
    np.testing.assert_allclose(run_onnx(path, x), torch_out(model, x), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- export

def test_export_matches_the_folded_model(tmp_path):
    model = tiny_cnn(bn=True)
    with torch.no_grad():  # trained-looking BN statistics
        bn = model[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    fs = FilterSkeleton(model)
    torch.manual_seed(5)
    for layer in fs.layers.values():
        with torch.no_grad():
            layer.fs.mul_((torch.rand_like(layer.fs) > 0.5).float())
    fs.after_step()
    model.eval()
    path = tmp_path / "swp.onnx"
    report = fs.export(torch.randn(1, 3, 8, 8), path)
    onnx.checker.check_model(str(path), full_check=True)
    folded = fs.fold(inplace=False)
    for batch in (1, 3):  # dynamic batch
        x = torch.randn(batch, 3, 8, 8)
        np.testing.assert_allclose(run_onnx(path, x), torch_out(folded, x), rtol=1e-4, atol=1e-4)
    assert report.sparsity == pytest.approx(fs.sparsity())
    json.dumps(report.to_dict())
    assert "stripe sparsity" in report.format()
    assert isinstance(fs.model[0], SkeletonConv2d)  # export left the skeleton alone


def test_a_filter_with_no_live_stripe_disappears(tmp_path):
    model = tiny_cnn()
    with torch.no_grad():
        model[0].bias[2] = 0.0    # dead filter 2 of conv1: its channel is exactly zero
        model[2].bias[6] = -0.5   # dead filter 6 of conv2: ReLU(-0.5) = 0
        model[2].bias[3] = 0.5    # dead filter 3 of conv2: ReLU(0.5) reaches the Linear
    fs = FilterSkeleton(model)
    with torch.no_grad():
        fs.layers["0"].fs[2] = 0
        fs.layers["2"].fs[[3, 6]] = 0
    fs.after_step()
    path = tmp_path / "swp.onnx"
    report = export(fs, torch.randn(1, 3, 8, 8), path, round_to=1)
    w = weights(path)
    assert w["0.weight"].shape == (7, 3, 3, 3) and w["0.bias"].shape == (7,)
    assert w["2.weight"].shape == (7, 7, 3, 3)         # consumer lost input channel 2
    assert w["6.weight"].shape == (5, 7)               # the Linear lost feature 6
    assert {(e["weight"], tuple(e["channels"])) for e in report.removed_filters} == \
        {("0.weight", (2,)), ("2.weight", (6,))}
    kept = {e["weight"]: e for e in report.kept_filters}
    assert kept["2.weight"]["channels"] == [3] and "nonzero constant" in kept["2.weight"]["reason"]
    x = torch.randn(3, 3, 8, 8)
    np.testing.assert_allclose(run_onnx(path, x), torch_out(fs.fold(inplace=False), x),
                               rtol=1e-4, atol=1e-4)
    onnx.checker.check_model(str(path), full_check=True)


def test_dead_filter_behind_batchnorm_shift_is_kept(tmp_path):
    model = tiny_cnn(bn=True)
    with torch.no_grad():
        model[1].bias[4] = 0.3  # BN turns the zero filter into the constant 0.3
    fs = FilterSkeleton(model)
    with torch.no_grad():
        fs.layers["0"].fs[[1, 4]] = 0
    path = tmp_path / "swp.onnx"
    report = export(fs, torch.randn(1, 3, 8, 8), path, round_to=1)
    assert weights(path)["0.weight"].shape == (7, 3, 3, 3)  # 1 removed (BN shift 0), 4 kept
    assert report.removed_filters[0]["channels"] == [1]
    assert report.kept_filters[0]["channels"] == [4]
    x = torch.randn(2, 3, 8, 8)
    np.testing.assert_allclose(run_onnx(path, x), torch_out(fs.fold(inplace=False), x),
                               rtol=1e-4, atol=1e-4)


def test_dead_filters_are_removed_down_to_aligned_channel_counts(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.ReLU(),
                          nn.Conv2d(16, 8, 3, padding=1, bias=False), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    fs = FilterSkeleton(model)
    with torch.no_grad():
        fs.layers["0"].fs[:9] = 0   # 9 of 16 dead: 8 go, one stays for alignment
        fs.layers["2"].fs[3] = 0    # 1 of 8 dead: stays (8 → 7 would be unaligned)
    path = tmp_path / "swp.onnx"
    report = export(fs, torch.randn(1, 3, 8, 8), path)  # round_to=8 by default
    w = weights(path)
    assert w["0.weight"].shape == (8, 3, 3, 3) and w["2.weight"].shape == (8, 8, 3, 3)
    assert report.removed_filters == [{"node": report.removed_filters[0]["node"],
                                       "weight": "0.weight", "channels": list(range(8))}]
    reasons = {(e["weight"], tuple(e["channels"])): e["reason"] for e in report.kept_filters}
    assert "alignment" in reasons[("0.weight", (8,))] and "alignment" in reasons[("2.weight", (3,))]
    x = torch.randn(2, 3, 8, 8)
    np.testing.assert_allclose(run_onnx(path, x), torch_out(fs.fold(inplace=False), x),
                               rtol=1e-4, atol=1e-4)


def test_frozen_group_keeps_its_zero_filters(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3))
    fs = FilterSkeleton(model)
    with torch.no_grad():
        fs.layers["2"].fs[1] = 0  # the last conv's channels reach the graph output
    report = export(fs, torch.randn(1, 3, 8, 8), tmp_path / "swp.onnx")
    assert weights(tmp_path / "swp.onnx")["2.weight"].shape == (6, 4, 3, 3)
    assert report.kept_filters[0]["channels"] == [1]
    assert "frozen" in report.kept_filters[0]["reason"]


def _one_conv(tmp_path, conv: nn.Conv2d, kill, hw=9):
    model = nn.Sequential(nn.ReLU(), conv)
    fs = FilterSkeleton(model)
    with torch.no_grad():
        fs.layers["1"].fs[kill] = 0
    path = tmp_path / "swp.onnx"
    report = export(fs, torch.randn(1, conv.in_channels, hw, hw), path)
    onnx.checker.check_model(str(path), full_check=True)
    x = torch.randn(2, conv.in_channels, hw, hw)
    np.testing.assert_allclose(run_onnx(path, x), torch_out(fs.fold(inplace=False), x),
                               rtol=1e-4, atol=1e-4)
    node = conv_nodes(path)["1.weight"]
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    return report, node, ops, weights(path)["1.weight"]


def test_dead_border_row_and_column_with_padding_shrink_the_kernel(tmp_path):
    conv = nn.Conv2d(4, 5, 3, padding=1)
    _, node, ops, w = _one_conv(tmp_path, conv, (slice(None), 0, slice(None)))   # top row
    assert attr(node, "kernel_shape") == [2, 3] and w.shape == (5, 4, 2, 3)
    assert attr(node, "pads") == [0, 1, 1, 1] and "Slice" not in ops
    conv = nn.Conv2d(4, 5, 5, padding=2, stride=2, dilation=1)
    kill = (slice(None), slice(None), [3, 4])                                      # right columns
    _, node, ops, w = _one_conv(tmp_path, conv, kill, hw=11)
    assert attr(node, "kernel_shape") == [5, 3] and attr(node, "pads") == [2, 2, 2, 0]
    assert "Slice" not in ops


def test_dead_border_rows_without_padding_crop_the_input(tmp_path):
    conv = nn.Conv2d(4, 5, 3, padding=0)
    report, node, ops, _ = _one_conv(tmp_path, conv, (slice(None), 0, slice(None)))  # top, pad 0
    assert attr(node, "kernel_shape") == [2, 3] and attr(node, "pads") == [0, 0, 0, 0]
    assert "Slice" in ops and report.kernel_cuts[0]["crop"] == [1, 0, 0, 0]
    # bottom row and left column, stride 2 and dilation 2, one-sided padding
    conv = nn.Conv2d(4, 5, 3, padding=(1, 0), stride=2, dilation=2)
    model_kill = [(slice(None), 2, slice(None)), (slice(None), slice(None), 0)]
    model = nn.Sequential(nn.ReLU(), conv)
    fs = FilterSkeleton(model)
    with torch.no_grad():
        for k in model_kill:
            fs.layers["1"].fs[k] = 0
    path = tmp_path / "swp2.onnx"
    report = export(fs, torch.randn(1, 4, 13, 12), path)
    x = torch.randn(2, 4, 13, 12)
    np.testing.assert_allclose(run_onnx(path, x), torch_out(fs.fold(inplace=False), x),
                               rtol=1e-4, atol=1e-4)
    node = conv_nodes(path)["1.weight"]
    assert attr(node, "kernel_shape") == [2, 2]
    cut = report.kernel_cuts[0]
    assert cut["pads_after"] == [1, 0, 0, 0] and cut["crop"] == [0, 2, 1, 0]


def test_dead_interior_row_stays(tmp_path):
    conv = nn.Conv2d(4, 5, 3, padding=1)
    report, node, _, w = _one_conv(tmp_path, conv, (slice(None), 1, slice(None)))
    assert attr(node, "kernel_shape") == [3, 3] and not report.kernel_cuts
    assert np.all(w[:, :, 1] == 0) and np.any(w[:, :, 0] != 0)


def test_report_matches_a_hand_count(tmp_path):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    fs = FilterSkeleton(conv)
    with torch.no_grad():
        skeleton = fs.layers[""].fs
        skeleton[0, 0, 0] = skeleton[0, 1, 1] = 0     # filter 0: 2 dead stripes
        skeleton[1] = 0
        skeleton[1, 1, 1] = 1.0                       # filter 1: 8 dead stripes
    assert fs.sparsity() == pytest.approx(10 / 27)
    report = export(fs, torch.randn(1, 2, 5, 5), tmp_path / "one.onnx")
    layer, = report.after
    assert (layer.stripes, layer.live, layer.in_channels, layer.out_positions) == (27, 17, 2, 25)
    assert report.sparsity == pytest.approx(10 / 27)
    # dense: 3·2·3·3 weights + 3 biases; MACs 3·2·3·3 · 5·5
    assert (report.params_before, report.macs_before) == (57, 1350)
    # by live stripes: each is 1×1×C_in = 2 weights, 2·25 MACs
    assert (layer.params_stripes, layer.macs_stripes) == (34, 850)
    assert (report.params_stripes, report.macs_stripes) == (34 + 3, 850)
    assert not report.kernel_cuts and not report.removed_filters  # nothing structural to cut


# --------------------------------------------------------------------------- stripe form

def _stripe_model():
    torch.manual_seed(2)
    model = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(6, 5, 3, padding=2, dilation=2, bias=False), nn.ReLU(),
                          nn.Conv2d(5, 4, (3, 5), padding=(0, 2)))
    fs = FilterSkeleton(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in fs.layers.values():
            layer.fs.mul_((torch.rand(layer.fs.shape, generator=g) > 0.6).float())
        fs.layers["5"].fs[2] = 0   # a dead filter of the last conv (frozen: graph output)
    fs.after_step()
    return fs


def test_stripe_form_computes_the_same_outputs(tmp_path):
    fs = _stripe_model()
    x = torch.randn(3, 8, 10, 11)
    want = torch_out(fs.fold(inplace=False), x)
    path = tmp_path / "stripe.onnx"
    report = export(fs, torch.randn(1, 8, 10, 11), path, form="stripe")
    onnx.checker.check_model(str(path), full_check=True)
    assert [c["node"] for c in report.stripe_form] == [layer.node for layer in report.after]
    graph = onnx.load(str(path)).graph
    assert [o.name for o in graph.output] == ["output"]
    kernels = [attr(n, "kernel_shape") for n in graph.node if n.op_type == "Conv"]
    assert kernels == [[1, 1]] * 3                       # every conv is a 1×1 over its stripes
    w1 = weights(path)
    live = {name: int((layer.fs != 0).sum()) for name, layer in fs.layers.items()}
    for name in ("1", "3", "5"):                           # one row per live stripe + a zero row
        assert w1[f"{name}.weight__stripes"].shape[0] == live[name] + 1
    assert {"Gather", "Sum", "Slice"} <= {n.op_type for n in graph.node}
    np.testing.assert_allclose(run_onnx(path, x), want, rtol=1e-4, atol=1e-4)
    # the dense form of the same model agrees too
    dense = tmp_path / "dense.onnx"
    export(fs, torch.randn(1, 8, 10, 11), dense, form="dense")
    assert "Gather" not in {n.op_type for n in onnx.load(str(dense)).graph.node}
    np.testing.assert_allclose(run_onnx(dense, x), want, rtol=1e-4, atol=1e-4)


def test_auto_form_follows_the_rules(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(128, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3))
    fs = FilterSkeleton(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in fs.layers.values():   # 8 of 9 stripes dead in every filter
            for n in range(layer.fs.shape[0]):
                keep = torch.randint(0, 9, (1,), generator=g).item()
                layer.fs[n].view(-1)[[k for k in range(9) if k != keep]] = 0
    x = torch.randn(2, 128, 24, 24)
    want = torch_out(fs.fold(inplace=False), x)
    report = export(fs, x[:1], tmp_path / "auto.onnx")
    # 128 input channels, 89% dead, 5.3 M MACs: stripe form; the 8-channel conv stays dense
    assert [c["node"] for c in report.stripe_form] == [report.after[0].node]
    np.testing.assert_allclose(run_onnx(tmp_path / "auto.onnx", x), want, rtol=1e-4, atol=1e-4)
    report = export(fs, x[:1], tmp_path / "all.onnx", rules=((8, 0.5),), min_macs=0)
    assert len(report.stripe_form) == 2
    np.testing.assert_allclose(run_onnx(tmp_path / "all.onnx", x), want, rtol=1e-4, atol=1e-4)
    small = torch.randn(1, 128, 6, 6)                       # 0.3 M MACs: too small to gain
    assert not export(fs, small, tmp_path / "small.onnx").stripe_form
