"""`ftflow` command line: run the pipeline, or one stage of it, from a terminal.

    ftflow run [CONFIG] [--set KEY=VALUE ...] [--summary-json PATH]
    ftflow convert INPUT... --out FILE [--format FMT] [--report REPORT.json]
    ftflow tokenize CONFIG [--json]
    ftflow show-sample CONFIG --index N
    ftflow eval --model models:/NAME@ALIAS|models:/NAME/VERSION|PATH --data FILE
    ftflow generate --model models:/NAME@ALIAS|PATH "prompt"
    ftflow promote NAME VERSION [--force] --why TEXT
    ftflow rollback NAME --why TEXT
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


def _setup() -> None:
    from infra.local import configure_environment

    configure_environment()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "alembic", "mlflow.store", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _config_path(arg: str | None) -> str:
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
    from flows.finetune import finetune, run_output_dir
    from ftflow.utils import state_dir
    from infra.local import RunLog

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


def cmd_tokenize(args: argparse.Namespace) -> int:
    from tasks.tokenize import tokenize_cli

    return tokenize_cli(_config_path(args.config), args.set, args.json)


def cmd_show_sample(args: argparse.Namespace) -> int:
    from tasks.tokenize import show_sample_cli

    return show_sample_cli(_config_path(args.config), args.set, args.index)


def cmd_eval(args: argparse.Namespace) -> int:
    from flows.evaluate import eval_cli

    gen = {k: getattr(args, k) for k in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty",
                                         "no_repeat_ngram_size") if getattr(args, k) is not None}
    return eval_cli(args.model, args.data, args.max_samples, args.batch_size, args.max_new_tokens,
                    generation=gen, experiment=args.experiment, record=not args.no_record)


def cmd_generate(args: argparse.Namespace) -> int:
    from tasks.evaluate import generate_cli

    return generate_cli(args.model, args.prompt, args.max_new_tokens, args.system)


def cmd_promote(args: argparse.Namespace) -> int:
    from flows.promote import promote_cli

    return promote_cli(args.name, args.version, args.force, args.why)


def cmd_rollback(args: argparse.Namespace) -> int:
    from flows.promote import rollback_cli

    return rollback_cli(args.name, args.why)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ftflow",
        description="Fine-tune Hugging Face causal LMs: data -> tokens -> DeepSpeed -> MLflow registry -> scored, promoted models.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sp: argparse.ArgumentParser, optional: bool) -> None:
        sp.add_argument("config", nargs="?" if optional else None, help=f"pipeline YAML (default {DEFAULT_CONFIG})")
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, dotted, validated like the file (e.g. --set train.seed=7); repeatable")

    r = sub.add_parser("run", help="run the whole pipeline (Prefect flow 'finetune') on a config")
    with_config(r, optional=True)
    r.add_argument("--summary-json", metavar="PATH", help="also write the run summary as JSON")
    r.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show full tracebacks on the terminal (they are always in the run's log file)")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("convert", help="convert input files to canonical chat JSONL, with a rejects file and report")
    c.add_argument("inputs", nargs="+", help="files, folders or globs (JSON, JSONL, CSV, Parquet), or hf:NAME[:SPLIT]")
    c.add_argument("--out", required=True, help="canonical JSONL to write (rejects go next to it)")
    c.add_argument("--format", default="auto", choices=["auto", "alpaca", "sharegpt", "messages", "text"])
    c.add_argument("--report", help="write the JSON report here")
    c.add_argument("--on-bad-row", default="quarantine", choices=["quarantine", "raise"])
    c.add_argument("--max-reject-fraction", type=float, default=0.01)
    c.add_argument("--system-prompt", default=None, help="system message for samples without one")
    c.set_defaults(func=cmd_convert)

    t = sub.add_parser("tokenize", help="build (or hit) the tokenized cache of a config and print its stats")
    with_config(t, optional=False)
    t.add_argument("--json", action="store_true", help="print the result as JSON")
    t.set_defaults(func=cmd_tokenize)

    s = sub.add_parser("show-sample", help="print one tokenized sample with its trained spans marked")
    with_config(s, optional=False)
    s.add_argument("--index", type=int, default=0)
    s.set_defaults(func=cmd_show_sample)

    e = sub.add_parser("eval", help="scored inference run (Prefect flow 'evaluate') of a model on a canonical JSONL file")
    e.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, or a model folder")
    e.add_argument("--data", required=True, help="canonical JSONL (last turn = reference reply)")
    e.add_argument("--max-samples", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--max-new-tokens", type=int, default=64)
    e.add_argument("--do-sample", action="store_true", default=None, help="sample instead of greedy decoding")
    e.add_argument("--temperature", type=float, default=None)
    e.add_argument("--top-p", type=float, default=None)
    e.add_argument("--top-k", type=int, default=None)
    e.add_argument("--repetition-penalty", type=float, default=None)
    e.add_argument("--no-repeat-ngram-size", type=int, default=None)
    e.add_argument("--experiment", default="ftflow", help="MLflow experiment of the scored run")
    e.add_argument("--no-record", action="store_true",
                   help="do not tag a registered version with these scores (it stays unpromotable by them)")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="chat with a model: prints the reply as it is generated")
    g.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, or a model folder")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--system", default=None)
    g.set_defaults(func=cmd_generate)

    pr = sub.add_parser("promote", help="point alias @champion at a version (Prefect flow 'promote'; refuses unscored versions unless --force)")
    pr.add_argument("name")
    pr.add_argument("version")
    pr.add_argument("--force", action="store_true")
    pr.add_argument("--why", default="manual promotion")
    pr.set_defaults(func=cmd_promote)

    rb = sub.add_parser("rollback", help="move @champion back to the previous champion (Prefect flow 'rollback')")
    rb.add_argument("name")
    rb.add_argument("--why", default="manual rollback")
    rb.set_defaults(func=cmd_rollback)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup()
    from ftflow.config import ConfigError
    from tasks.preflight import PreflightError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, PreflightError) as err:
        sys.stderr.write(f"ftflow: {err}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
