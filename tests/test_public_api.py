import moefy


def test_public_surface_is_pinned():
    assert sorted(moefy.__all__) == [
        "MoE", "MoEConfig", "__version__", "aux_loss", "convert", "distill", "freeze", "report",
        "runtime"]
    assert sorted(moefy.runtime.__all__) == ["ExpertWeights", "expert_ffn", "reference_ffn"]
