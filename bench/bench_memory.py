"""Peak host memory of the export path on a locally built ~170M-parameter model (a benchmark; the
bound itself is asserted by tests/integration/test_memory_bounds.py, which uses these functions).

    python -m bench.bench_memory                       # 170M parameters, 32 MiB output shards
    python -m bench.bench_memory --shard-mib 64 --layers 24

Three steps, each in a fresh process so its peak RSS is its own; the figure reported is the peak
RSS (VmHWM) minus the RSS after every library the step uses is imported:
- consolidate: a LoRA run's adapter export (`consolidate(..., merge=False)`);
- merge: the same run merged into the base and written as bf16 shards (`merge=True`);
- register: the merged export logged and registered in MLflow (SQLite store) from its folder;
- register_adapter: the adapter export registered (still loads the base once: recorded, not bounded).
A whole-model approach needs at least the fp32 model (4 bytes a parameter); these stay near a few
output shards plus the largest tensor in fp32. Results go to bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "memory.json"
REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20


def build_base(out: Path, *, hidden: int = 1024, layers: int = 12, vocab: int = 8192, intermediate: int = 2816,
               tokenizer_from: str | None = None) -> dict:
    """A random-init Qwen2 saved as fp32 safetensors shards of 100 MB (untied head); its sizes."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from tasks.base_model import resolve_model_path

    config = Qwen2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                         intermediate_size=intermediate, vocab_size=vocab, tie_word_embeddings=False,
                         max_position_embeddings=512)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(out, max_shard_size="100MB")
    AutoTokenizer.from_pretrained(tokenizer_from or resolve_model_path("embedded:tiny-qwen2")).save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() for p in model.parameters()) * 4
    return {"parameters": params, "fp32_bytes": params * 4, "largest_tensor_fp32_bytes": largest}


def build_lora_run(base: Path, final: Path, r: int = 8, precision: str = "bf16") -> None:
    """What a LoRA run without DeepSpeed leaves in final/: the adapter (random B, so the merge
    changes every targeted weight), its config and the training summary naming the precision."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from tasks.train_worker import COMPLETE_MARKER

    with torch.device("meta"):  # only the adapter is real; it is saved by peft like a run's final/
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    for name, p in list(model.named_parameters()):
        if "lora_" in name:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, torch.nn.Parameter(torch.randn(p.shape) * 0.02))
    model.save_pretrained(final)
    (final / "train_summary.json").write_text(json.dumps({"precision": precision, "mode": "lora"}))
    (final / COMPLETE_MARKER).write_text("{}")


_STEP = r"""
import json, os, sys
import psutil, torch, transformers, peft, safetensors.torch, mlflow, mlflow.transformers
from tasks.consolidate import consolidate
from tasks.registry import register_model
step, base, final, out, shard, tracking = sys.argv[1:7]
rss0 = psutil.Process().memory_info().rss
if step == "register":
    mlflow.set_tracking_uri(tracking)
    client = mlflow.MlflowClient()
    known = client.get_experiment_by_name("memory")
    exp = known.experiment_id if known else client.create_experiment("memory")
    run_id = client.create_run(exp).info.run_id
    register_model(out, model_name="memory", run_id=run_id, fingerprint=os.path.basename(out), tags={})
else:
    consolidate(final, base, out, mode="lora", merge=step == "merge", max_shard_bytes=int(shard))
# VmHWM: this process image's own high-water mark (ru_maxrss would carry the parent's across exec)
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"baseline_rss": rss0, "peak_rss": peak, "delta": peak - rss0}))
"""


def measure(step: str, base: Path, final: Path, out: Path, shard_bytes: int, tracking: str = "") -> dict:
    """Run one step in a fresh process; its RSS figures in bytes."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", _STEP, step, str(base), str(final), str(out), str(shard_bytes), tracking],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{step} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(root: Path, shard_bytes: int, **shape) -> dict:
    sizes = build_base(root / "base", **shape)
    build_lora_run(root / "base", root / "final")
    figures = {"model": sizes, "shard_bytes": shard_bytes}
    figures["consolidate"] = measure("consolidate", root / "base", root / "final", root / "adapter", shard_bytes)
    figures["merge"] = measure("merge", root / "base", root / "final", root / "merged", shard_bytes)
    figures["register"] = measure("register", root / "base", root / "final", root / "merged", shard_bytes,
                                  f"sqlite:///{root / 'mlflow.db'}")
    # an adapter version still loads base + adapter once (MLflow's PEFT logging needs the model): recorded, not bounded
    figures["register_adapter"] = measure("register", root / "base", root / "final", root / "adapter", shard_bytes,
                                          f"sqlite:///{root / 'mlflow.db'}")
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shard-mib", type=int, default=32)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=1024)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ftflow-bench-memory-") as tmp:
        figures = run(Path(tmp), a.shard_mib * MIB, layers=a.layers, hidden=a.hidden)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2))
    m = figures["model"]
    sys.stdout.write(f"model: {m['parameters'] / 1e6:.0f}M parameters, fp32 {m['fp32_bytes'] / MIB:.0f} MiB, "
                     f"largest tensor fp32 {m['largest_tensor_fp32_bytes'] / MIB:.0f} MiB, shards {a.shard_mib} MiB\n")
    for step in ("consolidate", "merge", "register", "register_adapter"):
        f = figures[step]
        sys.stdout.write(f"{step:12s} peak RSS over its imports: {f['delta'] / MIB:7.0f} MiB "
                         f"(process peak {f['peak_rss'] / MIB:.0f} MiB)\n")


if __name__ == "__main__":
    main()
