"""Black-box fuzzer of the promise "a checkpoint is safe to receive from anyone" (docs/checkpoints.md).

Genuine checkpoints (a classifier, one with callbacks and a scheduler, a vectorised
ensemble, a score model with SDE and sampler, a mid-epoch step checkpoint) are made once per
session. Each example applies 1-4 random edits to a copy of one payload (swap values, plant
a hostile string - dangerous import paths, paths escaping the folder, format strings -, an
extreme number, a 2,000-deep nesting, a dropped or duplicated key, a changed type, a tensor
of another shape or with non-finite values), re-seals it with ``save_checkpoint`` (as an
attacker who knows the format would) and hands it to a long-lived worker process
(``fuzz_worker.py``: memory cap, time limit, its own folder as working directory) that runs
``NNHandler.load`` and, when the handler can train, one ``train(epochs=1)``.

The property, per example:

* no canary file outside the example folder changed (content and mtime), and no file
  appeared or vanished outside the example folder (the examples folder, the canary folder,
  the session folder);
* the only exceptions are ``CheckpointError`` (any kind) and, from ``train()``, nnh's
  documented divergence error ``FloatingPointError`` (counted separately);
* after a ``train()`` that returned, every parameter is finite;
* the worker answered within the time limit and did not die (memory cap, crash).

Knobs (environment):

* ``NNH_FUZZ_EXAMPLES`` (default 400, about 60 s on 2 busy CPU cores): examples; ``make fuzz``
  runs 20,000.
* ``NNH_FUZZ_DERANDOMIZE`` (default 1): a fixed example sequence, reproducible in CI;
  ``make fuzz`` sets 0 so every long run explores new ground (hypothesis prints the seed of
  a failure: rerun with ``--hypothesis-seed``).
* ``NNH_FUZZ_SHRINK`` (default 0): shrink a failing example (slow: every shrink step is a
  save and a load; the edit list in the failure message is already a reproducer).
* ``NNH_FUZZ_SURVEY=<file.json>``: do not stop at the first failure; record every failing
  example, group them by class and write the groups to the file (and print them).
* ``NNH_FUZZ_TIMEOUT`` (default 20 s per example), ``NNH_FUZZ_MEMORY_GIB`` (default 4).

Run with ``-s`` to print a summary of outcomes (loaded, CheckpointError kinds, others).
"""

from __future__ import annotations

import collections
import copy
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis import strategies as st

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
for _p in (str(TESTS), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from fuzz_worker import WorkerPool  # noqa: E402

EXAMPLES = int(os.environ.get("NNH_FUZZ_EXAMPLES", "400"))
DERANDOMIZE = os.environ.get("NNH_FUZZ_DERANDOMIZE", "1") == "1"
SHRINK = os.environ.get("NNH_FUZZ_SHRINK", "0") == "1"
SURVEY = os.environ.get("NNH_FUZZ_SURVEY")
TIMEOUT = float(os.environ.get("NNH_FUZZ_TIMEOUT", "20"))
MEMORY_GIB = float(os.environ.get("NNH_FUZZ_MEMORY_GIB", "4"))

HEADER_KEYS = ("nnh_format", "versions", "integrity")
# Sections that name code or paths: edits go there three times out of four.
HOT_SECTIONS = (
    "model", "loss", "metrics", "callbacks", "sde", "sampler", "optimizer", "scheduler", "data",
    "auto_saver", "logging", "resume", "ensemble", "train_state", "run", "last_train_kwargs",
)  # fmt: skip

# ----------------------------------------------------------------------------- hostile corpus
# @CANARY@ is the canary folder (outside the example folder), @BASE@ the session folder.
DANGEROUS_NAMES = [
    "os.system", "posix.system", "os.remove", "os.unlink", "os.rmdir", "os.execv", "os.fork",
    "os.kill", "os._exit", "subprocess.Popen", "subprocess.run", "subprocess.call",
    "subprocess.check_call", "subprocess.check_output", "subprocess.getoutput",
    "shutil.rmtree", "shutil.move", "shutil.copyfile", "builtins.eval", "builtins.exec",
    "builtins.open", "builtins.__import__", "builtins.compile", "builtins.getattr",
    "builtins.setattr", "builtins.exit", "sys.exit", "functools.partial", "functools.reduce",
    "operator.attrgetter", "operator.methodcaller", "importlib.import_module", "runpy.run_path",
    "pickle.loads", "marshal.loads", "ctypes.CDLL", "code.interact", "pdb.set_trace",
    "webbrowser.open", "types.FunctionType", "pathlib.Path.unlink", "tempfile.mkdtemp",
    "sympy.core.sympify.sympify", "sympy.sympify", "numpy.load", "numpy.lib.npyio.load",
    "numpy.save", "numpy.fromfile", "numpy.os.system", "yaml.unsafe_load", "yaml.load",
    "torch.from_file", "torch.save", "torch.load", "torch.hub.load", "torch.hub.download_url_to_file",
    "torch.set_num_threads", "torch.set_default_dtype", "torch.set_default_device",
    "torch.manual_seed", "torch.set_grad_enabled", "torch.jit.load", "torch.compile",
    "torch.package.PackageImporter", "torch.utils.cpp_extension.load_inline",
    "torch.distributed.init_process_group", "torch.multiprocessing.spawn",
    "torch.os.system", "torch.serialization.os.remove", "torch.serialization.pickle.loads",
    "torch.nn.functional.torch.save", "torch.nn.functional.__builtins__", "torch.__builtins__",
    "torch._C._set_grad_enabled", "torch.ops.aten.empty", "torch.Tensor.__reduce_ex__",
    "torch.nn.Module.register_forward_hook", "torch.nn.modules.module.Module.__setattr__",
    "torch.utils.model_dump.__main__.main", "torch.utils.model_dump.__main__.X",
    "torch.utils.model_dump.main", "torch.utils.bottleneck.__main__.main",
    "torch.utils.collect_env.main", "torch.testing._internal.common_utils.run_tests",
    "pip._internal.main", "pip._internal.cli.main.main", "pip.__main__",
    "setuptools.sandbox.run_setup", "setuptools.setup", "pytest.main", "hypothesis.__init__",
    "matplotlib.pyplot.savefig", "matplotlib.pyplot.show", "tensorboard.main.run_main",
    "__main__.anything", "__main__.MLP", "__main__._serve", "__main__.WorkerPool",
    "nnh.checkpoint.atomic.atomic_write_text", "nnh.checkpoint.atomic.replace_previous",
    "nnh.checkpoint.save_checkpoint", "nnh.checkpoint.source.rebuild_class_from_source",
    "nnh.handler.nnhandler.os.system", "nnh.checkpoint.cleanup_stale_temps",
    "fuzz_worker._serve", "conftest.settings",
    # real classes in the wrong slot, and test classes (importable user code)
    "nnh.callbacks.CSVLogger", "nnh.callbacks.ModelCheckpoint", "nnh.callbacks.TensorBoardLogger",
    "nnh.NNHandler", "nnh.generative.VPSDE", "nnh.generative.VESDE", "nnh.Sampler",
    "torch.optim.SGD", "torch.optim.lr_scheduler.LambdaLR", "torch.optim.lr_scheduler.StepLR",
    "torch.nn.Linear", "torch.nn.Module", "torch.nn.CrossEntropyLoss", "torch.nn.functional",
    "torchmetrics.Accuracy", "torchmetrics.classification.MulticlassAccuracy",
    "models.MLP", "models.BatchLog", "gen_models.NaNAfter", "gen_models.SDESampler",
    "tests.models.MLP", "ensemble_models.EnsMLP", "no.such.module", "", ".", "..os.system",
    "os", "torch", "torch.", ".torch.save", "torch..save", "torch.save.__call__",
]  # fmt: skip
PATHS = [
    "@CANARY@/secret.txt", "@CANARY@/canary.pth", "@CANARY@", "@CANARY@/victim",
    "@CANARY@/new_file.pth", "@BASE@/escaped.pth", "@BASE@", "../../canary/secret.txt",
    "../../canary/canary.pth", "../../canary", "../escaped", "../../escaped.pth", "..", "../",
    "escape_link", "escape_link/secret.txt", "escape_link/evil.pth", "linked.pth", "linked_secret.txt",
    "/", "/tmp", "/etc/passwd", "/dev/null", "/dev/zero", "/proc/self/mem", "~", "~/.bashrc",
    "$HOME/x", "file:///etc/passwd", ".", "", "a/b/../../../../canary/secret.txt",
    "ckpt/../../../canary/secret.txt",
]  # fmt: skip
FORMATS = [
    "{0.__class__}", "{epoch.__class__.__init__.__globals__}", "{epoch:%s}", "{epoch!r:>99999999}",
    "{epoch:{epoch}}", "{loss:.999999999f}", "{", "}", "{}", "{0}", "{__import__}", "%s%s%n",
    "{epoch}/../../canary/x", "{val_loss:.3f}", "{nope}", "e{epoch:02d}",
]  # fmt: skip
ODD = [
    "a\nb", "x\r\ny", "\n", "\r", "name\n../../canary/secret.txt", "\x00", "é\u202e",
    "\ud800", "cuda", "cuda:7", "meta", "mps", "cpu", "regression", "classification",
    "score_based", "generative", "console", "file", "both", "INFO", "ReduceLROnPlateau",
    "a" * 100_000, "x." * 5000, "os." * 1000 + "system", "torch." + "nn." * 3000 + "Linear",
]  # fmt: skip
HOSTILE_STRINGS = DANGEROUS_NAMES + PATHS + FORMATS + ODD
EXTREMES = [0, -1, 1, 2, 10**12, -(10**12), 2**63, -(2**63) - 1, 2**31, math.nan, math.inf,
            -math.inf, 1e308, -1e308, 5e-324, 0.5, True, False]  # fmt: skip
EDIT_KINDS = (
    ["hostile_str"] * 10 + ["hostile_any"] * 2 + ["number"] * 6 + ["swap"] * 4 + ["nest"] * 1
    + ["drop"] * 5 + ["dup_key"] * 2 + ["retype"] * 5 + ["tensor"] * 4 + ["none"] * 2
)  # fmt: skip


# The closed registry a foreign file may select from (everything else - user code, pip,
# nnh's own file helpers - must be dropped with a warning or refused): torch losses,
# optimizers, schedulers and maths functions, nnh callbacks, SDEs and samplers, torchmetrics.
TORCH_NOT_MATHS = (
    "torch.save", "torch.load", "torch.hub", "torch.set_", "torch.manual_seed", "torch.from_file",
    "torch.compile", "torch.jit", "torch.utils", "torch.distributed", "torch.multiprocessing",
    "torch.package", "torch.cuda", "torch.backends", "torch.serialization", "torch.optim",
    "torch.autograd.grad_mode", "torch.ops", "torch.testing", "torch.export", "torch.onnx",
)  # fmt: skip


def _torch_maths(path: str) -> bool:
    return path.startswith("torch.") and not path.startswith(TORCH_NOT_MATHS)


def in_registry(slot: str, path: str) -> bool:
    if slot == "optimizer":
        return path.startswith("torch.optim.") and ".lr_scheduler." not in path
    if slot == "scheduler":
        return path.startswith("torch.optim.lr_scheduler.")
    if slot == "loss" or slot.startswith("metrics["):
        return _torch_maths(path) or path.startswith("torchmetrics.")
    if slot.startswith("callbacks["):
        return path.startswith("nnh.callbacks.")
    return path.startswith("nnh.generative.")  # sde, sampler


# ----------------------------------------------------------------------------- payload walk
def walk(obj: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    """Every node of the payload tree as (path, value), 40 levels deep at most; long
    sequences contribute their first 6 and last elements (the RNG state's 625 numbers would
    drown everything else)."""
    out = [(path, obj)]
    if len(path) >= 40:
        return out
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += walk(v, (*path, k))
    elif isinstance(obj, (list, tuple)):
        idx = list(range(len(obj)))
        if len(idx) > 7:
            idx = idx[:6] + idx[-1:]
        for i in idx:
            out += walk(obj[i], (*path, i))
    return out


def get_at(obj: Any, path: tuple) -> Any:
    for k in path:
        obj = obj[k]
    return obj


def set_at(obj: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    k, rest = path[0], path[1:]
    if isinstance(obj, tuple):
        items = list(obj)
        items[k] = set_at(items[k], rest, value)
        return type(obj)(items) if type(obj) is tuple else tuple(items)
    obj[k] = set_at(obj[k], rest, value)
    return obj


def del_at(obj: Any, path: tuple) -> Any:
    if len(path) == 1:
        if isinstance(obj, tuple):
            return tuple(v for i, v in enumerate(obj) if i != path[0])
        del obj[path[0]]
        return obj
    k = path[0]
    if isinstance(obj, tuple):
        items = list(obj)
        items[k] = del_at(items[k], path[1:])
        return tuple(items)
    obj[k] = del_at(obj[k], path[1:])
    return obj


def nested(leaf: Any, depth: int, kind: str) -> Any:
    v = leaf
    for i in range(depth):
        if kind == "list" or (kind == "mixed" and i % 2):
            v = [v]
        else:
            v = {"class": v}
    return v


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float))  # bools too


def fmt_path(path: tuple) -> str:
    return "".join(f"[{k!r}]" for k in path) or "<root>"


def short(v: Any, n: int = 80) -> str:
    if isinstance(v, torch.Tensor):
        return f"tensor(shape={list(v.shape)}, dtype={v.dtype}, values={v.flatten()[:3].tolist()}...)"
    r = repr(v)
    return r if len(r) <= n else r[:n] + f"...<{len(r)} chars>"


# ----------------------------------------------------------------------------- the edits
def choose_path(data, payload: dict, pred, what: str) -> tuple | None:
    """A path whose value satisfies ``pred``: 3 times in 4 inside a section that names code
    or paths (when it has one), else anywhere."""
    nodes = [(p, v) for p, v in walk(payload) if p and pred(p, v)]
    if not nodes:
        return None
    hot = sorted({p[0] for p, _ in nodes if p[0] in HOT_SECTIONS}, key=str)
    if hot and data.draw(st.integers(0, 3), label=f"{what}: hot?") > 0:
        section = data.draw(st.sampled_from(hot), label=f"{what}: section")
        nodes = [(p, v) for p, v in nodes if p[0] == section]
    i = data.draw(st.integers(0, len(nodes) - 1), label=f"{what}: node")
    return nodes[i][0]


def new_tensor(data, t: torch.Tensor) -> torch.Tensor:
    choice = data.draw(
        st.sampled_from(["scalar", "empty", "one", "grow", "stack", "transpose", "drop_dim", "dtype",
                         "nan", "inf", "huge", "int_values"]),
        label="tensor edit",
    )  # fmt: skip
    shape = list(t.shape)
    dtype = t.dtype if t.dtype.is_floating_point or t.dtype in (torch.int64, torch.bool) else torch.float32
    if choice == "scalar":
        return torch.tensor(3, dtype=dtype)
    if choice == "empty":
        return torch.zeros(0, dtype=dtype)
    if choice == "one":
        return torch.ones(1, dtype=dtype)
    if choice == "grow":
        return torch.ones([shape[0] + 1, *shape[1:]] if shape else [2], dtype=dtype)
    if choice == "stack":
        return torch.ones([2, *shape], dtype=dtype)
    if choice == "transpose":
        return torch.ones(shape[::-1] if len(shape) > 1 else [1, *shape], dtype=dtype)
    if choice == "drop_dim":
        return torch.ones(shape[1:], dtype=dtype) if shape else torch.ones([1, 1], dtype=dtype)
    if choice == "dtype":
        new = data.draw(st.sampled_from([torch.float64, torch.int64, torch.bool, torch.complex64,
                                         torch.float16, torch.uint8]), label="dtype")  # fmt: skip
        return t.to(new) if t.numel() < 10**6 else torch.zeros(1, dtype=new)
    if choice in ("nan", "inf", "huge"):
        value = {"nan": math.nan, "inf": math.inf, "huge": 1e38}[choice]
        base = t.detach().clone().to(torch.float32 if not t.dtype.is_floating_point else t.dtype)
        return base.fill_(value) if base.numel() else torch.tensor([value])
    return torch.full(shape, 10**6, dtype=torch.int64)


def retype(data, v: Any) -> Any:
    if isinstance(v, dict):
        return data.draw(st.sampled_from([list(v.values()), [list(kv) for kv in v.items()], str(v)[:200],
                                          tuple(v), 0, None]), label="dict ->")  # fmt: skip
    if isinstance(v, (list, tuple)):
        return data.draw(st.sampled_from([{str(i): x for i, x in enumerate(v)}, tuple(v) if isinstance(v, list)
                                          else list(v), (v[0] if v else None), str(v)[:200], len(v)]),
                         label="sequence ->")  # fmt: skip
    if isinstance(v, str):
        return data.draw(st.sampled_from([len(v), [v], {v: v}, v.encode("utf-8", "surrogatepass"), 1.5, None]),
                         label="str ->")  # fmt: skip
    if isinstance(v, torch.Tensor):
        return data.draw(st.sampled_from(["tensor", v.flatten()[:8].tolist(), 0, None, {"data": v}]),
                         label="tensor ->")  # fmt: skip
    if isinstance(v, (int, float)):
        return data.draw(st.sampled_from([str(v), [v], {"value": v}, None, "1e999"]), label="number ->")
    return data.draw(st.sampled_from([{}, [], "", 0, "None"]), label="None ->")


def apply_edit(data, payload: dict, all_keys: list[str]) -> tuple[dict, str]:
    """One random edit of ``payload`` (in place where possible); returns it and its description."""
    kind = data.draw(st.sampled_from(EDIT_KINDS), label="edit")
    if kind == "hostile_str":
        path = choose_path(data, payload, lambda p, v: isinstance(v, str), kind)
        if path is None:
            kind = "hostile_any"
        else:
            new = data.draw(st.sampled_from(HOSTILE_STRINGS), label="hostile string")
            return set_at(payload, path, new), f"set {fmt_path(path)} = {short(new, 120)}"
    if kind == "hostile_any":
        path = choose_path(data, payload, lambda p, v: True, kind)
        new = data.draw(st.sampled_from(HOSTILE_STRINGS), label="hostile string")
        old = get_at(payload, path)
        return set_at(payload, path, new), f"set {fmt_path(path)} = {short(new, 120)} (was {short(old, 40)})"
    if kind == "number":
        path = choose_path(data, payload, lambda p, v: is_number(v), kind)
        if path is None:
            return payload, "noop (no number)"
        new = data.draw(st.sampled_from(EXTREMES), label="extreme")
        old = get_at(payload, path)
        return set_at(payload, path, new), f"set {fmt_path(path)} = {new!r} (was {old!r})"
    if kind == "swap":
        a = choose_path(data, payload, lambda p, v: True, "swap a")
        b = choose_path(data, payload, lambda p, v: True, "swap b")
        if a is None or b is None or a[: len(b)] == b or b[: len(a)] == a:
            return payload, "noop (swap of nested paths)"
        va, vb = get_at(payload, a), get_at(payload, b)
        payload = set_at(payload, a, copy.deepcopy(vb))
        payload = set_at(payload, b, copy.deepcopy(va))
        return payload, f"swap {fmt_path(a)} <-> {fmt_path(b)} ({short(va, 40)} <-> {short(vb, 40)})"
    if kind == "nest":
        path = choose_path(data, payload, lambda p, v: True, kind)
        shape = data.draw(st.sampled_from(["list", "dict", "mixed"]), label="nest kind")
        leaf = get_at(payload, path)
        leaf = leaf if not isinstance(leaf, (dict, list, tuple)) else "os.system"
        return set_at(payload, path, nested(leaf, 2000, shape)), f"set {fmt_path(path)} = {shape} nested 2000 deep around {short(leaf, 30)}"
    if kind == "drop":
        path = choose_path(data, payload, lambda p, v: isinstance(get_at(payload, p[:-1]), (dict, list, tuple)), kind)
        return del_at(payload, path), f"drop {fmt_path(path)}"
    if kind == "dup_key":
        path = choose_path(data, payload, lambda p, v: isinstance(v, dict) and len(v) > 0, kind)
        if path is None:
            return payload, "noop (no dict)"
        d = get_at(payload, path)
        src = data.draw(st.sampled_from(sorted(d, key=str)), label="dup source key")
        dst = data.draw(st.sampled_from(all_keys), label="dup target key")
        d[dst] = copy.deepcopy(d[src])
        return payload, f"set {fmt_path((*path, dst))} = copy of {fmt_path((*path, src))} ({short(d[src], 40)})"
    if kind == "retype":
        path = choose_path(data, payload, lambda p, v: True, kind)
        old = get_at(payload, path)
        new = retype(data, old)
        return set_at(payload, path, new), f"set {fmt_path(path)} = {short(new)} (was {short(old, 40)})"
    if kind == "tensor":
        path = choose_path(data, payload, lambda p, v: isinstance(v, torch.Tensor), kind)
        if path is None:
            return payload, "noop (no tensor)"
        old = get_at(payload, path)
        new = new_tensor(data, old)
        return set_at(payload, path, new), f"set {fmt_path(path)} = {short(new)} (was {short(old, 60)})"
    path = choose_path(data, payload, lambda p, v: v is not None, kind)
    return set_at(payload, path, None), f"set {fmt_path(path)} = None (was {short(get_at(payload, path), 40)})"


def substitute(obj: Any, mapping: dict[str, str]) -> Any:
    """Replace the @CANARY@/@BASE@ placeholders in every string of ``obj``."""
    if isinstance(obj, str):
        for k, v in mapping.items():
            obj = obj.replace(k, v)
        return obj
    if isinstance(obj, dict):
        return type(obj)((k, substitute(v, mapping)) for k, v in obj.items()) if not isinstance(obj, collections.OrderedDict) else collections.OrderedDict((k, substitute(v, mapping)) for k, v in obj.items())
    if isinstance(obj, list):
        return [substitute(v, mapping) for v in obj]
    if isinstance(obj, tuple):
        return tuple(substitute(v, mapping) for v in obj)
    return obj


# ----------------------------------------------------------------------------- seed files
def make_seeds(folder: Path) -> dict[str, Path]:
    """Genuine checkpoints, each written by a real handler (cwd = ``folder``)."""
    from ensemble_models import EnsMLP
    from gen_models import ScoreMLP, SDESampler, mixture_data
    from models import MLP, accuracy, classification_data, regression_data
    from torch import nn
    from torch.utils.data import TensorDataset

    from nnh import NNHandler
    from nnh.callbacks import (
        CSVLogger,
        EarlyStopping,
        EpochTimer,
        LearningRateMonitor,
        ModelCheckpoint,
    )
    from nnh.generative import VPSDE

    seeds: dict[str, Path] = {}
    old = os.getcwd()
    os.chdir(folder)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(0)
            h = NNHandler(MLP, model_type="classification", seed=0)
            h.set_optimizer(torch.optim.Adam, lr=1e-2)
            h.set_loss_fn(nn.functional.cross_entropy)
            h.add_metric("accuracy", accuracy)
            h.set_train_loader(classification_data(64), batch_size=16, shuffle=True)
            h.train(1, progress_bar=False)
            seeds["plain"] = folder / "plain.pth"
            h.save(str(seeds["plain"]))

            torch.manual_seed(1)
            h = NNHandler(MLP, model_type="classification", seed=1, logger_mode="file",
                          logger_filename="training.log", hidden=8)  # fmt: skip
            h.set_optimizer(torch.optim.SGD, lr=0.05, momentum=0.9)
            h.set_scheduler(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.9)
            h.set_loss_fn(nn.CrossEntropyLoss(label_smoothing=0.1))
            try:
                from torchmetrics.classification import MulticlassAccuracy

                h.add_metric("tm_acc", MulticlassAccuracy(num_classes=3))
            except ImportError:  # pragma: no cover
                h.add_metric("accuracy", accuracy)
            h.set_train_loader(classification_data(64), batch_size=16, shuffle=True)
            h.set_val_loader(classification_data(32, seed=1), batch_size=16)
            h.add_callback(CSVLogger("log.csv"))
            h.add_callback(EarlyStopping(monitor="val_loss", patience=3))
            h.add_callback(ModelCheckpoint("ckpt", filename="best_{epoch}", monitor="val_loss"))
            h.add_callback(LearningRateMonitor())
            h.add_callback(EpochTimer())
            h.auto_save(1, save_path="ckpt", name="e{epoch}", overwrite=True)
            h.train(2, ema_decay=0.9, progress_bar=False)
            seeds["callbacks"] = folder / "callbacks.pth"
            h.save(str(seeds["callbacks"]))

            torch.manual_seed(2)
            h = NNHandler(EnsMLP, ensemble_size=3, model_type="regression", d_in=4, hidden=8, d_out=1)
            h.set_optimizer(torch.optim.Adam, lr=1e-2)
            h.set_loss_fn(nn.functional.mse_loss)
            h.set_train_loader(regression_data(48), batch_size=16, shuffle=True)
            h.train(1, progress_bar=False)
            seeds["ensemble"] = folder / "ensemble.pth"
            h.save(str(seeds["ensemble"]))

            torch.manual_seed(3)
            h = NNHandler(ScoreMLP, model_type="score_based", hidden=16, n_freq=2)
            h.set_sde(VPSDE)
            h.set_sampler(SDESampler, dim=2, steps=4)
            h.set_optimizer(torch.optim.Adam, lr=1e-3)
            h.set_train_loader(TensorDataset(mixture_data(64, seed=0)), batch_size=16, shuffle=True)
            h.train(1, progress_bar=False)
            seeds["score"] = folder / "score.pth"
            h.save(str(seeds["score"]))

            torch.manual_seed(4)
            h = NNHandler(MLP, model_type="classification", seed=4)
            h.set_optimizer(torch.optim.Adam, lr=1e-2)
            h.set_loss_fn(nn.functional.cross_entropy)
            h.set_train_loader(classification_data(128), batch_size=16, shuffle=True)
            h.auto_save(1, save_path="steps", name="run_{epoch}", every_n_steps=5)
            h.train(1, gradient_accumulation_steps=2, progress_bar=False)
            step = Path(h.auto_saver.step_path())
            seeds["step"] = folder / "step.pth"
            shutil.copyfile(step, seeds["step"])
    finally:
        os.chdir(old)
    return seeds


def load_payload(path: Path) -> dict:
    payload = torch.load(path, weights_only=True)
    return {k: v for k, v in payload.items() if k not in HEADER_KEYS}


def all_key_names(payloads: dict[str, dict]) -> list[str]:
    names: set[str] = {"class", "function", "kind", "path", "save_path", "filename", "dirpath",
                       "source", "last_saved", "best_path", "__class__", "__init__", "new_key"}  # fmt: skip
    for p in payloads.values():
        for path, _ in walk(p):
            names.update(k for k in path if isinstance(k, str))
    return sorted(names)


# ----------------------------------------------------------------------------- file-system watch
def snapshot(folder: Path, skip: Path | None = None) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for root, dirs, files in os.walk(folder, followlinks=False):
        r = Path(root)
        if skip is not None and (r == skip or skip in r.parents):
            dirs[:] = []
            continue
        for name in dirs + files:
            p = r / name
            if skip is not None and p == skip:
                continue
            st_ = p.lstat()
            digest = ""
            if p.is_file() and not p.is_symlink() and st_.st_size < 2**22:
                digest = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            out[str(p.relative_to(folder))] = (st_.st_mode, st_.st_size, st_.st_mtime_ns, digest)
    return out


class Session:
    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="nnh-fuzz-"))
        self.seeds_dir = self.base / "seeds"
        self.canary = self.base / "canary"
        self.examples = self.base / "examples"
        self.logs = self.base / "logs"
        self.failures_dir = self.base / "failures"
        for d in (self.seeds_dir, self.canary, self.examples, self.logs, self.failures_dir):
            d.mkdir()
        self.seed_paths = make_seeds(self.seeds_dir)
        self.payloads = {name: load_payload(p) for name, p in self.seed_paths.items()}
        self.keys = all_key_names(self.payloads)
        # canaries: a secret, a checkpoint of another run, a folder of precious files
        (self.canary / "secret.txt").write_text("do not touch")
        shutil.copyfile(self.seed_paths["plain"], self.canary / "canary.pth")
        (self.canary / "victim").mkdir()
        (self.canary / "victim" / "keep.txt").write_text("precious")
        self.mapping = {"@CANARY@": str(self.canary), "@BASE@": str(self.base)}
        self.pool = WorkerPool(self.logs, memory_gib=MEMORY_GIB)
        self.counter = 0
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.failures: list[dict[str, Any]] = []

    def watched(self) -> dict[str, Any]:
        return {
            "canary": snapshot(self.canary),
            "seeds": snapshot(self.seeds_dir),
            "examples": sorted(os.listdir(self.examples)),
            "base": sorted(os.listdir(self.base)),
        }

    def close(self) -> None:
        self.pool.close()


@pytest.fixture(scope="module")
def session():
    s = Session()
    yield s
    s.close()
    print_summary(s)
    if SURVEY:
        write_survey(s, Path(SURVEY))
    if not SURVEY and not s.failures:
        shutil.rmtree(s.base, ignore_errors=True)
    else:
        print(f"fuzz session folder (failing files under failures/): {s.base}")


def classify(result: dict[str, Any]) -> tuple[str, bool]:
    """(outcome label, allowed?)"""
    status = result.get("status")
    if status == "ok":
        if result.get("can_train"):
            if result.get("finite") is False:
                return "trained, NON-FINITE parameters", False
            return "loaded and trained", True
        return "loaded (cannot train)", True
    if status == "timeout":
        return "TIMEOUT", False
    if status == "died":
        return f"WORKER DIED (rc={result.get('returncode')})", False
    if result.get("checkpoint_error"):
        return f"CheckpointError[{result.get('kind')}] at {result.get('stage')}", True
    if result.get("exc_type") == "builtins.FloatingPointError" and result.get("stage") == "train":
        return "FloatingPointError at train (divergence)", True
    return f"{result.get('exc_type')} at {result.get('stage')} @ {result.get('where')}", False


def print_summary(s: Session) -> None:
    print(f"\ncheckpoint fuzz: {s.counter} examples, worker starts {s.pool.starts}")
    for label, n in s.outcomes.most_common():
        print(f"  {n:6d}  {label}")


def write_survey(s: Session, out: Path) -> None:
    groups: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for f in s.failures:
        groups[f["class"]].append(f)
    report = {
        "examples": s.counter,
        "outcomes": dict(s.outcomes.most_common()),
        "failure_classes": [
            {"class": k, "count": len(v), "examples": v[:4]}
            for k, v in sorted(groups.items(), key=lambda kv: -len(kv[1]))
        ],
    }
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"survey: {len(s.failures)} failing examples in {len(groups)} classes -> {out}")
    for k, v in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        print(f"  {len(v):5d}  {k}\n         e.g. [{v[0]['seed']}] " + " ; ".join(v[0]["edits"]))
        print(f"         -> {v[0]['msg'][:200]!r}")


# ----------------------------------------------------------------------------- the property
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=DERANDOMIZE,
    database=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, *([Phase.shrink] if SHRINK else [])],
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
@given(data=st.data())
def test_a_hostile_checkpoint_loads_or_raises_checkpoint_error_and_touches_nothing(session, data):
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 20_000))  # 2,000-deep values; an attacker's writer has no limit
    try:
        run_example(session, data)
    finally:
        sys.setrecursionlimit(limit)


def run_example(s: Session, data) -> None:
    seed = data.draw(st.sampled_from(sorted(s.payloads)), label="seed file")
    payload = copy.deepcopy(s.payloads[seed])
    edits = []
    for _ in range(data.draw(st.integers(1, 4), label="number of edits")):
        payload, desc = apply_edit(data, payload, s.keys)
        edits.append(desc)
    payload = substitute(payload, s.mapping)
    edits = [substitute(e, s.mapping) for e in edits]

    s.counter += 1
    ex = s.examples / f"ex{s.counter:06d}"
    ex.mkdir()
    os.symlink(s.canary, ex / "escape_link")
    os.symlink(s.canary / "canary.pth", ex / "linked.pth")
    os.symlink(s.canary / "secret.txt", ex / "linked_secret.txt")
    ckpt = ex / "ckpt.pth"
    from nnh.checkpoint import save_checkpoint

    try:
        save_checkpoint(payload, ckpt, durable=False, sign=False)  # a stranger: not our key
    except Exception:  # save_checkpoint refuses the payload: not a file anyone can make this way
        shutil.rmtree(ex, ignore_errors=True)
        s.counter -= 1
        reject()
    before = s.watched()
    result = s.pool.run(str(ckpt), str(ex), TIMEOUT)
    after = s.watched()

    label, allowed = classify(result)
    outcome = label
    problems = []
    if not allowed:
        problems.append(label)
    foreign = [f"{slot} = {path}" for slot, path in result.get("components", []) if not in_registry(slot, path)]
    if foreign:
        s.outcomes["(also) FOREIGN CODE LOADED"] += 1
        if allowed:  # an exception class already names the example; else this is its class
            label, allowed = "FOREIGN CODE LOADED: " + foreign[0], False
        problems.append("foreign code loaded: " + ", ".join(foreign))
    for part in ("canary", "seeds", "examples", "base"):
        if before[part] != after[part]:
            if isinstance(before[part], dict):
                changed = sorted(set(before[part].items()) ^ set(after[part].items()))
                problems.append(f"{part} changed: {[c[0] for c in changed][:6]}")
            else:
                problems.append(f"{part} listing changed: {sorted(set(before[part]) ^ set(after[part]))[:6]}")
    if any(p.startswith(("canary", "seeds", "examples", "base")) for p in problems):
        s.outcomes["OUTSIDE-FOLDER WRITE"] += 1
        # restore the canaries for the next example
        shutil.rmtree(s.canary, ignore_errors=True)
        s.canary.mkdir()
        (s.canary / "secret.txt").write_text("do not touch")
        shutil.copyfile(s.seed_paths["plain"], s.canary / "canary.pth")
        (s.canary / "victim").mkdir()
        (s.canary / "victim" / "keep.txt").write_text("precious")
        for extra in set(os.listdir(s.base)) - {"seeds", "canary", "examples", "logs", "failures"}:
            target = s.base / extra
            shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
        for extra in set(os.listdir(s.examples)) - {ex.name}:
            target = s.examples / extra
            shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
    s.outcomes[outcome] += 1

    if problems:
        where = s.failures_dir / f"{s.counter:06d}-{seed}.pth"
        shutil.copyfile(ckpt, where)
        record = {
            "class": next((f"OUTSIDE WRITE: {p}" for p in problems if p.startswith(("canary", "seeds", "examples", "base"))), label),
            "problems": problems,
            "seed": seed,
            "edits": edits,
            "msg": result.get("msg", result.get("stderr_tail", ""))[:600],
            "file": str(where),
        }
        s.failures.append(record)
    shutil.rmtree(ex, ignore_errors=True)
    if problems and not SURVEY:
        raise AssertionError(
            f"hostile checkpoint from seed {seed!r} broke the promise: {problems}\n"
            f"edits: {edits}\nworker: {json.dumps(result, default=str)[:1500]}\nfile kept at {where}"
        )


def test_the_harness_sees_what_it_must(session, tmp_path):
    """The fuzzer's own checks work: a genuine file loads and trains, a foreign one is a
    CheckpointError, a changed or new file outside is seen, and a planted os.system callback
    is refused as untrusted (the promise the fuzzer stands on)."""
    s = session
    ex = tmp_path / "ex"
    ex.mkdir()
    shutil.copyfile(s.seed_paths["plain"], ex / "ok.pth")
    result = s.pool.run(str(ex / "ok.pth"), str(ex), TIMEOUT)
    assert classify(result) == ("loaded and trained", True), result
    (ex / "foreign.pth").write_bytes(b"not a checkpoint")
    result = s.pool.run(str(ex / "foreign.pth"), str(ex), TIMEOUT)
    assert result["status"] == "error" and result["checkpoint_error"], result
    from nnh.checkpoint import save_checkpoint

    payload = copy.deepcopy(s.payloads["plain"])
    payload["callbacks"] = [{"class": "os.system", "config": {"command": "true"}, "state": {}}]
    save_checkpoint(payload, ex / "planted.pth", durable=False)
    result = s.pool.run(str(ex / "planted.pth"), str(ex), TIMEOUT)
    assert result["status"] == "error" and result["kind"] == "untrusted", result

    watched = tmp_path / "watched"
    watched.mkdir()
    (watched / "a.txt").write_text("a")
    before = snapshot(watched)
    (watched / "a.txt").write_text("b")
    assert snapshot(watched) != before
    (watched / "a.txt").write_text("a")
    os.utime(watched / "a.txt", ns=(0, before["a.txt"][2]))
    assert snapshot(watched) == before
    (watched / "new").write_text("")
    assert snapshot(watched) != before


def test_the_worker_pool_survives_timeouts_and_deaths(session, tmp_path):
    s = session
    shutil.copyfile(s.seed_paths["plain"], tmp_path / "ok.pth")
    assert s.pool.run(str(tmp_path / "ok.pth"), str(tmp_path), 0.001)["status"] == "timeout"
    assert s.pool.run(str(tmp_path / "ok.pth"), str(tmp_path), TIMEOUT)["status"] == "ok"
    s.pool.proc.kill()  # a worker that died between examples is replaced
    s.pool.proc.wait()
    assert s.pool.run(str(tmp_path / "ok.pth"), str(tmp_path), TIMEOUT)["status"] == "ok"
