"""The demo data set that ships in `data/demo/` and the text the embedded tokenizer learns from.

Two sources, in two of the formats users bring:
- `poems.json`: the five poem samples of seed 001 (alpaca style `instruct`/`input`/`label`);
- `reverse_train.jsonl` / `reverse_eval.jsonl`: a deterministic synthetic task ("reverse these
  words") in ChatML `messages` form, with a held-out split. A model of a few hundred thousand
  parameters learns it in well under a minute of CPU training, so the demo shows a real learning
  signal, and a random-init base model scores 0 on it.

`python -m ftflow.demo` rewrites the files; a test checks the committed files equal its output.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent.parent / "data" / "demo"

POEMS = [
    {"instruct": "请你给哪吒写一首诗：", "input": "哪吒降世，意气飞扬。\n逆天改命，破障冲霄。",
     "label": "红绫缠腕，风火踏浪。\n不屈不悔，笑傲苍茫。"},
    {"instruct": "请你给敖丙写一首诗：", "input": "碧海生龙子，云中舞雪霜。",
     "label": "恩仇难两忘，何处是家乡？"},
    {"instruct": "请你给殷夫人写一首诗：", "input": "十月怀胎盼子生，柔心铁骨两相承。",
     "label": "甘将慈爱护天地，不惧风雷不惧征。"},
    {"instruct": "请你给太乙真人写一首诗：", "input": "仙风道骨，骑兽遨游。",
     "label": "炉中炼术，指点神童。"},
    {"instruct": "请你给申公豹写一首诗：", "input": "阴谋藏心，步步为营。\n狂傲不羁，志向高冥。",
     "label": "欲翻天命，终难遂行。\n困局自招，悔恨难平。"},
]

WORDS = (
    "apple river stone cloud tiger lemon piano forest candle rocket garden silver "
    "winter button dragon pencil mirror castle orange rabbit window bridge planet "
    "coffee violin desert marble jacket island meadow falcon copper"
).split()

PROMPT = "Reverse the words: "


def reverse_samples(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(3, 5))
        out.append({"prompt": PROMPT + " ".join(words), "answer": " ".join(reversed(words))})
    return out


def reverse_splits(n_train: int = 2000, n_eval: int = 100, seed: int = 1234):
    """Train and held-out rows; no held-out prompt appears in train."""
    rows = reverse_samples(n_train + 4 * n_eval, seed)
    seen: set[str] = set()
    unique = []
    for r in rows:
        if r["prompt"] not in seen:
            seen.add(r["prompt"])
            unique.append(r)
    eval_rows, train_rows = unique[:n_eval], unique[n_eval : n_eval + n_train]
    return train_rows, eval_rows


def as_messages(row: dict, idx: int, split: str) -> dict:
    return {
        "id": f"reverse-{split}-{idx:05d}",
        "messages": [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["answer"]},
        ],
    }


def tokenizer_corpus() -> list[str]:
    """Every text the demo data holds: what the embedded BPE tokenizer is trained on."""
    train, evals = reverse_splits()
    texts = [r["prompt"] + "\n" + r["answer"] for r in train + evals]
    texts += [p["instruct"] + p["input"] + "\n" + p["label"] for p in POEMS]
    texts += ["You are a helpful assistant.", "user", "assistant", "system"]
    return texts


def write_demo_data(out_dir: Path = DEMO_DIR) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "poems.json").write_text(json.dumps(POEMS, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    train, evals = reverse_splits()
    for name, rows, split in (("reverse_train.jsonl", train, "train"), ("reverse_eval.jsonl", evals, "eval")):
        with open(out_dir / name, "w", encoding="utf-8") as f:
            for i, r in enumerate(rows):
                f.write(json.dumps(as_messages(r, i, split), ensure_ascii=False) + "\n")


if __name__ == "__main__":
    write_demo_data()
