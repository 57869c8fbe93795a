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

    check(cfg)
    if cfg.model.hub_token is not None:  # handed to from_pretrained (and every rank) via the environment only
        import os

        os.environ.setdefault("HF_TOKEN", cfg.model.hub_token.get_secret_value())
    from flows.finetune import finetune

    t0 = time.perf_counter()
    summary = finetune(cfg)
    summary["wall_time_s"] = round(time.perf_counter() - t0, 1)
    if args.summary_json:
        Path(args.summary_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary_json).write_text(json.dumps(summary, indent=2, default=str))
    _print_summary(summary)
    return 0


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
    _out(f"  promotion        : {'PROMOTED to @champion' if s['promoted'] else 'not promoted'} — {s['decision']}")
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
