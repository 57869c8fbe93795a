"""`ftflow run` failures read like a tool, not a stack: one message (what failed, the path/URL/key,
what to do), where the full log is, the exit code; tracebacks only in the log file or with --debug.

Table-driven: case, expected exit code, expected message fragment; never a 'Traceback' on the
terminal without --debug."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ftflow.cli import describe_failure
from tasks.train import TrainingFailed, rank_error

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- the words, per error


def _output_error():
    from tasks.convert import OutputError

    try:
        try:
            raise OSError(27, "File too large")  # a write() error: no file name
        except OSError:
            raise OutputError("could not write /data/run/train.jsonl: File too large (errno 27). Nothing was replaced") from None
    except OutputError as e:
        return e


def _mlflow_error():
    from mlflow.exceptions import MlflowException

    return MlflowException("API request to http://127.0.0.1:5999/api/2.0/mlflow/runs/create failed with exception "
                           "ConnectionError")


FAILURES = [
    # case, error, exit code, headline fragment, detail fragment
    ("disk full with a path", lambda: OSError(28, "No space left on device", "/h/train/x/final/model.safetensors"),
     1, "disk full: could not write /h/train/x/final/model.safetensors", "free space"),
    ("disk full wrapped by the data stage", _output_error, 1, "disk full: could not write /data/run/train.jsonl",
     "run the same command again"),
    ("read-only store", lambda: OSError(30, "Read-only file system", "/ro/mlflow.db"), 1,
     "could not write /ro/mlflow.db (Read-only file system)", "make it writable"),
    ("rejects over the limit", lambda: __import__("tasks.convert").convert.DataError(
        "7 of 100 rows rejected (7.00%), above data.max_reject_fraction = 0.01 (1.00%). Each rejected row ..."),
     2, "above data.max_reject_fraction", None),
    ("MLflow unreachable mid-run", _mlflow_error, 1, "MLflow (", "server is up"),
    ("a rank raised", lambda: TrainingFailed("training failed: rank 1 exited with code 1. All ranks were stopped; the "
                                             "next run resumes from the latest complete checkpoint. Full logs: /t/logs\n...",
                                             1, 1, "tail", '  File "w.py", line 3, in f\nValueError: nan loss at step 7'),
     1, "training failed: rank 1 exited with code 1", "ValueError: nan loss at step 7"),
    ("a rank was killed", lambda: TrainingFailed("training failed: rank 0 exited with code -9 (...). Full logs: /t/logs\n",
                                                 0, -9, "", ""),
     1, "rank 0 exited with code -9 (signal 9 (SIGKILL", "rank logs: /t/logs"),
    ("training timed out", lambda: TrainingFailed("training exceeded train.timeout_minutes=10.0; every rank was stopped. "
                                                  "Logs: /t/logs", None, None, ""),
     1, "training failed: training exceeded train.timeout_minutes=10.0; every rank was stopped.", "rank logs: /t/logs"),
]


@pytest.mark.parametrize("case, make, code, headline, detail", FAILURES, ids=[f[0] for f in FAILURES])
def test_failure_words(case, make, code, headline, detail):
    got_headline, details, got_code = describe_failure(make())
    assert got_code == code
    assert headline in got_headline and "Logs:" not in got_headline  # the logs get their own line
    if detail:
        assert any(detail in d for d in details), details
    assert not any("Traceback" in d for d in [got_headline, *details])


def test_training_failed_survives_pickling():
    """Prefect hands a task's exception back to the flow through its result machinery."""
    import pickle

    e = pickle.loads(pickle.dumps(TrainingFailed("m", 1, -9, "tail", "ValueError: x")))
    assert (e.rank, e.exit_code, e.log_tail, e.error) == (1, -9, "tail", "ValueError: x")


# --------------------------------------------------------------------------- a failed rank's error

TRACEBACK = textwrap.dedent("""\
    Traceback (most recent call last):
      File "/w/tasks/train_worker.py", line 400, in <module>
        main()
      File "/w/tasks/train_worker.py", line 300, in main
        raise RuntimeError("loss is nan at step 3")
    RuntimeError: loss is nan at step 3
""")
WARNING = "/site-packages/torch/utils/data.py:12: UserWarning: this DataLoader will create 4 workers\n  warnings.warn(\n"

RANK_LOGS = [
    # case, the rank's stderr, the error shown
    ("warning before the traceback", WARNING + TRACEBACK, "RuntimeError: loss is nan at step 3"),
    ("warning after the traceback", TRACEBACK + "[W1204 ProcessGroupGloo.cpp:1] Warning: destroyed\n" + WARNING,
     "RuntimeError: loss is nan at step 3"),
    ("chained exceptions: the last one", TRACEBACK + "\nDuring handling of the above exception, another exception occurred:\n\n"
     + TRACEBACK.replace("RuntimeError: loss is nan at step 3", "OSError: [Errno 28] No space left on device: '/c/ckpt'"),
     "OSError: [Errno 28] No space left on device: '/c/ckpt'"),
    ("no traceback, an error line", WARNING + "ValueError: bad shard\n", "ValueError: bad shard"),
    ("killed: nothing to show", WARNING + "step 3/10 {'loss': 1.2}\n", ""),
]


@pytest.mark.parametrize("case, text, error", RANK_LOGS, ids=[r[0] for r in RANK_LOGS])
def test_rank_error_is_the_error_not_a_warning(case, text, error):
    got = rank_error(text)
    if not error:
        assert got == ""
        return
    assert got.splitlines()[-1] == error
    assert "Warning" not in got and "warnings.warn" not in got


# --------------------------------------------------------------------------- the console and the log file


def test_run_log_keeps_tracebacks_in_the_file_only(tmp_path):
    from infra.local import RunLog

    root = logging.getLogger()
    console = io.StringIO()
    handler = logging.StreamHandler(console)
    root.addHandler(handler)
    try:
        run_log = RunLog(tmp_path / "runs", debug=False)
        try:
            raise ValueError("boom in a stage")
        except ValueError:
            logging.getLogger("prefect.task_runs").error("Task run failed with exception: ValueError", exc_info=True,
                                                         extra={"task_name": "tokenize"})
            logging.getLogger("prefect.flow_runs").info("Finished in state Failed('Flow run encountered an exception')")
            logging.getLogger("tests.some.library").warning("a warning with a traceback", exc_info=True)
        logging.getLogger("tests.some.library").warning("an ordinary warning")
        moved = run_log.move_to(tmp_path / "runs" / "flow-run-id")
        logging.getLogger("tests.some.library").warning("after the move")
        run_log.close()
    finally:
        root.removeHandler(handler)
    shown = console.getvalue()
    assert "Traceback" not in shown and "Task run failed" not in shown and "Finished in state Failed" not in shown
    assert "a warning with a traceback" in shown and "an ordinary warning" in shown
    text = moved.read_text()
    assert moved == tmp_path / "runs" / "flow-run-id" / "ftflow-run.log"
    assert text.count("Traceback") == 2 and "ValueError: boom in a stage" in text and "after the move" in text
    assert "\x1b[" not in text
    assert run_log.failed_stage == "tokenize"
    assert handler.formatter is None or not type(handler.formatter).__name__.startswith("_NoTraceback")  # restored


# --------------------------------------------------------------------------- `ftflow run`, end to end

ROW = {"messages": [{"role": "user", "content": "reverse: a b c"}, {"role": "assistant", "content": "c b a"}]}


def _write_config(tmp_path: Path, train_rows: list[str], train_name: str = "train.jsonl") -> Path:
    (tmp_path / train_name).write_text("".join(train_rows))
    (tmp_path / "eval.jsonl").write_text(json.dumps(ROW) + "\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: failing\nmodel: {{name_or_path: 'embedded:tiny-qwen2'}}\n"
                   f"data: {{train: [{train_name}], eval: [eval.jsonl]}}\n"
                   "train: {deepspeed: null, nproc_per_node: 1, max_steps: 2}\n")
    return cfg


def _rows(n: int, bad: int = 0, width: int = 10) -> list[str]:
    rows = [json.dumps({"messages": [{"role": "user", "content": f"q{i} " + "x" * width},
                                     {"role": "assistant", "content": f"a{i} " + "y" * width}]}) + "\n" for i in range(n)]
    return rows + ['{"messages": 5}\n'] * bad


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _case_rejects(tmp_path):
    return _write_config(tmp_path, _rows(95, bad=5)), {}, []


def _case_unsupported(tmp_path):
    return _write_config(tmp_path, ["instruction,output\n"], "notes.txt"), {}, []


def _case_mlflow_unreachable(tmp_path):
    return _write_config(tmp_path, _rows(20)), {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_closed_port()}"}, []


CHILD_DISK_FULL = """
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # a write past the limit fails with EFBIG
    import tasks.convert as c
    real = c.convert_from_config

    def convert_on_a_full_disk(*a, **k):                    # the disk fills up while the data stage writes
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
        try:
            return real(*a, **k)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    c.convert_from_config = convert_on_a_full_disk
    from ftflow.cli import main
    sys.exit(main(sys.argv[1:]))
"""


def _case_disk_full(tmp_path):
    child = tmp_path / "child.py"
    child.write_text(textwrap.dedent(CHILD_DISK_FULL))
    return _write_config(tmp_path, _rows(3000, width=40)), {}, [str(child)]


CHILD_RANK_FAILS = """
    import sys
    import tasks.train as tt
    rank = sys.argv.pop(1)                                  # a rank that warns, then raises

    def fake_torchrun(job, train, log_dir):
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
                f"--log-dir={log_dir}", "--tee=3", "--local-ranks-filter=0", rank]

    tt.torchrun_command = fake_torchrun
    from ftflow.cli import main
    sys.exit(main(sys.argv[1:]))
"""
FAILING_RANK = """
    import sys, warnings
    def step(n):
        raise ValueError(f"loss is nan at step {n}")
    warnings.warn("this DataLoader will create 4 worker processes", UserWarning)
    step(3)
"""


def _case_rank_fails(tmp_path):
    child, rank = tmp_path / "child.py", tmp_path / "rank.py"
    child.write_text(textwrap.dedent(CHILD_RANK_FAILS))
    rank.write_text(textwrap.dedent(FAILING_RANK))
    return _write_config(tmp_path, _rows(20)), {}, [str(child), str(rank)]


RUNS = [
    # case, setup, exit code, message fragment, fails in the flow (a log file is written)
    ("unsupported data file type", _case_unsupported, 2, "unsupported file type", False),
    ("unreachable MLflow server", _case_mlflow_unreachable, 2, "is unreachable (Connection refused)", False),
    ("rejects over the limit", _case_rejects, 2, "above data.max_reject_fraction", True),
    ("disk full while converting", _case_disk_full, 1, "disk full: could not write", True),
    ("a rank raises", _case_rank_fails, 1, "training failed: rank 0 exited with code 1", True),
]


@pytest.mark.parametrize("case, setup, code, fragment, in_flow", RUNS, ids=[r[0] for r in RUNS])
def test_ftflow_run_failure(tmp_path, case, setup, code, fragment, in_flow):
    cfg, env, child = setup(tmp_path)
    home = tmp_path / "home"
    cmd = [sys.executable, *(child or ["-m", "ftflow.cli"]), "run", str(cfg)]
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                         env={**os.environ, "FTFLOW_HOME": str(home), "PYTHONPATH": str(REPO), **env})
    took = time.monotonic() - t0
    assert out.returncode == code, out.stderr[-4000:]
    assert fragment in out.stderr, out.stderr[-4000:]
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-4000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith(("error:", "ftflow:"))]  # one message
    assert len(errors) == 1, out.stderr[-4000:]
    if in_flow:
        m = re.search(r"full log \(every traceback\): (\S+)", out.stderr)
        assert m, out.stderr[-3000:]
        log = Path(m.group(1))
        assert log.name == "ftflow-run.log" and log.parent.parent == home / "runs" / "failing"
        assert "Traceback" in log.read_text() and "\x1b[" not in log.read_text()
        assert f"(exit code {code})" in out.stderr
        assert len(out.stderr.splitlines()) < 40, out.stderr  # not ~200 lines before the message
        if case == "a rank raises":  # its error, not the warning it printed first
            message = out.stderr[out.stderr.index("error: training failed"):]
            assert "ValueError: loss is nan at step 3" in message and "UserWarning" not in message, message
            assert "in stage 'train'" in message
    else:
        assert not (home / "runs").exists()  # refused before Prefect or MLflow started
        assert took < 60, took  # seconds, not the minutes of stacked retries


def test_debug_shows_the_traceback(tmp_path):
    cfg, _, _ = _case_rejects(tmp_path)
    out = subprocess.run([sys.executable, "-m", "ftflow.cli", "run", str(cfg), "--debug"], capture_output=True,
                         text=True, timeout=600, cwd=REPO, env={**os.environ, "FTFLOW_HOME": str(tmp_path / "home")})
    assert out.returncode == 2
    assert "Traceback" in out.stderr and "above data.max_reject_fraction" in out.stderr


# --------------------------------------------------------------------------- noise that is ours to fix


def test_known_noise_is_dropped_by_logger_and_message_only():
    from infra.local import configure_environment

    configure_environment()
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(f"{record.name}: {record.getMessage()}")

    keep = Keep()
    names = ("bitsandbytes.backends.cpu.ops", "transformers.tokenization_utils_tokenizers")
    for name in names:
        logging.getLogger(name).addHandler(keep)
    try:
        logging.getLogger(names[0]).warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please "
                                            "make sure you already `pip install kernels`", "No module named 'kernels'")
        logging.getLogger(names[1]).warning("Ignoring clean_up_tokenization_spaces=True for BPE tokenizer Qwen2Tokenizer.")
        logging.getLogger(names[0]).warning("a real bitsandbytes problem")
        logging.getLogger(names[1]).warning("a real tokenizer problem")
    finally:
        for name in names:
            logging.getLogger(name).removeHandler(keep)
    assert seen == [f"{names[0]}: a real bitsandbytes problem", f"{names[1]}: a real tokenizer problem"]


def test_environment_has_one_retry_layer_and_no_colours(monkeypatch):
    from infra.local import configure_environment

    for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_POOL_MAXSIZE", "PREFECT_LOGGING_COLORS"):
        monkeypatch.delenv(k, raising=False)
    env = configure_environment()
    assert env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"  # ftflow's call_with_retry is the one layer
    assert int(env["MLFLOW_HTTP_POOL_MAXSIZE"]) > 10
    assert env["PREFECT_LOGGING_COLORS"] == "false"
    from tasks import stages

    retried = [t.name for t in vars(stages).values() if hasattr(t, "retries") and getattr(t, "retries", 0)]
    assert retried == []  # no Prefect task retries on top of it


def test_library_stdout_reaches_the_log_without_colour_codes(capsys):
    """MLflow's GenAI evaluation prints a notice with ANSI colours to stdout; the evaluate stage logs it as plain text."""
    from tasks.stages import _stdout_to_log

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("tests.stdout_to_log")
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    with _stdout_to_log(logger):
        sys.stdout.write("\n✨ Evaluation completed.\n\n  Run ID: \x1b[94mabc123\x1b[0m\n open the \x1b[93m\x1b[1mTraces\x1b[0m tab\n")
    assert records == ["✨ Evaluation completed. Run ID: abc123 open the Traces tab"]
    assert capsys.readouterr().out == ""


RANK0_LINES = [
    ("[default0]:2026-12-04 10:00:00 [rank0] INFO ftflow.train: step 1/6 {'loss': 1.2}", True),
    ("[default0]:ValueError: loss is nan at step 3", True),
    ("[default0]:torch.OutOfMemoryError: CUDA out of memory", True),
    ('[default0]:    raise ValueError(f"loss is nan at step {n}")', False),  # a source line, not the error
    ("    raise ChildFailedError(", False),
    ("torch.distributed.elastic.multiprocessing.errors.ChildFailedError:", False),  # torchrun's own
    ("[default0]:/x/data.py:3: UserWarning: this DataLoader will create 4 workers", False),
]


@pytest.mark.parametrize("line, shown", RANK0_LINES)
def test_rank0_lines_in_the_run_log(line, shown):
    from tasks.stages import _shown_rank0_line

    assert _shown_rank0_line(line) is shown
