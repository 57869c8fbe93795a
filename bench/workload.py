"""The benchmarks' SFT workload (issue #8): generated canonical conversations whose rendered token
lengths are ~log-normal (median ~150, clipped to 1,000), ~20% multi-turn, 30% with a system prompt."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

WORDS = (
    "apple river stone cloud tiger lemon piano forest candle rocket garden silver winter button dragon "
    "pencil mirror castle orange rabbit window bridge planet coffee violin desert marble jacket island "
    "reverse these words please the poem moon light frost bed"
).split()


def tokens_per_word(tokenizer) -> float:
    probe = " ".join(random.Random(0).choices(WORDS, k=2000))
    return len(tokenizer(probe).input_ids) / 2000


def generate(path: Path, rows: int, per_word: float, seed: int = 0) -> None:
    """`rows` canonical JSONL conversations; `per_word` is the tokenizer's tokens per word."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            budget = min(1000, max(24, int(rng.lognormvariate(math.log(150), 0.75))))
            turns = rng.randint(2, 4) if rng.random() < 0.2 else 1
            messages = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.3 else []
            per_turn = max(8.0, (budget - 6 * len(messages)) / turns - 10)  # ~5 template tokens a message
            for _ in range(turns):
                user = max(1, round(0.35 * per_turn / per_word))
                reply = max(1, round(0.65 * per_turn / per_word))
                messages += [{"role": "user", "content": " ".join(rng.choices(WORDS, k=user))},
                             {"role": "assistant", "content": " ".join(rng.choices(WORDS, k=reply))}]
            f.write(json.dumps({"id": f"bench-{seed}-{i}", "messages": messages, "source": "bench"}) + "\n")


def embedded_model_dir() -> str:
    """The embedded tiny Qwen2 (`embedded:tiny-qwen2`, the demo's model), built once into the
    project's state folder; its absolute path, so each product run sees a plain local model folder."""
    from tasks.base_model import resolve_model_path

    return resolve_model_path("embedded:tiny-qwen2")
