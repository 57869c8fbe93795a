"""The scoring stage: load a model (registry or folder), generate on held-out prompts, score the replies.

Replaces seed 004's loop (one `generate` per prompt, `[/INST]` string splitting) with:
- prompts rendered by the model's own chat template (`messages[:-1]` + generation prompt), the
  reference is the last (assistant) message;
- batched greedy generation with LEFT padding, so every row's next token sits at the same
  position; the pad token is never an end-of-turn token, so a stop is a real stop;
- a stop at eos or end-of-turn (the generation config's eos ids plus the tokenizer's eos); a reply
  that runs into `max_new_tokens` is reported (`stopped=False`, `no_stop_rate`), not silently cut;
- scores per reply (exact match, character F1, ROUGE-L, sentence BLEU) and the teacher-forced
  loss / perplexity of the references given their prompts.
- memory bounded in bytes, not tokens, so a 152k vocabulary costs what a 32k one does: generation
  keeps the logits of the last position only, the loss runs the LM head a chunk of target positions
  at a time (`tasks/loss.py`), and every batch holds no more rows than fit in `EVAL_BATCH_BYTES`.

`python -m bench.bench_inference` compares this batched loop with seed 004's loop.

Metrics are computed here (perplexity needs the model's logits, not only the reply text) and logged
with the per-example table (`log_table`, the run's Artifacts view). The same per-example scores also
go through MLflow's GenAI evaluation API (`log_genai_evaluation`: offline, our own `@scorer`
functions over predictions already made; one trace with assessments per example, ~0.1 s an example
on SQLite; `eval.mlflow_genai: false` skips it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

SCORE_KEYS = ("exact_match", "char_f1", "rouge_l", "bleu")
# Evaluation memory is bounded in bytes, not tokens: with Qwen's 151,936-token vocabulary one position's
# fp32 logits take 0.6 MB, so a token budget that suits a 32k vocabulary needs 19 GB at 152k.
EVAL_BATCH_BYTES = 1 << 30  # activations of one generation or loss batch (KV cache, hidden states, attention)
LOSS_CHUNK_BYTES = 64 << 20  # fp32 logits of one loss chunk: 110 positions at a 151,936-token vocabulary


# --------------------------------------------------------------------------- loading


def load_for_inference(model_ref: str, trust_remote_code: bool = False):
    """(model, tokenizer, local HF folder) for `models:/NAME@ALIAS`, `models:/NAME/VERSION`, a folder or hub id.

    Registry models are downloaded once into the state folder's cache and reassembled into one
    Hugging Face folder (weights or PEFT adapter, + tokenizer). An adapter (a registered LoRA version
    or an adapter folder) is applied to the base its adapter_config.json names (`load_causal_lm`).
    fp32 on CPU; bf16 on CUDA (fp16 where bf16 is missing).
    """
    import torch
    from transformers import AutoTokenizer

    if model_ref.startswith("models:/"):
        local_dir = str(_download_registered(model_ref))
        if not _is_adapter_dir(Path(local_dir)):  # an adapter's base may still come from the hub
            os.environ["HF_HUB_OFFLINE"] = "1"
    else:
        from tasks.base_model import resolve_model_path

        local_dir = resolve_model_path(model_ref)

    if torch.cuda.is_available():
        device, dtype = "cuda", (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    else:
        device, dtype = "cpu", torch.float32
    tokenizer = AutoTokenizer.from_pretrained(local_dir, trust_remote_code=trust_remote_code)
    model = load_causal_lm(local_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    model.to(device).eval()
    return model, tokenizer, local_dir


def _is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def load_causal_lm(path: str, *, dtype, trust_remote_code: bool = False):
    """A causal LM from a model folder or hub id, or base + adapter from a PEFT adapter folder.

    The adapter's base is its adapter_config.json `base_model_name_or_path` (and `revision`):
    `embedded:NAME` is built here, a hub id is fetched (or read from the cache), a folder is used as
    it is. The adapter is applied unmerged, so the model computes exactly base + adapter.
    """
    from transformers import AutoModelForCausalLM

    if not _is_adapter_dir(Path(path)):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    from peft import PeftConfig, PeftModel

    from tasks.base_model import resolve_model_path

    cfg = PeftConfig.from_pretrained(path)
    if not cfg.base_model_name_or_path:
        raise ValueError(f"{path}/adapter_config.json names no base model (base_model_name_or_path)")
    base_path = resolve_model_path(cfg.base_model_name_or_path)
    revision = None if Path(base_path).is_dir() else cfg.revision  # a revision means a hub commit
    log.info("adapter %s on base %s%s", path, cfg.base_model_name_or_path, f"@{revision}" if revision else "")
    base = AutoModelForCausalLM.from_pretrained(base_path, revision=revision, dtype=dtype,
                                                trust_remote_code=trust_remote_code)
    return PeftModel.from_pretrained(base, path)


def _download_registered(model_uri: str) -> Path:
    """Download a registered transformers-flavor model once; return the HF folder inside the copy."""
    import mlflow

    from ftflow.utils import atomic_dir, sha256_json, state_dir
    from infra.local import configure_environment
    from tasks.registry import call_with_retry

    configure_environment()
    client = mlflow.MlflowClient()
    rest = model_uri[len("models:/"):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        mv = call_with_retry(client.get_model_version_by_alias, name, alias)
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        mv = call_with_retry(client.get_model_version, name, version)
    else:
        raise ValueError(f"model {model_uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    # Versions are immutable, and a logged model id is unique across servers: a safe cache key.
    ident = getattr(mv, "model_id", None) or sha256_json([mv.source, mv.run_id])[:16]
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", mv.name)
    cache = state_dir() / "cache" / "registry" / f"{safe}-v{mv.version}-{ident}"
    if not cache.exists():
        log.info("downloading %s (version %s) into %s", model_uri, mv.version, cache)
        with atomic_dir(cache) as tmp:
            call_with_retry(mlflow.artifacts.download_artifacts,
                            artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=str(tmp))
            _assemble_hf_dir(tmp, model_uri)
    return cache / _hf_subdir(_flavor_conf(cache, model_uri))


def _flavor_conf(root: Path, model_uri: str) -> dict:
    import yaml

    mlmodel = root / "MLmodel"
    if not mlmodel.exists():
        raise FileNotFoundError(f"{model_uri}: no MLmodel file in the downloaded artifacts ({root})")
    flavors = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {})
    if "transformers" not in flavors:
        raise ValueError(f"{model_uri} was not logged with the mlflow.transformers flavor "
                         f"(flavors: {sorted(flavors)}); register it with `tasks.registry.register_model`")
    return flavors["transformers"]


def _hf_subdir(conf: dict) -> str:
    """The artifact folder holding the weights: `peft` for an adapter version, `model` otherwise."""
    return conf.get("peft_adaptor") or conf.get("model_binary", "model")


def _assemble_hf_dir(root: Path, model_uri: str) -> None:
    """MLflow stores weights in `model/` (or the adapter in `peft/`), the tokenizer in `components/tokenizer/`: merge them."""
    conf = _flavor_conf(root, model_uri)
    hf = root / _hf_subdir(conf)
    if not (hf / "config.json").exists() and not (hf / "adapter_config.json").exists():
        raise ValueError(f"{model_uri}: neither model weights nor a PEFT adapter in the artifacts (saved with "
                         "save_pretrained=False?); register the export folder with `tasks.registry.register_model`")
    for comp in conf.get("components", []):
        src = root / "components" / comp
        for f in src.iterdir() if src.is_dir() else []:
            if f.is_file():
                shutil.copy2(f, hf / f.name)


# --------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class _Shape:
    """The sizes that set an eval batch's memory, read from the model's config."""

    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_width: int  # key/value heads x head dim
    elem: int  # bytes per activation (the weights' dtype)
    logits_to_keep: bool  # forward() can compute the logits of the last position only


def _shape(model) -> _Shape:
    import inspect

    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = int(cfg.hidden_size)
    heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
    head_dim = int(getattr(cfg, "head_dim", None) or hidden // heads)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel's forward takes **kwargs
    return _Shape(
        vocab=int(model.get_output_embeddings().weight.shape[0]),
        hidden=hidden,
        layers=int(cfg.num_hidden_layers),
        intermediate=int(getattr(cfg, "intermediate_size", None) or 4 * hidden),
        heads=heads,
        kv_width=int(getattr(cfg, "num_key_value_heads", None) or heads) * head_dim,
        elem=next(model.parameters()).element_size(),
        logits_to_keep="logits_to_keep" in inspect.signature(base.forward).parameters,
    )


def batch_bytes(shape: _Shape, rows: int, width: int, *, new_tokens: int = 0, hidden_states: bool = False) -> int:
    """Upper estimate of the activation bytes of one forward (+ `new_tokens` decoding steps) of a (rows, width) batch.

    Per position: the KV cache (layers x 2 x kv_width), one layer's transient activations (q, k, v,
    attention output, residual: ~5 x hidden; gate, up and their product: 3 x intermediate) and, when
    the caller keeps every layer's hidden states (the loss pass), (layers + 1) x hidden. Per row: the
    attention scores and mask, (heads + 1) x width^2 in fp32 (the eager / math kernels materialise
    them). The logits: of the last position only where forward() supports `logits_to_keep` (as
    `generate` and the loss pass ask), else of every position.
    """
    positions = rows * (width + new_tokens)
    per_position = shape.layers * 2 * shape.kv_width + 5 * shape.hidden + 3 * shape.intermediate
    if hidden_states:
        per_position += (shape.layers + 1) * shape.hidden
    logits = rows * (1 if shape.logits_to_keep else width) * shape.vocab
    return (positions * per_position * shape.elem + rows * (shape.heads + 1) * width * width * 4
            + logits * (shape.elem + 2 * 4))  # the logits, their fp32 copy and the processed scores


def _rows_that_fit(shape: _Shape, width: int, limit: int, budget: int, **kw) -> int:
    """The most rows (<= limit, >= 1) of `width` positions whose batch fits in `budget` bytes."""
    rows = 1
    while rows < limit and batch_bytes(shape, rows + 1, width, **kw) <= budget:
        rows += 1
    return rows


# --------------------------------------------------------------------------- generation


def _prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # The template already holds any BOS / special tokens; adding them again would double them.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stop_token_ids(model, tokenizer) -> list[int]:
    """End-of-sequence and end-of-turn ids: the generation config's eos ids plus the tokenizer's eos."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for x in ([gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])) + [tokenizer.eos_token_id]:
        if x is not None and x not in ids:
            ids.append(int(x))
    if not ids:
        raise ValueError("the model has no eos token (generation_config.eos_token_id and tokenizer.eos_token "
                         "are unset); generation could never stop")
    return ids


def _pad_id(tokenizer, stop_ids: list[int]) -> int:
    # Left pads are masked out of attention, so any id works for inference; a real pad token is
    # preferred so that a pad can never be mistaken for a generated stop.
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]


def _generation(gen: dict | None):
    """The validated generation settings (unknown keys are rejected with the valid ones named)."""
    from ftflow.config import GenerationConfigModel

    return GenerationConfigModel.model_validate(gen or {})


def _generate_kwargs(gen: dict, stop_ids: list[int], pad_id: int) -> dict[str, Any]:
    g = _generation(gen)
    kw: dict[str, Any] = dict(
        max_new_tokens=g.max_new_tokens,
        do_sample=g.do_sample,
        num_beams=1,
        repetition_penalty=g.repetition_penalty,
        no_repeat_ngram_size=g.no_repeat_ngram_size,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
    )
    if g.do_sample:
        kw.update(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k)
    return kw


def _finish(new_ids: list[int], stop: set[int], tokenizer) -> dict:
    """Cut a row's new tokens at the first stop id. `new_tokens` counts the stop token itself."""
    for j, t in enumerate(new_ids):
        if t in stop:
            return {"prediction": tokenizer.decode(new_ids[:j], skip_special_tokens=True).strip(),
                    "stopped": True, "new_tokens": j + 1}
    return {"prediction": tokenizer.decode(new_ids, skip_special_tokens=True).strip(),
            "stopped": False, "new_tokens": len(new_ids)}


def generate_batch(model, tokenizer, prompts_messages: list[list[dict]], gen: dict, batch_size: int,
                   memory_bytes: int = EVAL_BATCH_BYTES,
                   on_progress: Callable[[int, int], None] | None = None) -> list[dict]:
    """Replies to chat prompts, at most `batch_size` at a time, in input order; `on_progress(done,
    total)` after each batch.

    Prompts are grouped by length (longest first) so a batch wastes little on padding, and left
    padded so generation continues from the same position in every row. A batch also holds no more
    rows than fit in `memory_bytes` (`batch_bytes`: KV cache, activations, and the logits of the
    last position only, which is all transformers' `generate` computes where the model's forward()
    takes `logits_to_keep`). Returns per prompt
    {"prediction": str, "stopped": bool (False: hit max_new_tokens), "new_tokens": int}.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stop_ids = stop_token_ids(model, tokenizer)
    pad_id = _pad_id(tokenizer, stop_ids)
    kw = _generate_kwargs(gen, stop_ids, pad_id)
    if kw["do_sample"]:  # same seed, prompts and batch size -> the same samples
        torch.manual_seed(_generation(gen).seed)
    stop = set(stop_ids)
    ids = [_prompt_ids(tokenizer, m) for m in prompts_messages]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out: list[dict | None] = [None] * len(ids)
    device = next(model.parameters()).device
    shape = _shape(model)
    start = 0
    while start < len(order):
        width = len(ids[order[start]])  # the longest of this batch
        size = _rows_that_fit(shape, width, batch_size, memory_bytes, new_tokens=kw["max_new_tokens"])
        rows = order[start:start + size]
        start += size
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            n = len(ids[i])
            input_ids[r, width - n:] = torch.tensor(ids[i])
            attention[r, width - n:] = 1
        with torch.inference_mode():
            seqs = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kw)
        new = seqs[:, width:].tolist()  # (B, new tokens); finished rows are filled with pad_id
        for r, i in enumerate(rows):
            out[i] = _finish(new[r], stop, tokenizer)
        if on_progress:
            on_progress(min(start, len(order)), len(order))  # `start` is already past this batch
    return out  # type: ignore[return-value]


def reference_nll(model, tokenizer, prompts_messages: list[list[dict]], references: list[str],
                  batch_size: int, memory_bytes: int = EVAL_BATCH_BYTES,
                  chunk_bytes: int = LOSS_CHUNK_BYTES) -> tuple[float, int]:
    """(sum of token NLLs, token count) of each reference + end of turn, teacher-forced after its prompt.

    The target is the chat template's rendering of the assistant turn, cut after its first stop
    token (so template whitespace after end-of-turn is not scored).

    Memory is bounded in bytes: a batch holds no more rows than fit in `memory_bytes`, the model
    returns its final hidden states (and the logits of one position only), and the LM head and
    cross-entropy run on the target positions `chunk_bytes` of fp32 logits at a time
    (`tasks.loss.chunked_causal_lm_loss`, the loss training uses), so the (B, T, vocab) logits
    never exist. Prompt positions never reach the head.
    """
    import torch

    from tasks.loss import chunked_causal_lm_loss

    stop = set(stop_token_ids(model, tokenizer))
    pad_id = _pad_id(tokenizer, sorted(stop))
    samples = []
    for msgs, ref in zip(prompts_messages, references):
        p = _prompt_ids(tokenizer, msgs)
        full_text = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": ref}], tokenize=False)
        full = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        if full[:len(p)] == p:
            target = full[len(p):]
        else:  # templates that render the last turn differently: fall back to reply + eos
            target = tokenizer(ref, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id or sorted(stop)[0]]
        cut = next((j for j, t in enumerate(target) if t in stop), None)
        target = target[:cut + 1] if cut is not None else target
        samples.append((p, target))

    shape = _shape(model)
    head = model.get_output_embeddings()
    chunk_tokens = max(1, chunk_bytes // (shape.vocab * 4))
    extra = {"output_hidden_states": True}
    if shape.logits_to_keep:
        extra["logits_to_keep"] = 1
    order = sorted(range(len(samples)), key=lambda i: -(len(samples[i][0]) + len(samples[i][1])))
    device = next(model.parameters()).device
    total, count, start = 0.0, 0, 0
    while start < len(order):
        width = len(samples[order[start]][0]) + len(samples[order[start]][1])  # longest of this batch
        size = _rows_that_fit(shape, width, batch_size, memory_bytes, hidden_states=True)
        rows = order[start:start + size]
        start += size
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T), right padded
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            p, t = samples[i]
            seq = p + t
            input_ids[r, :len(seq)] = torch.tensor(seq)
            labels[r, len(p):len(seq)] = torch.tensor(t)
            attention[r, :len(seq)] = 1
        with torch.inference_mode():
            out = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), **extra)
            hidden = out.hidden_states[-1]  # (B, T, H), after the final norm
            del out  # the other layers' hidden states
            # token t predicts token t+1; num_items_in_batch=1 makes it the sum
            nll = chunked_causal_lm_loss(hidden, head, labels.to(device), chunk_tokens, num_items_in_batch=1)
        total += float(nll)
        count += int((labels[:, 1:] != -100).sum())
    return total, count


# --------------------------------------------------------------------------- scores

_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\u3000-\u303f\uff00-\uffef]")


def _is_cjk(text: str) -> bool:
    return bool(_CJK.search(text))


def _f1(pred: list, ref: list) -> float:
    if not pred and not ref:
        return 1.0
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)


def _lcs(a: list, b: list) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def score(prediction: str, reference: str) -> dict[str, float]:
    """Scores of one reply against its reference, all after stripping surrounding whitespace.

    - exact_match: 1.0 or 0.0;
    - char_f1: F1 of the multisets of non-space characters (robust for CJK, where words are unmarked);
    - rouge_l: LCS F1 over characters for CJK text, over whitespace words otherwise;
    - bleu: sacrebleu sentence BLEU on its usual 0-100 scale, tokenize="zh" for CJK text.
    """
    import sacrebleu

    p, r = prediction.strip(), reference.strip()
    cjk = _is_cjk(r) or _is_cjk(p)
    p_chars = [c for c in p if not c.isspace()]
    r_chars = [c for c in r if not c.isspace()]
    p_tok, r_tok = (p_chars, r_chars) if cjk else (p.split(), r.split())
    if not p_tok and not r_tok:
        rouge = 1.0
    elif not p_tok or not r_tok:
        rouge = 0.0
    else:
        lcs = _lcs(p_tok, r_tok)
        rouge = 0.0 if lcs == 0 else 2 * lcs / (len(p_tok) + len(r_tok))  # F1 of P=lcs/|p|, R=lcs/|r|
    bleu = sacrebleu.sentence_bleu(p, [r], tokenize="zh" if cjk else "13a").score
    return {"exact_match": float(p == r), "char_f1": _f1(p_chars, r_chars), "rouge_l": rouge, "bleu": float(bleu)}


# --------------------------------------------------------------------------- evaluation


@dataclass
class EvalResult:
    metrics: dict[str, float]
    rows: list[dict] = field(default_factory=list)


def read_eval_jsonl(path: str | Path, max_samples: int | None = None) -> list[dict]:
    """Canonical eval rows ({"id", "messages", ...}) whose last message is the assistant reference."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"eval data {path} does not exist")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            msgs = row.get("messages") if isinstance(row, dict) else None
            if not msgs or not isinstance(msgs, list) or len(msgs) < 2:
                raise ValueError(f"{path}:{lineno}: expected a 'messages' list with a prompt and a reply")
            if not all(isinstance(m, dict) and isinstance(m.get("content", ""), str) for m in msgs):
                raise ValueError(f"{path}:{lineno}: every message must be {{'role': ..., 'content': str}}")
            if msgs[-1].get("role") != "assistant":
                raise ValueError(f"{path}:{lineno}: the last message must be the assistant reference, "
                                 f"got role {msgs[-1].get('role')!r}")
            rows.append({"id": str(row.get("id", f"{path.name}:{lineno}")), "messages": msgs})
            if max_samples is not None and len(rows) >= max_samples:
                break
    if not rows:
        raise ValueError(f"eval data {path} holds no samples")
    return rows


def evaluate_model(model_ref: str, eval_jsonl: str | Path, *, gen: dict, batch_size: int = 32,
                   max_samples: int | None = None, trust_remote_code: bool = False,
                   on_progress: Callable[[int, int], None] | None = None) -> EvalResult:
    """Generate a reply for every eval prompt, score it, and compute the references' perplexity.
    `on_progress(done, total)` follows the generation, a batch at a time."""
    data = read_eval_jsonl(eval_jsonl, max_samples)
    model, tokenizer, _ = load_for_inference(model_ref, trust_remote_code=trust_remote_code)
    prompts = [r["messages"][:-1] for r in data]
    refs = [str(r["messages"][-1].get("content", "")) for r in data]

    t0 = time.perf_counter()
    outs = generate_batch(model, tokenizer, prompts, gen, batch_size, on_progress=on_progress)
    gen_s = time.perf_counter() - t0
    nll, ntok = reference_nll(model, tokenizer, prompts, refs, batch_size)

    rows = []
    for r, msgs, ref, o in zip(data, prompts, refs, outs):
        rows.append({
            "id": r["id"],
            "prompt": tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
            "reference": ref,
            "prediction": o["prediction"],
            **score(o["prediction"], ref),
            "stopped": o["stopped"],
            "new_tokens": o["new_tokens"],
        })
    n = len(rows)
    loss = nll / max(ntok, 1)
    metrics = {k: sum(row[k] for row in rows) / n for k in SCORE_KEYS}
    metrics.update(
        loss=loss,
        perplexity=math.exp(min(loss, 50.0)),  # capped: exp overflows past ~709 and means "random" anyway
        no_stop_rate=sum(not row["stopped"] for row in rows) / n,
        n=float(n),
        samples_per_s=n / gen_s if gen_s > 0 else float("inf"),
    )
    log.info("eval %s on %s: %s", model_ref, eval_jsonl, {k: round(v, 4) for k, v in metrics.items()})
    return EvalResult(metrics=metrics, rows=rows)


def log_eval_to_mlflow(result: EvalResult, run_id: str, prefix: str) -> None:
    """Metrics as `{prefix}/{name}` and the per-example table as `eval/{prefix}_table.json` in run `run_id`."""
    import mlflow
    import pandas as pd
    from mlflow.entities import Metric

    from infra.local import configure_environment
    from tasks.registry import call_with_retry

    configure_environment()
    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    metrics = [Metric(f"{prefix}/{k}", float(v), now, 0) for k, v in result.metrics.items()]
    call_with_retry(client.log_batch, run_id, metrics=metrics)
    artifact = f"eval/{prefix}_table.json"
    # log_table appends to an existing file; a re-run of the same scoring must not double the rows.
    existing = {a.path for a in call_with_retry(client.list_artifacts, run_id, "eval")}
    if artifact in existing:
        log.info("run %s already has %s; table not logged again", run_id, artifact)
        return
    call_with_retry(client.log_table, run_id, data=pd.DataFrame(result.rows), artifact_file=artifact)


def log_genai_evaluation(result: EvalResult, run_id: str) -> None:
    """The per-example scores through MLflow's GenAI evaluation API, in run `run_id`.

    Works offline: the predictions are already made, so `mlflow.genai.evaluate` gets them as
    `outputs` and code scorers (no LLM judge) that compute ftflow's own scores. Each example
    becomes a trace with its assessments, browsable in the run's Traces / Evaluations tabs, and
    the run gets `<score>/mean` metrics beside ftflow's.
    """
    import mlflow
    from mlflow.genai.scorers import scorer

    from infra.local import configure_environment
    from tasks.registry import _InRun

    configure_environment()

    def make(key: str):
        return scorer(name=key)(lambda outputs, expectations: score(outputs, expectations["expected_response"])[key])

    data = [{"inputs": {"prompt": row["prompt"]}, "outputs": row["prediction"],
             "expectations": {"expected_response": row["reference"]}} for row in result.rows]
    # SQLite serialises writers: MLflow's 10 scoring threads made 100 examples take 155 s, one takes
    # 10 s. For this call only, and only if the user has not chosen a number.
    one_worker = mlflow.get_tracking_uri().startswith("sqlite:") and "MLFLOW_GENAI_EVAL_MAX_WORKERS" not in os.environ
    t0 = time.perf_counter()
    try:
        if one_worker:
            os.environ["MLFLOW_GENAI_EVAL_MAX_WORKERS"] = "1"
        # The tracer provider binds to the tracking store it first saw; rebind it to the current one.
        mlflow.tracing.reset()
        with _InRun(run_id):
            mlflow.genai.evaluate(data=data, scorers=[make(key) for key in SCORE_KEYS])
    except Exception as err:  # the scores and the table are logged already; this view is extra
        log.warning("MLflow GenAI evaluation of run %s failed (%s: %s); the eval table and metrics are "
                    "logged, only the per-example traces are missing", run_id, type(err).__name__, err)
        return
    finally:
        if one_worker:
            del os.environ["MLFLOW_GENAI_EVAL_MAX_WORKERS"]
    log.info("MLflow GenAI evaluation: %d assessed traces in run %s (%.1f s)", len(data), run_id, time.perf_counter() - t0)


def scored_inference_run(model_ref: str, eval_jsonl: str | Path, *, gen: dict, batch_size: int,
                         max_samples: int | None, experiment_id: str, run_name: str,
                         tags: dict[str, str] | None = None, trust_remote_code: bool = False,
                         record: bool = True) -> dict[str, Any]:
    """A standalone scored inference run: one MLflow run holding what was scored, how, and the scores.

    Params: model ref, data file and its sha256, batch size, max samples, generation settings.
    Tags: lineage (git commit, library versions) plus the resolved registry version. Metrics
    `eval/*` and the per-example table `eval/eval_table.json`. When `model_ref` is a registered
    version and `record`, the version is tagged as scored by this run (what `ftflow promote` needs).
    """
    from ftflow.config import GenerationConfigModel
    from ftflow.utils import sha256_file
    from tasks.lineage import end_run, start_parent_run
    from tasks.registry import record_eval, resolve_version

    g = GenerationConfigModel.model_validate(gen or {}).model_dump()
    if not Path(eval_jsonl).is_file():
        raise FileNotFoundError(f"eval data {eval_jsonl} does not exist; pass a canonical JSONL file "
                                "(`ftflow convert` writes one)")
    resolved = resolve_version(model_ref)  # pins an alias to the version it points at now
    data_sha = sha256_file(eval_jsonl)
    run_tags = {"ftflow.model_ref": model_ref, "ftflow.eval_data_sha256": data_sha, **(tags or {})}
    if resolved:
        run_tags.update({"ftflow.model_name": resolved[0], "ftflow.model_version": resolved[1]})
    params = {"model": model_ref, "data": str(eval_jsonl), "data_sha256": data_sha, "batch_size": batch_size,
              "max_samples": max_samples, "generation": g}
    run_id = start_parent_run(experiment_id, run_name, params, tags=run_tags)
    try:
        # score the pinned version, so a concurrent alias move cannot mix two models in one run
        ref = f"models:/{resolved[0]}/{resolved[1]}" if resolved else model_ref
        result = evaluate_model(ref, eval_jsonl, gen=g, batch_size=batch_size, max_samples=max_samples,
                                trust_remote_code=trust_remote_code)
        log_eval_to_mlflow(result, run_id, "eval")
        log_genai_evaluation(result, run_id)
        if resolved and record:
            record_eval(resolved[0], resolved[1], run_id, result.metrics)
    except BaseException:
        end_run(run_id, "FAILED")
        raise
    end_run(run_id)
    return {"run_id": run_id, "model_ref": model_ref, "model_version": resolved, "metrics": result.metrics,
            "rows": result.rows, "data_sha256": data_sha, "recorded": bool(resolved and record)}


# --------------------------------------------------------------------------- CLI


def generate_cli(model: str, prompt: str, max_new_tokens: int, system: str | None) -> int:
    """`ftflow generate --model REF "prompt"`: stream one chat reply to stdout."""
    import torch
    from transformers import TextStreamer

    from infra.local import configure_environment

    configure_environment()
    m, tokenizer, _ = load_for_inference(model)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    stop_ids = stop_token_ids(m, tokenizer)
    ids = torch.tensor([_prompt_ids(tokenizer, messages)], device=next(m.parameters()).device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode():
        out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                         **_generate_kwargs({"max_new_tokens": max_new_tokens}, stop_ids, _pad_id(tokenizer, stop_ids)))
    if not set(out[0, ids.shape[1]:].tolist()) & set(stop_ids):
        sys.stderr.write(f"[stopped at max_new_tokens={max_new_tokens}]" + "\n")
    return 0
