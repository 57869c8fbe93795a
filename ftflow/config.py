"""The one configuration model of a pipeline run, validated once at the edge.

Loaded from YAML (`load_config`), overridden by `--set KEY=VALUE` (`apply_overrides`) and passed
as the Prefect flow's parameter, so the Prefect UI renders it as a form. Below this module, stages
receive plain typed values. Unknown keys are rejected with the closest valid key; combinations
that cannot work are rejected with the reason and the alternative.
"""

from __future__ import annotations

import difflib
import json
import re
import reprlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator


class ConfigError(ValueError):
    """A config problem, already phrased for the user (file, key, what to do)."""


# What an error message may quote of the user's input: enough to recognise it, never megabytes
# (a YAML alias bomb expands to millions of items; repr() of it would print them all).
_QUOTE = reprlib.Repr()
_QUOTE.maxlevel, _QUOTE.maxlist, _QUOTE.maxdict, _QUOTE.maxtuple, _QUOTE.maxset = 2, 4, 4, 4, 4
_QUOTE.maxstring = _QUOTE.maxother = 120
QUOTE_LIMIT = 120
MAX_PROBLEMS = 10  # problems listed in one config error; the rest are counted


def quote(value: Any) -> str:
    """A bounded repr of user input for error messages (at most QUOTE_LIMIT characters)."""
    text = _QUOTE.repr(value)
    return text if len(text) <= QUOTE_LIMIT else text[: QUOTE_LIMIT - 3] + "..."


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(_Section):
    name_or_path: str = Field(
        "embedded:tiny-qwen2",
        description="Hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct), local folder, or embedded:tiny-qwen2 "
        "(a tiny Qwen2 that ftflow builds itself; no download).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to pin.")
    trust_remote_code: bool = Field(
        False, description="Run Python code shipped with the model repo. Off unless you trust the repo."
    )
    hub_token: SecretStr | None = Field(
        None, description="Token for private hub models (prefer the HF_TOKEN environment variable). Never logged."
    )


class DataConfig(_Section):
    train: list[str] = Field(..., description="Input files, folders or globs (relative to the config file).")
    eval: list[str] = Field(default_factory=list, description="Explicit held-out files; else split from train.")
    format: Literal["auto", "alpaca", "sharegpt", "messages", "text"] = Field(
        "auto", description="Input format; auto detects it per file."
    )
    columns: dict[str, str] = Field(
        default_factory=dict, description="Map your field names to canonical ones, e.g. {question: instruction}."
    )
    system_prompt: str | None = Field(None, description="System message added to samples that have none.")
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="Share held out when no eval file is given.")
    split_seed: int = Field(0, description="Seed of the id-hash train/eval split.")
    on_bad_row: Literal["quarantine", "raise"] = Field(
        "quarantine", description="quarantine: keep going, write rejects; raise: fail on the first bad row."
    )
    max_reject_fraction: float = Field(0.01, ge=0.0, le=1.0, description="Fail the run above this rejected share.")


class TokenizeConfig(_Section):
    template: str = Field(
        "auto", description="auto (the tokenizer's chat template), chatml, llama2, plain, or a path to a .jinja file."
    )
    objective: Literal["sft", "pretrain"] = Field("sft", description="sft: train assistant replies only; pretrain: every token.")
    train_on: Literal["all_assistant", "last_assistant"] = Field("all_assistant", description="Which assistant turns sft trains.")
    max_length: int = Field(512, gt=8, description="Longest sample in tokens.")
    length_policy: Literal["drop", "truncate", "raise"] = Field("drop", description="What to do with longer samples.")
    multi_turn: Literal["auto", "split", "reject"] = Field(
        "auto",
        description="Multi-turn sft conversations. auto: one sample per conversation where every assistant turn "
        "sees exactly the tokens inference sends it, else one sample per assistant turn (messages[:i+1], its last "
        "turn trained; Qwen3 drops earlier reasoning); split: always one sample per turn; reject: reject such "
        "conversations (each in rejects.jsonl).",
    )


class LoraConfig(_Section):
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description="Modules to adapt.")
    modules_to_save: list[str] = Field(default_factory=list)
    use_dora: bool = False
    merge: bool = Field(
        False,
        description="false: register the adapter alone (base model referenced by id and revision); "
        "true: register the adapter merged into the base (a full model), the adapter logged beside it.",
    )


class QuantConfig(_Section):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"


class RayConfig(_Section):
    """train.launcher=ray: where the ranks run (README, "Several nodes: Ray")."""

    address: str = Field(
        "auto", description="Ray cluster to connect to: auto (the cluster this machine belongs to; RAY_ADDRESS wins "
        "when set) or HOST:PORT of the head's GCS (ray start --head --port)."
    )
    num_workers: int = Field(2, ge=1, description="Training ranks (Ray Train workers), one placement-group bundle each.")
    resources_per_worker: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 1.0}, description="Resources of one worker, e.g. {GPU: 1, CPU: 8}; "
        "with GPU > 0 the ranks use NCCL, else gloo."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How the bundles are placed on nodes (Ray placement groups); STRICT_SPREAD: one worker per node."
    )
    storage_path: str | None = Field(
        None, description="Folder every node mounts at the same path (NFS, Lustre, a PVC) that holds the training "
        "folder: checkpoints, rank logs, final state. null: <FTFLOW_HOME>/train, which must then be shared."
    )
    schedule_timeout_s: float = Field(
        60.0, gt=0, description="Wait this long for the whole placement group (all workers at once), then fail naming "
        "what is missing instead of waiting for a cluster too small."
    )
    max_failures: int = Field(
        0, ge=0, description="Restart the workers this many times after a worker dies, each time from the latest "
        "complete checkpoint, within the same run. 0: fail the run (the next run resumes), as with torchrun."
    )


class TrainConfig(_Section):
    mode: Literal["full", "lora", "qlora"] = "full"
    deepspeed: str | None = Field(
        "configs/deepspeed/zero3.json", description="DeepSpeed config file (relative to the project), or null for DDP."
    )
    nproc_per_node: int = Field(2, ge=1, description="Ranks per node (GPUs per node; CPU processes here).")
    nnodes: int = Field(1, ge=1)
    node_rank: int = Field(0, ge=0)
    master_addr: str = "127.0.0.1"
    master_port: int = Field(0, ge=0, le=65535, description="0 picks a free port (single node only).")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="Optimizer steps; -1 means run `epochs`.")
    micro_batch_size: int = Field(8, ge=1, description="Samples per rank per forward pass.")
    grad_accum: int = Field(1, ge=1)
    learning_rate: float = Field(2e-5, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    adam_beta2: float = Field(0.999, gt=0.0, lt=1.0)
    max_grad_norm: float = Field(1.0, ge=0.0)
    gradient_checkpointing: bool = False
    batching: Literal["auto", "padded", "packed"] = Field(
        "auto", description="packed: padding-free packing with per-sample causal attention (exact; the fastest "
        "batching measured on CPU, bench/RESULTS.md); padded: dynamic padding, length-grouped if group_by_length; "
        "auto = packed."
    )
    group_by_length: bool = Field(
        True, description="batching=padded only: batch samples of similar length (less padding, faster). Turn off for data whose lengths "
        "fall into a few classes: every batch would then hold one class, which slows learning."
    )
    loss_chunk_tokens: int = Field(
        0, ge=0, description="Compute the LM head and loss this many trained tokens at a time (0: all at once, as "
        "transformers does). Saves the (tokens x vocabulary) fp32 logits, 0.6 MB a token with Qwen's vocabulary, "
        "for a second forward of the head; same loss (tasks/loss.py, bench/RESULTS.md)."
    )
    tokens_per_batch: int = Field(
        0, ge=0, description="batching=packed: pack each rank's micro-batch to at most this many tokens (best-fit "
        "decreasing, every sample once, never split; bins of similar size go to the ranks of one step) instead of "
        "micro_batch_size samples. 0: micro_batch_size samples a pack. Must be >= tokenize.max_length."
    )
    attn_implementation: Literal[
        "auto", "flash_attention_3", "flash_attention_2", "ftflow_packed_sdpa", "sdpa", "flex_attention", "eager"
    ] = Field(
        "auto", description="auto: on CUDA flash_attention_3/2 when installed (variable-length, boundaries from the "
        "collator), else ftflow_packed_sdpa (torch's varlen flash kernel on CUDA, per-sample sdpa on CPU); "
        "padded batches: flash when installed, else sdpa. The run records what it used."
    )
    liger: bool | Literal["auto"] = Field(
        "auto", description="Liger kernels (RMSNorm, RoPE, SwiGLU; fused linear cross-entropy except under ZeRO-3 or "
        "with loss_chunk_tokens): auto = on CUDA when liger-kernel is installed; true fails without them."
    )
    torch_compile: bool = Field(False, description="torch.compile the model (the Trainer's torch_compile).")
    save_steps: int = Field(50, ge=1, description="Checkpoint every N optimizer steps.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept.")
    logging_steps: int = Field(5, ge=1)
    seed: int = 42
    timeout_minutes: float = Field(600, gt=0, description="Kill every rank after this long.")
    launcher: Literal["torchrun", "ray"] = Field(
        "torchrun", description="torchrun: ranks on this machine (nproc_per_node); ray: train.ray.num_workers ranks on a "
        "Ray cluster, one flow run in charge (several nodes)."
    )
    ray: RayConfig = Field(default_factory=RayConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)


class GenerationConfigModel(_Section):
    max_new_tokens: int = Field(64, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1.0)
    top_k: int = Field(50, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    no_repeat_ngram_size: int = Field(0, ge=0)
    seed: int = Field(0, description="Seeds sampling (do_sample=true), so a scored run can be repeated exactly.")


class EvalConfig(_Section):
    batch_size: int = Field(32, ge=1)
    max_samples: int | None = Field(None, ge=1, description="Score at most this many held-out samples.")
    generation: GenerationConfigModel = Field(default_factory=GenerationConfigModel)
    mlflow_genai: bool = Field(
        True, description="Also log the per-example scores through MLflow's GenAI evaluation API (a trace with "
        "assessments per example, in the run's Traces tab). ~0.1 s an example on a SQLite store."
    )


class RegistryConfig(_Section):
    model_name: str = Field(
        "ftflow-demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", description="Registered model name in MLflow (folder-safe)."
    )
    experiment: str = Field("ftflow", description="MLflow experiment of the runs.")


class ExportConfig(_Section):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="dtype of a merged LoRA export; auto: the training precision (bf16 runs export bf16, fp32 runs fp32).",
    )


class PromoteConfig(_Section):
    metric: Literal["exact_match", "char_f1"] = "exact_match"
    min_improvement: float = Field(0.0, description="Challenger must beat champion by more than this.")
    no_regress: list[Literal["exact_match", "char_f1"]] = Field(default_factory=list)


class PipelineConfig(_Section):
    """A whole pipeline run: data → tokens → training → model → registry → scores → alias."""

    name: str = Field("demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="Run name (folder-safe).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    promote: PromoteConfig = Field(default_factory=PromoteConfig)
    base_dir: str = Field(".", description="Folder that relative data paths are read from (the config's folder).")

    @model_validator(mode="after")
    def _combinations(self) -> "PipelineConfig":
        """Combinations that cannot work, all reported at once, each with the alternative."""
        t = self.train
        problems = []
        model_path, problem = resolve_model_name(self.model.name_or_path, self.base_dir)
        if problem:
            problems.append(problem)
        else:
            self.model.name_or_path = model_path
        stage, problem = _zero_stage(t.deepspeed) if t.deepspeed else (None, None)
        if problem:
            problems.append(problem)
        if t.mode == "qlora" and stage == 3:
            problems.append(
                "train.mode=qlora cannot run under DeepSpeed ZeRO-3 (4-bit weights cannot be partitioned). "
                "Use configs/deepspeed/zero2.json, or train.mode=lora with ZeRO-3."
            )
        if t.nnodes > 1 and t.master_port == 0:
            problems.append("train.nnodes > 1 needs an explicit train.master_port that every node uses (e.g. 29500).")
        if t.node_rank >= t.nnodes:
            problems.append(f"train.node_rank={t.node_rank} must be below train.nnodes={t.nnodes}.")
        if t.nnodes > 1 and t.master_addr in ("127.0.0.1", "localhost"):
            problems.append("train.nnodes > 1 needs train.master_addr set to node 0's address that the other nodes reach.")
        if t.launcher == "ray" and (t.nnodes > 1 or t.node_rank > 0):
            problems.append("train.nnodes/node_rank are torchrun settings; with train.launcher=ray set train.ray.num_workers "
                            "(the ranks of all nodes) instead.")
        if t.launcher == "ray" and t.ray.storage_path and "://" in t.ray.storage_path:
            problems.append(f"train.ray.storage_path={t.ray.storage_path!r}: the ranks write DeepSpeed checkpoints with file "
                            "I/O, so give a folder every node mounts at the same path (NFS, Lustre, a Kubernetes PVC).")
        if t.precision == "fp16" and t.mode == "qlora":
            problems.append("train.mode=qlora with precision=fp16 is unstable; use precision=bf16.")
        if t.mode == "qlora" and t.precision != "fp32" and t.quant.compute_dtype == "float32":
            problems.append(
                f"train.quant.compute_dtype=float32 with train.precision={t.precision} mixes dtypes in every "
                f"4-bit layer; set train.quant.compute_dtype={'bfloat16' if t.precision == 'bf16' else 'float16'}."
            )
        if t.tokens_per_batch and t.batching == "padded":
            problems.append("train.tokens_per_batch packs samples into one row: set train.batching=packed (or auto), or tokens_per_batch=0.")
        if t.tokens_per_batch and t.tokens_per_batch < self.tokenize.max_length:
            problems.append(
                f"train.tokens_per_batch={t.tokens_per_batch} is below tokenize.max_length={self.tokenize.max_length}: "
                "a sample is never split, so raise tokens_per_batch to at least max_length."
            )
        if t.mode == "full" and (t.lora.merge or t.lora.use_dora or t.lora.modules_to_save):
            problems.append("train.lora.* settings apply to train.mode=lora or qlora only; set train.mode=lora or drop them.")
        if problems:
            raise ValueError("\n  - ".join(problems))
        return self


def _zero_stage(path: str) -> tuple[int | None, str | None]:
    """(ZeRO stage, None) of a DeepSpeed JSON config, or (None, a message naming the file and the fix)."""
    p = project_path(path)
    fix = "pick one of configs/deepspeed/zero2.json, zero3.json, zero3_offload.json, or null (no DeepSpeed)"
    if not p.exists():
        return None, f"train.deepspeed: {path} does not exist (looked for {p}); {fix}."
    if not p.is_file():
        return None, f"train.deepspeed: {p} is a folder, not a DeepSpeed JSON file; {fix}."
    try:
        conf = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return None, f"train.deepspeed: {p} is not UTF-8 text; {fix}."
    except json.JSONDecodeError as err:
        return None, f"train.deepspeed: {p} line {err.lineno}, column {err.colno} is not valid JSON ({err.msg}); {fix}."
    except OSError as err:
        return None, f"train.deepspeed: {p} cannot be read ({err.strerror}); {fix}."
    if not isinstance(conf, dict):
        return None, (f"train.deepspeed: {p} holds a JSON {type(conf).__name__}, not an object of DeepSpeed "
                      f"settings ({{\"zero_optimization\": {{\"stage\": 3}}, ...}}); {fix}.")
    zero = conf.get("zero_optimization", {})
    if not isinstance(zero, dict):
        return None, (f"train.deepspeed: {p}: \"zero_optimization\" must be an object such as {{\"stage\": 3}}, "
                      f"got {quote(zero)}; {fix}.")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
        return None, f"train.deepspeed: {p}: zero_optimization.stage must be 0, 1, 2 or 3, got {quote(stage)}."
    return int(stage), None


EMBEDDED_PREFIX = "embedded:"  # tasks.base_model builds these; the config only passes them on
# A Hugging Face Hub id: NAME or OWNER/NAME, letters, digits, '-', '_', '.' (no leading '.' or '-').
_HUB_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)?$")


def looks_like_path(value: str) -> bool:
    """True for values that can only be a file-system path (`./m`, `../x`, `/abs`, `~/m`, `a/b/c`)."""
    if value.startswith(EMBEDDED_PREFIX):
        return False
    return (value.startswith(("./", "../", "/", "~", ".\\")) or value in (".", "..")
            or "\\" in value or not _HUB_ID.match(value))


def resolve_model_name(value: str, base_dir: str | Path) -> tuple[str, str | None]:
    """`model.name_or_path` as the stages use it, or a problem message.

    - `embedded:NAME` and Hub ids (`Qwen/Qwen2.5-0.5B-Instruct`) stay as they are;
    - a folder that exists relative to the config file's folder (like data paths), or an absolute one,
      becomes its absolute path;
    - a value that can only be a path (`./m`, `../models/x`, `/abs`) but does not exist is an error,
      never a hub lookup.
    """
    if value.startswith(EMBEDDED_PREFIX):
        return value, None
    path = Path(value).expanduser()
    resolved = (path if path.is_absolute() else Path(base_dir) / path).resolve()
    if resolved.exists():
        return str(resolved), None
    if looks_like_path(value):
        return value, (
            f"model.name_or_path: {value} does not exist (resolved to {resolved}); relative model paths are read "
            f"from the config file's folder ({base_dir}), like data paths. Fix the path, or use a Hugging Face Hub id "
            "(e.g. Qwen/Qwen2.5-0.5B-Instruct) or embedded:tiny-qwen2."
        )
    return value, None


def _valid_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _valid_keys(ann, prefix + name + ".")
    return keys


def _format_errors(err: ValidationError, source: str) -> str:
    valid = _valid_keys(PipelineConfig)
    lines = [f"invalid config {source}:"]
    errors = err.errors()
    for e in errors[:MAX_PROBLEMS]:
        key = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
            close = difflib.get_close_matches(key, [k for k in valid if k.startswith(parent)], n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            lines.append(f"  - unknown key '{key}'.{hint}")
        elif e["type"] == "missing":
            lines.append(f"  - missing required key '{key}'.")
        elif key:
            lines.append(f"  - '{key}': {e['msg']} (got {quote(e.get('input'))}).")
        else:
            lines.append(f"  - {e['msg'].removeprefix('Value error, ')}")
    if len(errors) > MAX_PROBLEMS:
        lines.append(f"  ... and {len(errors) - MAX_PROBLEMS} more problems")
    return "\n".join(lines)


def validate(raw: dict[str, Any], source: str = "<config>") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs with dotted keys; VALUE is parsed as YAML (numbers, bools, lists)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.seed=7")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: '{p}' is not a section")
        if not all(parts):
            raise ConfigError(f"--set {quote(item)}: KEY must be dotted names, e.g. --set train.seed=7")
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(
                f"--set {quote(item)}: the value {quote(value)} is not valid YAML ({getattr(err, 'problem', None) or err}). "
                f"Quote it to pass a string (--set '{key}=\"...\"'), or close the brackets of a list ([1, 2])."
            ) from None
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist; try configs/demo.yaml")
    if path.is_dir():
        inside = sorted(q.name for q in path.glob("*.yaml"))[:3]
        hint = f" such as {path / inside[0]}" if inside else " (e.g. configs/demo.yaml)"
        raise ConfigError(f"config file {path} is a folder; pass a pipeline YAML file{hint}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset "
                          f"{err.start}); save it as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read ({err.strerror}); check its permissions") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {path}{where} is not valid YAML: {getattr(err, 'problem', None) or err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (model:, data:, ...)")
    raw = apply_overrides(raw, overrides or [])
    raw.setdefault("base_dir", str(path.resolve().parent))
    return validate(raw, str(path))


def resolve_data_path(cfg: PipelineConfig, p: str) -> Path | str:
    """A data input relative to the config's folder; `hf:NAME[:SPLIT]` dataset ids pass unchanged."""
    if p.startswith("hf:"):
        return p
    path = Path(p).expanduser()
    return path if path.is_absolute() else (Path(cfg.base_dir) / path).resolve()


def project_path(p: str) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else (Path(__file__).resolve().parent.parent / path).resolve()
