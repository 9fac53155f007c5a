"""moefy.distill: a short fine-tune brings a converted model closer to the dense one."""

import pytest
import torch
import torch.nn as nn

import moefy


def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 128), nn.GELU(), nn.Linear(128, 16)).eval()
    data = [(torch.randn(64, 16),) for _ in range(8)]
    cfg = moefy.MoEConfig(method="split", num_experts=8, top_k=2, partition="kmeans")
    return model, moefy.convert(model, cfg, example_inputs=data[0]), data


def err(model, moe_model, data):
    with torch.no_grad():
        return sum(float((moe_model(*b) - model(*b)).pow(2).mean()) for b in data)


def test_distill_lowers_the_error_and_restores_flags():
    model, moe_model, data = setup()
    held = [(torch.randn(64, 16),) for _ in range(4)]
    moe_model[0].router.weight.requires_grad_(False)  # a user's own choice, restored after
    before = err(model, moe_model, held)
    dense_before = {k: v.clone() for k, v in model.state_dict().items()}
    log = moefy.distill(moe_model, model, data, steps=60, lr=3e-3, progress=False)
    assert len(log) == 60 and sum(log[-10:]) < 0.5 * sum(log[:10])
    assert err(model, moe_model, held) < 0.7 * before
    assert not moe_model[0].router.weight.requires_grad
    assert not moe_model.training and not moe_model[0].training
    assert all(torch.equal(dense_before[k], v) for k, v in model.state_dict().items())


def test_distill_trains_only_what_it_is_told():
    model, moe_model, data = setup()
    experts = moe_model[0].w_in.detach().clone()
    router = moe_model[0].router.weight.detach().clone()
    moefy.distill(moe_model, model, data, steps=5, lr=1e-2, train="routers", progress=False)
    assert torch.equal(moe_model[0].w_in, experts)
    assert not torch.equal(moe_model[0].router.weight, router)


def test_distill_with_a_custom_loss_and_aux():
    model, moe_model, data = setup()
    seen = []

    def loss(student, teacher, batch):
        seen.append(type(batch).__name__)
        return (student - teacher).abs().mean()

    log = moefy.distill(moe_model, model, data, steps=3, loss=loss, aux=0.01, progress=False)
    assert len(log) == 3 and seen == ["tuple"] * 3


def test_distill_bad_input():
    model, moe_model, data = setup()
    with pytest.raises(ValueError, match="steps must be a positive int"):
        moefy.distill(moe_model, model, data, steps=0)
    with pytest.raises(ValueError, match="no batches"):
        moefy.distill(moe_model, model, [], steps=2, progress=False)
    with pytest.raises(ValueError, match="no moefy.MoE"):
        moefy.distill(model, model, data, steps=2)


# ---------------------------------------------------------------- non-finite data, bad input
def student_and_teacher():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)).eval()
    # the sigmoid router nudges a buffer (selection_bias) in every training forward
    student = nn.Sequential(moefy.MoE(16, 16, num_experts=4, top_k=2, router="sigmoid"))
    return student, teacher


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("bad", (float("nan"), float("inf")))
def test_a_non_finite_batch_stops_distill_and_leaves_the_weights_of_the_step_before(bad):
    student, teacher = student_and_teacher()
    poisoned = torch.randn(32, 16)
    poisoned[5, 3] = bad
    data = [(torch.randn(32, 16),), (torch.randn(32, 16),), (poisoned,)]
    seen = []  # what each step starts from (before its forward nudges the router's bias)
    student.register_forward_pre_hook(lambda module, args: seen.append(snapshot(module)))
    with pytest.raises(moefy.errors.NonFiniteLossError, match="step 3 .batch 2") as info:
        moefy.distill(student, teacher, data, steps=5, lr=1e-2, progress=False)
    assert len(info.value.log) == 2 and len(seen) == 3
    after = snapshot(student)
    assert not torch.equal(seen[0]["0.w_in"], seen[2]["0.w_in"])  # two steps were applied
    for k, v in after.items():
        assert torch.isfinite(v).all(), k
        torch.testing.assert_close(v, seen[2][k], rtol=0, atol=0, msg=k)  # incl. the buffer
    assert all(p.grad is None for p in student.parameters())
    assert all(p.requires_grad for p in student.parameters()) and student.training
    assert isinstance(info.value, FloatingPointError)


def test_a_non_finite_gradient_with_a_finite_loss_changes_nothing():
    student, teacher = student_and_teacher()
    before = snapshot(student)

    def loss(s, t, batch):  # 0, but d sqrt(|u|)/du at u = 0 is NaN
        return (s - s.detach()).abs().sqrt().sum()

    with pytest.raises(moefy.errors.NonFiniteLossError, match="non-finite gradient"):
        moefy.distill(student, teacher, [(torch.randn(8, 16),)], steps=2, loss=loss,
                      progress=False)
    for k, v in snapshot(student).items():
        assert torch.equal(v, before[k]), k


BAD_DISTILL = (
    (dict(data=torch.randn(8, 16)), "data must be an iterable of batches"),
    (dict(data=[None]), "batch 0 is a NoneType"),
    (dict(data=[(torch.randn(0, 16),)]), "holds no tokens"),
    (dict(data=iter([])), "no batches"),
    (dict(steps=True), "steps must be a positive int"),
    (dict(steps=2.0), "steps must be a positive int"),
    (dict(lr=-1.0), "lr must be a finite number > 0"),
    (dict(lr=float("nan")), "lr must be a finite number > 0"),
    (dict(aux=float("inf")), "aux must be a finite number >= 0"),
    (dict(warmup=2.0), "warmup must be a finite number >= 0 and <= 1"),
    (dict(max_seconds=0), "max_seconds must be a finite number > 0"),
    (dict(train="everything"), "train must be one of"),
    (dict(train=None), "train must be one of"),
    (dict(loss="mse"), "loss must be callable"),
    (dict(loss=lambda s, t, b: 1.0), "loss must return a scalar tensor"),
    (dict(progress="yes"), "progress must be True, False or None"),
    (dict(teacher="dense"), "teacher must be a torch.nn.Module"),
)


@pytest.mark.parametrize(("kwargs", "message"), BAD_DISTILL)
def test_distill_bad_input_is_a_typed_error_before_any_change(kwargs, message):
    student, teacher = student_and_teacher()
    before = snapshot(student)
    args = dict(teacher=teacher, data=[(torch.randn(8, 16),)], steps=2, progress=False)
    args.update(kwargs)
    teacher = args.pop("teacher")
    with pytest.raises(moefy.errors.TrainingInputError, match=message):
        moefy.distill(student, teacher, **args)
    for k, v in snapshot(student).items():
        assert torch.equal(v, before[k]), k
    assert all(p.requires_grad and p.grad is None for p in student.parameters())


def test_distill_all_padding_batch_is_a_typed_error():
    class Keyed(nn.Module):  # takes keyword inputs, like a Hugging Face model
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, attention_mask=None):
            return self.inner(x)

    student, teacher = student_and_teacher()
    batch = {"x": torch.randn(2, 4, 16), "attention_mask": torch.zeros(2, 4)}
    with pytest.raises(moefy.errors.TrainingInputError, match="all padding"):
        moefy.distill(Keyed(student), Keyed(teacher), [batch], steps=1, progress=False)


def test_distill_stops_when_a_one_shot_iterator_runs_out(caplog):
    student, teacher = student_and_teacher()
    batches = ((torch.randn(8, 16),) for _ in range(3))
    with caplog.at_level("WARNING", logger="moefy.passes.distill"):
        log = moefy.distill(student, teacher, batches, steps=10, progress=False)
    assert len(log) == 3 and "ran out after 3 batches" in caplog.text


def test_aux_loss_and_freeze_bad_input():
    student, _ = student_and_teacher()
    with pytest.raises(moefy.errors.TrainingInputError, match="no MoE layer ran a training"):
        moefy.aux_loss(student)
    student.train()
    student(torch.randn(0, 16))  # a zero-token forward: the losses are 0, not NaN
    assert float(moefy.aux_loss(student).detach()) == 0.0
    for call, message in (
            (lambda: moefy.aux_loss(student, balance=float("nan")), "balance must be a finite"),
            (lambda: moefy.aux_loss("model"), "model must be a torch.nn.Module"),
            (lambda: moefy.aux_loss(nn.Linear(2, 2)), "holds no moefy.MoE layer"),
            (lambda: moefy.freeze(student, train=3), "train must be one of"),
            (lambda: moefy.freeze(nn.Linear(2, 2)), "holds no moefy.MoE layer")):
        with pytest.raises(moefy.errors.TrainingInputError, match=message):
            call()


def test_distill_prints_nothing_and_draws_a_progress_bar_only_when_asked(capsys):
    student, teacher = student_and_teacher()
    data = [(torch.randn(8, 16),)]
    moefy.distill(student, teacher, data, steps=2, progress=None)  # stderr is not a terminal
    assert capsys.readouterr() == ("", "")
    moefy.distill(student, teacher, data, steps=2, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "moefy distill" in err and "2/2" in err  # a tqdm bar, on stderr


def test_distill_explains_a_teacher_that_takes_other_inputs_and_a_detached_loss():
    from moefy.errors import TrainingInputError
    dense = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    moe = moefy.convert(dense, moefy.MoEConfig(num_experts=4, top_k=2),
                        example_inputs=(torch.randn(4, 8),))
    other = nn.Linear(5, 8)
    with pytest.raises(TrainingInputError, match="teacher"):
        moefy.distill(moe, other, [(torch.randn(4, 8),)], steps=1, progress=False)
    detached = lambda s, t, b: (s.detach() - t).pow(2).mean()  # noqa: E731
    with pytest.raises(TrainingInputError, match="does not depend"):
        moefy.distill(moe, dense, [(torch.randn(4, 8),)], steps=1, loss=detached,
                      progress=False)


def test_budget_distillation_cuts_batches_into_steps_of_about_a_thousand_tokens():
    from moefy.passes.distill import _rebatch

    ids = torch.arange(8 * 256).view(8, 256)
    batches = _rebatch([{"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                        (torch.randn(3, 4),)], 1024)
    dicts = [b for b in batches if isinstance(b, dict)]
    assert [tuple(b["input_ids"].shape) for b in dicts] == [(4, 256), (4, 256)]
    assert torch.equal(torch.cat([b["input_ids"] for b in dicts]), ids)  # every row, in order
    assert isinstance(batches[-1], tuple)  # not a dict of (B, S) tensors: kept whole
    long = _rebatch([{"input_ids": torch.zeros(2, 4096, dtype=torch.long)}], 1024)
    assert [tuple(b["input_ids"].shape) for b in long] == [(1, 4096), (1, 4096)]  # ≥ 1 row


def test_budget_loss_is_kl_on_logits_for_language_models():
    from types import SimpleNamespace

    from moefy.passes.distill import _budget_loss, _default_loss

    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    kl = torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1)
    want = (kl * mask).sum() / mask.sum()
    got = _budget_loss(SimpleNamespace(logits=s), SimpleNamespace(logits=t),
                       {"attention_mask": mask})
    assert torch.allclose(got, want, atol=1e-6)
    assert _budget_loss(SimpleNamespace(logits=t), SimpleNamespace(logits=t), {}) < 1e-6
    plain = (s,), (t,)  # no logits: the relative MSE of the first output
    assert torch.equal(_budget_loss(*plain, {}), _default_loss(*plain, {}))


def test_distill_leaves_no_autograd_graph_behind():
    model, moe_model, data = setup()
    moefy.distill(moe_model, model, data, steps=2, lr=1e-3, progress=False)
    # a training forward's auxiliary losses hold the step's graph (every activation)
    assert all(m.last_aux is None for m in moe_model.modules() if isinstance(m, moefy.MoE))
