"""PyTorch adapters: soft pruning (SFP, ASFP, FPGM training), Taylor collection and the
iterative Taylor pruner, HGSR regularization. Mechanics on tiny models: masks hold,
the hard-pruned ONNX equals the masked torch model, the schedules match their formulas."""

from __future__ import annotations

import math

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

import zoo_torch  # noqa: E402
from onnxprune.adapters.torch.hgsr import HierarchicalGroupSparsity, prune_with_hgsr  # noqa: E402
from onnxprune.adapters.torch.soft import SoftFilterPruner, asfp_k, asfp_rate  # noqa: E402
from onnxprune.adapters.torch.taylor import TaylorCollector, TaylorPruner  # noqa: E402
from onnxprune.cli import main  # noqa: E402

pytestmark = pytest.mark.torch
CASES = ["resnet_basic_projection", "mobilenetv2_block", "se_block", "vgg_view",
         "shufflenet_unit", "inception_concat", "transformer_mlp"]


def _case(name):
    torch.manual_seed(0)
    return zoo_torch.TORCH_CASES[name].make()


def _train_steps(model, inputs, steps=3, hook=None, lr=0.05):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        out = model(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        out.float().pow(2).mean().backward()
        if hook:
            hook()
        opt.step()


def _onnx_equals_torch(model, inputs, path):
    model.eval()
    with torch.no_grad():
        want = model(*inputs)
    want = (want[0] if isinstance(want, tuple) else want).numpy()
    sess = ort.InferenceSession(str(path))
    got = sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)})[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("method", ["l2", "fpgm"])
def test_soft_pruning_exports_what_the_masked_model_computes(name, method, tmp_path):
    model, inputs = _case(name)
    pruner = SoftFilterPruner(model, inputs, method=method, ratio=0.5)
    pruner.step(0)
    _train_steps(model, inputs)
    pruner.step(1)
    assert pruner.pruned_channels() > 0
    path = pruner.export(tmp_path / "pruned.onnx")
    _onnx_equals_torch(model, inputs, path)


def test_sfp_filters_stay_trainable_and_can_recover(tmp_path):
    model, inputs = _case("resnet_basic_projection")
    pruner = SoftFilterPruner(model, inputs, method="l2", ratio=0.5)
    pruner.step(0)
    masks = pruner._masks
    name, [(axis, index)] = next((n, e) for n, e in masks.items() if len(e) == 1)
    tensor = pruner.groups.tensors[name]
    assert tensor.index_select(axis, index).abs().sum() == 0
    _train_steps(model, inputs)  # no gradient masking: zeroed filters get updates
    assert tensor.index_select(axis, index).abs().sum() > 0


def test_grad_mask_keeps_pruned_filters_at_zero(tmp_path):
    model, inputs = _case("resnet_basic_projection")
    pruner = SoftFilterPruner(model, inputs, method="fpgm", ratio=0.5, grad_mask=True)
    pruner.step(0)
    masks = dict(pruner._masks)
    _train_steps(model, inputs, steps=5, hook=pruner.mask_gradients, lr=0.05)
    for name, entries in masks.items():
        for axis, index in entries:
            # SGD momentum only carries masked (zero) gradients, so no update reaches them
            assert pruner.groups.tensors[name].index_select(axis, index).abs().max() == 0


def test_asfp_schedule_matches_its_formula():
    ratio, t_max, d = 0.4, 100, 1 / 8
    k = asfp_k(t_max, d)
    assert asfp_rate(d * t_max, ratio, t_max, d) == pytest.approx(0.75 * ratio, rel=1e-9)
    assert asfp_rate(t_max, ratio, t_max, d) == pytest.approx(ratio, rel=1e-12)
    for t in (1, 7, 30, 60):
        expected = ratio * (1 - math.exp(-k * t)) / (1 - math.exp(-k * t_max))
        assert asfp_rate(t, ratio, t_max, d) == pytest.approx(expected, rel=1e-12)
    rates = [asfp_rate(t, ratio, t_max, d) for t in range(0, t_max + 1)]
    assert all(b >= a for a, b in zip(rates, rates[1:]))
    model, inputs = _case("vgg_view")
    pruner = SoftFilterPruner(model, inputs, ratio=ratio, schedule="asymptotic", epochs=10)
    counts = [sum(len(p) for p in pruner.step(t).values()) for t in (1, 5, 10)]
    assert counts[0] <= counts[1] <= counts[2] and counts[2] > 0


@pytest.mark.parametrize("bounded", [False, True])
def test_taylor_collector_writes_what_the_cli_reads(bounded, tmp_path, capsys):
    model, inputs = _case("resnet_basic_projection")
    collector = TaylorCollector(model, inputs, bounded=bounded)
    model.train()
    for seed in range(3):
        torch.manual_seed(seed)
        model.zero_grad()
        noisy = [t + 0.1 * torch.randn_like(t) for t in inputs]
        model(*noisy).pow(2).mean().backward()
        collector.step()
    grads = collector.write(tmp_path / "grads.npz")
    files = np.load(grads)
    weight = "body.conv1.weight"
    shape = tuple(model.body.conv1.weight.shape)
    assert files[weight].shape == (shape if bounded else (3, *shape))
    assert "body.bn1.weight" in files.files  # BN γ and β, for taylor-bn
    for method in ("taylor", "taylor-bn"):
        code = main([str(collector.groups.onnx_path), "--method", method, "--grads",
                     str(grads), "-o", str(tmp_path / "out.onnx"), "--round-to", "1",
                     "--repeat", "2"])
        assert code == 0, capsys.readouterr().err


def test_taylor_bounded_scores_equal_full_scores():
    model, inputs = _case("resnet_basic_projection")
    full = TaylorCollector(model, inputs)
    bounded = TaylorCollector(model, inputs, bounded=True)
    model.train()
    for seed in range(4):
        torch.manual_seed(seed)
        model.zero_grad()
        model(*[t + torch.randn_like(t) for t in inputs]).pow(2).mean().backward()
        full.step()
        bounded.step()
    for name in full.names:
        for squared in (False, True):
            np.testing.assert_allclose(bounded.scores(name, squared), full.scores(name, squared),
                                       rtol=1e-9)


def test_taylor_pruner_schedule_masks_and_export(tmp_path):
    model, inputs = _case("resnet_basic_projection")
    pruner = TaylorPruner(model, inputs, n=3, frequency=2, target_channels=7)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    pruned_at = []
    for step in range(12):
        opt.zero_grad()
        model(*inputs).pow(2).mean().backward()
        if pruner.step():
            pruned_at.append((step, pruner._removed()))
        opt.step()
        pruner.after_optimizer_step()
    assert pruned_at[:3] == [(1, 3), (3, 6), (5, 7)]  # every 2 batches, 3 more, up to 7
    assert pruner.done
    for name, entries in pruner._masks.items():
        for axis, index in entries:
            assert pruner.groups.tensors[name].index_select(axis, index).abs().max() == 0
    _onnx_equals_torch(model, inputs, pruner.export(tmp_path / "t.onnx"))


def test_taylor_pruner_stops_at_a_macs_target():
    model, inputs = _case("vgg_view")
    pruner = TaylorPruner(model, inputs, n=2, frequency=1, target_macs=0.7)
    model.train()
    for _ in range(40):
        model.zero_grad()
        model(*inputs).pow(2).mean().backward()
        pruner.step()
        if pruner.done:
            break
    assert pruner.done and pruner.macs.total <= 0.7 * pruner.macs.total0


def test_taylor_pruner_round_to_keeps_aligned_counts(tmp_path):
    model, inputs = _case("resnet_basic_projection")
    pruner = TaylorPruner(model, inputs, n=3, frequency=1, target_channels=9, round_to=4)
    model.train()
    for _ in range(10):
        model.zero_grad()
        model(*inputs).pow(2).mean().backward()
        pruner.step()
        for g in pruner.groups.prunable:
            kept = g.channels - len(pruner.selection.get(g.index, []))
            assert kept == g.channels or kept % 4 == 0, (g.channels, kept)
        pruner.after_optimizer_step()
    assert pruner.done and pruner._removed() >= 9
    _onnx_equals_torch(model, inputs, pruner.export(tmp_path / "aligned.onnx"))


def test_hgsr_penalty_matches_its_formula_and_skips_projection_shortcuts():
    model, inputs = _case("resnet_basic_projection")
    reg = HierarchicalGroupSparsity(model, inputs, lam=1e-3)
    assert reg.skipped == ["body.downsample.0.weight"]
    expected = 0.0
    for _, w in reg.weights:
        a = w.detach().double().numpy()
        for i in range(a.shape[1]):
            expected += sum(np.sqrt(np.abs(a[o, i]).sum()) for o in range(a.shape[0])) ** 2
    assert float(reg.penalty()) == pytest.approx(1e-3 * expected, rel=1e-6)
    l2 = HierarchicalGroupSparsity(model, inputs, lam=1.0, form="l2")
    expected = sum(sum(np.linalg.norm(w.detach().double().numpy()[o, i])
                       for o in range(w.shape[0])) ** 2
                   for _, w in l2.weights for i in range(w.shape[1]))
    assert float(l2.penalty()) == pytest.approx(expected, rel=1e-6)
    reg.penalty().backward()  # differentiable
    assert all(w.grad is not None for _, w in reg.weights)


def test_hgsr_flow_trains_then_selects_greedily(tmp_path):
    model, inputs = _case("resnet_basic_projection")
    reg = HierarchicalGroupSparsity(model, inputs, lam=1e-2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        (model(*inputs).pow(2).mean() + reg.penalty()).backward()
        opt.step()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, *inputs[0].shape[1:])).astype(np.float32)
    report = prune_with_hgsr(model, inputs, x, None, tmp_path / "h.onnx", ratio=0.5, samples=16)
    assert "predictions" in report["notes"][0]
    assert report["total"]["channels_after"] < report["total"]["channels_before"]


def test_hgsr_retrains_the_pruned_architecture_from_scratch(tmp_path):
    from onnxprune.adapters.torch.hgsr import reinitialize
    from onnxprune.adapters.torch.onnx_module import OnnxModule

    model, inputs = _case("resnet_basic_projection")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, *inputs[0].shape[1:])).astype(np.float32)
    prune_with_hgsr(model, inputs, x, None, tmp_path / "h.onnx", ratio=0.5, samples=8)
    module = OnnxModule(tmp_path / "h.onnx")
    before = {n: p.detach().clone() for n, p in module.named_onnx_parameters()}
    reinitialize(module, seed=1)
    after = dict(module.named_onnx_parameters())
    assert all(after[n].shape == before[n].shape for n in before)
    assert any(not torch.equal(after[n], before[n]) for n in before)
    out = module(torch.from_numpy(x))
    out.pow(2).mean().backward()  # trainable as is
    assert torch.isfinite(out).all()


def test_mapping_is_not_fooled_by_identical_fresh_parameters():
    """A fresh model's BN tensors are byte-identical (γ = 1, β = 0), and the exporter
    shares identical initializers: each torch tensor must still map to its own layer."""
    model, inputs = _case("resnet_basic_projection")
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_parameters()
            module.reset_running_stats()
    pruner = SoftFilterPruner(model, inputs, method="l2", ratio=0.5)
    pruner.step(0)
    masks = pruner.groups.masks(pruner.selection, members=True)
    for name, entries in masks.items():
        axes = [axis for axis, _ in entries]
        assert len(axes) == len(set(axes)), f"{name} mapped to several layers"


def test_recalibrate_batchnorm_averages_each_batch_statistics():
    from onnxprune.adapters.torch import recalibrate_batchnorm

    model, inputs = _case("resnet_basic_projection")
    pruner = SoftFilterPruner(model, inputs, method="l2", ratio=0.5)
    _train_steps(model, inputs)
    pruner.step(1)  # a late step: the running statistics describe the unpruned network
    norms = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    seen = {n: [] for n in norms}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: seen[n].append(args[0]))
             for n, m in norms.items()]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(inputs[0].shape, generator=generator), None) for _ in range(3)]
    model.eval()
    assert recalibrate_batchnorm(model, batches) == 3
    for h in hooks:
        h.remove()
    assert not model.training
    for n, m in norms.items():
        assert m.momentum == 0.1 and len(seen[n]) == 3
        means = torch.stack([x.mean(dim=(0, 2, 3)) for x in seen[n]])
        variances = torch.stack([x.transpose(0, 1).flatten(1).var(dim=1) for x in seen[n]])
        torch.testing.assert_close(m.running_mean, means.mean(0), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(m.running_var, variances.mean(0), atol=1e-5, rtol=1e-4)
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]), n
    # the zeroed filters' BN channels now see what they emit: zero mean and variance
    conv_masks = [(n, e) for n, e in pruner._masks.items() if n.endswith("conv1.weight")]
    assert conv_masks
    for name, [(axis, index)] in conv_masks:
        bn = norms[name.replace("conv1.weight", "bn1")]
        assert bn.running_var[index].abs().max() < 1e-6
