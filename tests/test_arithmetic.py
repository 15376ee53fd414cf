from __future__ import annotations

import math
import re

import pytest
import torch
from fake_models import ScriptedModel, oracle, wrong_model
from hypothesis import given, settings
from hypothesis import strategies as st

from course_utils.arithmetic import ArithmeticTask, evaluate_accuracy, pass_at_k
from course_utils.data import ArithmeticProblem, is_held_out, make_arithmetic_corpus
from course_utils.decoder import DecoderConfig, TinyDecoder


def test_sizes_of_the_default_task():
    task = ArithmeticTask()
    assert task.prompt_length == len("07+45+13=") == 9
    assert task.max_completion_length == len("<7+5+3=15;0+4+1+1=06>065\n") == 25
    assert task.max_line_length == 34
    assert task.tokenizer.decode([task.eos_token_id]) == "\n"
    assert ArithmeticTask(2, 1).prompt_length == len("3+4=")


def test_training_tokens_are_the_corpus_and_line_starts_point_at_lines():
    task = ArithmeticTask()
    corpus = task.training_tokens(300, seed=4)
    text = make_arithmetic_corpus(300, 4)
    assert task.tokenizer.decode(corpus.ids) == text
    lines = text.splitlines(keepends=True)
    assert corpus.line_starts.numel() == len(lines) == 300
    for i in (0, 1, 17, 299):
        s = int(corpus.line_starts[i])
        assert task.tokenizer.decode(corpus.ids[s : s + len(lines[i])]) == lines[i]


def test_held_out_problems_never_appear_in_training_lines():
    task = ArithmeticTask()
    text = task.tokenizer.decode(task.training_tokens(2000, seed=1).ids)
    prompts = {line.split("=", 1)[0] for line in text.splitlines()}
    test = task.problems(200, seed=9, split="test")
    assert all(is_held_out(p.operands) for p in test)
    assert not {p.prompt[:-1] for p in test} & prompts
    # and the train split does contain ordinary problems (the check above is not vacuous)
    assert len(prompts) > 1900


def test_lm_batches_start_at_line_starts_and_shift_by_one():
    task = ArithmeticTask()
    corpus = task.training_tokens(400, seed=0)
    g = torch.Generator().manual_seed(0)
    get_batch = task.lm_batches(corpus, batch_size=64, block_size=20, generator=g, layout="windows")
    x, y = get_batch()
    assert x.shape == y.shape == (64, 20)
    assert torch.equal(x[:, 1:], y[:, :-1])
    text = task.tokenizer.decode(corpus.ids)
    for row in x:
        window = task.tokenizer.decode(row)
        assert window in text
        # every row opens with a whole prompt, as a line does (a window cut inside a line
        # would open with the tail of a prompt or of an answer)
        assert re.fullmatch(r"\d\d\+\d\d\+\d\d=", window[:9]), window
    # the starts are drawn from many lines, not one
    assert len({tuple(r[:9].tolist()) for r in x}) > 40


def test_lm_batches_default_block_and_errors():
    task = ArithmeticTask()
    corpus = task.training_tokens(50)
    x, y = task.lm_batches(corpus, 4, prompt_loss=False)()  # default: one padded line a row
    assert x.shape == (4, task.max_line_length - 1)
    assert (y[:, : task.prompt_length - 1] == -100).all()
    x, _ = task.lm_batches(corpus, 4, layout="windows")()
    assert x.shape == (4, task.max_line_length)
    with pytest.raises(ValueError, match="block_size"):
        task.lm_batches(corpus, 4, block_size=10**6, layout="windows")
    with pytest.raises(ValueError, match="block_size"):
        task.lm_batches(corpus, 4, block_size=20)
    with pytest.raises(ValueError, match="batch_size"):
        task.lm_batches(corpus, 0)


def test_line_tensors_are_every_line_in_order_as_batches_show_them():
    task = ArithmeticTask()
    problems = task.problems(3, seed=5)
    text = "".join(
        p.prompt + a
        for p, a in zip(
            problems,
            (problems[0].direct_answer, problems[1].worked_answer, problems[2].direct_answer),
            strict=True,
        )
    )
    x, y = task.line_tensors(task.corpus_from_text(text))
    assert x.shape == y.shape == (3, task.max_line_length - 1)
    line = problems[1].prompt + problems[1].worked_answer
    assert task.tokenizer.decode(x[1].tolist()) == line[:-1]
    # targets: the completion only, shifted by one; -100 on the prompt and after the end token
    assert (y[:, : task.prompt_length - 1] == -100).all()
    completion = y[1, task.prompt_length - 1 :].tolist()
    assert task.tokenizer.decode(completion) == problems[1].worked_answer
    n_direct = len(problems[0].direct_answer)
    assert (y[0, task.prompt_length - 1 + n_direct :] == -100).all()
    _, with_prompt = task.line_tensors(task.corpus_from_text(text), prompt_loss=True)
    assert (with_prompt[:, : task.prompt_length - 1] != -100).all()


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(*[st.integers(0, 99)] * 3), min_size=1, max_size=8))
def test_prompt_encoding_round_trips(ops):
    task = ArithmeticTask()
    problems = [ArithmeticProblem(o) for o in ops]
    ids = task.encode_prompts(problems)
    assert ids.shape == (len(problems), 9) and ids.dtype == torch.long
    assert [task.tokenizer.decode(r) for r in ids] == [p.prompt for p in problems]


def test_encode_prompts_rejects_other_sizes_and_empty():
    task = ArithmeticTask()
    with pytest.raises(ValueError, match="size"):
        task.encode_prompts([ArithmeticProblem((1, 2))])
    with pytest.raises(ValueError, match="empty"):
        task.encode_prompts([])


def test_decode_completions_cut_after_the_first_end_token():
    task = ArithmeticTask()
    enc = task.tokenizer.encode
    ids = torch.tensor([enc("065\n\n\n\n\n\n\n"), enc("<1+2=3>3\n0"), enc("0650650000")])
    assert task.decode_completions(ids) == ["065\n", "<1+2=3>3\n", "0650650000"]


def test_oracle_model_scores_one_and_wrong_model_zero():
    problems = ArithmeticTask().problems(20, seed=3, split="test")
    good = evaluate_accuracy(oracle(), problems, batch_size=7)
    assert good.accuracy == 1.0 and good.worked_fraction == 0.0
    assert good.mean_length == 4.0 and good.correct.all()
    assert good.examples[0] == (problems[0].prompt, problems[0].direct_answer, True)
    worked = evaluate_accuracy(oracle(worked=True), problems)
    assert worked.accuracy == 1.0 and worked.worked_fraction == 1.0
    assert worked.accuracy_worked == 1.0 and math.isnan(worked.accuracy_direct)
    assert worked.mean_length == 25.0
    bad = evaluate_accuracy(wrong_model(), problems)
    assert bad.accuracy == 0.0 and not bad.correct.any()


def test_unterminated_completions_are_wrong():
    # writes the right digits but never the end token before max_new_tokens runs out
    model = ScriptedModel(lambda p: p.direct_answer[:-1] + "0000000")
    problems = ArithmeticTask().problems(5, seed=0)
    result = evaluate_accuracy(model, problems, max_new_tokens=5)
    assert result.accuracy == 0.0 and result.mean_length == 5.0


def test_pass_at_k_matches_the_formula_and_sampled_eval():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)
    assert pass_at_k(4, 3, 2) == 1.0 and pass_at_k(4, 0, 4) == 0.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    # a model that is right on half the problems and wrong on the others
    problems = ArithmeticTask().problems(6, seed=5)
    right = {p.operands for p in problems[:3]}
    model = ScriptedModel(lambda p: p.direct_answer if p.operands in right else "999\n")
    g = torch.Generator().manual_seed(0)
    res = evaluate_accuracy(model, problems, greedy=False, samples=4, generator=g)
    assert res.accuracy == 0.5 and res.pass_at == {1: 0.5, 2: 0.5, 4: 0.5}
    with pytest.raises(ValueError, match="greedy"):
        evaluate_accuracy(model, problems, greedy=True, samples=4)


def test_evaluate_a_real_decoder_matches_uncached_generation():
    torch.manual_seed(0)
    task = ArithmeticTask()
    model = TinyDecoder(
        DecoderConfig(
            task.vocab_size,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=64,
        )
    )
    problems = task.problems(10, seed=1, split="test")
    res = evaluate_accuracy(model, problems, batch_size=4)
    prompts = task.encode_prompts(problems)
    out = model.generate(
        prompts, task.default_max_new_tokens, use_cache=False, eos_token_id=task.eos_token_id
    )
    want = task.decode_completions(out[:, 9:])
    assert [c for _, c, _ in res.examples] == want[:4]
    assert res.mean_length == pytest.approx(sum(map(len, want)) / len(want))


def test_lm_batches_lines_layout_pads_and_masks():
    task = ArithmeticTask()
    corpus = task.training_tokens(300, seed=2)
    lines = task.tokenizer.decode(corpus.ids).splitlines(keepends=True)
    x, y = task.lm_batches(corpus, 64, layout="lines", generator=torch.Generator().manual_seed(0))()
    assert x.shape == y.shape == (64, 33)
    for xi, yi in zip(x, y, strict=True):
        learned = task.tokenizer.decode(yi[yi != -100])
        line = task.tokenizer.decode(xi[:1]) + learned
        assert line in lines  # the row is one whole line, its targets shifted by one
        n = len(line)
        assert (yi[n - 1 :] == -100).all() and (yi[: n - 1] != -100).all()
    _, y2 = task.lm_batches(
        corpus, 64, layout="lines", prompt_loss=False, generator=torch.Generator().manual_seed(0)
    )()
    assert (y2[:, :8] == -100).all() and torch.equal(y2[:, 8:], y[:, 8:])
    completions = {task.tokenizer.decode(r[r != -100]) for r in y2}
    assert completions <= {line[9:] for line in lines}
    with pytest.raises(ValueError, match="layout"):
        task.lm_batches(corpus, 4, layout="rows")
    with pytest.raises(ValueError, match="prompt_loss"):
        task.lm_batches(corpus, 4, layout="windows", prompt_loss=False)


def test_corpus_from_text_measures_the_mix_and_rejects_bad_text():
    task = ArithmeticTask()
    text = make_arithmetic_corpus(400, seed=3, worked_fraction=0.25)
    corpus = task.corpus_from_text(text)
    built = task.training_tokens(400, seed=3, worked_fraction=0.25)
    assert torch.equal(corpus.ids, built.ids) and torch.equal(corpus.line_starts, built.line_starts)
    assert corpus.worked_fraction == pytest.approx(text.count("<") / 400)
    assert 0.15 < corpus.worked_fraction < 0.35
    with pytest.raises(ValueError, match="newline"):
        task.corpus_from_text("07+45+13=065")
    with pytest.raises(ValueError, match="alphabet"):
        task.corpus_from_text("07+45+13=065 \n")


def test_a_batch_larger_than_the_data_is_refused():
    task = ArithmeticTask()
    corpus = task.training_tokens(20, seed=0)
    with pytest.raises(ValueError, match="batch_size=21 is larger than the data"):
        task.lm_batches(corpus, 21)


# -- train_on_task: one seeded run of a model on the task, scored on held-out answers ---------


def _tiny_run(seed: int = 0, steps: int = 6, eval_every: int | None = 3, **kw):
    from course_utils.arithmetic import train_on_task

    task = ArithmeticTask()
    corpus = task.training_tokens(200, seed=0, worked_fraction=1.0)
    held_out = task.problems(8, seed=1, split="test")

    def build() -> TinyDecoder:
        return TinyDecoder(
            DecoderConfig(
                vocab_size=task.vocab_size,
                hidden_size=16,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=task.prompt_length + task.default_max_new_tokens,
            )
        )

    kw.setdefault("batch_size", 4)
    return (
        task,
        held_out,
        train_on_task(
            build,
            task,
            corpus,
            held_out,
            steps,
            seed=seed,
            eval_every=eval_every,
            progress=False,
            **kw,
        ),
    )


def test_train_on_task_is_seeded_and_scores_held_out_answers():
    task, held_out, run = _tiny_run()
    assert run.steps == [3, 6] and len(run.accuracy) == 2 and len(run.losses) == 6
    # the last figure is the returned model's greedy accuracy on the held-out problems
    assert run.final_accuracy == run.accuracy[-1]
    assert run.final_accuracy == evaluate_accuracy(run.model, held_out, task=task).accuracy
    assert not run.model.training
    _, _, again = _tiny_run()
    assert again.losses == run.losses  # the seed fixes the initial weights and the batches
    _, _, other = _tiny_run(seed=1)
    assert other.losses != run.losses
    _, _, end_only = _tiny_run(eval_every=None)
    assert end_only.steps == [6] and end_only.losses == run.losses  # evaluating changes nothing


def test_train_on_task_rejects_bad_arguments():
    with pytest.raises(ValueError, match="eval_every"):
        _tiny_run(eval_every=0)
    with pytest.raises(ValueError, match="eval_every"):
        _tiny_run(eval_every=7)
    with pytest.raises(ValueError, match="steps"):
        _tiny_run(steps=0)
    with pytest.raises(ValueError, match="larger than the data"):
        _tiny_run(batch_size=10_000)
