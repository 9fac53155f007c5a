import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_full():
    """SmolLM2-135M-Instruct (real weights, float32, eval) and its tokenizer, loaded once per
    test session (~6 s). Tests take a few of its layers with ``smollm2_slice``."""
    from moefy.io.pretrained import load_pretrained

    return load_pretrained("smollm2")


@pytest.fixture
def smollm2_slice(smollm2_full):
    """``make(layers)``: a fresh copy of SmolLM2 cut to its first ``layers`` decoder layers
    (real weights; its config says ``num_hidden_layers=layers``), and the tokenizer."""
    import copy

    def make(layers: int = 2):
        full = smollm2_full.model
        every = full.model.layers
        full.model.layers = torch.nn.ModuleList(list(every[:layers]))
        try:
            model = copy.deepcopy(full)
        finally:
            full.model.layers = every
        model.config.num_hidden_layers = layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:layers]
        return model.eval(), smollm2_full.tokenizer
    return make
