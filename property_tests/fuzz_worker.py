"""The long-lived worker of the checkpoint fuzzer (``test_checkpoint_fuzz.py``).

Run as a script (``python fuzz_worker.py``), it imports torch and nnh once, then serves
requests: one JSON line on stdin ``{"path": ..., "cwd": ...}`` per example; it changes into
``cwd``, runs ``NNHandler.load(path)`` and, when the loaded handler can train, one short
``train(epochs=1, progress_bar=False)``, and answers one JSON line with the outcome.

Its memory is capped (``RLIMIT_AS``, ``NNH_FUZZ_MEMORY_GIB``, default 4 GiB). The protocol
runs over a private copy of the original stdout: file descriptor 1 is pointed at stderr, so
whatever a loaded handler prints (a console logger named by the file) cannot corrupt the
answers. The parent (:class:`WorkerPool`) kills the worker on a timeout or when it dies and
starts a new one.

This module is also the parent side: :class:`WorkerPool` starts, feeds and restarts workers.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TESTS = ROOT / "tests"
SRC = ROOT / "src"


# ----------------------------------------------------------------------------- worker side
def _where(tb: Any) -> str:
    """The innermost frame of the traceback inside nnh (else the innermost frame)."""
    frames = traceback.extract_tb(tb)
    inside = [f for f in frames if f"{os.sep}nnh{os.sep}" in f.filename]
    f = (inside or frames or [None])[-1]
    if f is None:
        return "?"
    name = f.filename
    if f"{os.sep}nnh{os.sep}" in name:
        name = "nnh/" + name.split(f"{os.sep}nnh{os.sep}", 1)[1]
    else:
        name = os.path.basename(name)
    return f"{name}:{f.lineno}:{f.name}"


def _name(obj: Any) -> str:
    """The import path of a loaded component (a function, or an object's class); stateful
    metric wrappers and ``functools.partial`` are looked through."""
    import functools
    import inspect

    for _ in range(10):
        if isinstance(obj, functools.partial):
            obj = obj.func
        elif type(obj).__name__ == "StatefulMetric" and hasattr(obj, "metric"):
            obj = obj.metric
        else:
            break
    if inspect.isroutine(obj) or inspect.isclass(obj):
        module = getattr(obj, "__module__", None) or "?"
        return f"{module}.{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _components(h: Any) -> list[list[str]]:
    """[slot, import path] of every component the loaded handler will call."""
    out = []
    if getattr(h, "_adapter", None) is not None:
        out.append(["optimizer", _name(h._adapter.optimizer)])
    if getattr(h, "_scheduler", None) is not None:
        out.append(["scheduler", _name(h._scheduler)])
    if getattr(h, "_loss_fn", None) is not None:
        out.append(["loss", _name(h._loss_fn)])
    for name, fn in (getattr(h, "_metrics", None) or {}).items():
        out.append([f"metrics[{name}]", _name(fn)])
    for i, cb in enumerate(getattr(h, "_callbacks", None) or []):
        out.append([f"callbacks[{i}]", _name(cb)])
    for slot in ("sde", "sampler"):
        obj = getattr(h, f"_{slot}", None)
        if obj is not None:
            out.append([slot, _name(obj)])
    return out


def _serve() -> None:
    import resource

    gib = float(os.environ.get("NNH_FUZZ_MEMORY_GIB", "4"))
    limit = int(gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # the protocol gets a private descriptor; fd 1 (and sys.stdout) go to stderr
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for p in (str(TESTS), str(SRC)):
        if p not in sys.path:
            sys.path.insert(0, p)

    import warnings

    import torch

    torch.set_num_threads(1)
    from nnh import NNHandler
    from nnh.checkpoint import CheckpointError

    proto.write(json.dumps({"ready": os.getpid()}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        out: dict[str, Any] = {"stage": "load", "warnings": 0}
        t0 = time.perf_counter()
        try:
            os.chdir(req["cwd"])
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    h = NNHandler.load(req["path"])
                    out["components"] = _components(h)
                    can_train = (
                        getattr(h, "_adapter", None) is not None
                        and getattr(h, "_train_loader", None) is not None
                        and (getattr(h, "_loss_fn", None) is not None or getattr(h, "_sde", None) is not None)
                    )
                    out["can_train"] = bool(can_train)
                    if can_train:
                        out["stage"] = "train"
                        h.train(epochs=1, progress_bar=False)
                        out["finite"] = all(bool(torch.isfinite(p).all()) for p in h.module.parameters())
                    out["status"] = "ok"
                finally:
                    out["warnings"] = len(caught)
                    out["warning_kinds"] = sorted({type(w.message).__name__ for w in caught})
        except BaseException as err:
            out["status"] = "error"
            out["exc_type"] = f"{type(err).__module__}.{type(err).__qualname__}"
            out["checkpoint_error"] = isinstance(err, CheckpointError)
            out["kind"] = getattr(err, "kind", None) if isinstance(err, CheckpointError) else None
            out["msg"] = str(err)[:400]
            out["where"] = _where(err.__traceback__)
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                out["fatal"] = True
        out["seconds"] = round(time.perf_counter() - t0, 3)
        with contextlib.suppress(OSError):
            os.chdir("/")
        try:
            proto.write(json.dumps(out, default=str) + "\n")
        except (TypeError, ValueError):  # pragma: no cover - a non-serialisable field
            proto.write(json.dumps({**out, "msg": repr(out.get("msg"))[:400]}, default=repr) + "\n")


# ----------------------------------------------------------------------------- parent side
class WorkerDied(Exception):
    pass


class WorkerPool:
    """One worker process at a time; restarted after a timeout or a death.

    ``run(path, cwd, timeout)`` returns the worker's answer, or ``{"status": "timeout"}`` /
    ``{"status": "died", "returncode": ..., "stderr_tail": ...}``.
    """

    def __init__(self, log_dir: Path, memory_gib: float = 4.0, recycle_every: int = 250):
        self.log_dir = Path(log_dir)
        self.memory_gib = memory_gib
        self.recycle_every = recycle_every
        self.proc: subprocess.Popen | None = None
        self.served = 0
        self.starts = 0
        self._log = None

    def _start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(TESTS), env.get("PYTHONPATH", "")])
        env["NNH_FUZZ_MEMORY_GIB"] = str(self.memory_gib)
        env.setdefault("OMP_NUM_THREADS", "1")
        env["PYTHONUNBUFFERED"] = "1"
        self.starts += 1
        self._log_path = self.log_dir / f"worker-{self.starts}.stderr"
        self._log = open(self._log_path, "wb")  # noqa: SIM115 - lives as long as the worker
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            cwd=str(self.log_dir),
            start_new_session=True,
        )
        self.served = 0
        ready = self._read_line(120.0)
        if ready is None or "ready" not in ready:
            self.kill()
            raise WorkerDied(f"the fuzz worker did not start; see {self._log_path}")

    def _read_line(self, timeout: float) -> dict[str, Any] | None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        if not line:
            return None
        return json.loads(line)

    def kill(self) -> None:
        if self.proc is not None:
            # the worker's own session only (start_new_session): it and its children
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            for stream in (self.proc.stdin, self.proc.stdout):
                with contextlib.suppress(OSError):
                    stream.close()
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def _stderr_tail(self) -> str:
        try:
            return self._log_path.read_bytes()[-1500:].decode("utf-8", "replace")
        except OSError:  # pragma: no cover
            return ""

    def run(self, path: str, cwd: str, timeout: float) -> dict[str, Any]:
        if self.proc is None or self.proc.poll() is not None or self.served >= self.recycle_every:
            self.kill()
            self._start()
        assert self.proc is not None and self.proc.stdin is not None
        self.served += 1
        try:
            self.proc.stdin.write((json.dumps({"path": path, "cwd": cwd}) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            rc = self.proc.poll()
            tail = self._stderr_tail()
            self.kill()
            return {"status": "died", "returncode": rc, "stderr_tail": tail}
        t0 = time.monotonic()
        answer = self._read_line(timeout)
        if answer is None:
            rc = self.proc.poll()
            if rc is None and time.monotonic() - t0 >= timeout - 0.5:
                self.kill()
                return {"status": "timeout", "seconds": timeout}
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
            rc = self.proc.poll()
            tail = self._stderr_tail()
            self.kill()
            return {"status": "died", "returncode": rc, "stderr_tail": tail}
        if answer.get("fatal"):
            self.kill()  # SystemExit/KeyboardInterrupt inside: start afresh
        return answer

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None and self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()


if __name__ == "__main__":
    _serve()
