"""Chat templates and the trained character spans they imply.

A template turns a conversation (`[{"role", "content"}, ...]`) into one string. Which characters
of that string the model is trained on is derived from the rendered text itself, so any Jinja
chat template works, with or without `{% generation %}` markers:

    render(messages[:i], add_generation_prompt=True)  ends where assistant turn i starts
    render(messages[:i + 1])                          ends where assistant turn i ends

The trained span of an assistant turn is its content plus the end-of-turn token
(`tokenizer.eos_token`, e.g. `<|im_end|>`), not the separator the template writes after it
(ChatML's trailing "\\n"). Because the span starts exactly where the generation prompt ends, the
prompt a user sends at inference (`add_generation_prompt=True`) is the text the model saw before
its first trained token. (`tasks.tokenize` encodes the text segment by segment at these edges,
so this holds for tokens too.) A template that rewrites earlier turns (Qwen3 drops past
reasoning) is not prefix-stable for such a conversation: `spans` raises NotPrefixStable and
`turn_sample` renders each assistant turn as its own sample.

Built-in templates (`tokenize.template`):
- `chatml`: `<|im_start|>role\\ncontent<|im_end|>\\n` (Qwen; needs those two special tokens);
- `llama2`: `<s>[INST] <<SYS>>\\nsystem\\n<</SYS>>\\n\\nuser [/INST] reply</s>` (seed 004). The
  space before the reply belongs to the reply: the prompt ends with `[/INST]`, the way Llama-2
  was trained, so the first reply token (`▁word`) is never split across prompt and reply;
- `plain`: prompt, a newline, reply, eos (seed 001's `instruct + input + label + eos`). The
  newline is our addition: with plain concatenation a BPE token can swallow the end of the
  prompt and the start of the reply, and the inference prompt would then not be a token prefix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA2 = (
    "{%- set bos = bos_token if bos_token else '' %}"
    "{%- set eos = eos_token if eos_token else '' %}"
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system = none %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if loop.first and system is not none and message['role'] != 'user' %}"
    "{{- raise_exception('llama2 template: a system message must be followed by a user message') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{{- bos + '[INST] ' }}"
    "{%- if loop.first and system is not none %}{{- '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{%- endif %}"
    "{{- message['content'] + ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- ' ' + message['content'] + eos }}"
    "{%- else %}"
    "{{- raise_exception('llama2 template: unsupported role ' + message['role']) }}"
    "{%- endif %}"
    "{%- endfor %}"
)

PLAIN = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}{{- message['content'] + (eos_token if eos_token else '') }}"
    "{%- else %}{{- message['content'] + '\\n' }}{%- endif %}"
    "{%- endfor %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {"chatml": CHATML, "llama2": LLAMA2, "plain": PLAIN}

# Special tokens a built-in template writes itself; the tokenizer must know them as single tokens.
_REQUIRED_SPECIALS = {"chatml": ("<|im_start|>", "<|im_end|>")}


class TemplateError(ValueError):
    """The chat template cannot be used (missing, unreadable, or not prefix-consistent)."""


class NotPrefixStable(TemplateError):
    """For this conversation, the render of a prefix is not a prefix of the whole render (Qwen3's
    template drops the reasoning of earlier turns). A property of one conversation, not of the set:
    the tokenizer splits it into one sample per assistant turn (`tokenize.multi_turn`)."""


def resolve_template(template: str, tokenizer: Any) -> str:
    """The Jinja text for `tokenize.template`: auto, a built-in name, or a path to a .jinja file."""
    if template == "auto":
        text = getattr(tokenizer, "chat_template", None)
        if isinstance(text, dict):  # several named templates: the default one is the chat template
            text = text.get("default")
        if not text:
            name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
            raise TemplateError(
                f"{name} has no chat template, so `tokenize.template: auto` has nothing to use. "
                f"Set `tokenize.template` to one of {', '.join(BUILTIN_TEMPLATES)} or a path to a .jinja file."
            )
        return text
    if template in BUILTIN_TEMPLATES:
        missing = [t for t in _REQUIRED_SPECIALS.get(template, ()) if t not in special_tokens(tokenizer)]
        if missing and hasattr(tokenizer, "convert_tokens_to_ids"):
            raise TemplateError(
                f"`tokenize.template: {template}` writes the special tokens {missing}, which this tokenizer does not "
                f"have as single tokens. Use `tokenize.template: auto` (the model's own template) or another template."
            )
        return BUILTIN_TEMPLATES[template]
    path = Path(template).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise TemplateError(
        f"`tokenize.template: {template}` is neither auto, a built-in ({', '.join(BUILTIN_TEMPLATES)}) "
        f"nor an existing .jinja file."
    )


def special_tokens(tokenizer: Any) -> set[str]:
    """Every token string the tokenizer treats as a control token (all_special_tokens + special added tokens)."""
    out = set(getattr(tokenizer, "all_special_tokens", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    out.update(str(t) for t in decoder.values() if getattr(t, "special", False))
    return out


def template_kwargs(tokenizer: Any) -> dict[str, Any]:
    """What `apply_chat_template` lets a template see besides the messages: bos_token, eos_token, ..."""
    kwargs = dict(getattr(tokenizer, "special_tokens_map", {}) or {})
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        kwargs.setdefault(name, getattr(tokenizer, name, None))
    return kwargs


def compile_template(template_text: str):
    """A compiled Jinja template with the environment transformers uses (sandbox, raise_exception, tojson)."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:  # pragma: no cover - moved in a future transformers
        _compile_jinja_template = None
    if _compile_jinja_template is not None:
        return _compile_jinja_template(template_text)
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # pragma: no cover

    def raise_exception(message):  # pragma: no cover
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # pragma: no cover
    env.globals["raise_exception"] = raise_exception  # pragma: no cover
    return env.from_string(template_text)  # pragma: no cover


class Renderer:
    """Renders conversations with one template; compiled once, reused for every sample."""

    def __init__(self, tokenizer: Any, template_text: str):
        try:
            self.template = compile_template(template_text)
        except Exception as err:  # jinja2.TemplateSyntaxError and friends
            raise TemplateError(f"the chat template (`tokenize.template`) is not valid Jinja: {err}") from None
        self.kwargs = template_kwargs(tokenizer)
        eos = getattr(tokenizer, "eos_token", None)
        self.eos = str(eos) if eos else None
        # The template's globals (a ChainMap) flattened once: `Template.render` merges them into a
        # fresh dict (and a set of their names) on every call, over half the render time of a short
        # conversation. The names only matter to `{% import %}`, which a template compiled from a
        # string cannot do (no loader).
        self._context = {**self.template.globals, **self.kwargs}

    def __call__(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """`template.render(messages=..., add_generation_prompt=..., **kwargs)`, without re-merging globals."""
        from jinja2.runtime import new_context

        t = self.template
        context = new_context(t.environment, t.name, t.blocks, shared=True, vars={
            **self._context, "messages": list(messages), "add_generation_prompt": add_generation_prompt})
        try:
            return t.environment.concat(t.root_render_func(context))
        except Exception:
            return t.environment.handle_exception()  # re-raises, with the template's line in the traceback

    def spans(self, messages: Sequence[dict], objective: str, train_on: str) -> tuple[str, list[tuple[int, int]]]:
        """The whole conversation rendered once and the character spans of its trained turns.

        Raises NotPrefixStable when the render of a prefix is not a prefix of the whole (the
        template rewrites earlier turns for this conversation); `turn_sample` then gives each turn
        its own sample.
        """
        full = self(messages)
        if objective == "pretrain":
            return full, [(0, len(full))] if full else []
        spans = []
        for i in trained_turns(messages, train_on):
            prompt = self(messages[:i], add_generation_prompt=True)
            upto = full if i == len(messages) - 1 else self(messages[: i + 1])
            for part, what in ((prompt, f"messages[:{i}] with add_generation_prompt=True"), (upto, f"messages[:{i + 1}]")):
                if not full.startswith(part):
                    raise NotPrefixStable(
                        f"the chat template's rendering of {what} is not a prefix of the whole conversation's "
                        "(the template rewrites earlier turns, e.g. drops past reasoning)"
                    )
            span = self._turn_span(prompt, upto)
            if span is not None:
                spans.append(span)
        return full, spans

    def turn_sample(self, messages: Sequence[dict], i: int) -> tuple[str, list[tuple[int, int]]]:
        """Assistant turn i as its own sample: messages[:i + 1] rendered, only its last turn trained.

        Its context is exactly what the template gives turn i at inference (the generation prompt
        of messages[:i]). Raises NotPrefixStable when even that is not a prefix of messages[:i + 1]'s
        render: then the turn's trained tokens cannot be located.
        """
        upto = self(messages[: i + 1])
        prompt = self(messages[:i], add_generation_prompt=True)
        if not upto.startswith(prompt):
            raise NotPrefixStable(
                f"the chat template's generation prompt for messages[:{i}] is not a prefix of its rendering of "
                f"messages[:{i + 1}], so the reply's tokens cannot be located"
            )
        span = self._turn_span(prompt, upto)
        return upto, [span] if span is not None else []

    def _turn_span(self, prompt: str, upto: str) -> tuple[int, int] | None:
        """From the end of the generation prompt to the turn's end token (inclusive)."""
        start = len(prompt)
        turn = upto[start:]
        k = turn.rfind(self.eos) if self.eos else -1
        # Content + end token; without an eos in the turn, the turn minus trailing whitespace.
        end = start + k + len(self.eos) if k >= 0 else start + len(turn.rstrip())
        return (start, end) if end > start else None


def trained_turns(messages: Sequence[dict], train_on: str) -> list[int]:
    """Indices of the assistant messages sft trains (all, or the last with `last_assistant`)."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return turns[-1:] if train_on == "last_assistant" else turns


def render(tokenizer: Any, template_text: str, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as the template writes it (the same text `apply_chat_template` gives)."""
    return Renderer(tokenizer, template_text)(messages, add_generation_prompt)


def trained_char_spans(
    tokenizer: Any, template_text: str, messages: Sequence[dict], objective: str = "sft", train_on: str = "all_assistant"
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the [start, end) character spans the model is trained on.

    sft: each assistant turn (all, or the last with `train_on="last_assistant"`), content plus
    end-of-turn token; pretrain: the whole text.
    """
    return Renderer(tokenizer, template_text).spans(messages, objective, train_on)
