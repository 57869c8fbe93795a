"""Scoring stage: scores on literal cases, batched generation against the one-at-a-time loop, stops, loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tasks.evaluate import (
    EvalResult,
    _finish,
    evaluate_model,
    generate_batch,
    load_for_inference,
    log_eval_to_mlflow,
    read_eval_jsonl,
    reference_nll,
    score,
)

PROMPTS = [
    [{"role": "user", "content": "Reverse the words: apple river"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse the words: stone cloud tiger lemon piano"}],
    [{"role": "user", "content": "请你给哪吒写一首诗："}],
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Reverse the words: forest candle rocket"}],
    [{"role": "user", "content": "Reverse the words: garden silver winter button dragon"}],
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, tok, _ = load_for_inference(str(tiny_model_dir))
    return model, tok


@pytest.fixture(scope="module")
def noisy(tiny_model_dir):
    """The tiny model re-drawn with larger weights: its greedy replies differ per prompt and sometimes stop
    (the seed-0 init repeats one token forever, which would make any equality check trivial)."""
    model, tok, _ = load_for_inference(str(tiny_model_dir))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.3)
    return model, tok


@pytest.fixture(scope="module")
def eos_model(tiny_model_dir):
    """Logits = a fixed bias with eos (<|im_end|>) on top: every reply stops at its first token,
    and the teacher-forced loss has a closed form."""
    model, tok, _ = load_for_inference(str(tiny_model_dir))
    vocab = model.config.vocab_size
    with torch.no_grad():
        model.model.norm.weight.zero_()  # hidden state 0 -> logits = lm_head bias
        head = torch.nn.Linear(model.config.hidden_size, vocab, bias=True)
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.eos_token_id] = 5.0
    model.lm_head = head
    return model, tok


# --------------------------------------------------------------------------- score


def test_score_exact_and_partial_english():
    assert score("  stone lemon apple  ", "stone lemon apple") == pytest.approx(
        {"exact_match": 1.0, "char_f1": 1.0, "rouge_l": 1.0, "bleu": 100.0})
    s = score("stone lemon apple", "stone lemon apple forest")
    assert s["exact_match"] == 0.0
    assert s["char_f1"] == pytest.approx(30 / 36)  # 15 of 21 reference characters, all 15 predicted correct
    assert s["rouge_l"] == pytest.approx(2 * 3 / (3 + 4))  # word LCS 3: P=3/3, R=3/4
    assert s["bleu"] == pytest.approx(100 * math.exp(1 - 4 / 3), abs=1e-6)  # all n-grams match; brevity penalty


def test_score_cjk_is_character_level():
    s = score("床前明月", "床前明月光")
    assert s["exact_match"] == 0.0
    assert s["char_f1"] == pytest.approx(8 / 9)  # P=4/4, R=4/5
    assert s["rouge_l"] == pytest.approx(8 / 9)  # character LCS 4
    assert s["bleu"] == pytest.approx(100 * math.exp(1 - 5 / 4), abs=1e-6)  # tokenize="zh": one token per character
    assert score("疑是地上霜", "床前明月光") == pytest.approx(
        {"exact_match": 0.0, "char_f1": 0.0, "rouge_l": 0.0, "bleu": 0.0})


def test_score_empty():
    assert score("", "")["exact_match"] == 1.0
    assert score("", "abc") == pytest.approx({"exact_match": 0.0, "char_f1": 0.0, "rouge_l": 0.0, "bleu": 0.0})


# --------------------------------------------------------------------------- generation


def test_finish_cuts_at_first_stop(tiny):
    _, tok = tiny
    a = tok("ab cd", add_special_tokens=False)["input_ids"]
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert _finish(a + [eos, pad, pad], {eos, pad}, tok) == {"prediction": "ab cd", "stopped": True, "new_tokens": len(a) + 1}
    assert _finish(a, {eos, pad}, tok) == {"prediction": "ab cd", "stopped": False, "new_tokens": len(a)}


def test_left_padded_batches_equal_one_at_a_time(noisy):
    model, tok = noisy
    gen = {"max_new_tokens": 10}
    batched = generate_batch(model, tok, PROMPTS, gen, batch_size=4)
    single = [generate_batch(model, tok, [p], gen, batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    assert len({o["prediction"] for o in batched}) > 1  # not a degenerate model


def test_random_init_never_stops(tiny):
    model, tok = tiny
    out = generate_batch(model, tok, PROMPTS[:3], {"max_new_tokens": 5}, batch_size=2)
    assert [(o["stopped"], o["new_tokens"]) for o in out] == [(False, 5)] * 3


def test_generation_reports_its_progress_a_batch_at_a_time(tiny):
    model, tok = tiny
    seen = []
    out = generate_batch(model, tok, PROMPTS[:3], {"max_new_tokens": 2}, batch_size=2, on_progress=lambda d, t: seen.append((d, t)))
    assert len(out) == 3 and seen == [(2, 3), (3, 3)]


def test_stops_at_eos(eos_model):
    model, tok = eos_model
    out = generate_batch(model, tok, PROMPTS, {"max_new_tokens": 8}, batch_size=4)
    assert out == [{"prediction": "", "stopped": True, "new_tokens": 1}] * len(PROMPTS)


def test_unknown_generation_key_is_rejected(tiny):
    model, tok = tiny
    with pytest.raises(Exception, match="max_new_token"):
        generate_batch(model, tok, PROMPTS[:1], {"max_new_token": 4}, batch_size=1)


def test_reference_nll_closed_form(eos_model):
    model, tok = eos_model
    refs = ["stone lemon", "你好"]
    total, count = reference_nll(model, tok, [PROMPTS[0], PROMPTS[2]], refs, batch_size=2)
    # target = reply tokens + <|im_end|>; logits are the bias: nll = log(V - 1 + e^5) - 5 * [token is eos]
    expected_count = sum(len(tok(r, add_special_tokens=False)["input_ids"]) + 1 for r in refs)
    assert count == expected_count
    log_z = math.log(model.config.vocab_size - 1 + math.exp(5.0))
    assert total == pytest.approx(count * log_z - 5.0 * len(refs), rel=1e-5)


# --------------------------------------------------------------------------- evaluate_model


def test_evaluate_model_on_folder(tiny_model_dir, demo_dir):
    res = evaluate_model(str(tiny_model_dir), demo_dir / "reverse_eval.jsonl",
                         gen={"max_new_tokens": 4}, batch_size=4, max_samples=5)
    assert set(res.metrics) == {"exact_match", "char_f1", "rouge_l", "bleu", "loss", "perplexity",
                                "no_stop_rate", "n", "samples_per_s"}
    assert res.metrics["n"] == 5
    assert res.metrics["no_stop_rate"] == 1.0  # random init never emits <|im_end|>
    assert res.metrics["exact_match"] == 0.0
    assert res.metrics["perplexity"] == pytest.approx(math.exp(res.metrics["loss"]))
    assert res.metrics["loss"] > 0
    row = res.rows[0]
    assert row["id"] == "reverse-eval-00000"
    assert row["reference"] == "stone lemon apple forest"
    assert row["prompt"].endswith("<|im_start|>assistant\n")
    assert {"prediction", "exact_match", "char_f1", "rouge_l", "bleu", "stopped"} <= set(row)


def test_read_eval_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "e.jsonl"
    good = {"id": "a", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    p.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"e\.jsonl:2"):
        read_eval_jsonl(p)
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}]}) + "\n")
    with pytest.raises(ValueError, match="assistant"):
        read_eval_jsonl(p)
    p.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    assert len(read_eval_jsonl(p, max_samples=1)) == 1


def test_log_eval_to_mlflow(mlflow_sqlite):
    import mlflow

    from infra.local import ensure_experiment

    exp = ensure_experiment("t")
    run = mlflow.MlflowClient().create_run(exp)
    rid = run.info.run_id
    res = EvalResult(metrics={"exact_match": 0.5, "n": 2.0},
                     rows=[{"id": "a", "prediction": "x", "exact_match": 1.0}, {"id": "b", "prediction": "y", "exact_match": 0.0}])
    log_eval_to_mlflow(res, rid, "challenger")
    log_eval_to_mlflow(res, rid, "challenger")  # a re-run must not double the table
    data = mlflow.MlflowClient().get_run(rid).data
    assert data.metrics["challenger/exact_match"] == 0.5
    table = mlflow.MlflowClient().load_table(exp, "eval/challenger_table.json", run_ids=[rid])
    assert list(table["id"]) == ["a", "b"]


def test_generate_cli(tiny_model_dir, capsys):
    from tasks.evaluate import generate_cli

    # `ftflow eval` is the `evaluate` flow's eval_cli: tests/integration/test_flow_artifacts.py
    assert generate_cli(str(tiny_model_dir), "hello", 3, system="Be brief.") == 0
    assert "max_new_tokens=3" in capsys.readouterr().err  # random init: no end of turn


def test_scored_inference_run(mlflow_sqlite, tiny_model_dir, demo_dir):
    import mlflow

    from infra.local import ensure_experiment
    from tasks.evaluate import scored_inference_run

    data = demo_dir / "reverse_eval.jsonl"
    res = scored_inference_run(str(tiny_model_dir), data, gen={"max_new_tokens": 3}, batch_size=2, max_samples=3,
                               experiment_id=ensure_experiment("t"), run_name="eval-x", tags={"who": "test"})
    assert res["model_version"] is None and res["recorded"] is False  # a folder: nothing to tag
    run = mlflow.MlflowClient().get_run(res["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["eval/n"] == 3 and "eval/bleu" in run.data.metrics
    assert run.data.params["generation.max_new_tokens"] == "3" and run.data.params["max_samples"] == "3"
    assert run.data.tags["ftflow.eval_data_sha256"] == res["data_sha256"] and run.data.tags["who"] == "test"
    assert "ftflow.git_commit" in run.data.tags
    assert [r["id"] for r in res["rows"]] == [r["id"] for r in read_eval_jsonl(data, 3)]
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        scored_inference_run(str(tiny_model_dir), demo_dir / "missing.jsonl", gen={}, batch_size=2, max_samples=1,
                             experiment_id=ensure_experiment("t"), run_name="eval-y")
    with pytest.raises(ValueError, match="max_new_token"):  # generation settings are validated before any run
        scored_inference_run(str(tiny_model_dir), data, gen={"max_new_token": 3}, batch_size=2, max_samples=1,
                             experiment_id=ensure_experiment("t"), run_name="eval-z")


def test_generation_settings_take_effect(tiny, noisy):
    from tasks.evaluate import _generate_kwargs, _prompt_ids, stop_token_ids

    model, tok = tiny  # the seed-0 init repeats one token forever under greedy decoding
    prompt = torch.tensor([_prompt_ids(tok, PROMPTS[0])])
    stops = stop_token_ids(model, tok)

    def new_ids(gen: dict) -> list[int]:
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **_generate_kwargs(gen, stops, 0))
        return out[0, prompt.shape[1]:].tolist()

    assert len(set(new_ids({"max_new_tokens": 6}))) == 1
    no_repeat = new_ids({"max_new_tokens": 6, "no_repeat_ngram_size": 1})
    assert len(no_repeat) == len(set(no_repeat)) == 6  # no token twice
    penalised = new_ids({"max_new_tokens": 6, "repetition_penalty": 1e6})
    assert len(set(penalised)) > 1

    model, tok = noisy
    sample = {"max_new_tokens": 8, "do_sample": True, "temperature": 5.0, "top_k": 0, "seed": 3}
    first = generate_batch(model, tok, PROMPTS, sample, batch_size=3)
    assert generate_batch(model, tok, PROMPTS, sample, batch_size=3) == first  # seeded: repeatable
    assert generate_batch(model, tok, PROMPTS, {**sample, "seed": 4}, batch_size=3) != first
    assert first != generate_batch(model, tok, PROMPTS, {"max_new_tokens": 8}, batch_size=3)  # not greedy


def test_generate_cli_streams_the_reply(noisy_model_dir, monkeypatch, capsys):
    from transformers import TextStreamer

    from tasks.evaluate import generate_cli

    # The noisy model's greedy reply has spaces: TextStreamer emits at word boundaries.
    pieces = []
    original = TextStreamer.on_finalized_text
    monkeypatch.setattr(TextStreamer, "on_finalized_text",
                        lambda self, text, stream_end=False: (pieces.append(text), original(self, text, stream_end))[1])
    assert generate_cli(str(noisy_model_dir), "Reverse the words: apple river stone", 24, system=None) == 0
    printed = capsys.readouterr().out
    assert len([p for p in pieces if p]) >= 2, pieces  # written piece by piece, as generated
    assert printed.strip() and "".join(pieces).strip() == printed.strip()


def test_genai_evaluation_logs_one_assessed_trace_per_example(mlflow_sqlite):
    import mlflow

    from infra.local import ensure_experiment
    from tasks.evaluate import SCORE_KEYS, log_genai_evaluation

    exp = ensure_experiment("t")
    rid = mlflow.MlflowClient().create_run(exp).info.run_id
    refs, preds = ["stone cloud", "床前明月光", "a b c"], ["stone cloud", "床前明月", "c b a"]
    rows = [{"id": str(i), "prompt": f"p{i}", "reference": r, "prediction": p, **score(p, r)}
            for i, (r, p) in enumerate(zip(refs, preds))]
    log_genai_evaluation(EvalResult(metrics={}, rows=rows), rid)

    run = mlflow.MlflowClient().get_run(rid)
    assert run.info.status == "RUNNING"  # the owner of the run finishes it, not the evaluation
    for key in SCORE_KEYS:  # MLflow's aggregate equals ftflow's own mean
        assert run.data.metrics[f"{key}/mean"] == pytest.approx(sum(r[key] for r in rows) / len(rows))
    traces = mlflow.search_traces(locations=[exp], run_id=rid, return_type="list")
    assert len(traces) == len(rows)
    got = {}
    for t in traces:
        values = {a.name: a.value for a in t.info.assessments if a.name in SCORE_KEYS}
        response = t.data.response  # the prediction, JSON-encoded by the trace
        got[json.loads(response) if isinstance(response, str) and response.startswith('"') else response] = values
    for r in rows:
        assert got[r["prediction"]] == pytest.approx({k: r[k] for k in SCORE_KEYS}), r


# --------------------------------------------------------------------------- memory on the real vocabulary

# BELLE-like rows: CJK prompts, replies of 40-80 tokens, half of them starting with "\n".
REAL_PROMPTS = [
    [{"role": "user", "content": f"请把下面的句子翻译成英文：今天天气很好，我们去公园散步吧。第{i}题"}] for i in range(6)
]
REAL_REFS = [("\n" if i % 2 else "") + "The weather is nice today, let's walk in the park. " * (1 + i % 3) + "好的。"
             for i in range(6)]


def belle_like_eval_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        reply = ("\n" if i % 2 else "") + "The weather is nice today, let's go for a walk in the park. " * (3 + i % 4) + "好的。"
        rows.append({"id": f"belle-{i}", "messages": [
            {"role": "user", "content": f"请把下面的句子翻译成英文：今天天气很好，我们去公园散步吧。第{i}题"},
            {"role": "assistant", "content": reply}]})
    return rows


@pytest.fixture(scope="module")
def real_noisy(qwen25_tiny_model_dir):
    """The tiny model on the real 151,665-token vocabulary, re-drawn with larger weights so that
    token losses differ (the 0.02-std init is close to uniform) and greedy replies differ per prompt."""
    model, tok, _ = load_for_inference(str(qwen25_tiny_model_dir))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.3)
    return model, tok


def _plain_loss_sum(model, tok, prompts, refs) -> tuple[float, int]:
    """Independent reference: per sample, transformers' own `model(input_ids, labels=...)` mean loss x its targets.

    The Qwen2.5 template renders a reply as `<|im_start|>assistant\n` + content + `<|im_end|>`: the
    target is the reply's tokens + <|im_end|>, after the generation prompt's tokens.
    """
    total, count = 0.0, 0
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for msgs, ref in zip(prompts, refs):
        p = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        target = tok(ref, add_special_tokens=False)["input_ids"] + [end]
        ids = torch.tensor([p + target])
        labels = torch.tensor([[-100] * len(p) + target])
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss
        total += float(loss) * len(target)
        count += len(target)
    return total, count


def test_reference_nll_equals_plain_model_loss_on_real_vocab(real_noisy):
    model, tok = real_noisy
    want_total, want_count = _plain_loss_sum(model, tok, REAL_PROMPTS, REAL_REFS)
    assert want_total / want_count > 12.5  # not the near-uniform log(V) = 11.93 of a 0.02-std init
    default = reference_nll(model, tok, REAL_PROMPTS, REAL_REFS, batch_size=4)
    # one row per batch, one position per head chunk
    tiny_budget = reference_nll(model, tok, REAL_PROMPTS, REAL_REFS, batch_size=4, memory_bytes=1, chunk_bytes=1)
    for total, count in (default, tiny_budget):
        assert count == want_count
        assert total == pytest.approx(want_total, rel=1e-5)


def test_reference_nll_through_a_lora_adapter(real_noisy):
    """A PEFT model (what a registered adapter loads as): hidden states and head reached through the wrapper."""
    import copy

    from peft import LoraConfig, get_peft_model

    model, tok = real_noisy
    prompts, refs = REAL_PROMPTS[:3], REAL_REFS[:3]
    torch.manual_seed(3)
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                           init_lora_weights=False)).eval()
    want_total, want_count = _plain_loss_sum(peft, tok, prompts, refs)
    assert want_total != pytest.approx(_plain_loss_sum(model, tok, prompts, refs)[0], rel=1e-3)  # the adapter matters
    total, count = reference_nll(peft, tok, prompts, refs, batch_size=3, chunk_bytes=1)
    assert count == want_count
    assert total == pytest.approx(want_total, rel=1e-5)


def test_head_never_sees_more_than_a_chunk_of_positions(real_noisy):
    """The LM head's outputs during the loss pass and generation: one position per row, or one loss
    chunk, never the (B, T, vocab) logits of a batch."""
    model, tok = real_noisy
    vocab = model.get_output_embeddings().weight.shape[0]
    shapes: list[tuple] = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    try:
        reference_nll(model, tok, REAL_PROMPTS, REAL_REFS, batch_size=6, chunk_bytes=20 * vocab * 4)
        loss_shapes, shapes[:] = list(shapes), []
        generate_batch(model, tok, REAL_PROMPTS, {"max_new_tokens": 3}, batch_size=6)
        gen_shapes = list(shapes)
    finally:
        hook.remove()
    assert (6, 1, vocab) in loss_shapes  # the forward's own logits: last position only
    chunks = [s for s in loss_shapes if len(s) == 2]
    assert chunks and max(s[0] for s in chunks) == 20 and sum(s[0] for s in chunks) == reference_nll(
        model, tok, REAL_PROMPTS, REAL_REFS, batch_size=6)[1]  # every target once, 20 at a time
    assert gen_shapes == [(6, 1, vocab)] * 3  # prefill and each step: the last position only


def test_generation_batches_bounded_by_bytes(real_noisy, monkeypatch):
    from tasks.evaluate import _shape, batch_bytes

    model, tok = real_noisy
    gen = {"max_new_tokens": 5}
    want = generate_batch(model, tok, REAL_PROMPTS, gen, batch_size=6)
    assert len({o["prediction"] for o in want}) > 1  # replies differ per prompt: the equality below means something

    rows_seen: list[int] = []
    original = type(model).generate
    monkeypatch.setattr(type(model), "generate",
                        lambda self, **kw: (rows_seen.append(kw["input_ids"].shape[0]), original(self, **kw))[1])
    widths = {len(tok(tok.apply_chat_template(p, add_generation_prompt=True, tokenize=False))["input_ids"])
              for p in REAL_PROMPTS}
    assert len(widths) == 1  # equal prompt lengths: every batch needs the same bytes
    two_rows = batch_bytes(_shape(model), 2, widths.pop(), new_tokens=5)
    assert generate_batch(model, tok, REAL_PROMPTS, gen, batch_size=6, memory_bytes=two_rows) == want
    assert rows_seen == [2, 2, 2]
    rows_seen.clear()
    assert generate_batch(model, tok, REAL_PROMPTS, gen, batch_size=6, memory_bytes=1) == want
    assert rows_seen == [1] * 6


def test_eval_peak_rss_on_real_vocab(qwen25_tiny_model_dir, tmp_path):
    """Issue 16.4: 50 BELLE-like rows, batch 25, 4 new tokens on the real vocabulary peaked at 7.3 GB
    (19 GB on longer rows) when the loss pass bounded tokens; bounded by bytes it stays under 2 GB."""
    import subprocess
    import sys

    from tests.files import write_jsonl

    data = write_jsonl(tmp_path / "eval.jsonl", belle_like_eval_rows(50))
    code = (
        "import json, resource, sys\n"
        "from tasks.evaluate import evaluate_model\n"
        "r = evaluate_model(sys.argv[1], sys.argv[2], gen={'max_new_tokens': 4}, batch_size=25)\n"
        "print(json.dumps({'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **r.metrics}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(qwen25_tiny_model_dir), str(data)],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["n"] == 50 and out["loss"] > 0
    print(f"evaluate_model peak RSS: {out['peak_rss_mb']:.0f} MB")
    assert out["peak_rss_mb"] < 2048, out
