"""The Rust tokenizer in a child process that runs on a faster malloc.

Profiled on the tokenization benchmark, ~40% of the Rust tokenizer's CPU time goes to glibc's
malloc/free (every pre-token, normalized string and encoding is a small heap object), and in a
long-lived process glibc's heap fragments: a second build in the same process ran 30-60% slower
than the first. mimalloc (or jemalloc) fixes both, but an allocator can only be chosen when a
process starts (`LD_PRELOAD`), and ftflow's own process must not change allocator under torch. So a
cold build hands its batched encode calls to a small child process that imports nothing but
`tokenizers`, started with the allocator preloaded:

    malloc = find_malloc()          # None: no allocator found (or `off`), encode in process
    with EncodeProcess(backend, with_offsets=False, malloc=malloc) as enc:
        flat, counts, offsets = enc.encode(texts)   # int32 ids, int64 counts (bytes), offsets or None

The child gets the exact tokenizer (`backend.to_str()`), so the ids are the ones the parent would
compute itself (tests check the cached datasets are identical). Allocator choice,
`FTFLOW_TOKENIZER_MALLOC`:
- unset or `auto`: the first of mimalloc, jemalloc found in the system library folders (Debian /
  Ubuntu: `apt-get install libmimalloc2.0`); none found: encode in this process, as before;
- a path to a shared library: that one (an error if it does not exist);
- `off`: encode in this process.
A process already running on the chosen allocator (started with it in `LD_PRELOAD`) encodes in
process: the child would only add its pipe.
Any failure of the child (it cannot start, dies mid-build) falls back to encoding in this process,
with a warning; the result is the same either way.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "FTFLOW_TOKENIZER_MALLOC"
# Preferred first: mimalloc was 1.8-2.5x faster than glibc on the benchmark's encode, jemalloc 1.5x.
MALLOC_NAMES = ("libmimalloc.so.2", "libmimalloc.so", "libjemalloc.so.2", "libjemalloc.so")


class EncodeProcessError(RuntimeError):
    """The child process failed; the caller encodes in its own process instead."""


def _library_dirs() -> list[Path]:
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    dirs = [Path(sys.prefix) / "lib", Path("/usr/local/lib")]
    if multiarch:
        dirs += [Path("/usr/lib") / multiarch, Path("/lib") / multiarch]
    return dirs + [Path("/usr/lib64"), Path("/usr/lib")]


def find_malloc(setting: str | None = None) -> str | None:
    """The allocator library the child should preload, or None to encode in this process."""
    setting = (os.environ.get(ENV, "auto") if setting is None else setting).strip()
    if setting.lower() in ("off", "none", "0", "false"):
        return None
    if setting.lower() not in ("", "auto"):
        if not Path(setting).is_file():
            raise FileNotFoundError(f"{ENV}={setting}: no such file; give the path of a malloc shared library "
                                    "(e.g. /usr/lib/x86_64-linux-gnu/libmimalloc.so.2), `auto` or `off`")
        found = setting
    elif not sys.platform.startswith("linux"):
        return None
    else:
        found = next((str(d / n) for n in MALLOC_NAMES for d in _library_dirs() if (d / n).is_file()), None)
    if found is not None and _mapped(found, unknown=False):
        log.info("this process already runs on %s: the tokenizer encodes here", found)
        return None
    return found


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def child_environment(malloc: str) -> dict[str, str]:
    """The child's environment: this one, `malloc` preloaded, and the tokenizer's threads on.

    `TOKENIZERS_PARALLELISM` is set, not defaulted: the CLI sets it to false for its own process
    (`infra.local`), which forks and spawns after the tokenizer's thread pool may exist; the child is
    a fresh process that never forks, so its batched encode uses every core it may run on (on 2
    cores the cold build of the 20,000-conversation bench workload was ~10-20% faster than with
    false, `bench/RESULTS.md`). One core: false (threads only add overhead). `RAYON_NUM_THREADS`,
    if set, still caps the threads.
    """
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(filter(None, [malloc, env.get("LD_PRELOAD", "")]))
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    env["TOKENIZERS_PARALLELISM"] = "true" if _cores() >= 2 else "false"
    return env


class EncodeProcess:
    """One child process running `encode_batch(_fast)` for the parent.

    `encode(texts)` returns (flat ids as int32 bytes, tokens per text as int64 bytes, offsets or
    None). Thread-safe: one request at a time (a pipelined version, the child encoding batch k+1
    while it converts batch k, measured no faster: the two cores are busy either way).
    """

    def __init__(self, backend, *, with_offsets: bool, malloc: str):
        self.malloc, self.with_offsets = malloc, with_offsets
        env = child_environment(malloc)
        self._lock = threading.Lock()
        self.preloaded: bool | None = None  # whether the child really runs on `malloc` (its first reply says)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tasks.encode_process"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )
        try:
            self._send({"tokenizer": backend.to_str(), "with_offsets": with_offsets, "malloc": malloc})
        except OSError as err:
            self.close()
            raise EncodeProcessError(f"the tokenizer process did not start: {err}") from err

    def _send(self, obj) -> None:
        pickle.dump(obj, self._proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        self._proc.stdin.flush()

    def _receive(self):
        try:
            reply = pickle.load(self._proc.stdout)
        except (EOFError, pickle.UnpicklingError, OSError) as err:
            code = self._proc.poll()
            raise EncodeProcessError(f"the tokenizer process (LD_PRELOAD={self.malloc}) ended"
                                     f"{'' if code is None else f' with exit code {code}'}: {err!r}") from err
        if isinstance(reply, dict) and "error" in reply:
            raise EncodeProcessError(f"the tokenizer process failed: {reply['error']}")
        return reply

    def encode(self, texts: list[str]) -> tuple[bytes, bytes, list | None]:
        with self._lock:
            try:
                self._send(texts)
            except OSError as err:
                raise EncodeProcessError(f"the tokenizer process is gone: {err!r}") from err
            if self.preloaded is None:  # the child's hello, written once its tokenizer is loaded
                self.preloaded = bool(self._receive()["preloaded"])
                if not self.preloaded:
                    log.warning("the tokenizer process could not preload %s (not a malloc library for this "
                                "system?); it runs on glibc malloc. Set %s to another library or `off`.",
                                self.malloc, ENV)
            return self._receive()

    def describe(self) -> str:
        """What the stats say about this encoder."""
        if self.preloaded is False:
            return f"child process, glibc malloc ({self.malloc} could not be preloaded)"
        return f"child process, LD_PRELOAD={self.malloc}"

    def close(self) -> None:
        proc = self._proc
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()

    def __enter__(self) -> "EncodeProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _mapped(library: str, unknown: bool = True) -> bool:
    """Whether `library` is loaded into this process (ld.so only warns when a preload fails);
    `unknown` without a procfs to ask."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return unknown
    return os.path.realpath(library) in maps or library in maps


def _child() -> None:
    """The child's loop: a tokenizer from the parent, then texts in, (ids, counts, offsets) out."""
    from array import array
    from itertools import chain

    from tokenizers import Tokenizer

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; we stop at EOF
    inp = sys.stdin.buffer
    out = os.fdopen(os.dup(1), "wb")  # the reply channel; anything printed goes to stderr instead
    os.dup2(2, 1)
    setup = pickle.load(inp)
    tokenizer, with_offsets = Tokenizer.from_str(setup["tokenizer"]), setup["with_offsets"]
    encode = tokenizer.encode_batch if with_offsets else tokenizer.encode_batch_fast
    pickle.dump({"preloaded": _mapped(setup["malloc"])}, out)
    out.flush()
    while True:
        try:
            texts = pickle.load(inp)
        except EOFError:
            return
        try:
            encodings = encode(texts, add_special_tokens=False)
            ids = [e.ids for e in encodings]
            reply = (array("i", chain.from_iterable(ids)).tobytes(), array("q", map(len, ids)).tobytes(),
                     [e.offsets for e in encodings] if with_offsets else None)
        except Exception as err:  # noqa: BLE001 - reported to the parent, which falls back
            reply = {"error": f"{type(err).__name__}: {err}"}
        pickle.dump(reply, out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()


if __name__ == "__main__":
    _child()
