"""``moefy.runtime.Session``: an ONNX Runtime session that takes torch or numpy inputs.

    path, device ⇒ execution providers (CUDA EP on "cuda", CPU EP otherwise)
    run({name: tensor}) ⇒ {output name: tensor}  (IO binding on CUDA: tensors stay on the GPU)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

DEVICES = ("cpu", "cuda")


class Session:
    """Run an exported model in ONNX Runtime.

    Args:
        path: the .onnx file.
        device: "cpu" or "cuda" (needs ``onnxruntime-gpu`` and a CUDA device).
        threads: intra-op threads on CPU (default: ONNX Runtime's choice).
        config: ONNX Runtime session config entries, e.g.
            ``{"session.intra_op.allow_spinning": "0"}`` (worker threads sleep between calls).

    ``run(inputs)`` takes a dict of torch tensors or numpy arrays keyed by input name (extra
    keys that the model does not take, such as an unused ``token_type_ids``, are ignored) and
    returns a dict of outputs by name: torch tensors on the session's device when the inputs
    were torch tensors, else numpy arrays.
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu", threads: int | None = None,
                 config: dict[str, str] | None = None):
        import onnxruntime as ort
        if device not in DEVICES:
            raise ValueError(f"Session: device must be one of {DEVICES}, got {device!r}")
        if not Path(path).is_file():
            raise FileNotFoundError(f"Session: no ONNX file at {path}")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise ValueError(f"Session: threads must be a positive int, got {threads!r}")
        config = dict(config or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in config.items()):
            raise TypeError(f"Session: config maps names to string values, got {config!r}")
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError(
                    "Session(device='cuda') needs ONNX Runtime's CUDA provider: install "
                    "onnxruntime-gpu instead of onnxruntime (pip install 'moefy[gpu]')")
            if not torch.cuda.is_available():
                raise RuntimeError("Session(device='cuda'): no CUDA device is visible")
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
        self._session = ort.InferenceSession(str(path), options, providers=providers)
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]

    def run(self, inputs: dict) -> dict:
        if not isinstance(inputs, dict):
            raise TypeError("Session.run takes a dict of inputs keyed by name, got "
                            f"{type(inputs).__name__}")
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ValueError(f"Session.run: missing inputs {missing}; the model takes "
                             f"{self.input_names}")
        feeds = {n: inputs[n] for n in self.input_names}
        as_torch = any(isinstance(v, torch.Tensor) for v in feeds.values())
        if self.device == "cuda" and as_torch:
            return self._run_bound(feeds)
        arrays = {n: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
                  for n, v in feeds.items()}
        outs = self._session.run(self.output_names, arrays)
        if as_torch:
            return {n: torch.from_numpy(o) for n, o in zip(self.output_names, outs, strict=True)}
        return dict(zip(self.output_names, outs, strict=True))

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
