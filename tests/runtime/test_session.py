"""moefy.runtime.Session: inputs checked against the model's declared inputs, and every bad
file, input or device a typed moefy error that says what was wrong and what to do."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import moefy
from moefy.errors import (
    ModelFileError,
    ProviderError,
    SessionDtypeError,
    SessionError,
    SessionInputError,
    SessionShapeError,
)
from moefy.runtime import Session


def add_model(dims=("n", 4), weight=None) -> onnx.ModelProto:
    """y = a + b (+ w): inputs a, b of shape ``dims`` (str: a named dynamic dim)."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, list(dims))
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, list(dims))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(dims))
    nodes = [helper.make_node("Add", ["a", "b"], ["s"])]
    inits = []
    if weight is not None:
        inits.append(onnx.numpy_helper.from_array(weight, "w"))
        nodes.append(helper.make_node("Add", ["s", "w"], ["y"]))
    else:
        nodes.append(helper.make_node("Identity", ["s"], ["y"]))
    graph = helper.make_graph(nodes, "add", [a, b], [y], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


@pytest.fixture
def add_path(tmp_path):
    path = tmp_path / "add.onnx"
    onnx.save(add_model(), str(path))
    return path


def test_runs_torch_and_numpy_inputs(add_path):
    session = Session(add_path, threads=1)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(SessionInputError, match="ignore_extra"):  # would be dropped silently
        session.run({"a": a, "b": b, "attention_mask": b})
    got = session.run({"a": a, "b": b, "unused": 1}, ignore_extra=True)
    torch.testing.assert_close(got["y"], a + b)
    got = session.run({"a": a.numpy(), "b": b.numpy()})
    assert isinstance(got["y"], np.ndarray)
    quiet = Session(add_path, config={"session.intra_op.allow_spinning": "0"})
    np.testing.assert_allclose(quiet.run({"a": a.numpy(), "b": b.numpy()})["y"], got["y"])


def test_inputs_checked_against_the_declared_ones(add_path):
    session = Session(add_path)
    a = torch.randn(3, 4)
    with pytest.raises(SessionInputError, match=r"missing inputs \['b'\].*unknown keys \['B'\]"):
        session.run({"a": a, "B": a})
    with pytest.raises(SessionInputError, match="dict of inputs"):
        session.run([a, a])
    with pytest.raises(SessionInputError, match="'b' must be a torch tensor or a numpy array"):
        session.run({"a": a, "b": [[0.0] * 4] * 3})
    with pytest.raises(SessionDtypeError, match=r"'b' must be torch.float32.*got torch.float64"
                                                r".*x.to\(torch.float32\)"):
        session.run({"a": a, "b": a.double()})
    with pytest.raises(SessionDtypeError, match=r"got numpy int64.*astype\('float32'\)"):
        session.run({"a": a, "b": np.zeros((3, 4), dtype=np.int64)})
    with pytest.raises(SessionShapeError, match=r"'a' must have 2 dimensions \[n, 4\], got 3"):
        session.run({"a": a[None], "b": a})
    with pytest.raises(SessionShapeError, match="'b' dimension 1 must be 4.*got 5"):
        session.run({"a": a, "b": torch.randn(3, 5)})
    # a and b share the named dimension n: ONNX Runtime would broadcast or fail inside
    with pytest.raises(SessionShapeError, match="'a' and 'b' must agree on dimension 'n', got "
                                                "3 and 1"):
        session.run({"a": a, "b": torch.randn(1, 4)})
    assert issubclass(SessionShapeError, ValueError)  # callers catching ValueError still do


def test_wrong_hidden_width_of_an_exported_moe_is_refused(tmp_path):
    """The exported graph declares the hidden width fixed (it used to be a symbol, and a
    (4, 8) input was silently re-chunked into (2, 16))."""
    moe = moefy.MoE(16, 8, num_experts=4, top_k=2).eval()
    out = moefy.export_onnx(moe, tmp_path / "m.onnx", (torch.randn(5, 16),), validate=False)
    session = Session(out.path)
    name = session.input_names[0]
    with pytest.raises(SessionShapeError, match=rf"'{name}' dimension 1 must be 16.*got 8"):
        session.run({name: torch.randn(4, 8)})
    assert next(iter(session.run({name: torch.randn(3, 16)}).values())).shape == (3, 16)


def test_bad_files_are_named_with_what_to_do(tmp_path, add_path):
    with pytest.raises(ModelFileError, match="no ONNX file at .*export_onnx"):
        Session(tmp_path / "nothing.onnx")
    with pytest.raises(ModelFileError, match="directory"):
        Session(tmp_path)
    data = add_path.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="cut.onnx.*(truncated|not an ONNX model)"):
        Session(cut)
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    with pytest.raises(ModelFileError, match="notes.onnx.*(truncated|not an ONNX model)"):
        Session(text)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty.onnx"):
        Session(empty)


def test_missing_or_short_external_data(tmp_path):
    model = add_model(weight=np.ones((8, 4), np.float32))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 8
    path = tmp_path / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="ext.onnx.data",
              size_threshold=0)
    Session(path)  # loads as saved
    data = tmp_path / "ext.onnx.data"
    data.write_bytes(data.read_bytes()[:10])
    with pytest.raises(ModelFileError, match="shorter than .*truncated"):
        Session(path)
    data.unlink()
    with pytest.raises(ModelFileError, match="'ext.onnx.data', which is not in .*keep the data "
                                             "file next to"):
        Session(path)


def test_bad_arguments(add_path):
    with pytest.raises(SessionError, match="device must be one of"):
        Session(add_path, device="tpu")
    with pytest.raises(SessionError, match="threads must be a positive int"):
        Session(add_path, threads=0)
    with pytest.raises(SessionError, match="string values"):
        Session(add_path, config={"session.intra_op.allow_spinning": 0})
    with pytest.raises(SessionError, match="path must be a str"):
        Session(3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_without_provider_or_device(add_path):
    with pytest.raises(ProviderError, match="onnxruntime-gpu|no CUDA device"):
        Session(add_path, device="cuda")


def test_a_failure_inside_the_graph_is_a_session_error(tmp_path):
    """Inputs that pass the declared checks but fail inside (a reshape the data does not
    fit) raise a moefy error, not onnxruntime's Fail."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])
    shape = onnx.numpy_helper.from_array(np.array([2, 2], np.int64), "shape")
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"])], "r", [x],
                              [y], initializer=[shape])
    path = tmp_path / "r.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                                ir_version=10), str(path))
    session = Session(path)
    assert session.run({"x": np.ones(4, np.float32)})["y"].shape == (2, 2)
    with pytest.raises(SessionError, match="ONNX Runtime failed running the model"):
        session.run({"x": np.ones(3, np.float32)})
