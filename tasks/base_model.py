"""The embedded default base model, and resolution of `model.name_or_path`.

`embedded:tiny-qwen2` is a Qwen2-architecture causal LM that ftflow builds itself, so every
stage runs for real on a machine with no GPU and no Hugging Face Hub:
- a byte-level BPE tokenizer trained on the demo data, with the ChatML special tokens
  `<|endoftext|>` (pad), `<|im_start|>`, `<|im_end|>` (end of turn = eos) and a ChatML chat template.
  Pad is deliberately *not* eos (seed 001's trap: masking pad == eos means eos is never learned);
- `Qwen2ForCausalLM` initialised from a fixed seed.
The build is deterministic (byte-identical files on every build) and cached under the state dir.
Any other value is passed to `from_pretrained` unchanged (a hub id or a local folder). Relative
folders are resolved against the config file's folder when the config is loaded
(`ftflow.config.resolve_model_name`); `hub_model_problem` tells in seconds whether a hub id can be
loaded here at all (cached, or the hub reachable), instead of a minute of retries.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from ftflow.utils import atomic_dir, sha256_file, sha256_json, sha256_sources, state_dir

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_MODELS = ("tiny-qwen2",)

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# 2 layers x 128 wide, 8 heads of 16: ~0.48M parameters. Learns the demo's reverse task on 2 CPU
# ranks in about a minute. Narrower shapes (96 wide, 4 heads) got stuck under the HF Trainer with the
# first reply word at chance (it must attend to the prompt's last word, 5 tokens back); 8 heads
# find that pattern reliably.
TINY_QWEN2 = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=512,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)
VOCAB_SIZE = 640
SEED = 0


def build_tiny_qwen2(out_dir: Path) -> None:
    """Write tokenizer, config, generation config and weights of the tiny model into `out_dir`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from ftflow.demo import tokenizer_corpus

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHATML_TEMPLATE,
        model_max_length=TINY_QWEN2["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    tok.padding_side = "right"
    eos_id = tok.convert_tokens_to_ids("<|im_end|>")
    pad_id = tok.convert_tokens_to_ids("<|endoftext|>")
    assert eos_id != pad_id

    config = Qwen2Config(
        vocab_size=len(tok),
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        **TINY_QWEN2,
    )
    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[eos_id, pad_id], pad_token_id=pad_id, do_sample=False, max_new_tokens=64
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)


def embedded_model_dir(name: str) -> Path:
    if name not in EMBEDDED_MODELS:
        raise ValueError(
            f"unknown embedded model {EMBEDDED_PREFIX}{name!r}; choose one of "
            + ", ".join(EMBEDDED_PREFIX + m for m in EMBEDDED_MODELS)
        )
    # The folder is named by the code that builds it (this module and the demo corpus), not a hand-bumped number.
    out = state_dir() / "models" / f"{name}-{sha256_sources(__name__, 'ftflow.demo')[:12]}"
    if not (out / "model.safetensors").exists():
        log.info("building embedded base model %s into %s", name, out)
        with atomic_dir(out) as tmp:
            build_tiny_qwen2(tmp)
    return out


def resolve_model_path(name_or_path: str) -> str:
    """A string `from_pretrained` accepts: a local folder, or a hub id left as it is.

    For local folders `HF_HUB_OFFLINE=1` is set so nothing waits on network retries.
    """
    if name_or_path.startswith(EMBEDDED_PREFIX):
        os.environ["HF_HUB_OFFLINE"] = "1"
        return str(embedded_model_dir(name_or_path[len(EMBEDDED_PREFIX):]))
    if Path(name_or_path).expanduser().exists():
        os.environ["HF_HUB_OFFLINE"] = "1"
        return str(Path(name_or_path).expanduser().resolve())
    return name_or_path


HUB_PROBE_TIMEOUT_S = 5.0  # one HEAD request to the hub endpoint; a DNS failure returns at once


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE", "")).upper() in {"1", "ON", "YES", "TRUE"}


def _hub_unreachable(endpoint: str) -> str | None:
    """None when `endpoint` answers at all (any HTTP status), else why it cannot be reached."""
    import httpx

    try:
        httpx.head(endpoint, timeout=HUB_PROBE_TIMEOUT_S, follow_redirects=False)
    except httpx.HTTPError as err:
        return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return None


def hub_model_problem(repo_id: str, revision: str | None = None) -> str | None:
    """Why the hub model `repo_id` cannot be loaded on this machine, or None when it can.

    It can when it is in the local Hugging Face cache, or when the hub answers (then
    `from_pretrained` downloads it). A cached model with the hub unreachable is loaded offline
    (`HF_HUB_OFFLINE=1` for this process and its children), so nothing waits on retries. Only
    one probe is made: seconds, not the minute of retries `from_pretrained` takes to give up.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)
    except Exception:  # not a valid repo id: from_pretrained reports it with its own words
        return None
    download = (f"Download it on a machine with network (`hf download {repo_id} --local-dir models/"
                f"{repo_id.rsplit('/', 1)[-1]}`), copy the folder here and point model.name_or_path (or --model) "
                "at it; a relative path is read from the config file's folder")
    if _offline():
        if cached:
            return None
        return (f"{repo_id!r} is a Hugging Face Hub id that is not in the local cache ({constants.HF_HUB_CACHE}), "
                f"and HF_HUB_OFFLINE=1 forbids downloading it. {download}, or unset HF_HUB_OFFLINE where there is network.")
    why = _hub_unreachable(constants.ENDPOINT)
    if why is None:
        return None
    if cached:
        log.warning("the Hugging Face Hub (%s) cannot be reached (%s); loading %s from the local cache",
                    constants.ENDPOINT, why, repo_id)
        os.environ["HF_HUB_OFFLINE"] = "1"  # the ranks and every later process
        constants.HF_HUB_OFFLINE = True  # this process: huggingface_hub read the variable at import
        return None
    return (f"{repo_id!r} is a Hugging Face Hub id, but the hub ({constants.ENDPOINT}) cannot be reached from "
            f"here ({why}) and the model is not in the local cache ({constants.HF_HUB_CACHE}). {download}.")


# Files of a model folder that decide how text becomes tokens; each one present is hashed, byte for
# byte, into every content key that depends on the tokenizer (tokenize, train).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "vocab.txt",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
)
_COMMIT = re.compile(r"[0-9a-f]{40}")


def tokenizer_files(folder: Path, trust_remote_code: bool = False) -> list[Path]:
    """The files of `folder` that define its tokenizer and chat template (with remote code: its .py files too)."""
    files = [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        files += sorted(p for p in extra.iterdir() if p.is_file())
    if trust_remote_code:
        files += sorted(folder.glob("*.py"))
    return files


def hub_snapshot(repo_id: str, revision: str | None = None) -> tuple[Path, str]:
    """(local snapshot folder, commit) of the hub model `repo_id` at `revision` (default branch: main).

    With the hub reachable the revision is resolved to its commit (`model_info(...).sha`) and that
    commit's tokenizer files are fetched into the Hugging Face cache; offline (or when the hub does
    not answer) the cache alone decides: `models--org--name/refs/<revision>` names the commit and
    `snapshots/<commit>/` holds its files. A folder is always one commit, never "whatever main is".
    """
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    rev = revision or "main"
    if not _offline() and not constants.HF_HUB_OFFLINE:
        from huggingface_hub import HfApi, snapshot_download

        try:
            commit = HfApi().model_info(repo_id, revision=rev).sha
            folder = snapshot_download(repo_id, revision=commit, allow_patterns=[
                *TOKENIZER_FILES, "additional_chat_templates/*", "config.json", "*.py"])
            return Path(folder), commit
        except Exception as err:  # no network, hub down, gated: the local cache decides (or says what is missing)
            log.warning("cannot resolve %s@%s on the hub (%s); using the local Hugging Face cache", repo_id, rev, err)
    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    ref = storage / "refs" / rev
    commit = rev if _COMMIT.fullmatch(rev) else (ref.read_text(encoding="utf-8").strip() if ref.is_file() else None)
    folder = storage / "snapshots" / (commit or "?")
    if not commit or not folder.is_dir():
        raise FileNotFoundError(
            f"model.name_or_path: {repo_id!r} (revision {rev}) is not in the Hugging Face cache ({storage}: no "
            f"{'snapshots/' + commit if commit else 'refs/' + rev}). Download it where there is network "
            f"(`hf download {repo_id}`) or point model.name_or_path at a local folder."
        )
    return folder, commit


def model_fingerprint(path: str, revision: str | None = None, trust_remote_code: bool = False) -> str:
    """Content hash of a model: what a training on it depends on.

    A local folder: its weights, config and tokenizer files (names and bytes). A hub id: the commit
    it resolves to (which names the weights) plus the bytes of that snapshot's tokenizer files, so a
    new upstream commit, or a tokenizer file changed in place in the cache, changes the fingerprint.
    """
    p = Path(path)
    if not p.exists():
        folder, commit = hub_snapshot(path, revision)
        return sha256_json({"hub": path, "commit": commit, "files": {
            str(q.relative_to(folder)): sha256_file(q) for q in tokenizer_files(folder, trust_remote_code)}})
    files = sorted(q for q in p.iterdir() if q.is_file() and q.suffix in {".json", ".safetensors", ".jinja", ".txt", ".model"})
    if trust_remote_code:
        files += sorted(p.glob("*.py"))
    import hashlib

    h = hashlib.sha256()
    for q in files:
        h.update(q.name.encode())
        h.update(sha256_file(q).encode())
    return h.hexdigest()
