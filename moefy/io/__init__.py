"""Files in and out (a use of a converted model): ``moefy.save`` / ``moefy.load`` (a JSON plan
and safetensors, never pickles), Hugging Face MoE checkpoints (``export_hf``), and the
pretrained models that ship offline.

    checkpoint.py        save / load: the order of checks, writes and swaps
    plan.py              moefy.json: layers described on save, checked and rebuilt on load
    atomic.py            folder arguments checked; files written all or nothing
    hf_rebuild.py        the Hugging Face config kept, a model rebuilt from it, checked
    safetensors_range.py a safetensors header and rows read by hand
    hf.py                export_hf: Mixtral / Qwen2-MoE / GLM-4-MoE checkpoints
    hf_source.py         what export_hf reads from a converted model, and what a target holds
    pretrained.py        the models moefy works with offline

May import: ``moefy.report``, ``moefy.evaluate``, ``moefy.onnx``, ``moefy.convert`` and the
floors below (never ``moefy.distributed`` or ``moefy.cli``).
"""
