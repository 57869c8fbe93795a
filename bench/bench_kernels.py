"""Speed levers beyond batching, measured side by side before adopting any (a benchmark, not a test).

    python -m bench.bench_kernels                 # every part, 3 repeats
    python -m bench.bench_kernels --parts loss --repeats 5

Issue #8 names compiled kernels, fused loss and lower precision as ways to go beyond the batching
the worker already picks. Each part runs its variants in their own forked processes (so peak RSS
is theirs), interleaved repeat by repeat, on the same inputs, and checks that the variant computes
the same thing before its speed counts:

- compile: one training step (forward, backward, AdamW) of bench_train's 4-layer, 256-wide Qwen2
  on the worker's batches (packed rows of 8 samples of issue #8's workload, per-sample attention),
  eager vs `torch.compile(model.model, dynamic=True)` (inductor, a fresh cache; the per-sample
  attention stays eager: its loop over samples is data-dependent and breaks the graph). Figures: the
  first step (compilation), the median of the later steps, the losses of both (must agree), and the
  steps needed to earn the compilation back.
- loss: the LM head and cross-entropy of a Qwen2.5-0.5B-shaped model (hidden 896, vocabulary
  151,936) on one packed micro-batch (2,048 tokens, a third of them prompt), forward + backward:
  transformers' `ForCausalLMLoss` (all logits at once, upcast to fp32) vs ftflow's
  `tasks.loss.chunked_causal_lm_loss` (`train.loss_chunk_tokens`: the head and the loss one chunk of
  trained tokens at a time under activation checkpointing, prompt positions skipped). Figures:
  seconds, peak RSS above the inputs, the loss and the gradients of both (must agree).
- bf16: the compile part's training step in fp32 vs under CPU bf16 autocast (the machine has
  avx512_bf16): step time and the loss difference.

Results go to bench/results/kernels.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "kernels.json"
PARTS = ("compile", "loss", "bf16")
QWEN_HEAD = dict(hidden=896, vocab=151_936)


def _peak_rss_reset() -> float:
    """Reset the kernel's peak-RSS mark (Linux clear_refs 5); returns the current RSS in MB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _rss()[0]


def _rss() -> tuple[float, float]:
    """(current RSS, peak RSS since the last reset), MB."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def in_child(fn, *args):
    """fn(*args) in a forked process; returns its result (or raises its error here)."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)

    def target(conn):
        try:
            conn.send(("ok", fn(*args)))
        except BaseException as err:  # report, never hang the parent
            import traceback

            conn.send(("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()[-1500:]}"))
        conn.close()

    p = ctx.Process(target=target, args=(child,), daemon=True)
    p.start()
    child.close()
    status, value = parent.recv()
    p.join()
    if status == "error":
        raise RuntimeError(value)
    return value


# ---------------------------------------------------------------------------------------------
# compile / bf16: the worker's training step


def packed_batches(samples: int, tmp: Path) -> list[dict]:
    """bench_train's data, batched as the worker batches it (8 samples a packed row)."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from bench.bench_train import MICRO
    from bench.workload import embedded_model_dir, generate, tokens_per_word
    from tasks.collate import PackedCollator
    from tasks.tokenize import tokenize_dataset

    model_dir = embedded_model_dir()
    generate(tmp / "train.jsonl", samples, tokens_per_word(AutoTokenizer.from_pretrained(model_dir)))
    data = load_from_disk(str(tokenize_dataset(tmp / "train.jsonl", model_dir, cache_root=tmp / "cache", max_length=1024,
                                               length_policy="truncate").path))
    rows = [data[i] for i in range(len(data))]
    collate = PackedCollator()
    return [dict(collate(rows[i:i + MICRO])) for i in range(0, len(rows) - MICRO + 1, MICRO)]


def train_steps(batches: list[dict], variant: str, threads: int) -> dict:
    """Training steps on `batches` with one variant: eager, compiled or bf16."""
    import torch

    from bench.bench_train import MODEL_SHAPE, SCHEDULE
    from tasks.collate import register_packed_attention
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)  # every variant starts from the same weights
    cfg = Qwen2Config(vocab_size=640, pad_token_id=0, eos_token_id=2, **MODEL_SHAPE)
    cfg._attn_implementation = register_packed_attention()
    model = Qwen2ForCausalLM(cfg)
    model.config.use_cache = False
    if variant == "compiled":
        # A fresh inductor cache: the first step pays the whole compilation, as a first run does.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="ftflow-bench-inductor-")
        model.model = torch.compile(model.model, dynamic=True)
    opt = torch.optim.AdamW(model.parameters(), lr=SCHEDULE["learning_rate"])
    times, losses = [], []
    for b in batches:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16"):
            loss = model(input_ids=b["input_ids"], position_ids=b["position_ids"], labels=b["labels"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    tokens = sum(int(b["input_ids"].numel()) for b in batches[1:])
    return {"first_step_s": times[0], "step_s": statistics.median(times[1:]), "tokens_per_s": tokens / sum(times[1:]),
            "losses": losses, "peak_rss_mb": _rss()[1]}


# ---------------------------------------------------------------------------------------------
# loss: all logits at once vs chunked


def head_inputs(tokens: int, seed: int = 0):
    """(1, T, H) hidden states, a (V, H) head and (1, T) labels, a third of them prompt (-100)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, tokens, QWEN_HEAD["hidden"], generator=g)
    head = torch.nn.Linear(QWEN_HEAD["hidden"], QWEN_HEAD["vocab"], bias=False)
    head.weight.data = torch.randn(QWEN_HEAD["vocab"], QWEN_HEAD["hidden"], generator=g) * 0.02
    labels = torch.randint(0, QWEN_HEAD["vocab"], (1, tokens), generator=g)
    labels[torch.rand(1, tokens, generator=g) < 1 / 3] = -100
    return hidden, head, labels


def head_loss(tokens: int, variant: str, chunk: int, threads: int) -> dict:
    """Forward + backward of LM head + cross-entropy over `tokens` positions: transformers'
    ForCausalLMLoss on all logits, or ftflow's `tasks.loss.chunked_causal_lm_loss`."""
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    from tasks.loss import chunked_causal_lm_loss

    torch.set_num_threads(threads)
    hidden, head, labels = head_inputs(tokens)
    hidden.requires_grad_(True)
    base = _peak_rss_reset()
    t0 = time.perf_counter()
    if variant == "full":
        loss = ForCausalLMLoss(head(hidden), labels, vocab_size=QWEN_HEAD["vocab"])
    else:
        loss = chunked_causal_lm_loss(hidden, head, labels, chunk)
    loss.backward()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_over_inputs_mb": _rss()[1] - base, "loss": float(loss.detach()),
            "grad_hidden_abs": hidden.grad.abs().double().sum().item(),
            "grad_weight_abs": head.weight.grad.abs().double().sum().item(),
            "grad_sample": hidden.grad[0, :4, :4].tolist()}


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=120, help="training samples for compile/bf16 (8 a step)")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens of the loss part's micro-batch")
    ap.add_argument("--chunk", type=int, default=512, help="tokens a chunk in the chunked loss")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if set(parts) - set(PARTS):
        ap.error(f"unknown --parts {sorted(set(parts) - set(PARTS))}; choose from {PARTS}")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the children are forked
    import logging

    logging.basicConfig(level=logging.WARNING)
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)  # never start OpenMP in the parent: forked children would hang in it
    t_start = time.perf_counter()
    result: dict = {"command": f"python -m bench.bench_kernels --parts {','.join(parts)} --repeats {args.repeats}",
                    "repeats": args.repeats, "threads": args.threads}
    lines: list[str] = []

    if "compile" in parts or "bf16" in parts:
        with tempfile.TemporaryDirectory(prefix="ftflow-bench-kernels-") as tmp:
            batches = packed_batches(args.samples, Path(tmp))
        variants = ["eager"] + [v for v, p in (("compiled", "compile"), ("bf16", "bf16")) if p in parts]
        runs = {v: [] for v in variants}
        for _ in range(args.repeats):
            for v in variants:
                runs[v].append(in_child(train_steps, batches, v, args.threads))
        med = {v: {k: statistics.median(r[k] for r in rs) for k in ("first_step_s", "step_s", "tokens_per_s", "peak_rss_mb")}
               for v, rs in runs.items()}
        eager_losses = runs["eager"][0]["losses"]
        tokens = sum(int(b["input_ids"].numel()) for b in batches)
        result["train_step"] = {"steps": len(batches), "tokens": tokens, "median": med,
                                "step_s_runs": {v: [round(r["step_s"], 4) for r in rs] for v, rs in runs.items()},
                                "losses": {v: rs[0]["losses"] for v, rs in runs.items()}}
        lines += [f"training step, bench_train's model, {len(batches)} packed steps ({tokens:,} tokens), "
                  f"median of {args.repeats}", "",
                  f"{'variant':<10}{'first step s':>13}{'later step s':>13}{'tokens/s':>10}{'peak RSS MB':>12}"
                  f"{'max |loss - eager|':>20}"]
        for v in variants:
            diff = max(abs(a - b) for a, b in zip(runs[v][0]["losses"], eager_losses))
            m = med[v]
            lines.append(f"{v:<10}{m['first_step_s']:>13.2f}{m['step_s']:>13.3f}{m['tokens_per_s']:>10,.0f}"
                         f"{m['peak_rss_mb']:>12,.0f}{diff:>20.2e}")
            result["train_step"].setdefault("max_abs_loss_diff_vs_eager", {})[v] = diff
        if "compiled" in med:
            gain = med["eager"]["step_s"] - med["compiled"]["step_s"]
            cost = med["compiled"]["first_step_s"] - med["eager"]["first_step_s"]
            result["train_step"]["compile_break_even_steps"] = round(cost / gain) if gain > 0 else None
            steps = result["train_step"]["compile_break_even_steps"]
            lines.append(f"compile: {med['eager']['step_s'] / med['compiled']['step_s']:.2f}x a step after {cost:.0f} s of "
                         f"compilation: " + (f"pays off after {steps} steps" if steps else "never pays off here"))
        if "bf16" in med:
            lines.append(f"bf16 autocast: {med['eager']['step_s'] / med['bf16']['step_s']:.2f}x a step")
        lines.append("")

    if "loss" in parts:
        runs = {"full": [], "chunked": []}
        for _ in range(args.repeats):
            for v in runs:
                runs[v].append(in_child(head_loss, args.tokens, v, args.chunk, args.threads))
        med = {v: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_over_inputs_mb")} for v, rs in runs.items()}
        f, c = runs["full"][0], runs["chunked"][0]
        agree = {"loss": abs(f["loss"] - c["loss"]),
                 "grad_hidden_rel": abs(f["grad_hidden_abs"] - c["grad_hidden_abs"]) / f["grad_hidden_abs"],
                 "grad_weight_rel": abs(f["grad_weight_abs"] - c["grad_weight_abs"]) / f["grad_weight_abs"],
                 "grad_sample_max_abs": max(abs(a - b) for ra, rb in zip(f["grad_sample"], c["grad_sample"]) for a, b in zip(ra, rb))}
        result["loss"] = {"tokens": args.tokens, "chunk": args.chunk, **QWEN_HEAD, "median": med, "agreement": agree,
                          "seconds_runs": {v: [round(r["seconds"], 2) for r in rs] for v, rs in runs.items()}}
        lines += [f"LM head + cross-entropy, Qwen2.5-0.5B head ({QWEN_HEAD['hidden']} x {QWEN_HEAD['vocab']:,}), "
                  f"{args.tokens:,} tokens, forward + backward, median of {args.repeats}", "",
                  f"{'variant':<22}{'seconds':>9}{'peak RSS over inputs MB':>25}"]
        for v in runs:
            name = v if v == "full" else f"chunked ({args.chunk})"
            lines.append(f"{name:<22}{med[v]['seconds']:>9.2f}{med[v]['peak_over_inputs_mb']:>25,.0f}")
        lines.append(f"chunked vs full: {med['full']['seconds'] / med['chunked']['seconds']:.2f}x speed, "
                     f"{med['chunked']['peak_over_inputs_mb'] / med['full']['peak_over_inputs_mb']:.2f}x peak memory; "
                     f"|loss diff| {agree['loss']:.1e}, gradient rel. diff {agree['grad_hidden_rel']:.1e}")

    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    result["load_average"] = os.getloadavg()
    result["machine"] = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                         "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    lines.append(f"\nload average {os.getloadavg()[0]:.1f}, {result['wall_s']:.0f} s; written to {args.out}")
    print("\n".join(lines))  # the benchmark's report is its output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
