import moefy


def test_public_surface_is_pinned():
    assert sorted(moefy.__all__) == [
        "MoE", "MoEConfig", "NeuronFFN", "PEER", "SparseLinear",
        "__version__", "aux_loss", "convert", "distill",
        "distributed", "errors", "export_hf", "export_onnx", "freeze", "load", "onnx", "report",
        "runtime", "save"]
    assert sorted(moefy.runtime.__all__) == ["ExpertWeights", "Session", "expert_ffn",
                                             "reference_ffn"]
    assert sorted(moefy.distributed.__all__) == ["expert_parallel", "load_sharded",
                                                 "reduce_gradients"]
    assert sorted(moefy.onnx.__all__) == ["ExportError", "ExportResult", "check_tensorrt_ops",
                                          "export_onnx"]
