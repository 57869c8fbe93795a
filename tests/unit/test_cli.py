"""The CLI's words (issue #17), through the real entry point in a subprocess, as a new user on a
fresh clone meets them: each failure is one `error:` line naming what to fix, with the documented
exit code (2 bad input, 1 refused), no traceback and no Prefect log noise before it. Also: every
option has help text, `--debug` shows the traceback, and the commands the README shows work as
written (the CLI synopsis parses; `prefect deployment run -p ...` passes the flow's parameter schema).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLOSED_PORT = "http://127.0.0.1:9"  # nothing listens: a hub that cannot be reached, deterministically


def ftflow(home: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "HF_", "TRANSFORMERS_"))}
    env.update(FTFLOW_HOME=str(home), HF_ENDPOINT=CLOSED_PORT, HF_HUB_CACHE=str(home.parent / "hf-cache"),
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    return subprocess.run([sys.executable, "-m", "ftflow.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_error(proc: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert " ERROR " not in proc.stderr, proc.stderr[-3000:]  # no logged errors (Prefect's) before it
    for frag in fragments:
        assert frag in proc.stderr, proc.stderr[-3000:]


def _hub_config(tmp: Path) -> Path:
    (tmp / "d.jsonl").write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    p = tmp / "hub.yaml"
    p.write_text("data: {train: [d.jsonl]}\nmodel: {name_or_path: Qwen/Qwen2.5-0.5B-Instruct}\n"
                 "train: {deepspeed: null, nproc_per_node: 1}\n")
    return p


def _bad_json(tmp: Path) -> Path:
    p = tmp / "bad.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n{oops\n')
    return p


# A fresh clone: nothing registered. (id, argv builder(tmp), exit code, fragments of the error line)
FRESH = [
    ("generate-empty-registry", lambda t: ["generate", "--model", "models:/ftflow-demo@champion", "hi"], 2,
     ["--model models:/ftflow-demo@champion: no registered model 'ftflow-demo'", "the registry is empty", "ftflow run"]),
    ("eval-missing-model-folder",
     lambda t: ["eval", "--model", "./no-such-model", "--data", "data/demo/reverse_eval.jsonl"], 2,
     ["--model ./no-such-model: no such folder (resolved to", "models:/NAME@ALIAS"]),
    ("eval-missing-data", lambda t: ["eval", "--model", "embedded:tiny-qwen2", "--data", "missing.jsonl"], 2,
     ["--data missing.jsonl: no such file", "data/demo/reverse_eval.jsonl"]),
    ("eval-bad-json-data", lambda t: ["eval", "--model", "embedded:tiny-qwen2", "--data", str(_bad_json(t))], 2,
     ["bad.jsonl:2: not valid JSON"]),
    ("eval-empty-registry", lambda t: ["eval", "--model", "models:/ftflow-demo@champion", "--data",
                                       "data/demo/reverse_eval.jsonl"], 2, ["no registered model 'ftflow-demo'"]),
    ("promote-empty-registry", lambda t: ["promote", "ftflow-demo", "1", "--why", "x"], 2,
     ["no registered model 'ftflow-demo'"]),
    ("rollback-empty-registry", lambda t: ["rollback", "ftflow-demo", "--why", "x"], 2,
     ["no registered model 'ftflow-demo'"]),
    ("promote-version-abc", lambda t: ["promote", "ftflow-demo", "abc", "--why", "x"], 2,
     ["VERSION must be a version number such as 1, got 'abc'"]),
    ("promote-without-why", lambda t: ["promote", "ftflow-demo", "1"], 2, ["required: --why"]),
    ("promote-blank-why", lambda t: ["promote", "ftflow-demo", "1", "--why", "  "], 2, ["--why must say why"]),
    ("rollback-without-why", lambda t: ["rollback", "ftflow-demo"], 2, ["required: --why"]),
    ("generate-hub-id-no-network", lambda t: ["generate", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "hi"], 2,
     ["is a Hugging Face Hub id, but the hub", "cannot be reached", "hf download Qwen/Qwen2.5-0.5B-Instruct"]),
    ("tokenize-hub-id-no-network", lambda t: ["tokenize", str(_hub_config(t))], 2,
     ["model.name_or_path: 'Qwen/Qwen2.5-0.5B-Instruct' is a Hugging Face Hub id", "cannot be reached"]),
    ("run-hub-id-no-network", lambda t: ["run", str(_hub_config(t))], 2,
     ["model.name_or_path: 'Qwen/Qwen2.5-0.5B-Instruct' is a Hugging Face Hub id", "point model.name_or_path"]),
    ("unknown-command", lambda t: ["frobnicate"], 2, ["invalid choice: 'frobnicate'"]),
    ("convert-missing-input", lambda t: ["convert", "no-such.jsonl", "--out", str(t / "o.jsonl")], 2, ["no-such.jsonl"]),
]


@pytest.fixture(scope="module")
def fresh_home(tmp_path_factory) -> Path:
    """One state folder for all fresh-clone cases: MLflow builds its empty SQLite store once, not per case."""
    return tmp_path_factory.mktemp("fresh") / "home"


@pytest.mark.parametrize("case", FRESH, ids=[c[0] for c in FRESH])
def test_fresh_clone_commands_fail_with_one_error_line(tmp_path, fresh_home, case):
    _, argv, code, fragments = case
    t0 = time.monotonic()
    proc = ftflow(fresh_home, *argv(tmp_path))
    assert_one_error(proc, code, *fragments)
    assert not (fresh_home / "runs").exists()  # nothing started
    if "hub-id" in case[0]:
        assert time.monotonic() - t0 < 60  # one probe, not a minute of retries (plus a busy machine's imports)


@pytest.fixture(scope="module")
def registry_home(tmp_path_factory) -> Path:
    """A state folder whose registry holds ftflow-demo versions 1 and 2, unscored, no aliases."""
    import mlflow

    home = tmp_path_factory.mktemp("reg") / "home"
    home.mkdir()
    uri = f"sqlite:///{home / 'mlflow.db'}"  # where configure_environment points a CLI with this FTFLOW_HOME
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("ftflow-demo")
    for _ in range(2):
        client.create_model_version("ftflow-demo", source="file:///nonexistent")
    return home


# Run in this order against one registry; the last two run the README's promote for real.
WITH_REGISTRY = [
    ("promote-version-99", ["promote", "ftflow-demo", "99", "--why", "x"], 2,
     ["model 'ftflow-demo' has no version 99 (versions: 1, 2)"]),
    ("promote-unknown-model", ["promote", "nosuchmodel", "1", "--why", "x"], 2,
     ["no registered model 'nosuchmodel'", "registered models: ftflow-demo"]),
    ("promote-unscored", ["promote", "ftflow-demo", "1", "--why", "x"], 1,
     ["ftflow-demo version 1 has no scored inference run", "--force"]),
    ("rollback-no-champion", ["rollback", "ftflow-demo", "--why", "x"], 1,
     ["model 'ftflow-demo' has no champion to roll back", "ftflow promote ftflow-demo VERSION --why"]),
    ("generate-missing-alias", ["generate", "--model", "models:/ftflow-demo@champion", "hi"], 2,
     ["has no alias @champion (aliases: none; versions: 1, 2)"]),
    ("eval-missing-version", ["eval", "--model", "models:/ftflow-demo/7", "--data", "data/demo/reverse_eval.jsonl"], 2,
     ["model 'ftflow-demo' has no version 7 (versions: 1, 2)"]),
]


@pytest.mark.integration  # three real Prefect flow runs (promote, promote, rollback): ~1-3 min on a busy 2-core machine
def test_registry_commands(registry_home):
    for name, argv, code, fragments in WITH_REGISTRY:
        proc = ftflow(registry_home, *argv)
        try:
            assert_one_error(proc, code, *fragments)
        except AssertionError as err:
            raise AssertionError(f"case {name}: {err}") from None
    # The README's `ftflow promote NAME VERSION [--force] --why TEXT`, for real (a Prefect flow run).
    proc = ftflow(registry_home, "promote", "ftflow-demo", "2", "--force", "--why", "hotfix from the README")
    assert proc.returncode == 0 and "ftflow-demo: champion none -> 2" in proc.stdout, (proc.stdout + proc.stderr)[-3000:]
    proc = ftflow(registry_home, "rollback", "ftflow-demo", "--why", "x")  # version 2 replaced nobody
    assert_one_error(proc, 1, "has no previous champion recorded")
    proc = ftflow(registry_home, "promote", "ftflow-demo", "1", "--force", "--why", "second thoughts")
    assert proc.returncode == 0 and "ftflow-demo: champion 2 -> 1" in proc.stdout, (proc.stdout + proc.stderr)[-3000:]
    # The README's `ftflow rollback NAME --why TEXT`, for real.
    proc = ftflow(registry_home, "rollback", "ftflow-demo", "--why", "bad replies")
    assert proc.returncode == 0 and "ftflow-demo: champion 1 -> 2 (rollback)" in proc.stdout, (proc.stdout + proc.stderr)[-3000:]
    import mlflow

    uri = f"sqlite:///{registry_home / 'mlflow.db'}"
    mv = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version("ftflow-demo", "1")
    assert mv.tags["ftflow.rollback.why"] == "bad replies" and mv.tags["ftflow.promotion.why"] == "second thoughts"


def test_lookup_version_finds_what_exists(registry_home, monkeypatch):
    from tasks.registry import lookup_version

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{registry_home / 'mlflow.db'}")
    assert lookup_version("ftflow-demo", "2").version in ("2", 2)
    assert lookup_version("ftflow-demo") is None
    with pytest.raises(LookupError, match="no alias @nope"):
        lookup_version("ftflow-demo", alias="nope")


def test_debug_shows_the_traceback(tmp_path):
    for argv in (["--debug", "run", "configs"], ["run", "configs", "--debug"]):
        proc = ftflow(tmp_path / "home", *argv)
        assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigError: config file configs is a folder" in proc.stderr


def test_unexpected_failure_is_one_line_with_a_pointer_to_debug(monkeypatch, capsys):
    import ftflow.cli as cli

    def boom(args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(cli, "_setup", lambda: None)
    monkeypatch.setattr(cli, "cmd_convert", boom)
    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser(), "convert", boom))
    assert cli.main(["convert", "x.jsonl", "--out", "y.jsonl"]) == 1
    err = capsys.readouterr().err
    assert err == "error: disk on fire (RuntimeError; run again with --debug for the traceback)\n"
    with pytest.raises(RuntimeError, match="disk on fire"):
        cli.main(["--debug", "convert", "x.jsonl", "--out", "y.jsonl"])


def _with_func(parser: argparse.ArgumentParser, command: str, func) -> argparse.ArgumentParser:
    _subcommands(parser)[command].set_defaults(func=func)
    return parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_option_has_help():
    from ftflow.cli import build_parser

    missing = [f"{name} {a.dest}" for name, sp in _subcommands(build_parser()).items() for a in sp._actions
               if not a.help or not a.help.strip()]
    assert missing == []


def test_config_argument_defaults_agree_with_help():
    """run, tokenize and show-sample take an optional CONFIG, defaulting to configs/demo.yaml as their help says."""
    from ftflow.cli import DEFAULT_CONFIG, _config_path, build_parser

    subs = _subcommands(build_parser())
    for name in ("run", "tokenize", "show-sample"):
        config = next(a for a in subs[name]._actions if a.dest == "config")
        assert config.nargs == "?" and f"default {DEFAULT_CONFIG}" in config.help
        assert subs[name].parse_args([]).config is None
    assert _config_path(None).endswith(DEFAULT_CONFIG) and Path(_config_path(None)).is_file()


# ----------------------------------------------------------------------------- the README's commands

README = (REPO / "README.md").read_text()
PLACEHOLDERS = {  # a synopsis placeholder -> a value a user would type
    "CONFIG": "configs/demo.yaml", "KEY=VALUE": "train.seed=7", "PATH": "summary.json", "INPUT...": "data/demo/poems.json",
    "FILE": "out.jsonl", "F": "auto", "R.json": "report.json", "N": "3", "NAME": "ftflow-demo", "VERSION": "2",
    "TEXT": "passed review", "models:/NAME@ALIAS|PATH": "models:/ftflow-demo@champion",
    "models:/NAME@ALIAS|models:/NAME/VERSION|PATH": "models:/ftflow-demo/2", '"prompt"': "hi",
}


def _synopsis_lines() -> list[str]:
    block = README.split("## Commands", 1)[1].split("```", 2)[1]
    lines = [ln for ln in block.splitlines() if ln.startswith("ftflow ")]
    col = re.match(r"ftflow .*?\S\s{2,}", lines[0]).end()  # where the description column starts
    return [ln[:col].strip() for ln in lines]


def _instantiate(line: str) -> list[str]:
    """`ftflow run [CONFIG] [--set KEY=VALUE ...]` -> ["run", "configs/demo.yaml", "--set", "train.seed=7"]."""
    words = []
    for w in shlex.split(line.replace("[", " ").replace("]", " ").replace(" ...", " "))[1:]:
        words.append(PLACEHOLDERS.get(w, w))
    return words


def test_readme_synopsis_parses_as_written():
    from ftflow.cli import build_parser

    lines = _synopsis_lines()
    assert {ln.split()[1] for ln in lines} == set(_subcommands(build_parser()))  # every command is shown
    for line in lines:
        argv = _instantiate(line)
        args = build_parser().parse_args(argv)
        assert args.command == argv[0], line
        # what the synopsis marks as required really is: dropping any `--option VALUE` it shows unbracketed fails
        required = re.findall(r"(?<!\[)(--[a-z-]+) [A-Z]", line)
        for opt in required:
            i = argv.index(opt)
            with pytest.raises(SystemExit):
                build_parser().parse_args(argv[:i] + argv[i + 2:])


def test_readme_ftflow_examples_parse():
    """Every literal `ftflow …` / `.venv/bin/ftflow …` command in the README's code blocks parses."""
    from ftflow.cli import build_parser

    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    examples = []
    for block in blocks:
        text = block.replace("\\\n", " ")
        for ln in text.splitlines():
            ln = ln.split(" #", 1)[0].strip()
            m = re.match(r"^(?:[A-Z_]+=\S+\s+)*(?:\.venv/bin/)?ftflow (.*)$", ln)  # FTFLOW_HOME=... ftflow run ...
            if m and "[" not in ln and "|" not in ln:
                examples.append(shlex.split(m.group(1)))
    assert len(examples) >= 3, examples  # the seed re-run and the Ray cluster / Slurm lines at least
    for argv in examples:
        build_parser().parse_args(argv)


def test_readme_prefect_deployment_run_parameters_validate():
    """`prefect deployment run 'promote/on-demand' -p model_name=… -p version=1 -p why=…` as the README
    writes it: Prefect's own `-p` parsing, then the server's validation against the flow's schema."""
    from prefect.cli._utilities import load_json_key_values
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    from flows.promote import promote, rollback

    flows = {"promote": promote, "rollback": rollback}
    lines = re.findall(r"prefect deployment run '([a-z]+)/[a-z-]+'((?: -p [^`\n]+?)+)`", README)
    assert lines, "the README shows no `prefect deployment run` command"
    for flow_name, params in lines:
        if flow_name not in flows:
            continue
        values = load_json_key_values([p for p in shlex.split(params) if p != "-p"], "parameter")
        schema = parameter_schema(flows[flow_name].fn).model_dump_for_openapi()
        validate(values, schema, raise_on_error=True)  # raises on a value the server would refuse
        assert "why" in schema["required"] and "why" in values
    schema = parameter_schema(promote.fn).model_dump_for_openapi()
    validate({"model_name": "m", "version": 1, "why": "ok"}, schema, raise_on_error=True)
    for bad in ({"model_name": "m", "version": 1}, {"model_name": "m", "version": 1, "why": "  "},
                {"model_name": "m", "version": "abc", "why": "ok"}, {"model_name": "m", "version": 0, "why": "ok"}):
        with pytest.raises(ValidationError):
            validate(bad, schema, raise_on_error=True)
