"""The launcher's logic without training: keys, checkpoint completeness, rank failure reporting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ftflow.config import TrainConfig
from tasks.train import TrainingFailed, clean_partial_checkpoints, kill_group, launch, torchrun_command, train_key
from tasks.train_worker import COMPLETE_MARKER, fill_deepspeed_config, latest_complete_checkpoint

REPO = Path(__file__).resolve().parents[2]


def test_train_key_ignores_launch_only_settings():
    base = TrainConfig()
    k = train_key(base, "data", "model", "tmpl")
    assert k == train_key(TrainConfig(timeout_minutes=5, node_rank=0, master_port=0, logging_steps=1), "data", "model", "tmpl")
    assert k != train_key(TrainConfig(seed=7), "data", "model", "tmpl")
    assert k != train_key(base, "data2", "model", "tmpl")
    assert k != train_key(base, "data", "model", "other template")


def test_only_marked_checkpoints_count(tmp_path):
    for step, done in ((10, True), (20, True), (30, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        if done:
            (d / COMPLETE_MARKER).write_text("{}")
    assert latest_complete_checkpoint(tmp_path).name == "checkpoint-20"
    removed = clean_partial_checkpoints(tmp_path)
    assert [p.name for p in removed] == ["checkpoint-30"] and not (tmp_path / "checkpoint-30").exists()
    assert latest_complete_checkpoint(tmp_path / "missing") is None


def test_a_checkpoint_at_the_last_step_is_not_a_resume_point(tmp_path):
    """The Trainer resumed at max_steps would run one step more (see test_resume.py)."""
    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / COMPLETE_MARKER).write_text("{}")
    assert latest_complete_checkpoint(tmp_path).name == "checkpoint-6"  # epochs-based (-1): the end of an epoch
    assert latest_complete_checkpoint(tmp_path, max_steps=6).name == "checkpoint-4"
    assert latest_complete_checkpoint(tmp_path, max_steps=5).name == "checkpoint-4"
    assert latest_complete_checkpoint(tmp_path, max_steps=7).name == "checkpoint-6"
    assert latest_complete_checkpoint(tmp_path, max_steps=2) is None


def test_deepspeed_batch_sizes_are_explicit():
    ds = json.loads((Path(__file__).resolve().parents[2] / "configs/deepspeed/zero3.json").read_text())
    t = TrainConfig(micro_batch_size=4, grad_accum=3).model_dump()
    filled = fill_deepspeed_config(ds, t, world=2)
    assert filled["train_batch_size"] == 24 and filled["train_micro_batch_size_per_gpu"] == 4
    assert filled["gradient_accumulation_steps"] == 3 and "_comment" not in filled
    assert filled["bf16"] == {"enabled": False}


def test_torchrun_command_single_and_multi_node(tmp_path):
    single = torchrun_command(tmp_path / "job.json", TrainConfig(nproc_per_node=2), tmp_path)
    assert "--standalone" in single and "--nproc-per-node=2" in single and single[-2:] == ["tasks.train_worker", str(tmp_path / "job.json")]
    multi = torchrun_command(tmp_path / "job.json", TrainConfig(nnodes=2, node_rank=1, master_port=29500, master_addr="10.0.0.1"), tmp_path)
    assert "--standalone" not in multi and "--node-rank=1" in multi and "--master-addr=10.0.0.1" in multi


def test_failing_rank_is_named_with_exit_code_and_log_tail(tmp_path, monkeypatch):
    """A real torchrun with 2 ranks where rank 1 dies: the error names rank 1, its code and its output."""
    job = tmp_path / "job.json"
    job.write_text("{}")
    worker = tmp_path / "fake_worker"
    worker.mkdir()
    (worker / "tasks_fake.py").write_text(
        "import os, sys, time\n"
        "r = int(os.environ['RANK'])\n"
        "print(f'rank {r} starting', flush=True)\n"
        "if r == 1:\n    sys.stderr.write('boom: simulated failure in rank 1\\n'); sys.exit(3)\n"
        "time.sleep(60)\n"
    )
    import tasks.train as tt

    monkeypatch.setattr(tt, "torchrun_command", lambda j, t, d: [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", f"--log-dir={d}",
        "--tee=3", "--local-ranks-filter=0", str(worker / "tasks_fake.py"),
    ])
    lines: list[str] = []
    with pytest.raises(TrainingFailed) as err:
        launch(job, TrainConfig(nproc_per_node=2, timeout_minutes=2), tmp_path / "logs", on_line=lines.append)
    e = err.value
    assert e.rank == 1 and e.exit_code == 3
    assert "boom: simulated failure in rank 1" in str(e)
    assert "rank 1 exited with code 3" in str(e)
    # no rank left behind
    out = subprocess.run(["pgrep", "-f", str(worker / "tasks_fake.py")], capture_output=True, text=True)
    assert out.stdout.strip() == ""


def test_kill_group_ends_children(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import subprocess,sys,time; subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)']); time.sleep(60)"],
                            start_new_session=True)
    kill_group(proc, grace_s=5)
    assert proc.poll() is not None


def _job(model_dir, **train) -> "Job":
    from tasks.train_worker import Job

    return Job(model_path=str(model_dir), dataset_path="", output_dir="", pad_token_id=0,
               train=TrainConfig(**train).model_dump())


def test_lora_options_take_effect(tiny_model_dir):
    """DoRA, modules_to_save, r/alpha and the all-linear default reach the peft model the ranks train."""
    from peft.utils import ModulesToSaveWrapper

    from tasks.train_worker import count_parameters, load_model

    model = load_model(_job(tiny_model_dir, mode="lora", lora={"r": 2, "alpha": 4, "use_dora": True,
                                                                "modules_to_save": ["lm_head"]}), None)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names)  # DoRA
    assert any(isinstance(m, ModulesToSaveWrapper) for m in model.modules())
    adapted = {n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    cfg = model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha) == (2, 4)
    trainable, total = count_parameters(model)
    assert 0 < trainable < total


def test_precision_sets_the_weights_dtype(tiny_model_dir):
    """With DeepSpeed the ranks hold bf16 weights (DeepSpeed keeps the fp32 masters); without it a
    full run keeps fp32 weights and trains under autocast, or bf16 weights would lose small updates."""
    import torch

    from tasks.train_worker import load_model

    job = _job(tiny_model_dir, mode="full", precision="bf16")
    job.deepspeed_config = json.loads((REPO / "configs/deepspeed/zero2.json").read_text())
    model = load_model(job, None)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.use_cache is False
    plain = load_model(_job(tiny_model_dir, mode="full", precision="bf16", deepspeed=None, nproc_per_node=1), None)
    assert {p.dtype for p in plain.parameters()} == {torch.float32}


def test_qlora_loads_nf4_double_quant_base_with_trainable_adapter(tiny_model_dir):
    import bitsandbytes as bnb
    import torch

    from tasks.train_worker import load_model

    model = load_model(_job(tiny_model_dir, mode="qlora", deepspeed=None, nproc_per_node=1,
                            quant={"compute_dtype": "float32"}, gradient_checkpointing=True), None)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.quant_type == "nf4" and m.weight.quant_state.nested for m in layers)
    assert all(m.compute_dtype == torch.float32 for m in layers)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    assert model.is_gradient_checkpointing  # prepare_model_for_kbit_training enables it


def test_same_training_folder_is_never_used_by_two_runs_at_once(tmp_path):
    """Two processes entering run_training's lock for the same folder run one after the other."""
    import textwrap
    import time as _time

    script = tmp_path / "hold.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from tasks.train import exclusive
        with exclusive(Path({str(tmp_path)!r}) / ".train-x.lock"):
            print("in", time.monotonic(), flush=True)
            time.sleep(2)
            print("out", time.monotonic(), flush=True)
    """))
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    spans = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        t = dict(line.split() for line in out.splitlines())
        spans.append((float(t["in"]), float(t["out"])))
    (a0, a1), (b0, b1) = sorted(spans)
    assert a1 <= b0  # never inside at the same time
