"""The pipeline on the real Qwen2.5 vocabulary, with data in the shape users bring (issue 16).

A random-init Qwen2 (hidden 64, 2 layers) on the real 151,665-token vocabulary and chat template
(`qwen25_tiny_model_dir`, tests/realvocab.py), named by its absolute path in the config, goes
through `python -m ftflow.cli run` as the product runs it: convert (ShareGPT `conversations` in
BELLE's human/assistant form, CJK, replies that start with "\\n") → tokenize → 2 DeepSpeed ZeRO-3
ranks for a few steps → consolidate (the export's logits checked against the ranks') → register →
eval (challenger and base), with the peak RSS of the run's own process sampled throughout.
Then `ftflow eval … --batch-size 25 --max-new-tokens 4` on the converted eval file, the command
that peaked at 19 GB before evaluation memory was bounded in bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.files import write_jsonl
from tests.realvocab import needs_real_vocab

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, needs_real_vocab]

RSS_LIMIT_MB = 2048
EVAL_ROWS = 25

QUESTIONS = ["把这句话翻译成英文：{w}", "Reverse the words: {w}", "用一句话解释：{w}", "Repeat after me: {w}"]
WORDS = ["apple river", "stone cloud tiger", "床前明月光", "lemon piano planet", "春眠不觉晓", "forest candle rocket"]


def belle_rows(n: int, prefix: str) -> list[dict]:
    """ShareGPT `conversations` as BELLE writes them (`human` / `assistant`), with a system prompt on
    some rows and a second turn on others; half of the replies start with "\\n" (as 805 of BELLE's
    1,000 dev rows do), some with spaces then "\\n"."""
    rows = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        lead = ["", "\n", "  \n", "\n\n"][i % 4]
        conv = [{"from": "human", "value": QUESTIONS[i % len(QUESTIONS)].format(w=w) + f" ({prefix} {i})"},
                {"from": "assistant", "value": lead + " ".join(reversed(w.split())) + ("。" if i % 3 == 0 else "")}]
        if i % 5 == 4:
            conv += [{"from": "human", "value": "再说一遍"}, {"from": "assistant", "value": "\n" + w}]
        row = {"id": f"{prefix}-{i:03d}", "conversations": conv}
        if i % 6 == 1:
            row["system"] = "You are a helpful assistant. 请简洁回答。"
        rows.append(row)
    return rows


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env["FTFLOW_HOME"] = str(home)
    env["HF_HUB_OFFLINE"] = "1"
    return env


def run_sampling_rss(cmd: list[str], env: dict, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    """Run `cmd`; return its result and the peak RSS (MB) of its own process, sampled every 50 ms.

    The process's own RSS, not its children's: training ranks and the Prefect server are separate
    processes; evaluation runs in this one.
    """
    import psutil

    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0.0]

    def sample() -> None:
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], p.memory_info().rss / 2**20)
            except psutil.Error:
                return
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"{cmd[3:5]} ran past {timeout} s:\n{out[-6000:]}")
    sampler.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, ""), peak[0]


@pytest.fixture(scope="module")
def real_run(qwen25_tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("real-vocab")
    home = root / "home"
    write_jsonl(root / "belle_train.jsonl", belle_rows(48, "train"))
    (root / "belle_eval.json").write_text(json.dumps(belle_rows(EVAL_ROWS, "eval"), ensure_ascii=False, indent=1),
                                          encoding="utf-8")
    config = root / "realvocab.yaml"
    config.write_text(f"""\
# ftflow run realvocab.yaml  (tests/integration/test_real_vocab.py)
name: realvocab
model:
  name_or_path: {qwen25_tiny_model_dir}   # absolute: the real Qwen2.5 vocabulary and template, random init
data:
  train: [belle_train.jsonl]
  eval: [belle_eval.json]
tokenize:
  template: auto
  max_length: 128
train:
  mode: full
  deepspeed: {REPO / "configs" / "deepspeed" / "zero3.json"}
  nproc_per_node: 2
  max_steps: 3
  micro_batch_size: 4
  learning_rate: 1.0e-3
  loss_chunk_tokens: 256   # the ranks' logits at a 151,665-token vocabulary: 0.6 MB a token
  save_steps: 3
  logging_steps: 1
eval:
  batch_size: {EVAL_ROWS}
  mlflow_genai: false
  generation:
    max_new_tokens: 4
registry:
  model_name: ftflow-realvocab
promote:
  metric: char_f1
""", encoding="utf-8")
    summary = root / "summary.json"
    proc, peak_mb = run_sampling_rss(
        [sys.executable, "-m", "ftflow.cli", "run", str(config), "--summary-json", str(summary)], _env(home), timeout=900)
    (root / "run.log").write_text(proc.stdout, encoding="utf-8")
    assert proc.returncode == 0, proc.stdout[-6000:]
    return home, json.loads(summary.read_text()), proc.stdout, peak_mb


def test_run_registers_a_version_with_eval_metrics(real_run):
    home, s, log, _ = real_run
    import mlflow

    assert s["registered_model"] == "ftflow-realvocab" and s["version"] == "1"
    assert s["training"]["world_size"] == 2 and s["training"]["deepspeed_stage"] == 3
    assert s["training"]["global_step"] == 3
    client = mlflow.MlflowClient(s["mlflow_tracking_uri"])
    mv = client.get_model_version("ftflow-realvocab", "1")
    assert mv.run_id
    for side in ("challenger", "champion"):
        m = s["scores"][side]
        assert {"exact_match", "char_f1", "rouge_l", "bleu", "loss", "perplexity", "no_stop_rate"} <= set(m)
        assert m["n"] == EVAL_ROWS and m["loss"] > 0
    # a random init is close to uniform over the real vocabulary: loss ~ ln(151,665) = 11.93
    assert 11.0 < s["scores"]["champion"]["loss"] < 13.0
    run = client.get_run(s["mlflow_run_id"])
    assert run.data.metrics["challenger/n"] == EVAL_ROWS
    assert "ftflow run complete" in log


def test_export_logits_checked_against_the_ranks(real_run):
    _, s, log, _ = real_run
    assert "logits match the in-training reference" in log
    files = {p.name for p in Path(s["model_dir"]).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    config = json.loads((Path(s["model_dir"]) / "config.json").read_text())
    assert config["vocab_size"] == 151665 and config["hidden_size"] == 64


def test_run_converted_belle_rows(real_run):
    home, _, _, _ = real_run
    (eval_file,) = {p.resolve() for p in home.rglob("eval.jsonl")}
    rows = [json.loads(line) for line in eval_file.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == EVAL_ROWS
    assert all(r["messages"][0]["role"] in ("system", "user") and r["messages"][-1]["role"] == "assistant" for r in rows)
    assert rows[1]["messages"][-1]["content"].startswith("\n")  # the reply's own newline is kept


def test_run_eval_peak_rss_is_bounded(real_run):
    *_, peak_mb = real_run
    print(f"peak RSS of the `ftflow run` process: {peak_mb:.0f} MB")
    assert 0 < peak_mb < RSS_LIMIT_MB, f"peak RSS of the `ftflow run` process: {peak_mb:.0f} MB"


def test_ftflow_eval_command_peak_rss(real_run, qwen25_tiny_model_dir):
    """Issue 16.4's command: `ftflow eval --model <tiny model on the real vocab> --data … --batch-size 25
    --max-new-tokens 4`. Peak RSS of the largest process it ran (ru_maxrss of the waited-for tree)."""
    home, *_ = real_run
    (eval_file,) = {p.resolve() for p in home.rglob("eval.jsonl")}
    code = (
        "import resource, subprocess, sys\n"
        "rc = subprocess.run(sys.argv[1:]).returncode\n"
        "print('PEAK_RSS_MB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)\n"
        "sys.exit(rc)\n"
    )
    cmd = [sys.executable, "-c", code, sys.executable, "-m", "ftflow.cli", "eval", "--model", str(qwen25_tiny_model_dir),
           "--data", str(eval_file), "--batch-size", "25", "--max-new-tokens", "4"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(home), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    peak_mb = float(proc.stdout.rsplit("PEAK_RSS_MB", 1)[1].split()[0])
    print(f"peak RSS of `ftflow eval`: {peak_mb:.0f} MB")
    assert peak_mb < RSS_LIMIT_MB, f"peak RSS of `ftflow eval`: {peak_mb:.0f} MB"
