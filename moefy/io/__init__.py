"""Files in and out (a use of a converted model): ``moefy.save`` / ``moefy.load`` (a JSON plan
and safetensors, never pickles), Hugging Face MoE checkpoints (``export_hf``), and the
pretrained models that ship offline.

May import: ``moefy.passes.distill``, ``report``, ``evaluate``, ``onnx``, ``convert`` and the floors
below (never ``moefy.distributed`` or ``moefy.cli``).
"""
