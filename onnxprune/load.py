"""Read, normalize and write models.

Loading is lazy: onnx-ir keeps external tensors memory-mapped, so memory stays
close to the model's own size. Normalization makes every weight a plain
initializer (Constant nodes lifted, constant subgraphs folded) and records, for
each folded tensor, the name of the tensor it came from in the input model, so
that plans can name tensors as the user's model does.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx_ir.passes.common import LiftConstantsToInitializersPass, ShapeInferencePass

from .errors import InputError, OutputError

#: value.meta key: the input-model tensor a (possibly folded) constant came from.
ORIGIN = "onnxprune.origin"

#: Ops whose output is an elementwise copy of their first input: a folded result
#: keeps the input's origin, because its entries are indexed the same way.
_SAME_INDEXING = {"Identity", "Cast", "CastLike"}
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                     "Multinomial", "Bernoulli"}
_LAYOUT_ONLY = {"Identity", "Cast", "CastLike", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
                "Flatten"}
_MAX_FOLD_BYTES = 64 << 20  # beyond this, fold only ops that merely re-lay a weight
_EXTERNAL_THRESHOLD = 1_800_000_000  # protobuf's 2 GB limit, with margin


def _check_external_data(model: ir.Model, base_dir: Path) -> None:
    """Refuse external data that is missing, short, or outside the model's folder."""
    root = base_dir.resolve()
    for tensor in _all_tensors(model):
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        location = Path(tensor.location)
        target = (root / location).resolve()
        if location.is_absolute() or root not in target.parents:
            raise InputError(f"external data '{tensor.location}' of tensor '{tensor.name}' "
                             "points outside the model's folder")
        if not target.is_file():
            raise InputError(f"external data file '{tensor.location}' of tensor "
                             f"'{tensor.name}' is missing")
        needed = (tensor.offset or 0) + (tensor.length or tensor.nbytes)
        if target.stat().st_size < needed:
            raise InputError(f"external data file '{tensor.location}' is too short for "
                             f"tensor '{tensor.name}' (truncated?)")


def _all_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX file lazily, turning every way it can be bad into an InputError."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"no such file: {path}")
    if not path.is_file():
        raise InputError(f"not a file: {path}")
    try:
        model = ir.load(path)
    except (DecodeError, RuntimeError, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not a valid ONNX model (corrupt or truncated file?)") from exc
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    # A random byte string can parse as an (empty) protobuf message: insist on a real graph.
    if model.ir_version < 3 or not model.opset_imports or len(model.graph) == 0 \
            or not model.graph.outputs:
        raise InputError(f"{path} is not a valid ONNX model (no graph, opset or outputs)")
    _check_external_data(model, path.parent)
    model.meta["onnxprune.path"] = str(path)
    return model


def opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))


#: value.meta key: for a constant folded from a Transpose of its origin, the axis of the
#: origin tensor that each of its own axes is (the composed permutation).
ORIGIN_PERM = "onnxprune.origin_perm"


def origin(value: ir.Value) -> str:
    """The name a constant had in the input model."""
    return value.meta.get(ORIGIN, value.name)


def origin_axis(value: ir.Value, axis: int) -> int:
    """The axis of the origin tensor that `axis` of this (maybe transposed) constant is."""
    perm = value.meta.get(ORIGIN_PERM)
    return int(perm[axis]) if perm is not None else axis


def value_axis(value: ir.Value, axis: int) -> int:
    """The inverse of origin_axis: this constant's axis for an origin-tensor axis."""
    perm = value.meta.get(ORIGIN_PERM)
    return list(perm).index(axis) if perm is not None else axis


def copy_origin(target: ir.Value, source: ir.Value) -> None:
    target.meta[ORIGIN] = origin(source)
    if ORIGIN_PERM in source.meta:
        target.meta[ORIGIN_PERM] = source.meta[ORIGIN_PERM]


def _fold_node(node: ir.Node, model_opset: int) -> list[np.ndarray]:
    """Evaluate one node whose inputs are all constants with the ONNX reference runtime."""
    from onnx.reference import ReferenceEvaluator

    feeds = {v.name: v.const_value.numpy() for v in node.inputs if v is not None}
    proto = ir.serde.serialize_node(node)
    graph = onnx.helper.make_graph(
        [proto], "fold",
        [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
         for n, a in feeds.items()],
        [onnx.helper.make_tensor_value_info(o.name, onnx.TensorProto.UNDEFINED, None)
         for o in node.outputs])
    m = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", model_opset)])
    return [np.asarray(r) for r in ReferenceEvaluator(m).run(None, feeds)]


def _is_constant(value: ir.Value | None) -> bool:
    return value is None or (value.const_value is not None and not value.is_graph_input())


def fold_constants(model: ir.Model) -> int:
    """Turn constant subgraphs (Identity, Cast, Reshape, ConstantOfShape...) into initializers."""
    graph, folded, model_opset = model.graph, 0, opset(model)
    for node in list(graph):
        if (node.domain not in ("", "ai.onnx") or node.op_type in _NONDETERMINISTIC
                or node.op_type == "Constant" or not node.inputs
                or any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                       for a in node.attributes.values())
                or not all(_is_constant(v) for v in node.inputs)
                or any(o.is_graph_output() for o in node.outputs)):
            continue
        if node.op_type == "Identity":
            # Rewire the users to the source tensor itself: no copy, and sharing
            # is resolved later by the surgery, per user.
            node.outputs[0].replace_all_uses_with(node.inputs[0])
            graph.remove(node, safe=True)
            folded += 1
            continue
        try:
            results = _fold_node(node, model_opset)
        except Exception:  # noqa: BLE001 - an op the reference runtime cannot evaluate stays as is
            continue
        if sum(r.nbytes for r in results) > _MAX_FOLD_BYTES and node.op_type not in _LAYOUT_ONLY:
            continue
        for out, array in zip(node.outputs, results):
            value = ir.Value(name=out.name, shape=ir.Shape(array.shape),
                             type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                             const_value=ir.tensor(array, name=out.name))
            value.meta[ORIGIN] = origin(out)
            source = node.inputs[0]
            if node.op_type in _SAME_INDEXING:
                copy_origin(value, source)
            elif node.op_type == "Transpose" and len(node.inputs) == 1:
                # A transposed weight (MatMul of a Linear layer) keeps its source's name;
                # its axes are recorded as the source's axes.
                perm = node.attributes.get("perm")
                perm = list(perm.value) if perm is not None else \
                    list(reversed(range(array.ndim)))
                value.meta[ORIGIN] = origin(source)
                value.meta[ORIGIN_PERM] = [origin_axis(source, p) for p in perm]
            out.replace_all_uses_with(value)
            graph.register_initializer(value)
        graph.remove(node, safe=True)
        folded += 1
    return folded


def _name_nodes(model: ir.Model) -> None:
    """Give every node a unique, deterministic name: plans refer to nodes by name."""
    seen: set[str] = set()
    for index, node in enumerate(model.graph):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}"
        seen.add(node.name)


def _drop_unused_initializers(model: ir.Model) -> None:
    for name, value in list(model.graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            del model.graph.initializers[name]


def infer_shapes(model: ir.Model) -> None:
    """Static shapes for MACs, reshape analysis and checks. Never fatal.

    The graph's inputs and outputs keep their declared (symbolic) shapes: inference
    only fills in intermediate values."""
    declared = [(v, v.shape, v.type) for v in (*model.graph.inputs, *model.graph.outputs)]
    for strict in (True, False):
        if ShapeInferencePass(strict_mode=strict, data_prop=True)(model).modified or not strict:
            break
    for value, shape, type_ in declared:
        value.shape, value.type = shape, type_


def clear_intermediate_shapes(model: ir.Model) -> None:
    """Forget inferred shapes of intermediate values (stale after surgery)."""
    keep = set(model.graph.inputs) | set(model.graph.outputs)
    for node in model.graph:
        for out in node.outputs:
            if out not in keep:
                out.shape = None


def normalize(model: ir.Model) -> ir.Model:
    """Make weights plain initializers, named by their input-model origin; infer shapes."""
    graph = model.graph
    # Old exporters list initializers as graph inputs; they are weights, not inputs.
    for value in list(graph.inputs):
        if value.is_initializer():
            graph.inputs.remove(value)
    _name_nodes(model)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    fold_constants(model)
    _drop_unused_initializers(model)
    infer_shapes(model)
    return model


def model_nbytes(model: ir.Model) -> int:
    return sum(t.nbytes for t in _all_tensors(model))


def check_output_path(output: str | os.PathLike, inputs: list[str | os.PathLike]) -> Path:
    """Refuse to write over an input, or into a folder that does not exist."""
    output = Path(output)
    for src in inputs:
        if src is not None and Path(src).exists() and output.exists() \
                and os.path.samefile(src, output):
            raise OutputError(f"output {output} is the input file; choose another path")
        if src is not None and output.resolve() == Path(src).resolve():
            raise OutputError(f"output {output} is the input file; choose another path")
    parent = output.resolve().parent
    if not parent.is_dir():
        raise OutputError(f"cannot write {output}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (output.exists() and not os.access(output, os.W_OK)):
        raise OutputError(f"cannot write {output}: permission denied")
    return output


def save_model(model: ir.Model, path: str | os.PathLike, *, external: bool | None = None,
               check: Callable[[Path], None] | None = None) -> Path:
    """Write atomically: into a temporary folder beside the target, then rename into place.

    `check`, if given, runs on the temporary file first; if it raises, nothing is written.

    Weights go to external data (`<name>.data`) when the input had external data
    or the model is too large for one protobuf file.
    """
    path = Path(path)
    if external is None:
        external = model.meta.get("onnxprune.external", False) or \
            model_nbytes(model) > _EXTERNAL_THRESHOLD
    data_name = path.name + ".data" if external else None
    source = model.meta.get("onnxprune.path")
    if data_name and source and (Path(source).parent / data_name).exists() \
            and Path(source).parent.resolve() == path.resolve().parent:
        for tensor in _all_tensors(model):
            if isinstance(tensor, ir.ExternalTensor) and Path(tensor.location).name == data_name:
                raise OutputError(f"writing {path} would overwrite the input's external data "
                                  f"{data_name}; choose another output name")
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=".onnxprune-", dir=path.resolve().parent))
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        ir.save(model, tmpdir / path.name, external_data=data_name,
                max_in_flight_bytes=128 << 20)
        if check is not None:
            check(tmpdir / path.name)
        if data_name and (tmpdir / data_name).exists():
            os.replace(tmpdir / data_name, path.resolve().parent / data_name)
        os.replace(tmpdir / path.name, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def to_proto_bytes(model: ir.Model) -> bytes:
    """Serialize a (small enough) model for an in-memory onnxruntime session.

    External tensors are read into memory first (in place): bytes carry no folder.
    """
    ir.external_data.load_to_model(model)
    return ir.serde.serialize_model(model).SerializeToString()


def load_normalized(path: str | os.PathLike) -> ir.Model:
    model = load_model(path)
    model.meta["onnxprune.external"] = any(isinstance(t, ir.ExternalTensor)
                                           for t in _all_tensors(model))
    return normalize(model)
