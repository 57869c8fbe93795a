"""Resume after a crash: 2 ZeRO-3 ranks on CPU, one rank SIGKILLed between two checkpoints.

The second `run_training` call in the same folder resumes from the latest complete checkpoint and
must end with the same weights as an uninterrupted run (max |Δ| ≤ 1e-6, fp32): that only holds when
the optimizer, the LR schedule, every rank's RNG (LoRA dropout) and the data position are restored.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
import torch
from transformers import AutoTokenizer

from ftflow.config import TrainConfig
from tasks.consolidate import materialise, trained_state_dict
from tasks.tokenize import tokenize_dataset
from tasks.train import TrainingFailed, run_training

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

# 6 optimizer steps, checkpoints after steps 2 and 4; the kill lands after step 3 is logged.
STEPS, SAVE_EVERY, KILL_AFTER = 6, 2, 3


@pytest.fixture(scope="module")
def dataset(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume-data")
    rows = (REPO / "data/demo/reverse_train.jsonl").read_text().splitlines()[:96]
    (root / "train.jsonl").write_text("\n".join(rows) + "\n")
    tok = tokenize_dataset(root / "train.jsonl", str(tiny_model_dir), cache_root=root / "cache", max_length=64)
    pad = AutoTokenizer.from_pretrained(tiny_model_dir).pad_token_id
    return str(tok.path), pad


def _train(train: TrainConfig, train_dir: Path, model_dir: Path, dataset, **kw):
    path, pad = dataset
    return run_training(train=train, train_dir=train_dir, model_path=str(model_dir), dataset_path=path,
                        pad_token_id=pad, **kw)


def _kill_rank_1_after_step(n: int):
    """on_start/on_line hooks that SIGKILL rank 1 (a child of torchrun) once rank 0 logs step n."""
    procs: dict[str, subprocess.Popen] = {}
    killed: list[int] = []

    def on_start(proc: subprocess.Popen) -> None:
        procs["torchrun"] = proc

    def on_line(line: str) -> None:
        if killed or not re.search(rf"step {n}/", line):
            return
        for child in psutil.Process(procs["torchrun"].pid).children():
            if child.environ().get("RANK") == "1":
                os.kill(child.pid, signal.SIGKILL)
                killed.append(child.pid)

    return on_start, on_line, killed


def _losses(summary) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in summary["log_history"] if "loss" in h}


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_sigkill_between_checkpoints_then_resume_matches_uninterrupted(mode, tiny_model_dir, dataset, tmp_path):
    train = TrainConfig(
        mode=mode, deepspeed="configs/deepspeed/zero3.json", nproc_per_node=2, max_steps=STEPS,
        micro_batch_size=4, learning_rate=1e-3, warmup_ratio=0.2, lr_scheduler="cosine",
        save_steps=SAVE_EVERY, save_total_limit=3, logging_steps=1, seed=3, group_by_length=True,
        lora={"r": 4, "dropout": 0.1},  # dropout: the ranks' RNG must be restored too
        timeout_minutes=5,
    )
    on_start, on_line, killed = _kill_rank_1_after_step(KILL_AFTER)
    with pytest.raises(TrainingFailed) as err:
        _train(train, tmp_path / "crashed", tiny_model_dir, dataset, on_start=on_start, on_line=on_line)
    assert killed and err.value.rank == 1 and err.value.exit_code == -signal.SIGKILL
    ckpts = tmp_path / "crashed" / "checkpoints"
    assert (ckpts / "checkpoint-2" / "ftflow_complete.json").is_file()
    assert not (ckpts / "checkpoint-4" / "ftflow_complete.json").exists()

    lines: list[str] = []
    resumed = _train(train, tmp_path / "crashed", tiny_model_dir, dataset, on_line=lines.append)
    assert resumed["resumed_from"] == str(ckpts / "checkpoint-2") and resumed["global_step"] == STEPS
    # the live progress (flows/monitor.py) of the resumed run begins at the checkpoint's step and ends at the last
    from flows.monitor import parse_progress

    progress = [p for p in map(parse_progress, lines) if p]
    assert progress[0] == {"step": SAVE_EVERY, "max_steps": STEPS, "event": "begin"}
    assert progress[-1]["step"] == STEPS
    straight = _train(train, tmp_path / "straight", tiny_model_dir, dataset)
    assert straight["resumed_from"] is None

    a = materialise(trained_state_dict(Path(resumed["final_dir"])))
    b = materialise(trained_state_dict(Path(straight["final_dir"])))
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff <= 1e-6, f"resumed weights differ from the uninterrupted run's by {diff:.3e}"
    # the losses after the resume point (same batches, same schedule, same dropout masks)
    after = {s: v for s, v in _losses(resumed).items() if s > SAVE_EVERY}
    torch.testing.assert_close(after, {s: _losses(straight)[s] for s in after}, rtol=1e-5, atol=1e-6)

    again = _train(train, tmp_path / "crashed", tiny_model_dir, dataset)  # final/ complete: reused
    assert again["reused"] is True


def test_killed_after_the_last_checkpoint_resumes_without_an_extra_step(tiny_model_dir, dataset, tmp_path):
    """Killed after checkpoint-6 (the last step) was complete but before final/ was: the Trainer,
    resumed at max_steps, would train a 7th step (seen on CI through a late SIGKILL under Ray).
    The run resumes from checkpoint-4 and ends on the uninterrupted run's weights."""
    train = TrainConfig(
        mode="full", deepspeed="configs/deepspeed/zero3.json", nproc_per_node=2, max_steps=STEPS,
        micro_batch_size=4, learning_rate=1e-3, warmup_ratio=0.2, lr_scheduler="cosine",
        save_steps=SAVE_EVERY, save_total_limit=3, logging_steps=1, seed=3, timeout_minutes=5,
    )
    straight = _train(train, tmp_path / "run", tiny_model_dir, dataset)
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / f"checkpoint-{STEPS}" / "ftflow_complete.json").is_file()
    before = materialise(trained_state_dict(Path(straight["final_dir"])))
    shutil.rmtree(straight["final_dir"])  # the state a SIGKILL during the final save leaves

    resumed = _train(train, tmp_path / "run", tiny_model_dir, dataset)
    assert resumed["resumed_from"] == str(ckpts / f"checkpoint-{STEPS - SAVE_EVERY}")
    assert resumed["global_step"] == STEPS and max(_losses(resumed)) == STEPS
    after = materialise(trained_state_dict(Path(resumed["final_dir"])))
    diff = max((after[k] - before[k]).abs().max().item() for k in before)
    assert diff <= 1e-6, f"resumed weights differ from the uninterrupted run's by {diff:.3e}"
