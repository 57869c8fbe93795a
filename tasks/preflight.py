"""Checks that run before any heavy work: each problem gets one paragraph naming the file or key
and what to do, instead of a stack trace ten minutes into a run.

Only cheap checks: files exist, the model folder has weights and needs no remote code (unless
allowed), the tokenizer can render chats when `tokenize.template: auto`, `max_length` fits the
model's context. Hub ids are not fetched here (that would need the network); `from_pretrained`
reports those.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

from ftflow.config import PipelineConfig, project_path, resolve_data_path
from tasks.base_model import EMBEDDED_PREFIX

WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "adapter_model.safetensors")


class PreflightError(ValueError):
    pass


def _data_problems(cfg: PipelineConfig) -> list[str]:
    problems = []
    for key, paths in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        for p in paths:
            path = resolve_data_path(cfg, p)
            if isinstance(path, str):  # hf:NAME — resolved by the data stage
                continue
            if not path.exists() and not glob.glob(str(path)):
                problems.append(
                    f"{key}: {p!r} does not exist (looked for {path}). Relative paths are read from the "
                    f"config file's folder ({cfg.base_dir}); fix the path or the file name."
                )
    return problems


def _model_problems(cfg: PipelineConfig) -> list[str]:
    m = cfg.model
    if m.name_or_path.startswith(EMBEDDED_PREFIX):
        return []
    path = Path(m.name_or_path).expanduser()
    if not path.exists():
        if m.name_or_path.startswith((".", "/", "~")):
            return [f"model.name_or_path: {m.name_or_path!r} looks like a path but does not exist."]
        from tasks.base_model import hub_model_problem  # a hub id: cached, or the hub answers (one probe)

        problem = hub_model_problem(m.name_or_path, m.revision)
        return [f"model.name_or_path: {problem}"] if problem else []
    problems = []
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        return [f"model.name_or_path: {path} has no config.json; point it at a Hugging Face model folder."]
    config = json.loads(cfg_file.read_text())
    if not any(next(path.glob(p), None) for p in WEIGHT_PATTERNS):
        bins = [q.name for q in path.glob("*.bin")] + [q.name for q in path.glob("*.pt")]
        hint = (f" It holds {bins[:2]} (pickle files): ftflow loads safetensors only — convert them with "
                "`model.save_pretrained(dir, safe_serialization=True)` in a trusted environment.") if bins else ""
        problems.append(f"model.name_or_path: {path} has no weights (*.safetensors).{hint}")
    if config.get("auto_map") and not m.trust_remote_code:
        problems.append(
            f"model.name_or_path: {path} needs custom Python code from the model repository (config.json has "
            f"auto_map: {sorted(config['auto_map'])}). ftflow does not run remote code by default. Read the code; "
            "if you trust it, set model.trust_remote_code: true."
        )
    ctx = config.get("max_position_embeddings")
    if ctx and cfg.tokenize.max_length > ctx:
        problems.append(
            f"tokenize.max_length={cfg.tokenize.max_length} is larger than the model's context "
            f"(max_position_embeddings={ctx} in {cfg_file}); set tokenize.max_length <= {ctx}."
        )
    if cfg.tokenize.template == "auto" and cfg.tokenize.objective == "sft":
        tok_cfg = path / "tokenizer_config.json"
        has_template = (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file()
        if not has_template and tok_cfg.is_file():
            has_template = bool(json.loads(tok_cfg.read_text()).get("chat_template"))
        if not has_template:
            problems.append(
                f"tokenize.template: auto, but the tokenizer in {path} has no chat template. Set tokenize.template "
                "to chatml, llama2, plain, or a path to a .jinja file."
            )
    return problems


def _train_problems(cfg: PipelineConfig) -> list[str]:
    t = cfg.train
    if t.deepspeed and not project_path(t.deepspeed).is_file():
        return [f"train.deepspeed: {t.deepspeed} does not exist; use one of configs/deepspeed/*.json or null."]
    return []


def check(cfg: PipelineConfig) -> None:
    """Raise PreflightError listing every problem found (not just the first)."""
    problems = _data_problems(cfg) + _model_problems(cfg) + _train_problems(cfg)
    if problems:
        raise PreflightError("the run cannot start:\n" + "\n".join(f"  - {p}" for p in problems))
