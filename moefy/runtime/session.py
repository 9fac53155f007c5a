"""``moefy.runtime.Session``: an ONNX Runtime session that takes torch or numpy inputs.

    path, device ⇒ execution providers (CUDA EP on "cuda", CPU EP otherwise)
    run({name: tensor}) ⇒ inputs checked against the model's declared inputs (names, dtype,
    rank, fixed and shared dimensions) ⇒ {output name: tensor}
    (IO binding on CUDA: tensors stay on the GPU)

Every failure is a ``moefy.errors.SessionError`` that names what was wrong and what to do:
ONNX Runtime's own errors (``Fail``, ``InvalidProtobuf``, a reshape deep inside the graph)
say neither.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from moefy.errors import (
    MissingDependencyError,
    ModelFileError,
    ProviderError,
    SessionDtypeError,
    SessionError,
    SessionInputError,
    SessionShapeError,
    first_line,
)

DEVICES = ("cpu", "cuda")

# element types as ONNX Runtime names them in NodeArg.type
_ORT_TYPES = {
    torch.float32: "tensor(float)", torch.float16: "tensor(float16)",
    torch.bfloat16: "tensor(bfloat16)", torch.float64: "tensor(double)",
    torch.int64: "tensor(int64)", torch.int32: "tensor(int32)", torch.int16: "tensor(int16)",
    torch.int8: "tensor(int8)", torch.uint8: "tensor(uint8)", torch.bool: "tensor(bool)",
}
_NUMPY_ORT_TYPES = {np.dtype(np.float32): "tensor(float)", np.dtype(np.float16): "tensor(float16)",
                    np.dtype(np.float64): "tensor(double)", np.dtype(np.int64): "tensor(int64)",
                    np.dtype(np.int32): "tensor(int32)", np.dtype(np.int16): "tensor(int16)",
                    np.dtype(np.int8): "tensor(int8)", np.dtype(np.uint8): "tensor(uint8)",
                    np.dtype(np.bool_): "tensor(bool)"}
_TORCH_NAMES = {v: str(k) for k, v in _ORT_TYPES.items()}
_NUMPY_NAMES = {v: str(k) for k, v in _NUMPY_ORT_TYPES.items()}


class Session:
    """Run an exported model in ONNX Runtime.

    Args:
        path: the .onnx file (with its external data file beside it, if it was saved so).
        device: "cpu" or "cuda" (needs ``onnxruntime-gpu`` and a CUDA device).
        threads: intra-op threads on CPU (default: ONNX Runtime's choice).
        config: ONNX Runtime session config entries, e.g.
            ``{"session.intra_op.allow_spinning": "0"}`` (worker threads sleep between calls).

    ``run(inputs)`` takes a dict of torch tensors or numpy arrays keyed by input name (a key
    the model does not take is an error, ``run(inputs, ignore_extra=True)`` drops it) and
    returns a dict of outputs by name: torch tensors on the session's device when the inputs
    were torch tensors, else numpy arrays. Inputs are checked against the model's declared
    inputs first: a wrong dtype, rank or fixed size raises ``SessionInputError`` (and its
    subclasses) naming the input, what the model expects and what it got.

    Raises ``ModelFileError`` for a missing, truncated or non-ONNX file (or missing external
    data), ``ProviderError`` for ``device="cuda"`` without ONNX Runtime's CUDA provider.
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int | None = None,
                 config: dict[str, str] | None = None):
        try:
            import onnxruntime as ort
        except ImportError as exc:  # neither wheel is a base dependency: they exclude each other
            raise MissingDependencyError(
                "Session needs ONNX Runtime, which is not installed: pip install 'moefy[cpu]' "
                "(or 'moefy[gpu]' for CUDA; never both)") from exc
        if device not in DEVICES:
            raise SessionError(f"Session: device must be one of {DEVICES}, got {device!r}")
        if not isinstance(path, str | os.PathLike):
            raise SessionError(f"Session: path must be a str or os.PathLike to an .onnx file, "
                               f"got {type(path).__name__}")
        if not Path(path).is_file():
            raise ModelFileError(f"Session: no ONNX file at {path}"
                                 + (" (it is a directory)" if Path(path).is_dir() else "")
                                 + "; check the path, or write it with moefy.export_onnx")
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool)
                                    or threads < 1):
            raise SessionError(f"Session: threads must be a positive int, got {threads!r}")
        config = dict(config or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in config.items()):
            raise SessionError(f"Session: config maps names to string values (e.g. "
                               f"{{'session.intra_op.allow_spinning': '0'}}), got {config!r}")
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ProviderError(
                    "Session(device='cuda') needs ONNX Runtime's CUDA provider: install "
                    "onnxruntime-gpu instead of onnxruntime (pip install 'moefy[gpu]'), or use "
                    "device='cpu'")
            if not torch.cuda.is_available():
                raise ProviderError("Session(device='cuda'): no CUDA device is visible; use "
                                    "device='cpu' or check CUDA_VISIBLE_DEVICES and the driver")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        for key, value in config.items():
            options.add_session_config_entry(key, value)
        self.device = device
        try:
            self._session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # Fail, InvalidProtobuf, NoSuchFile, InvalidGraph, ...
            raise ModelFileError(_why_not_loadable(Path(path), exc)) from exc
        self._inputs = self._session.get_inputs()
        self.input_names = [i.name for i in self._inputs]
        self.output_names = [o.name for o in self._session.get_outputs()]

    def run(self, inputs: dict, *, ignore_extra: bool = False) -> dict:
        """Run the model on ``inputs`` (name -> tensor or array). An input the model does not
        take is an error (it would be dropped silently: an ``attention_mask`` the export did
        not keep changes nothing), unless ``ignore_extra=True``."""
        if not isinstance(inputs, Mapping):
            raise SessionInputError("Session.run takes a dict of inputs keyed by name "
                                    f"({self.input_names}), got {type(inputs).__name__}")
        missing = [n for n in self.input_names if n not in inputs]
        unknown = [k for k in inputs if k not in self.input_names]
        if missing:
            raise SessionInputError(
                f"Session.run: missing inputs {missing}; the model takes {self.input_names}"
                + (f" (got unknown keys {unknown}: misspelt?)" if unknown else ""))
        if unknown and not ignore_extra:
            raise SessionInputError(
                f"Session.run: the model takes {self.input_names}, not {unknown}: it was "
                "exported without them and would ignore them. Export with them in "
                "example_inputs, or pass ignore_extra=True to drop them knowingly")
        feeds = {n: inputs[n] for n in self.input_names}
        self._check(feeds)
        as_torch = any(isinstance(v, torch.Tensor) for v in feeds.values())
        try:
            if self.device == "cuda" and as_torch:
                return self._run_bound(feeds)
            arrays = {n: v.detach().cpu().numpy() if isinstance(v, torch.Tensor)
                      else np.asarray(v) for n, v in feeds.items()}
            outs = self._session.run(self.output_names, arrays)
        except Exception as exc:  # the inputs passed the declared checks: an error inside
            raise SessionError(f"ONNX Runtime failed running the model: {type(exc).__name__}: "
                               f"{first_line(exc)}") from exc
        if as_torch:
            return {n: torch.from_numpy(o) for n, o in zip(self.output_names, outs, strict=True)}
        return dict(zip(self.output_names, outs, strict=True))

    def _check(self, feeds: dict) -> None:
        """Each input against the model's declared type and shape; dims that the model names
        alike (one symbol, e.g. the batch of input_ids and attention_mask) must agree."""
        symbols: dict[str, tuple[str, int]] = {}
        for arg in self._inputs:
            name, value = arg.name, feeds[arg.name]
            if isinstance(value, torch.Tensor):
                got_type, shape = _ORT_TYPES.get(value.dtype, str(value.dtype)), value.shape
                got_name = str(value.dtype)
            elif isinstance(value, np.ndarray | np.generic):
                got_type = _NUMPY_ORT_TYPES.get(value.dtype, str(value.dtype))
                shape, got_name = np.shape(value), f"numpy {value.dtype}"
            else:
                raise SessionInputError(f"Session.run: input {name!r} must be a torch tensor or "
                                        f"a numpy array, got {type(value).__name__}")
            if got_type != arg.type:
                want = _TORCH_NAMES.get(arg.type, arg.type)
                hint = (f"x.to({want})" if isinstance(value, torch.Tensor)
                        else f"x.astype({_NUMPY_NAMES.get(arg.type, want)!r})")
                raise SessionDtypeError(f"Session.run: input {name!r} must be {want} "
                                        f"({arg.type}), got {got_name}; convert it: {hint}")
            declared = arg.shape
            if declared is None:
                continue
            if len(shape) != len(declared):
                raise SessionShapeError(f"Session.run: input {name!r} must have {len(declared)} "
                                        f"dimensions {_show(declared)}, got {len(shape)}: "
                                        f"{tuple(shape)}")
            for axis, (want, got) in enumerate(zip(declared, shape, strict=True)):
                if isinstance(want, str) and want.isdigit():  # older exports named 16 "16"
                    want = int(want)
                if isinstance(want, int) and want >= 0 and want != got:
                    raise SessionShapeError(
                        f"Session.run: input {name!r} dimension {axis} must be {want} (the "
                        f"model is fixed to {_show(declared)}), got {got}: shape "
                        f"{tuple(shape)}")
                if isinstance(want, str) and want:
                    seen = symbols.setdefault(want, (name, got))
                    if seen[1] != got:
                        raise SessionShapeError(
                            f"Session.run: inputs {seen[0]!r} and {name!r} must agree on "
                            f"dimension {want!r}, got {seen[1]} and {got}")

    def _run_bound(self, feeds: dict) -> dict:
        """IO binding: inputs read from and outputs left in CUDA memory."""
        binding = self._session.io_binding()
        keep = []
        for name, t in feeds.items():
            t = torch.as_tensor(t).to("cuda").contiguous()
            keep.append(t)
            binding.bind_input(name, "cuda", 0, _NP_TYPES[t.dtype], tuple(t.shape),
                               t.data_ptr())
        for name in self.output_names:
            binding.bind_output(name, "cuda", 0)
        self._session.run_with_iobinding(binding)
        outs = binding.get_outputs()
        return {n: torch.from_dlpack(o.to_dlpack()) if hasattr(o, "to_dlpack")
                else torch.from_numpy(o.numpy()).to("cuda")
                for n, o in zip(self.output_names, outs, strict=True)}


_NP_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
             torch.int32: np.int32, torch.bool: np.bool_}


def _show(shape: list) -> str:
    return "[" + ", ".join(str(d) if d not in (None, "") else "?" for d in shape) + "]"


def _why_not_loadable(path: Path, exc: Exception) -> str:
    """Why ONNX Runtime could not load ``path``, in words: read only after it failed."""
    import onnx
    fix = "re-export it with moefy.export_onnx (or copy it again whole)"
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as parse:  # protobuf's DecodeError and friends: not an ONNX protobuf
        return (f"Session: {path} ({path.stat().st_size} bytes) is not a readable ONNX model: "
                f"truncated, or another format ({type(parse).__name__}); {fix}")
    if model.ir_version == 0 or not model.HasField("graph") or not model.opset_import:
        return (f"Session: {path} is not an ONNX model (no IR version, graph or opset in it); "
                f"{fix}")
    for tensor in _external_tensors(model):
        info = {e.key: e.value for e in tensor.external_data}
        data = path.parent / info.get("location", "")
        if not data.is_file():
            return (f"Session: {path} keeps tensor {tensor.name!r} in the external data file "
                    f"{data.name!r}, which is not in {path.parent}; keep the data file next to "
                    f"the .onnx file (export_onnx writes both), or {fix}")
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if end > data.stat().st_size:
            return (f"Session: the external data file {data} is shorter than {path} expects "
                    f"(tensor {tensor.name!r} ends at byte {end}, the file has "
                    f"{data.stat().st_size}): truncated; {fix}")
    return (f"Session: ONNX Runtime could not load {path}: {type(exc).__name__}: "
            f"{first_line(exc)}; check that its opset and ops are ones this onnxruntime "
            f"version runs, or {fix}")


def _external_tensors(model):
    import onnx
    ext = onnx.TensorProto.EXTERNAL
    yield from (t for t in model.graph.initializer if t.data_location == ext)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_location == ext:
                yield attr.t
