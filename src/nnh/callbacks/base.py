"""The callback protocol and the dispatcher the training loop calls.

A callback overrides any of the ``on_*`` hooks. ``logs`` dicts carry the epoch's values
(``loss``, ``val_loss``, each metric and ``val_<metric>``, ``lr``, ``epoch``) at epoch end,
and the batch's device tensors (``loss``, ``batch_size``) at batch end: reading a batch loss
with ``float()`` forces a device sync, so do it sparingly.

To stop training, set ``self.handler.stop_training = True`` (the loop stops after the
current epoch, on every rank).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from nnh.handler import NNHandler

__all__ = ["HOOKS", "Callback", "CallbackList"]

HOOKS = (
    "on_train_begin",
    "on_train_end",
    "on_epoch_begin",
    "on_epoch_end",
    "on_train_batch_begin",
    "on_train_batch_end",
    "on_val_begin",
    "on_val_end",
    "on_val_batch_begin",
    "on_val_batch_end",
)


class Callback:
    """Base class: override the hooks you need; keep state in ``state_dict``.

    Example:
        >>> class CountEpochs(Callback):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.seen = 0
        ...     def on_epoch_end(self, epoch, logs=None):
        ...         self.seen += 1
        ...     def state_dict(self):
        ...         return {"seen": self.seen}
        ...     def load_state_dict(self, state):
        ...         self.seen = state["seen"]
        >>> CountEpochs().state_dict()
        {'seen': 0}
    """

    #: Run this callback on every rank (True) or only on rank 0 (False).
    all_ranks: bool = True

    def __init__(self) -> None:
        self.handler: NNHandler | None = None

    def set_handler(self, handler: NNHandler) -> None:
        """Called by ``NNHandler.add_callback``."""
        self.handler = handler

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None: ...
    def on_train_end(self, logs: dict[str, Any] | None = None) -> None: ...
    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None: ...
    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None: ...
    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None: ...
    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None: ...
    def on_val_begin(self, logs: dict[str, Any] | None = None) -> None: ...
    def on_val_end(self, logs: dict[str, Any] | None = None) -> None: ...
    def on_val_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None: ...
    def on_val_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint-safe state (tensors, numbers, strings, lists, dicts)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""

    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments to rebuild this callback from a checkpoint.

        The default reads attributes named like the ``__init__`` parameters.
        """
        import inspect

        out = {}
        for name, p in inspect.signature(type(self).__init__).parameters.items():
            if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if hasattr(self, name):
                out[name] = getattr(self, name)
        return out


class CallbackList:
    """Dispatches each hook to the callbacks that override it, in registration order.

    Example:
        >>> class A(Callback):
        ...     def on_train_begin(self, logs=None):
        ...         print("A begins")
        >>> cl = CallbackList([A(), Callback()])
        >>> cl.wants("on_train_batch_end"), cl.wants("on_train_begin")
        (False, True)
        >>> cl.call("on_train_begin")
        A begins
    """

    def __init__(self, callbacks: Iterable[Callback] = (), *, is_main: bool = True):
        self.callbacks = list(callbacks)
        self.is_main = is_main
        self._by_hook = {hook: self._overriding(hook) for hook in HOOKS}

    def _overriding(self, hook: str) -> list[Any]:
        bound = []
        for cb in self.callbacks:
            if not (cb.all_ranks or self.is_main):
                continue
            if getattr(type(cb), hook) is not getattr(Callback, hook):
                bound.append(getattr(cb, hook))
        return bound

    def wants(self, hook: str) -> bool:
        return bool(self._by_hook[hook])

    def call(self, hook: str, *args: Any) -> None:
        for fn in self._by_hook[hook]:
            fn(*args)
