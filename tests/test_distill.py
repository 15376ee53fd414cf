from __future__ import annotations

import math

import pytest
import torch
from fake_models import ScriptedModel, oracle

from course_utils import distill
from course_utils.arithmetic import ArithmeticTask, evaluate_accuracy
from course_utils.data import ArithmeticProblem
from course_utils.decoder import DecoderConfig, TinyDecoder


def _tiny(seed=0, hidden=32, layers=1):
    torch.manual_seed(seed)
    return TinyDecoder(
        DecoderConfig(
            16,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            max_position_embeddings=64,
        )
    )


def test_kl_is_zero_for_equal_logits_and_positive_otherwise():
    z = torch.randn(3, 5, 11)
    for direction in distill.DIRECTIONS:
        assert distill.distillation_kl(z, z.clone(), 2.0, direction).abs().item() < 1e-6
        assert distill.distillation_kl(z, torch.randn(3, 5, 11), 2.0, direction).item() > 0.01


def test_forward_and_reverse_differ_by_the_hand_computed_amounts():
    teacher = torch.log(torch.tensor([[0.5, 0.5]]))
    student = torch.log(torch.tensor([[0.9, 0.1]]))
    fwd = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # 0.5108
    rev = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)  # 0.3681
    assert distill.distillation_kl(student, teacher, 1.0, "forward").item() == pytest.approx(
        fwd, abs=1e-6
    )
    assert distill.distillation_kl(student, teacher, 1.0, "reverse").item() == pytest.approx(
        rev, abs=1e-6
    )
    # with T = 2 the logits are halved, and the result is scaled by T^2 = 4
    p = torch.softmax(teacher / 2, -1)[0]
    q = torch.softmax(student / 2, -1)[0]
    want = 4 * float((p * (p / q).log()).sum())
    assert distill.distillation_kl(student, teacher, 2.0).item() == pytest.approx(want, abs=1e-6)


def test_gradient_is_t_times_student_minus_teacher_and_descends():
    torch.manual_seed(0)
    t = 3.0
    teacher = torch.randn(4, 7)
    student = torch.randn(4, 7, requires_grad=True)
    loss = distill.distillation_kl(student, teacher, t, "forward")
    loss.backward()
    # d/dz [T^2 KL(p || softmax(z / T))] = T (q - p), averaged over the 4 positions
    want = t * (torch.softmax(student / t, -1) - torch.softmax(teacher / t, -1)) / 4
    assert torch.allclose(student.grad, want, atol=1e-6)
    assert teacher.grad is None
    for direction in distill.DIRECTIONS:
        z = torch.randn(4, 7, requires_grad=True)
        before = distill.distillation_kl(z, teacher, t, direction)
        before.backward()
        with torch.no_grad():
            after = distill.distillation_kl(z - 0.1 * z.grad, teacher, t, direction)
        assert after < before


def test_mask_selects_positions():
    z_s, z_t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    per = distill.distillation_kl(z_s, z_t, reduction="none")
    assert per.shape == (2, 3)
    assert distill.distillation_kl(z_s, z_t, mask=mask).item() == pytest.approx(
        per[mask].mean().item(), abs=1e-6
    )
    with pytest.raises(ValueError, match="mask"):
        distill.distillation_kl(z_s, z_t, mask=mask[:, :2])
    with pytest.raises(ValueError, match="direction"):
        distill.distillation_kl(z_s, z_t, direction="both")


def test_distillation_set_keeps_only_verified_samples():
    task = ArithmeticTask()
    problems = task.problems(10, seed=0)
    right = {p.operands for p in problems[::2]}
    teacher = ScriptedModel(lambda p: p.worked_answer if p.operands in right else "000\n")
    data = distill.build_distillation_set(
        teacher, problems, samples_per_problem=3, generator=torch.Generator().manual_seed(0)
    )
    assert data.n_sampled == 30 and len(data) == 15 and data.keep_rate == 0.5
    assert data.worked_fraction == 1.0
    assert data.lines[0] == problems[0].prompt + problems[0].worked_answer
    assert len(distill.build_distillation_set(teacher, problems, 3, dedupe=True)) == 5


def test_sft_tensors_train_on_completion_tokens_only():
    p1, p2 = ArithmeticProblem((7, 45, 13)), ArithmeticProblem((1, 2, 3))
    inputs, targets = distill.sft_tensors([p1, p2], [p1.worked_answer, p2.direct_answer])
    task = ArithmeticTask()
    assert inputs.shape == targets.shape == (2, 9 + 25 - 1)
    learned = [task.tokenizer.decode(t[t != -100]) for t in targets]
    assert learned == [p1.worked_answer, p2.direct_answer]
    assert (targets[:, :8] == -100).all()  # prompt positions predict prompt tokens: ignored
    assert task.tokenizer.decode(inputs[1, :13]) == p2.prompt + p2.direct_answer
    # the first learned target is predicted from the '=' at position 8
    assert task.tokenizer.decode([inputs[0, 8]]) == "=" and targets[0, 8] != -100


def test_train_sft_learns_the_teacher_format():
    task = ArithmeticTask()
    problems = task.problems(300, seed=0)
    data = distill.build_distillation_set(oracle(worked=True), problems[:200])
    assert len(data) == 200
    student = _tiny(hidden=32, layers=2)
    result = distill.train_sft(student, data, steps=60, batch_size=32, lr=1e-2, progress=False)
    assert result.losses[-1] < 0.6 * result.losses[0]
    res = evaluate_accuracy(student, task.problems(30, seed=1, split="test"))
    assert res.worked_fraction > 0.9  # it copied the teacher's worked-steps format


def test_logit_and_on_policy_distillation_reduce_the_kl():
    task = ArithmeticTask()
    teacher = _tiny(seed=3, hidden=48)
    student = _tiny(seed=4)
    corpus = task.training_tokens(200)
    get_batch = task.lm_batches(corpus, 16, generator=torch.Generator().manual_seed(0))
    x, _ = get_batch()
    with torch.no_grad():
        before = distill.distillation_kl(student(x), teacher(x)).item()
    res = distill.train_logit_distillation(
        student, teacher, get_batch, 40, temperature=1.0, alpha=1.0, lr=1e-2, progress=False
    )
    with torch.no_grad():
        after = distill.distillation_kl(student(x), teacher(x)).item()
    assert after < 0.5 * before and len(res.losses) == 40
    onp = distill.train_on_policy_distillation(
        student,
        teacher,
        task.problems(50),
        steps=15,
        batch_size=16,
        lr=1e-2,
        max_new_tokens=6,
        progress=False,
    )
    assert sum(onp.losses[-3:]) < sum(onp.losses[:3])
