"""Hand-built ONNX test graphs (``onnx.helper``) for ONNX constructs that the
torch exporters never (or rarely) produce: old opsets, Constant-node weights,
constant sub-graphs feeding weights, shared initializers, every Split/Resize/Pad
flavour, control flow, ops unknown to the pruner, quantized graphs, NHWC
TF-style graphs.

Every case builds an ``onnx.ModelProto`` that passes
``onnx.checker.check_model(full_check=True)`` and runs in onnxruntime.
Weights come from a ``numpy.random.RandomState`` seeded per case.

Node names are stable (``conv1``, ``bn1``, ...). ``OnnxCase.frozen`` lists the
nodes whose *output channels* must not be pruned (where this is the point of
the case); ``prunable=False`` means nothing at all may be pruned / the pruner
should decline the model.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT


@dataclass
class OnnxCase:
    name: str
    make: Callable[[], onnx.ModelProto]
    prunable: bool = True
    note: str = ""
    # node names whose output channels must stay (frozen); informative
    frozen: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    # node names whose output channels must stay prunable (the rule passes channels through)
    kept_prunable: tuple[str, ...] = ()


ONNX_CASES: dict[str, OnnxCase] = {}


def _case(name: str, note: str = "", prunable: bool = True, frozen: Sequence[str] = (), tags: Sequence[str] = (),
          kept_prunable: Sequence[str] = ()):
    def deco(fn: Callable[[], onnx.ModelProto]):
        def make() -> onnx.ModelProto:
            m = fn()
            m.graph.name = name
            return m

        make.__name__ = f"make_{name}"
        ONNX_CASES[name] = OnnxCase(name, make, prunable, note, tuple(frozen), tuple(tags), tuple(kept_prunable))
        return fn

    return deco


# ---------------------------------------------------------------------------
# graph builder
# ---------------------------------------------------------------------------


class G:
    """Tiny helper around onnx.helper. ``const_nodes=True`` emits weights as
    ``Constant`` nodes instead of initializers."""

    def __init__(self, name: str, opset: int = 13, const_nodes: bool = False):
        self.name = name
        self.opset = opset
        self.rs = np.random.RandomState(zlib.crc32(name.encode()) & 0x7FFFFFFF)
        self.const_nodes = const_nodes
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self._n = 0

    # -- values ---------------------------------------------------------
    def uniq(self, base: str) -> str:
        self._n += 1
        return f"{base}_{self._n}"

    def input(self, name: str, shape: Sequence[int | str], elem_type: int = FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def const(self, name: str, arr: np.ndarray, as_node: bool | None = None) -> str:
        arr = np.asarray(arr)
        as_node = self.const_nodes if as_node is None else as_node
        t = numpy_helper.from_array(arr, name)
        if as_node:
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"const_{name}", value=t))
        else:
            self.inits.append(t)
        return name

    def ints(self, name: str, vals: Sequence[int], as_node: bool | None = None) -> str:
        return self.const(name, np.asarray(vals, dtype=np.int64), as_node)

    def floats(self, name: str, vals, as_node: bool | None = None) -> str:
        return self.const(name, np.asarray(vals, dtype=np.float32), as_node)

    def randn(self, name: str, shape: Sequence[int], std: float = 1.0, mean: float = 0.0,
              as_node: bool | None = None) -> str:
        return self.floats(name, self.rs.randn(*shape) * std + mean, as_node)

    def uniform(self, name: str, shape: Sequence[int], lo: float, hi: float, as_node: bool | None = None) -> str:
        return self.floats(name, self.rs.uniform(lo, hi, size=shape), as_node)

    # -- nodes ----------------------------------------------------------
    def node(self, op: str, inputs: Sequence[str], name: str | None = None, n_out: int = 1,
             outputs: Sequence[str] | None = None, domain: str | None = None, **attrs):
        name = name or self.uniq(op.lower())
        if outputs is None:
            outputs = [name] if n_out == 1 else [f"{name}_out{i}" for i in range(n_out)]
        kw = {"domain": domain} if domain else {}
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name, **attrs, **kw))
        return outputs[0] if len(outputs) == 1 else list(outputs)

    def conv_w(self, name: str, cin: int, cout: int, k: int = 3, group: int = 1, nd: int = 2,
               as_node: bool | None = None) -> str:
        fan_in = cin // group * k ** nd
        return self.randn(f"{name}.weight", [cout, cin // group] + [k] * nd, std=1.0 / np.sqrt(fan_in), as_node=as_node)

    def conv(self, x: str, cin: int, cout: int, k: int = 3, name: str | None = None, group: int = 1,
             bias: bool = True, stride: int = 1, pad: int | None = None) -> str:
        name = name or self.uniq("conv")
        pad = k // 2 if pad is None else pad
        ins = [x, self.conv_w(name, cin, cout, k, group)]
        if bias:
            ins.append(self.randn(f"{name}.bias", [cout], std=0.2))
        return self.node("Conv", ins, name=name, kernel_shape=[k, k], pads=[pad] * 4, strides=[stride, stride],
                         group=group)

    def bn(self, x: str, c: int, name: str | None = None, **attrs) -> str:
        name = name or self.uniq("bn")
        ins = [x,
               self.uniform(f"{name}.weight", [c], 0.5, 1.5),
               self.randn(f"{name}.bias", [c], std=0.3),
               self.randn(f"{name}.running_mean", [c], std=0.5),
               self.uniform(f"{name}.running_var", [c], 0.5, 2.0)]
        return self.node("BatchNormalization", ins, name=name, epsilon=1e-5, **attrs)

    def gemm(self, x: str, din: int, dout: int, name: str | None = None, trans_b: int = 1, bias: bool = True) -> str:
        name = name or self.uniq("gemm")
        shape = [dout, din] if trans_b else [din, dout]
        ins = [x, self.randn(f"{name}.weight", shape, std=1.0 / np.sqrt(din))]
        if bias:
            ins.append(self.randn(f"{name}.bias", [dout], std=0.2))
        return self.node("Gemm", ins, name=name, transB=trans_b)

    def relu(self, x: str, name: str | None = None) -> str:
        return self.node("Relu", [x], name=name)

    # -- model ----------------------------------------------------------
    def model(self, outputs: Sequence[str], ir_version: int | None = None,
              extra_opsets: Sequence[tuple[str, int]] = ()) -> onnx.ModelProto:
        outs = [helper.make_tensor_value_info(o, FLOAT, None) for o in outputs]
        graph = helper.make_graph(self.nodes, self.name, self.inputs, outs, initializer=self.inits)
        opsets = [helper.make_opsetid("", self.opset)] + [helper.make_opsetid(d, v) for d, v in extra_opsets]
        kw = {"ir_version": ir_version} if ir_version is not None else {}
        m = helper.make_model(graph, opset_imports=opsets, producer_name="onnxprune-zoo", **kw)
        if ir_version is None:
            # keep IR version compatible with the installed onnxruntime
            m.ir_version = min(m.ir_version, 10)
        # fill in the declared output types/shapes from shape inference
        inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
        by_name = {v.name: v for v in inferred.graph.output}
        batch_dim = m.graph.input[0].type.tensor_type.shape.dim[0] if self.inputs else None
        for o in m.graph.output:
            if o.name not in by_name:
                continue
            o.CopyFrom(by_name[o.name])
            for k, d in enumerate(o.type.tensor_type.shape.dim):
                if d.dim_param.startswith("unk__"):
                    # inference lost the symbol (e.g. through Resize/Reshape): batch -> the input's batch symbol
                    if k == 0 and batch_dim is not None and batch_dim.dim_param:
                        d.dim_param = batch_dim.dim_param
                    else:
                        d.ClearField("dim_param")
        return m


# ---------------------------------------------------------------------------
# conv chains at different opsets / weight encodings
# ---------------------------------------------------------------------------


def _chain(name: str, opset: int, batch: int | str = "N", const_nodes: bool = False,
           ir_version: int | None = None) -> onnx.ModelProto:
    g = G(name, opset, const_nodes=const_nodes)
    x = g.input("x", [batch, 3, 8, 8])
    h = g.relu(g.bn(g.conv(x, 3, 8, name="conv1"), 8, name="bn1"), name="relu1")
    h = g.relu(g.conv(h, 8, 12, name="conv2"), name="relu2")
    h = g.node("GlobalAveragePool", [h], name="gap")
    h = g.node("Flatten", [h], name="flatten", axis=1)
    y = g.gemm(h, 12, 5, name="fc", trans_b=1)
    g.node("Identity", [y], name="out", outputs=["y"])
    return g.model(["y"], ir_version=ir_version)


@_case("chain_opset9", "Conv-BN-Relu-Conv-Relu-GAP-Flatten-Gemm at opset 9 / IR 4, static batch 1 "
       "(BatchNormalization-9: no 'spatial' attribute; Gemm-9 needs C)", tags=("chain", "opset"))
def _():
    return _chain("chain_opset9", 9, batch=1, ir_version=4)


@_case("chain_opset11", "same chain at opset 11, dynamic batch N", tags=("chain", "opset"))
def _():
    return _chain("chain_opset11", 11, ir_version=6)


@_case("chain_opset13", "same chain at opset 13, dynamic batch N", tags=("chain", "opset"))
def _():
    return _chain("chain_opset13", 13)


@_case("chain_constant_nodes", "chain at opset 13 with every weight/BN param a Constant node, no initializers",
       tags=("chain", "constant"))
def _():
    return _chain("chain_constant_nodes", 13, const_nodes=True)


@_case("const_subgraph_weights",
       "weights computed by constant sub-graphs: conv1.W = Identity(init); conv1.B = ConstantOfShape([8]) (zeros); "
       "per-channel scale Mul by Reshape(s[8] -> [8,1,1]); per-channel shift Add by Unsqueeze(t[8], axes=[1,2]); "
       "conv2.W = Cast(float16 init -> float)", tags=("constant",))
def _():
    g = G("const_subgraph_weights", 13)
    x = g.input("x", ["N", 3, 8, 8])
    w1 = g.node("Identity", [g.conv_w("conv1", 3, 8)], name="conv1_w_identity")
    b1 = g.node("ConstantOfShape", [g.ints("conv1.bias_shape", [8])], name="conv1_b_zeros",
                value=numpy_helper.from_array(np.zeros(1, np.float32)))
    h = g.node("Conv", [x, w1, b1], name="conv1", kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    s = g.node("Reshape", [g.uniform("scale1d", [8], 0.5, 1.5), g.ints("scale_shape", [8, 1, 1])], name="scale_reshape")
    h = g.node("Mul", [h, s], name="scale_mul")
    t = g.node("Unsqueeze", [g.randn("shift1d", [8], std=0.3), g.ints("shift_axes", [1, 2])], name="shift_unsqueeze")
    h = g.relu(g.node("Add", [h, t], name="shift_add"), name="relu1")
    w2 = g.const("conv2.weight_fp16", (g.rs.randn(6, 8, 3, 3) / np.sqrt(72)).astype(np.float16))
    w2 = g.node("Cast", [w2], name="conv2_w_cast", to=FLOAT)
    y = g.node("Conv", [h, w2, g.randn("conv2.bias", [6], std=0.2)], name="conv2", outputs=["y"],
               kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    return g.model([y])


# ---------------------------------------------------------------------------
# shared initializers
# ---------------------------------------------------------------------------


@_case("shared_zero_bias", "one zero bias initializer 'zero_bias' [8] used by conv1 and conv2, whose outputs are "
       "different channel groups -> pruning one must not corrupt the other (copy-on-write)", tags=("shared",))
def _():
    g = G("shared_zero_bias", 13)
    x = g.input("x", ["N", 3, 8, 8])
    zb = g.floats("zero_bias", np.zeros(8))
    h = g.relu(g.node("Conv", [x, g.conv_w("conv1", 3, 8), zb], name="conv1", kernel_shape=[3, 3], pads=[1] * 4))
    h = g.relu(g.node("Conv", [h, g.conv_w("conv2", 8, 8), zb], name="conv2", kernel_shape=[3, 3], pads=[1] * 4))
    y = g.node("Conv", [h, g.conv_w("conv3", 8, 6, 1)], name="conv3", outputs=["y"], kernel_shape=[1, 1])
    return g.model([y])


@_case("shared_weight_identity", "TorchScript-style weight tying: one initializer 'tied.weight' [8,8,3,3] (+bias) "
       "reached through two Identity nodes by conv_a and conv_b applied in sequence -> stem, conv_a and conv_b "
       "out channels and conv_a/conv_b in channels all form one group", tags=("shared",))
def _():
    g = G("shared_weight_identity", 13)
    x = g.input("x", ["N", 3, 8, 8])
    h = g.relu(g.conv(x, 3, 8, name="stem"))
    w = g.conv_w("tied", 8, 8)
    b = g.randn("tied.bias", [8], std=0.2)
    wa = g.node("Identity", [w], name="tied_w_a")
    wb = g.node("Identity", [w], name="tied_w_b")
    h = g.relu(g.node("Conv", [h, wa, b], name="conv_a", kernel_shape=[3, 3], pads=[1] * 4))
    h = g.relu(g.node("Conv", [h, wb, b], name="conv_b", kernel_shape=[3, 3], pads=[1] * 4))
    y = g.conv(h, 8, 6, k=1, name="head")
    g.node("Identity", [y], name="out", outputs=["y"])
    return g.model(["y"])


# ---------------------------------------------------------------------------
# Gemm / MatMul
# ---------------------------------------------------------------------------


def _gemm_mlp(name: str, trans_b: int) -> onnx.ModelProto:
    g = G(name, 13)
    x = g.input("x", ["N", 12])
    h = g.relu(g.gemm(x, 12, 24, name="fc1", trans_b=trans_b))
    y = g.gemm(h, 24, 5, name="fc2", trans_b=trans_b)
    g.node("Identity", [y], name="out", outputs=["y"])
    return g.model(["y"])


@_case("gemm_transB1", "Gemm(transB=1): W [out,in]; fc1 out (24) prunable", tags=("gemm",))
def _():
    return _gemm_mlp("gemm_transB1", 1)


@_case("gemm_transB0", "Gemm(transB=0): W [in,out]", tags=("gemm",))
def _():
    return _gemm_mlp("gemm_transB0", 0)


@_case("matmul_bias", "[N,12] MatMul(W[12,24]) + Add(b[24]) -> Relu -> MatMul(W[24,5]) + Add", tags=("gemm",))
def _():
    g = G("matmul_bias", 13)
    x = g.input("x", ["N", 12])
    h = g.node("MatMul", [x, g.randn("fc1.weight", [12, 24], std=0.3)], name="fc1")
    h = g.relu(g.node("Add", [h, g.randn("fc1.bias", [24], std=0.2)], name="fc1_bias"))
    h = g.node("MatMul", [h, g.randn("fc2.weight", [24, 5], std=0.2)], name="fc2")
    g.node("Add", [h, g.randn("fc2.bias", [5], std=0.2)], name="fc2_bias", outputs=["y"])
    return g.model(["y"])


# ---------------------------------------------------------------------------
# Split / Slice / Sum
# ---------------------------------------------------------------------------


@_case("split_opset13", "Split(axis=1) with split input [4,8] (opset 13) -> two convs -> Add", tags=("split",))
def _():
    g = G("split_opset13", 13)
    x = g.input("x", ["N", 3, 8, 8])
    h = g.relu(g.conv(x, 3, 12, name="conv1"))
    a, b = g.node("Split", [h, g.ints("split_sizes", [4, 8])], name="split", n_out=2, axis=1)
    s = g.relu(g.node("Add", [g.conv(a, 4, 6, name="conv_a"), g.conv(b, 8, 6, k=1, name="conv_b")], name="add"))
    g.conv(s, 6, 5, k=1, name="head")
    g.node("Identity", ["head"], name="out", outputs=["y"])
    return g.model(["y"])


@_case("split_opset11", "Split(axis=1, split=[6,6]) attribute form (opset 11) -> two convs -> Concat",
       tags=("split", "opset"))
def _():
    g = G("split_opset11", 11)
    x = g.input("x", ["N", 3, 8, 8])
    h = g.relu(g.conv(x, 3, 12, name="conv1"))
    a, b = g.node("Split", [h], name="split", n_out=2, axis=1, split=[6, 6])
    c = g.node("Concat", [g.relu(g.conv(a, 6, 4, name="conv_a")), g.relu(g.conv(b, 6, 5, name="conv_b"))],
               name="concat", axis=1)
    g.conv(c, 9, 5, k=1, name="head")
    g.node("Identity", ["head"], name="out", outputs=["y"])
    return g.model(["y"], ir_version=6)


@_case("split_opset18", "Split(axis=1, num_outputs=3) (opset 18) -> three convs -> Concat", tags=("split", "opset"))
def _():
    g = G("split_opset18", 18)
    x = g.input("x", ["N", 3, 8, 8])
    h = g.relu(g.conv(x, 3, 12, name="conv1"))
    parts = g.node("Split", [h], name="split", n_out=3, axis=1, num_outputs=3)
    outs = [g.relu(g.conv(p, 4, 3 + i, name=f"conv_{i}")) for i, p in enumerate(parts)]
    c = g.node("Concat", outs, name="concat", axis=1)
    g.conv(c, 12, 5, k=1, name="head")
    g.node("Identity", ["head"], name="out", outputs=["y"])
    return g.model(["y"])


@_case("slice_channels", "Slice on axis 1: [2:9] -> conv_a, and [0:12:2] (step 2) -> conv_b; Add", tags=("slice",))
def _():
    g = G("slice_channels", 13)
    x = g.input("x", ["N", 3, 8, 8])
    h = g.relu(g.conv(x, 3, 12, name="conv1"))
    a = g.node("Slice", [h, g.ints("sa_starts", [2]), g.ints("sa_ends", [9]), g.ints("sa_axes", [1])], name="slice_a")
    b = g.node("Slice", [h, g.ints("sb_starts", [0]), g.ints("sb_ends", [12]), g.ints("sb_axes", [1]),
                         g.ints("sb_steps", [2])], name="slice_b")
    s = g.node("Add", [g.conv(a, 7, 6, name="conv_a"), g.conv(b, 6, 6, k=1, name="conv_b")], name="add")
    g.conv(g.relu(s), 6, 5, k=1, name="head")
    g.node("Identity", ["head"], name="out", outputs=["y"])
    return g.model(["y"])


@_case("sum_three", "Sum of three conv branches (3->8 each) -> Relu -> conv", tags=("residual",))
def _():
    g = G("sum_three", 13)
    x = g.input("x", ["N", 3, 8, 8])
    bs = [g.conv(x, 3, 8, k=k, name=f"branch{i}") for i, k in enumerate((1, 3, 5))]
    s = g.relu(g.node("Sum", bs, name="sum"))
    g.conv(s, 8, 6, k=1, name="head")
    g.node("Identity", ["head"], name="out", outputs=["y"])
    return g.model(["y"])


# ---------------------------------------------------------------------------
# resampling / pad
# ---------------------------------------------------------------------------


@_case("upsample_opset9", "Upsample(nearest, scales input [1,1,2,2]) at opset 9 / IR 4", tags=("resize", "opset"))
def _():
    g = G("upsample_opset9", 9)
    x = g.input("x", ["N", 3, 8, 8])
    h = g.relu(g.conv(x, 3, 8, name="conv1"))
    h = g.node("Upsample", [h, g.floats("scales", [1, 1, 2, 2])], name="upsample", mode="nearest")
    g.conv(h, 8, 6, name="head")
    g.node("Identity", ["head"], name="out", outputs=["y"])
    return g.model(["y"], ir_version=4)


@_case("resize_scales", "Resize(X, roi='', scales=[1,1,2,2], mode=linear) opset 13", tags=("resize",))
def _():
    g = G("resize_scales", 13)
    x = g.input("x", ["N", 3, 8, 8])
    h = g.relu(g.conv(x, 3, 8, name="conv1"))
    h = g.node("Resize", [h, "", g.floats("scales", [1, 1, 2, 2])], name="resize", mode="linear")
    g.conv(h, 8, 6, name="head")
    g.node("Identity", ["head"], name="out", outputs=["y"])
    return g.model(["y"])


@_case("resize_sizes", "Resize(X, '', '', sizes=[16,16], axes=[2,3]) opset 18 (sizes over spatial axes only)",
       tags=("resize",))
def _():
    g = G("resize_sizes", 18)
    x = g.input("x", ["N", 3, 8, 8])
    h = g.relu(g.conv(x, 3, 8, name="conv1"))
    h = g.node("Resize", [h, "", "", g.ints("sizes", [16, 16])], name="resize", mode="nearest", axes=[2, 3])
    g.conv(h, 8, 6, name="head")
    g.node("Identity", ["head"], name="out", outputs=["y"])
    return g.model(["y"])


@_case("resize_sizes_full", "Resize(X, '', '', sizes=[2,8,16,16]) opset 13: the sizes constant contains the channel "
       "count 8 -> pruning conv1 must rewrite sizes[1] (or freeze). Static batch 2", tags=("resize",))
def _():
    g = G("resize_sizes_full", 13)
    x = g.input("x", [2, 3, 8, 8])
    h = g.relu(g.conv(x, 3, 8, name="conv1"))
    h = g.node("Resize", [h, "", "", g.ints("sizes", [2, 8, 16, 16])], name="resize", mode="nearest")
    g.conv(h, 8, 6, name="head")
    g.node("Identity", ["head"], name="out", outputs=["y"])
    return g.model(["y"])


@_case("pad_opset11", "Pad(X, pads=[0,0,1,2,0,0,1,0] input, constant_value=0) spatial only, opset 11", tags=("pad",))
def _():
    g = G("pad_opset11", 11)
    x = g.input("x", ["N", 3, 8, 8])
    h = g.relu(g.conv(x, 3, 8, name="conv1"))
    h = g.node("Pad", [h, g.ints("pads", [0, 0, 1, 2, 0, 0, 1, 0]), g.floats("pad_value", np.float32(0.0))],
               name="pad", mode="constant")
    g.conv(h, 8, 6, name="head", pad=0)
    g.node("Identity", ["head"], name="out", outputs=["y"])
    return g.model(["y"], ir_version=6)


# ---------------------------------------------------------------------------
# things the pruner must not touch
# ---------------------------------------------------------------------------


@_case("expand_tile_gather_passthrough",
       "channel-carrying tensors through Expand, Tile and Gather off the channel axis: conv1 -> GAP -> "
       "Expand([1,1,8,8]) added back to conv1's output -> Tile([1,1,2,2]) -> Gather(axis=2, 8 rows) -> conv2 -> "
       "Gather(axis=3, scalar index: rank drops) -> ReduceMean -> Gemm; conv1 and conv2 stay prunable",
       kept_prunable=("conv1", "conv2"), tags=("broadcast",))
def _():
    g = G("expand_tile_gather_passthrough", 13)
    x = g.input("x", ["N", 3, 8, 8])
    h = g.relu(g.conv(x, 3, 8, name="conv1"), name="relu1")
    s = g.node("GlobalAveragePool", [h], name="gap")
    e = g.node("Expand", [s, g.ints("expand_shape", [1, 1, 8, 8])], name="expand")
    h = g.node("Add", [h, e], name="add_context")
    t = g.node("Tile", [h, g.ints("tile_repeats", [1, 1, 2, 2])], name="tile")
    rows = g.node("Gather", [t, g.ints("rows", list(range(0, 16, 2)))], name="gather_rows", axis=2)
    h = g.relu(g.conv(rows, 8, 6, name="conv2"), name="relu2")
    col = g.node("Gather", [h, g.const("col", np.array(3, dtype=np.int64))], name="gather_col", axis=3)
    r = g.node("ReduceMean", [col], name="mean", axes=[2], keepdims=0)
    y = g.gemm(r, 6, 5, name="fc")
    g.node("Identity", [y], name="out", outputs=["y"])
    return g.model(["y"])


@_case("expand_tile_gather_on_channels",
       "the same ops acting on the channel axis: conv1 -> Gather(axis=1, 4 of 8) and conv2 -> Tile([1,2,1,1]) "
       "freeze the channels they touch; conv3 -> GAP -> Expand([1,8,8,8]) names the channel count in a "
       "constant, which is rewritten to the kept count (prunable); the three branches meet in 1x1 convs "
       "summed; conv0 stays prunable",
       frozen=("conv1", "conv2"), kept_prunable=("conv0", "conv3"), tags=("broadcast", "frozen"))
def _():
    g = G("expand_tile_gather_on_channels", 13)
    x = g.input("x", ["N", 3, 8, 8])
    h0 = g.relu(g.conv(x, 3, 8, name="conv0"), name="relu0")
    a = g.node("Gather", [g.conv(h0, 8, 8, name="conv1"), g.ints("picked", [0, 2, 4, 6])], name="gather_c",
               axis=1)
    ya = g.conv(a, 4, 6, k=1, name="head_a")
    b = g.node("Tile", [g.conv(h0, 8, 8, name="conv2"), g.ints("tile_c_repeats", [1, 2, 1, 1])], name="tile_c")
    yb = g.conv(b, 16, 6, k=1, name="head_b")
    s3 = g.node("GlobalAveragePool", [g.conv(h0, 8, 8, name="conv3")], name="gap3")
    c = g.node("Expand", [s3, g.ints("expand_c_shape", [1, 8, 8, 8])], name="expand_c")
    yc = g.conv(c, 8, 6, k=1, name="head_c")
    y = g.node("Add", [g.node("Add", [ya, yb], name="sum_ab"), yc], name="sum", outputs=["y"])
    return g.model([y])


@_case("runtime_shapes",
       "channel counts read at run time by Shape: conv_a's count used consistently (expand_as, view(b, c, -1) "
       "and back: stays prunable); conv_b's count sets the size of conv_c's Expand (both frozen); conv_d's "
       "count feeds ConstantOfShape (frozen); a run-time Reshape target Concat(batch, [8], [-1]) after conv_e "
       "(the literal 8 is rewritten: prunable), then back with [-1, 8, 8, 8]; conv_f viewed as "
       "Concat(Slice(Shape(f), 0:2), H*W) and back (prunable); conv_g's Size() scales its head (frozen); conv0 "
       "feeds them all and stays prunable",
       frozen=("conv_b", "conv_c", "conv_d", "conv_g"), kept_prunable=("conv0", "conv_a", "conv_e", "conv_f"),
       tags=("broadcast", "frozen"))
def _():
    g = G("runtime_shapes", 13)
    x = g.input("x", ["N", 3, 8, 8])
    h0 = g.relu(g.conv(x, 3, 8, name="conv0"), name="relu0")

    def dim(of, i, name):
        return g.node("Gather", [g.node("Shape", [of], name=f"shape_{name}"), g.ints(f"at_{name}", [i])],
                      name=f"dim_{name}", axis=0)

    a = g.conv(h0, 8, 8, name="conv_a")
    ea = g.node("Expand", [g.node("GlobalAveragePool", [a], name="gap_a"), g.node("Shape", [a], name="shape_a")],
                name="expand_as_a")
    a = g.node("Mul", [a, ea], name="gate_a")
    flat = g.node("Concat", [dim(a, 0, "a_n"), dim(a, 1, "a_c"), g.ints("minus_one", [-1])], name="view_shape",
                  axis=0)
    r = g.node("Reshape", [a, flat], name="view_a")
    r = g.node("Reshape", [r, g.node("Shape", [a], name="shape_a_back")], name="unview_a")
    ya = g.conv(r, 8, 6, k=1, name="head_a")

    b = g.conv(h0, 8, 8, name="conv_b")
    sc = g.node("GlobalAveragePool", [g.conv(h0, 8, 8, name="conv_c")], name="gap_c")
    ec = g.node("Expand", [sc, g.node("Shape", [b], name="shape_b")], name="expand_c_like_b")
    yb = g.node("Add", [g.conv(b, 8, 6, k=1, name="head_b"), g.conv(ec, 8, 6, k=1, name="head_c")],
                name="sum_bc")

    d = g.conv(h0, 8, 8, name="conv_d")
    ones = g.node("ConstantOfShape", [g.node("Shape", [d], name="shape_d")], name="ones_d",
                  value=numpy_helper.from_array(np.ones(1, np.float32)))
    yd = g.conv(g.node("Mul", [d, ones], name="scale_d"), 8, 6, k=1, name="head_d")

    e = g.conv(h0, 8, 8, name="conv_e")
    fixed = g.node("Concat", [dim(e, 0, "e_n"), g.ints("eight", [8]), g.ints("minus_one_e", [-1])],
                   name="fixed_shape", axis=0)
    re = g.node("Reshape", [e, fixed], name="view_e")
    re = g.node("Reshape", [re, g.ints("back_e", [-1, 8, 8, 8])], name="unview_e")
    ye = g.conv(re, 8, 6, k=1, name="head_e")

    f = g.conv(h0, 8, 8, name="conv_f")
    nc = g.node("Slice", [g.node("Shape", [f], name="shape_f"), g.ints("f_from", [0]), g.ints("f_to", [2])],
                name="f_batch_channels")
    hw = g.node("Mul", [dim(f, 2, "f_h"), dim(f, 3, "f_w")], name="f_hw")
    rf = g.node("Reshape", [f, g.node("Concat", [nc, hw], name="f_view_shape", axis=0)], name="view_f")
    rf = g.node("Reshape", [rf, g.node("Shape", [f], name="shape_f_back")], name="unview_f")
    yf = g.conv(rf, 8, 6, k=1, name="head_f")

    gg = g.conv(h0, 8, 8, name="conv_g")
    count = g.node("Cast", [g.node("Size", [gg], name="size_g")], name="size_g_float", to=FLOAT)
    scale = g.node("Div", [count, g.floats("size_g_norm", np.float32(512.0))], name="size_g_scale")
    yg = g.node("Mul", [g.conv(gg, 8, 6, k=1, name="head_g"), scale], name="scaled_g")

    y = g.node("Add", [g.node("Add", [ya, yb], name="sum_ab"), g.node("Add", [yd, ye], name="sum_de")],
               name="sum_abde")
    y = g.node("Add", [y, g.node("Add", [yf, yg], name="sum_fg")], name="sum", outputs=["y"])
    m = g.model([y])
    # shape inference cannot see through the run-time Reshape: declare the output
    m.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", FLOAT, ["N", 6, 8, 8]))
    return m


@_case("if_outer_tensor", "If node (cond = mean(x) > 0) whose then/else sub-graphs read the outer tensor conv2 "
       "(Relu / Sigmoid of it): conv2 channels must be frozen; conv1 (before conv2) stays prunable",
       frozen=("conv2",), tags=("control_flow", "frozen"))
def _():
    g = G("if_outer_tensor", 13)
    x = g.input("x", ["N", 3, 8, 8])
    h = g.relu(g.conv(x, 3, 8, name="conv1"))
    h2 = g.conv(h, 8, 8, name="conv2")
    m = g.node("ReduceMean", [x], name="mean", keepdims=0)
    cond = g.node("Greater", [m, g.floats("zero", np.float32(0.0))], name="cond")
    then_g = helper.make_graph([helper.make_node("Relu", [h2], ["then_out"], name="then_relu")], "then_branch", [],
                               [helper.make_tensor_value_info("then_out", FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Sigmoid", [h2], ["else_out"], name="else_sigmoid")], "else_branch",
                               [], [helper.make_tensor_value_info("else_out", FLOAT, None)])
    h = g.node("If", [cond], name="if", then_branch=then_g, else_branch=else_g)
    g.conv(h, 8, 6, k=1, name="head")
    g.node("Identity", ["head"], name="out", outputs=["y"])
    return g.model(["y"])


def _unknown_op_case(name: str, op: str, **attrs) -> onnx.ModelProto:
    g = G(name, 13)
    x = g.input("x", ["N", 3, 8, 8])
    h = g.relu(g.conv(x, 3, 8, name="conv0"))
    h = g.conv(h, 8, 8, name="conv1")
    h = g.node(op, [h], name=op.lower(), **attrs)
    g.conv(h, 8, 6, k=1, name="head")
    g.node("Identity", ["head"], name="out", outputs=["y"])
    return g.model(["y"])


@_case("lpnorm_channels", "conv0-Relu-conv1-LpNormalization(axis=1, p=2)-conv: an op the pruner does not know that "
       "mixes channels -> conv1 out frozen; conv0 out prunable", frozen=("conv1",), tags=("unknown_op", "frozen"))
def _():
    return _unknown_op_case("lpnorm_channels", "LpNormalization", axis=1, p=2)


@_case("softmax_channels", "conv0-Relu-conv1-Softmax(axis=1)-conv: conv1 out frozen; conv0 out prunable",
       frozen=("conv1",), tags=("unknown_op", "frozen"))
def _():
    return _unknown_op_case("softmax_channels", "Softmax", axis=1)


@_case("qdq_conv", "QDQ-quantized graph: Q/DQ on activations, DequantizeLinear(int8 W, per-channel scale axis=0) "
       "-> Conv -> Relu -> Q/DQ -> Conv. Pruner should decline (or at least not corrupt) quantized models",
       prunable=False, tags=("quantized",))
def _():
    g = G("qdq_conv", 13)
    x = g.input("x", ["N", 3, 8, 8])

    def qdq(t: str, scale: float, zp: int, tag: str) -> str:
        s, z = g.floats(f"{tag}.scale", np.float32(scale)), g.const(f"{tag}.zp", np.uint8(zp))
        q = g.node("QuantizeLinear", [t, s, z], name=f"{tag}_q")
        return g.node("DequantizeLinear", [q, s, z], name=f"{tag}_dq")

    def qconv(t: str, cin: int, cout: int, k: int, name: str) -> str:
        w = g.rs.randn(cout, cin, k, k).astype(np.float32) / np.sqrt(cin * k * k)
        ws = (np.abs(w).reshape(cout, -1).max(1) / 127.0).astype(np.float32)
        wq = np.clip(np.round(w / ws[:, None, None, None]), -127, 127).astype(np.int8)
        wdq = g.node("DequantizeLinear", [g.const(f"{name}.weight_q", wq), g.floats(f"{name}.weight_scale", ws),
                                          g.const(f"{name}.weight_zp", np.zeros(cout, np.int8))],
                     name=f"{name}_w_dq", axis=0)
        return g.node("Conv", [t, wdq, g.randn(f"{name}.bias", [cout], std=0.2)], name=name, kernel_shape=[k, k],
                      pads=[k // 2] * 4)

    h = qdq(x, 0.03, 128, "in")
    h = g.relu(qconv(h, 3, 8, 3, "conv1"))
    h = qdq(h, 0.02, 0, "act1")
    y = qconv(h, 8, 6, 1, "conv2")
    g.node("Identity", [y], name="out", outputs=["y"])
    return g.model(["y"])


@_case("qlinear_conv", "QuantizeLinear -> QLinearConv(uint8 x, int8 W per-channel, int32 bias) -> QLinearConv -> "
       "DequantizeLinear. Pruner should decline", prunable=False, tags=("quantized",))
def _():
    g = G("qlinear_conv", 13)
    x = g.input("x", ["N", 3, 8, 8])
    xs, xz = g.floats("x.scale", np.float32(0.03)), g.const("x.zp", np.uint8(128))
    h = g.node("QuantizeLinear", [x, xs, xz], name="quant")

    def qlconv(t: str, ts: str, tz: str, cin: int, cout: int, name: str, ys: float, yz: int):
        w = g.rs.randn(cout, cin, 3, 3).astype(np.float32) / np.sqrt(cin * 9)
        ws = (np.abs(w).reshape(cout, -1).max(1) / 127.0).astype(np.float32)
        wq = np.clip(np.round(w / ws[:, None, None, None]), -127, 127).astype(np.int8)
        in_scale = float(numpy_helper.to_array(next(i for i in g.inits if i.name == ts)))
        b = np.round(g.rs.randn(cout) * 0.2 / (in_scale * ws)).astype(np.int32)
        ys_, yz_ = g.floats(f"{name}.y_scale", np.float32(ys)), g.const(f"{name}.y_zp", np.uint8(yz))
        out = g.node("QLinearConv", [t, ts, tz, g.const(f"{name}.weight_q", wq), g.floats(f"{name}.w_scale", ws),
                                     g.const(f"{name}.w_zp", np.zeros(cout, np.int8)), ys_, yz_,
                                     g.const(f"{name}.bias_q", b)],
                     name=name, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        return out, ys_, yz_

    h, hs, hz = qlconv(h, xs, xz, 3, 8, "qconv1", 0.05, 128)
    h, hs, hz = qlconv(h, hs, hz, 8, 6, "qconv2", 0.05, 128)
    g.node("DequantizeLinear", [h, hs, hz], name="dequant", outputs=["y"])
    return g.model(["y"])


# ---------------------------------------------------------------------------
# dynamic shapes / layouts
# ---------------------------------------------------------------------------


@_case("dynamic_batch_reshape", "input [N,3,8,8]; conv-BN-Relu-conv(8->4)-Relu -> Reshape(x, Concat(Shape(x)[0:1], "
       "[-1])) (TorchScript view(x.size(0),-1) pattern) -> Gemm(256->5): conv2 channels own 64 Gemm columns each",
       tags=("dynamic", "flatten"))
def _():
    g = G("dynamic_batch_reshape", 13)
    x = g.input("x", ["N", 3, 8, 8])
    h = g.relu(g.bn(g.conv(x, 3, 8, name="conv1"), 8, name="bn1"))
    h = g.relu(g.conv(h, 8, 4, name="conv2"))
    shp = g.node("Shape", [h], name="shape")
    n = g.node("Gather", [shp, g.ints("idx0", np.int64(0))], name="gather_n", axis=0)
    n = g.node("Unsqueeze", [n, g.ints("unsq_axes", [0])], name="unsqueeze_n")
    tgt = g.node("Concat", [n, g.ints("minus1", [-1])], name="concat_shape", axis=0)
    h = g.node("Reshape", [h, tgt], name="reshape")
    g.gemm(h, 4 * 8 * 8, 5, name="fc")
    g.node("Identity", ["fc"], name="out", outputs=["y"])
    return g.model(["y"])


@_case("dynamic_spatial", "input [N,3,H,W] with symbolic batch and spatial dims; conv-BN-Relu-conv-GAP-Flatten-Gemm",
       tags=("dynamic",))
def _():
    g = G("dynamic_spatial", 13)
    x = g.input("x", ["N", 3, "H", "W"])
    h = g.relu(g.bn(g.conv(x, 3, 8, name="conv1"), 8, name="bn1"))
    h = g.relu(g.conv(h, 8, 12, name="conv2"))
    h = g.node("Flatten", [g.node("GlobalAveragePool", [h], name="gap")], name="flatten", axis=1)
    g.gemm(h, 12, 5, name="fc")
    g.node("Identity", ["fc"], name="out", outputs=["y"])
    return g.model(["y"])


@_case("nhwc_tf", "TF-style: NHWC input -> Transpose(0,3,1,2) -> Conv(3->8) -> Relu -> Transpose(0,2,3,1) -> "
       "Add bias [8] (last axis) -> Mul scale [8] -> Transpose(0,3,1,2) -> Conv(8->6)", tags=("nhwc",))
def _():
    g = G("nhwc_tf", 13)
    x = g.input("x", ["N", 8, 8, 3])
    h = g.node("Transpose", [x], name="to_nchw", perm=[0, 3, 1, 2])
    h = g.relu(g.conv(h, 3, 8, name="conv1"))
    h = g.node("Transpose", [h], name="to_nhwc", perm=[0, 2, 3, 1])
    h = g.node("Add", [h, g.randn("nhwc_bias", [8], std=0.3)], name="bias_add")
    h = g.node("Mul", [h, g.uniform("nhwc_scale", [8], 0.5, 1.5)], name="scale_mul")
    h = g.node("Transpose", [h], name="to_nchw2", perm=[0, 3, 1, 2])
    g.conv(h, 8, 6, name="head")
    g.node("Identity", ["head"], name="out", outputs=["y"])
    return g.model(["y"])


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

_NP_OF = {
    TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64,
    TensorProto.UINT8: np.uint8, TensorProto.INT8: np.int8, TensorProto.INT32: np.int32,
    TensorProto.INT64: np.int64, TensorProto.BOOL: np.bool_,
}


def random_inputs(model: onnx.ModelProto, batch: int = 2, seed: int = 0,
                  dims: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Random feeds for every real graph input. The first dim, when symbolic
    (or unknown), becomes ``batch``; other symbolic dims are looked up in
    ``dims`` (default 8)."""
    rs = np.random.RandomState(seed)
    dims = dims or {}
    init_names = {i.name for i in model.graph.initializer}
    feeds: dict[str, np.ndarray] = {}
    for vi in model.graph.input:
        if vi.name in init_names:
            continue
        tt = vi.type.tensor_type
        shape = []
        for k, d in enumerate(tt.shape.dim):
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            elif k == 0:
                shape.append(batch)
            else:
                shape.append(dims.get(d.dim_param, 8))
        dt = _NP_OF[tt.elem_type]
        if dt == np.bool_:
            arr = rs.rand(*shape) > 0.5
        elif np.issubdtype(dt, np.integer):
            info = np.iinfo(dt)
            arr = rs.randint(max(info.min, -128), min(info.max, 255) + 1, size=shape).astype(dt)
        else:
            arr = rs.randn(*shape).astype(dt)
        feeds[vi.name] = arr
    return feeds


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)
