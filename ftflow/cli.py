"""`ftflow` command line: run the pipeline, or one stage of it, from a terminal.

    ftflow run [CONFIG] [--set KEY=VALUE ...] [--summary-json PATH]
    ftflow convert INPUT... --out FILE [--format FMT] [--report REPORT.json]
    ftflow tokenize CONFIG [--json]
    ftflow show-sample CONFIG --index N
    ftflow eval --model models:/NAME@ALIAS|models:/NAME/VERSION|PATH --data FILE
    ftflow generate --model models:/NAME@ALIAS|PATH "prompt"
    ftflow promote NAME VERSION [--force] --why TEXT
    ftflow rollback NAME --why TEXT

Every failure is one `error: ...` line on stderr (what failed, the file/key/URL, what to do) and
exit code 2 for bad input (config, arguments, missing files or models), 1 for an operation that
failed or was refused; `--debug` (anywhere on the command line) shows the Python traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
import time
from pathlib import Path

DEFAULT_CONFIG = "configs/demo.yaml"
OWN_LOGGERS = ("ftflow", "tasks", "flows", "infra")  # their errors read like the CLI's own: `error: ...`


class CliError(Exception):
    """A problem with what the user asked for, already phrased for them (exit 2 unless `code`)."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


class _ConsoleFormatter(logging.Formatter):
    """Errors of ftflow's own loggers print as `error: ...`, like the CLI's; the rest with time and source."""

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno >= logging.ERROR and record.name.split(".")[0] in OWN_LOGGERS and not record.exc_info:
            return "error: " + record.getMessage()
        return super().format(record)


def _setup() -> None:
    from infra.local import configure_environment

    _check_state_dir()
    configure_environment()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ConsoleFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    for noisy in ("httpx", "alembic", "mlflow.store", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _check_state_dir() -> None:
    """`FTFLOW_HOME` must be a folder ftflow can create or use (it holds MLflow, Prefect and caches)."""
    import os

    home = os.environ.get("FTFLOW_HOME")
    if not home:
        return
    path = Path(home).expanduser()
    fix = "set FTFLOW_HOME to a folder (it is created if missing), or unset it to use .ftflow/ in the project"
    if path.exists() and not path.is_dir():
        raise CliError(f"FTFLOW_HOME={home} is a file, not a folder; {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CliError(f"FTFLOW_HOME={home} cannot be created ({err.strerror}); {fix}") from None


def _err(message: str) -> None:
    """`error: MESSAGE` on stderr, whatever the terminal's encoding (a non-UTF-8 file name stays printable)."""
    data = f"error: {message}\n".encode(sys.stderr.encoding or "utf-8", "backslashreplace")
    sys.stderr.flush()
    if hasattr(sys.stderr, "buffer"):
        sys.stderr.buffer.write(data)
    else:  # a replaced stream without bytes underneath
        sys.stderr.write(data.decode(sys.stderr.encoding or "utf-8", "replace"))
    sys.stderr.flush()


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _config_path(arg: str | None) -> str:
    """The config argument, or configs/demo.yaml (of the working directory, else of the project)."""
    if arg:
        return arg
    from ftflow.utils import PROJECT_ROOT

    local = Path(DEFAULT_CONFIG)
    return str(local if local.exists() else PROJECT_ROOT / DEFAULT_CONFIG)


def cmd_run(args: argparse.Namespace) -> int:
    from ftflow.config import load_config

    cfg = load_config(_config_path(args.config), args.set)  # validated before anything heavy starts
    from tasks.preflight import check

    check(cfg)  # data, model, FTFLOW_HOME, MLflow store/server, disk: before Prefect or MLflow start
    if cfg.model.hub_token is not None:  # handed to from_pretrained (and every rank) via the environment only
        import os

        os.environ.setdefault("HF_TOKEN", cfg.model.hub_token.get_secret_value())
    from infra.local import preload_stage_libraries, start_prefect_server_early

    prefect_ready = start_prefect_server_early()  # comes up while the imports below run
    from flows.finetune import finetune, run_output_dir
    from ftflow.utils import state_dir
    from infra.local import RunLog

    preload_stage_libraries()
    prefect_ready()

    debug = bool(getattr(args, "debug", False))
    run_log = RunLog(state_dir() / "runs" / cfg.name, debug=debug)
    t0 = time.perf_counter()
    try:
        try:
            state = finetune(cfg, return_state=True)
        except KeyboardInterrupt as err:  # Ctrl-C: the ranks are stopped by the flow's own clean-up
            run_log.record_failure(err, "ftflow run interrupted")
            sys.stderr.write(f"error: interrupted; the next run resumes from the latest complete checkpoint "
                             f"(full log: {run_log.path})\n")
            return 130
        except Exception as err:  # the flow could not even start (Prefect's server, ...)
            run_log.record_failure(err, "ftflow run could not start the flow")
            return _report_run_failure(err, run_log, None, debug)
        flow_run_id = state.state_details.flow_run_id
        if flow_run_id is not None:
            run_log.move_to(run_output_dir(cfg.name, flow_run_id))
        if not state.is_completed():
            err = state.result(raise_on_failure=False)
            if not isinstance(err, BaseException):
                err = RuntimeError(state.message or f"the flow run ended {state.name}")
            run_log.record_failure(err, "ftflow run failed")
            return _report_run_failure(err, run_log, run_log.failed_stage, debug)
        summary = state.result()
    finally:
        run_log.close()
    summary["wall_time_s"] = round(time.perf_counter() - t0, 1)
    summary["log"] = str(run_log.path)
    if args.summary_json:
        Path(args.summary_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary_json).write_text(json.dumps(summary, indent=2, default=str))
    _print_summary(summary)
    return 0


def _report_run_failure(err: BaseException, run_log, stage: str | None, debug: bool) -> int:
    """One message for a failed `ftflow run`: what failed and what to do, where the log is, the exit code."""
    headline, details, code = describe_failure(err)
    if debug:
        import traceback

        traceback.print_exception(type(err), err, err.__traceback__, file=sys.stderr)
    lines = [f"error: {headline}", *(f"  {d}" for d in details)]
    if run_log.write_error is not None:
        lines.append(f"  full log: {run_log.path} (incomplete: {run_log.write_error})")
    else:
        lines.append(f"  full log (every traceback): {run_log.path}")
    where = f"in stage '{stage}' " if stage else ""
    lines.append(f"ftflow run failed {where}(exit code {code})" + ("" if debug else "; --debug shows the tracebacks here"))
    sys.stderr.write("\n".join(lines) + "\n")
    return code


_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


def _chain(err: BaseException):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def describe_failure(err: BaseException) -> tuple[str, list[str], int]:
    """(headline, detail lines, exit code) for an error that ended a command, in a person's words.

    Exit codes: 2 bad input (data, config), 1 anything else that failed. The exception's own message
    is used where it already names the file or key; tracebacks are for the log file and --debug."""
    from tasks.train import TrainingFailed

    def first_line(e: BaseException) -> str:
        text = str(e).strip().splitlines()
        return (text[0] if text else type(e).__name__)[:500]

    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            # a write() error carries no file name: then the error that wrapped it names the path
            what = f"could not write {e.filename} ({e.strerror or e})" if e.filename else first_line(err)
            return (f"disk full: {what}",
                    ["free space on that disk (or set FTFLOW_HOME to a larger one) and run the same command "
                     "again; what was written and registered before is untouched"], 1)
        if isinstance(e, OSError) and e.errno in _NOT_WRITABLE and e.filename:
            return (f"could not write {e.filename} ({e.strerror or e})",
                    ["make it writable (or set FTFLOW_HOME / MLFLOW_TRACKING_URI to a place you can write), "
                     "then run the same command again"], 1)
    if isinstance(err, TrainingFailed):
        import re

        from tasks.train import describe_exit

        code = err.exit_code
        headline = (f"training failed: rank {err.rank if err.rank is not None else '?'} exited with code {code}"
                    + (f" ({describe_exit(code)})" if code is not None and code < 0 else ""))
        if code is None:  # not a rank's exit: a timeout, or a training that ended without its marker
            headline = f"training failed: {first_line(err).split(' Logs: ')[0].removeprefix('training failed: ')}"
        logs = re.search(r"Full logs: (\S+)|Logs: (\S+)", str(err))
        details = [ln for ln in (err.error or "").splitlines() if ln.strip()][-8:]
        if logs:
            details.append(f"rank logs: {(logs.group(1) or logs.group(2)).rstrip('.')}")
        details.append("fix the cause, then run the same command again: training resumes from the latest "
                       "complete checkpoint")
        return headline, details, 1
    try:
        from tasks.convert import DataError
    except ImportError:  # pragma: no cover
        DataError = ()  # noqa: N806
    if isinstance(err, DataError):
        return (first_line(err), [ln for ln in str(err).splitlines()[1:6]], 2)
    if _is_mlflow_error(err):
        import os

        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        return (f"MLflow ({uri}) failed: {first_line(err)}",
                ["check that the tracking server is up (`python -m infra.stack status`) or the store writable; "
                 "nothing is half-registered: run the same command again once it is back"], 1)
    return (f"{type(err).__name__}: {first_line(err)}", [], 1)


def _is_mlflow_error(err: BaseException) -> bool:
    for e in _chain(err):
        mod = type(e).__module__ or ""
        if mod.startswith(("mlflow", "requests", "urllib3")):
            return True
    return False


def _print_summary(s: dict) -> None:
    ch, cp = s["scores"]["challenger"], s["scores"]["champion"]
    metrics = [m for m in ("exact_match", "char_f1", "rouge_l", "bleu", "loss", "no_stop_rate") if m in ch]
    _out("")
    _out("=" * 72)
    _out(f"ftflow run complete in {s['wall_time_s']} s")
    _out(f"  registered model : {s['registered_model']} version {s['version']}"
         + (" (already registered: same data, config and code)" if s.get("already_registered") else ""))
    _out(f"  tokenized cache  : {'hit' if s['tokenized_cache_hit'] else 'built'}")
    _out(f"  {'metric':<14}{s['compared_with']:>22}{'fine-tuned':>14}")
    for m in metrics:
        _out(f"  {m:<14}{cp.get(m, float('nan')):>22.4f}{ch.get(m, float('nan')):>14.4f}")
    from tasks.stages import promotion_verdict  # the same words as the run log and the artifact

    verdict = promotion_verdict({"promote": s["promoted"], "already_champion": s.get("already_champion")})
    _out(f"  promotion        : {verdict} — {s['decision']}")
    _out(f"  MLflow           : {s['mlflow_tracking_uri']} (run {s['mlflow_run_id']}; `mlflow ui --backend-store-uri {s['mlflow_tracking_uri']}`)")
    _out(f"  Prefect          : flow run {s['prefect_flow_run_id']} ({s['prefect_api_url']})")
    _out(f"  outputs          : {s['outputs']}")
    _out("=" * 72)


def cmd_convert(args: argparse.Namespace) -> int:
    from tasks.convert import convert_cli

    return convert_cli(args.inputs, args.out, fmt=args.format, report=args.report, on_bad_row=args.on_bad_row,
                       max_reject_fraction=args.max_reject_fraction, system_prompt=args.system_prompt)


def _check_config_model(config: str, overrides: list[str]) -> None:
    """The config's model can be loaded here (a hub id: cached or the hub reachable), checked in seconds."""
    from ftflow.config import EMBEDDED_PREFIX, load_config

    cfg = load_config(config, overrides)
    name = cfg.model.name_or_path
    if not name.startswith(EMBEDDED_PREFIX) and not Path(name).exists():
        from tasks.base_model import hub_model_problem

        problem = hub_model_problem(name, cfg.model.revision)
        if problem:
            raise CliError(f"model.name_or_path: {problem}")


def _check_model_arg(ref: str) -> None:
    """`--model` of eval/generate names something loadable: a registered version or alias, a model
    folder, `embedded:NAME`, or a hub id that is cached or reachable. Checked before any flow starts."""
    from ftflow.config import EMBEDDED_PREFIX, looks_like_path

    kinds = "models:/NAME@ALIAS, models:/NAME/VERSION, a model folder, or a Hugging Face Hub id"
    if ref.startswith("models:/"):
        from tasks.registry import lookup_version

        rest = ref[len("models:/"):]
        try:
            if "@" in rest:
                name, alias = rest.split("@", 1)
                lookup_version(name, alias=alias)
            elif "/" in rest:
                name, version = rest.rsplit("/", 1)
                lookup_version(name, version)
            else:
                raise CliError(f"--model {ref}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        except LookupError as err:
            raise CliError(f"--model {ref}: {err}") from None
        return
    if ref.startswith(EMBEDDED_PREFIX):
        return
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir() or not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
            raise CliError(f"--model {ref}: {path.resolve()} is not a Hugging Face model folder (no config.json or "
                           f"adapter_config.json); pass {kinds}")
        return
    if looks_like_path(ref):
        raise CliError(f"--model {ref}: no such folder (resolved to {path.resolve()}); pass {kinds}")
    from tasks.base_model import hub_model_problem

    problem = hub_model_problem(ref)
    if problem:
        raise CliError(f"--model {ref}: {problem}")


def cmd_tokenize(args: argparse.Namespace) -> int:
    from tasks.tokenize import tokenize_cli

    config = _config_path(args.config)
    _check_config_model(config, args.set)
    return tokenize_cli(config, args.set, args.json)


def cmd_show_sample(args: argparse.Namespace) -> int:
    from tasks.tokenize import show_sample_cli

    config = _config_path(args.config)
    _check_config_model(config, args.set)
    return show_sample_cli(config, args.set, args.index)


def cmd_eval(args: argparse.Namespace) -> int:
    from tasks.evaluate import read_eval_jsonl

    _check_model_arg(args.model)
    try:  # the data file is read once here, so its problems are named before any flow starts
        read_eval_jsonl(args.data, args.max_samples)
    except FileNotFoundError:
        raise CliError(f"--data {args.data}: no such file (resolved to {Path(args.data).resolve()}); pass a canonical "
                       "JSONL file, e.g. data/demo/reverse_eval.jsonl (`ftflow convert` makes one)") from None
    except (ValueError, OSError) as err:
        raise CliError(f"--data {args.data}: {err}") from None
    from flows.evaluate import eval_cli  # Prefect: imported once the input is known to be good

    gen = {k: getattr(args, k) for k in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty",
                                         "no_repeat_ngram_size") if getattr(args, k) is not None}
    return eval_cli(args.model, args.data, args.max_samples, args.batch_size, args.max_new_tokens,
                    generation=gen, experiment=args.experiment, record=not args.no_record)


def cmd_generate(args: argparse.Namespace) -> int:
    from tasks.evaluate import generate_cli

    _check_model_arg(args.model)
    return generate_cli(args.model, args.prompt, args.max_new_tokens, args.system)


def _why(text: str) -> str:
    if not text.strip():
        raise CliError("--why must say why (it is recorded on the version for the audit trail), e.g. --why \"passed review\"")
    return text


def _registry_check(check, *args, **kwargs) -> None:
    """Run a registry check before Prefect is imported: no such model/version -> exit 2, refused -> exit 1."""
    from tasks.registry import PromotionRefused

    try:
        check(*args, **kwargs)
    except LookupError as err:
        raise CliError(str(err)) from None
    except PromotionRefused as err:
        raise CliError(str(err), code=1) from None


def cmd_promote(args: argparse.Namespace) -> int:
    from tasks.registry import promotable_version

    why = _why(args.why)
    _registry_check(promotable_version, args.name, args.version, force=args.force)
    from flows.promote import promote_cli

    return promote_cli(args.name, args.version, args.force, why)


def cmd_rollback(args: argparse.Namespace) -> int:
    from tasks.registry import rollback_target

    why = _why(args.why)
    _registry_check(rollback_target, args.name)
    from flows.promote import rollback_cli

    return rollback_cli(args.name, why)


def _version_number(text: str) -> str:
    if not (text.isdigit() and int(text) > 0):
        raise argparse.ArgumentTypeError(f"VERSION must be a version number such as 1, got {text[:40]!r}")
    return text


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one error prefix: usage, then `error: ...`, exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        _err(f"{message} (see `{self.prog} --help`)")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="ftflow",
        description="Fine-tune Hugging Face causal LMs: data -> tokens -> DeepSpeed -> MLflow registry -> scored, promoted models.",
        epilog="Exit codes: 0 done, 1 the operation failed or was refused, 2 bad input (config, arguments, files, models).",
    )
    debug_help = "show the full Python traceback of a failure (default: one `error:` line)"
    p.add_argument("--debug", action="store_true", help=debug_help)
    # --debug is accepted after the command too (`ftflow run --debug`); SUPPRESS keeps the global value.
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("config", nargs="?", help=f"pipeline YAML (default {DEFAULT_CONFIG})")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, dotted, validated like the file (e.g. --set train.seed=7); repeatable")

    r = sub.add_parser("run", parents=[common], help="run the whole pipeline (Prefect flow 'finetune') on a config")
    with_config(r)
    r.add_argument("--summary-json", metavar="PATH", help="also write the run summary as JSON")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("convert", parents=[common],
                       help="convert input files to canonical chat JSONL, with a rejects file and report")
    c.add_argument("inputs", nargs="+", help="files, folders or globs (JSON, JSONL, CSV, Parquet), or hf:NAME[:SPLIT]")
    c.add_argument("--out", required=True, help="canonical JSONL to write (rejects go next to it)")
    c.add_argument("--format", default="auto", choices=["auto", "alpaca", "sharegpt", "messages", "text"],
                   help="input format: alpaca (instruction/input/output), sharegpt (conversations from/value), "
                        "messages (OpenAI role/content), text (plain text); auto detects it per file (default)")
    c.add_argument("--report", metavar="R.json", help="write the JSON report (counts, rejects by reason) here")
    c.add_argument("--on-bad-row", default="quarantine", choices=["quarantine", "raise"],
                   help="quarantine: write bad rows to the rejects file with a reason and go on (default); "
                        "raise: stop at the first bad row")
    c.add_argument("--max-reject-fraction", type=float, default=0.01, metavar="F",
                   help="fail (exit 1) when more than this share of the rows is rejected (default 0.01 = 1%%)")
    c.add_argument("--system-prompt", default=None, help="system message for samples without one")
    c.set_defaults(func=cmd_convert)

    t = sub.add_parser("tokenize", parents=[common], help="build (or hit) the tokenized cache of a config and print its stats")
    with_config(t)
    t.add_argument("--json", action="store_true", help="print the result as JSON")
    t.set_defaults(func=cmd_tokenize)

    s = sub.add_parser("show-sample", parents=[common], help="print one tokenized sample with its trained spans marked")
    with_config(s)
    s.add_argument("--index", type=int, default=0, metavar="N",
                   help="which sample of the tokenized train set (0-based; negative counts from the end; default 0)")
    s.set_defaults(func=cmd_show_sample)

    models = "models:/NAME@ALIAS, models:/NAME/VERSION, a model folder, or a Hugging Face Hub id"
    e = sub.add_parser("eval", parents=[common],
                       help="scored inference run (Prefect flow 'evaluate') of a model on a canonical JSONL file")
    e.add_argument("--model", required=True, help=models)
    e.add_argument("--data", required=True, help="canonical JSONL (last turn = reference reply)")
    e.add_argument("--max-samples", type=int, default=None, metavar="N", help="score only the first N samples")
    e.add_argument("--batch-size", type=int, default=32, metavar="N", help="prompts generated together (default 32)")
    e.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="longest reply in tokens (default 64)")
    e.add_argument("--do-sample", action="store_true", default=None, help="sample instead of greedy decoding")
    e.add_argument("--temperature", type=float, default=None, help="sampling temperature (with --do-sample)")
    e.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep this probability mass (with --do-sample)")
    e.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens (with --do-sample)")
    e.add_argument("--repetition-penalty", type=float, default=None, help="> 1 makes repeated tokens less likely")
    e.add_argument("--no-repeat-ngram-size", type=int, default=None, metavar="N", help="never repeat an n-gram of this size")
    e.add_argument("--experiment", default="ftflow", help="MLflow experiment of the scored run (default ftflow)")
    e.add_argument("--no-record", action="store_true",
                   help="do not tag a registered version with these scores (it stays unpromotable by them)")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", parents=[common], help="chat with a model: prints the reply as it is generated")
    g.add_argument("--model", required=True, help=models)
    g.add_argument("prompt", help="the user message")
    g.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="longest reply in tokens (default 128)")
    g.add_argument("--system", default=None, help="system message")
    g.set_defaults(func=cmd_generate)

    pr = sub.add_parser("promote", parents=[common],
                        help="point alias @champion at a version (Prefect flow 'promote'; refuses unscored versions unless --force)")
    pr.add_argument("name", help="registered model name, e.g. ftflow-demo")
    pr.add_argument("version", type=_version_number, help="version number to make champion, e.g. 3")
    pr.add_argument("--force", action="store_true",
                    help="promote even a version without a scored inference run (recorded as forced)")
    pr.add_argument("--why", required=True, help="the reason, recorded on the version for the audit trail (required)")
    pr.set_defaults(func=cmd_promote)

    rb = sub.add_parser("rollback", parents=[common], help="move @champion back to the previous champion (Prefect flow 'rollback')")
    rb.add_argument("name", help="registered model name, e.g. ftflow-demo")
    rb.add_argument("--why", required=True, help="the reason, recorded on both versions for the audit trail (required)")
    rb.set_defaults(func=cmd_rollback)
    return p


def _user_error(err: BaseException) -> tuple[int, str] | None:
    """(exit code, message) for failures that are the user's to fix; None for anything else."""
    from ftflow.config import ConfigError
    from tasks.preflight import PreflightError

    if isinstance(err, CliError):
        return err.code, str(err)
    if isinstance(err, (ConfigError, PreflightError)):
        return 2, str(err)
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    try:
        _setup()
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except Exception as err:
        if debug:
            raise
        known = _user_error(err)
        if known:
            _err(known[1])
            return known[0]
        from ftflow.config import quote

        text = str(err) if len(str(err)) <= 2000 else quote(str(err))
        _err(f"{text or type(err).__name__} ({type(err).__name__}; run again with --debug for the traceback)")
        return 1


def entry() -> None:
    """The `ftflow` command (and `python -m ftflow.cli`): `main`, then a fast exit.

    Once `main` has returned, Python's own clean-up has nothing left to save, yet tearing down an
    interpreter that loaded torch, transformers and MLflow took ~3 s of the demo's wall time
    (no Python frame: the modules' C-level teardown). So the exit handlers run (Prefect's
    temporary server stops, log and MLflow queues flush, files close), the streams are flushed,
    and the process ends with `os._exit`. `main` itself returns normally, for callers in-process."""
    import atexit
    import os

    code = main()
    try:
        atexit._run_exitfuncs()  # what interpreter exit would run first (registered handlers, LIFO)
        logging.shutdown()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


if __name__ == "__main__":
    entry()
