"""bench/gpu.py: the skip path on a machine without CUDA, and its FLOP/MFU arithmetic against hand
calculations and against the published parameter counts of Qwen2.5-0.5B (model and PEFT LoRA)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu

REPO = Path(__file__).resolve().parents[2]


def test_skips_cleanly_without_cuda(tmp_path):
    out = tmp_path / "gpu.json"
    env = {"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "bench.gpu", "--out", str(out)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1 and "skipped" in lines[0] and "CUDA" in lines[0]
    assert not out.exists()  # nothing written: an earlier GPU result would be kept


def test_skip_path_in_process(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main(["--out", str(tmp_path / "x.json")]) == 0
    assert capsys.readouterr().out.count("\n") == 1 and not (tmp_path / "x.json").exists()


def test_parameter_counts_match_qwen25_05b():
    """By hand: a layer's linears are q 896x896 + k, v 896x128 + o 896x896 + gate, up, down 896x4864
    = 802,816 + 2 x 114,688 + 802,816 + 3 x 4,358,144 = 14,909,440; x 24 layers = 357,826,560;
    + the (tied) head 151,936 x 896 = 136,134,656 -> 493,961,216 matmul weights. The published
    total, 494,032,768, adds the embedding's lookup (counted once: tied), q/k/v biases and norms."""
    s = gpu.QWEN25_05B
    assert gpu.matmul_params(s) == 493_961_216
    from transformers import Qwen2Config, Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config(**s.hf_config()))
    assert sum(p.numel() for p in model.parameters()) == 494_032_768  # Qwen2.5-0.5B's published size
    biases_norms = 24 * (896 + 128 + 128) + 24 * 2 * 896 + 896
    assert sum(p.numel() for p in model.parameters()) == gpu.matmul_params(s) + biases_norms
    # LoRA r=16 on all linear layers: PEFT's own count (8,798,208, as its print_trainable_parameters shows)
    from peft import LoraConfig, get_peft_model

    with torch.device("meta"):
        peft = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    peft_count = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert peft_count == gpu.lora_params(s, 16) == 8_798_208


def test_flops_and_mfu_by_hand():
    s = gpu.QWEN25_05B
    # one 2,048-token sample, full fine-tuning: 6 N T = 6 x 493,961,216 x 2,048 = 6,069,795,422,208;
    # attention 6 L H d n^2 = 6 x 24 x (14 x 64) x 2,048^2 = 541,165,879,296
    assert gpu.train_flops(s, [2048]) == 6_069_795_422_208 + 541_165_879_296
    # the same tokens as 8 samples of 256: matmuls unchanged, attention / 8
    assert gpu.train_flops(s, [256] * 8) == 6_069_795_422_208 + 541_165_879_296 / 8
    # LoRA r=16: 4 N T + 6 N_lora T = 4 x 493,961,216 x 2,048 + 6 x 8,798,208 x 2,048 = 4,154,642,661,376
    assert gpu.train_flops(s, [2048], lora_r=16) == 4_154_642_661_376 + 541_165_879_296
    # MFU: 40,960 tokens/s = 20 such samples a second = 20 x 6,610,961,301,504 FLOP/s over 989.4e12
    per_token = (6_069_795_422_208 + 541_165_879_296) / 2048
    assert gpu.mfu(40_960, per_token, 989.4) == pytest.approx(20 * 6_610_961_301_504 / 989.4e12)  # = 0.1336
    assert gpu.mfu(40_960, per_token, 989.4) == pytest.approx(0.13364, abs=1e-5)
    assert gpu.mfu(81_920, per_token, 989.4, gpus=2) == pytest.approx(gpu.mfu(40_960, per_token, 989.4))
    assert gpu.mfu(40_960, per_token, None) is None


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.0), ("Tesla T4", None),
])
def test_peak_from_the_gpu_name(name, peak):
    assert gpu.peak_tflops(name) == peak
