"""ModelCheckpoint: keep the best checkpoint by a monitored value, and/or one every N epochs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from nnh.callbacks.base import Callback
from nnh.checkpoint.ownership import remove_owned
from nnh.warn import warn as nnh_warn

__all__ = ["ModelCheckpoint"]


class ModelCheckpoint(Callback):
    """Save the handler through :meth:`NNHandler.save` (atomic; rank 0 writes).

    Args:
        dirpath: folder for the files.
        filename: format string over ``epoch`` and the logged values, ``.pth`` added.
        monitor: logged key to rank checkpoints by (``None``: no best tracking).
        mode: ``"min"`` or ``"max"``.
        save_best_only: keep only the best file (the previous best is deleted only after
            the new one is safely written, and only if this run wrote it in ``dirpath``).
        every_n_epochs: also save every N epochs (independent of ``monitor``).
        save_last: also keep ``last.pth`` up to date every epoch.

    Example:
        >>> cb = ModelCheckpoint("ckpts", filename="best_{epoch}_{val_loss:.3f}", monitor="val_loss")
        >>> cb.best_score
        inf
    """

    def __init__(
        self,
        dirpath: str,
        filename: str = "epoch{epoch:03d}",
        monitor: str | None = "val_loss",
        mode: str = "min",
        save_best_only: bool = True,
        every_n_epochs: int | None = None,
        save_last: bool = False,
    ):
        super().__init__()
        if not isinstance(filename, str) or not filename or "/" in filename or "\\" in filename:
            raise ValueError(
                f"ModelCheckpoint filename {filename!r} must be a file name (a format string), "
                "not a path: put the folder in dirpath"
            )
        if mode not in ("min", "max"):
            raise ValueError(f"ModelCheckpoint mode must be 'min' or 'max', got {mode!r}")
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1 or None, got {every_n_epochs!r}")
        if monitor is None and every_n_epochs is None and not save_last:
            raise ValueError("ModelCheckpoint needs monitor=, every_n_epochs= or save_last=True")
        self.dirpath, self.filename, self.monitor, self.mode = str(dirpath), filename, monitor, mode
        self.save_best_only, self.every_n_epochs, self.save_last = (
            save_best_only,
            every_n_epochs,
            save_last,
        )
        self.best_score = math.inf if mode == "min" else -math.inf
        self.best_path: str | None = None
        self.saved: list[str] = []
        self._warned = False
        self._from_checkpoint = False

    def _save(self, path: Path) -> None:
        # through the handler: callbacks never import the shell at run time
        self.handler._write_checkpoint(str(path), guard_replace=self._from_checkpoint)

    def _path(self, logs: dict[str, Any]) -> Path:
        try:
            name = self.filename.format(**logs)
        except (KeyError, ValueError) as err:
            raise ValueError(
                f"ModelCheckpoint filename {self.filename!r} cannot be filled from the logged keys "
                f"{sorted(logs)}: {err}"
            ) from err
        if "/" in name or "\\" in name or "\x00" in name or name in (".", ".."):
            raise ValueError(
                f"ModelCheckpoint filename {self.filename!r} filled from the logged values gives "
                f"{name!r}, which is not a file name (a logged value or format spec must not "
                "produce a path separator)"
            )
        return Path(self.dirpath) / (name if name.endswith(".pth") else name + ".pth")

    def _improved(self, value: float) -> bool:
        return value < self.best_score if self.mode == "min" else value > self.best_score

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = dict(logs or {})
        logs.setdefault("epoch", epoch)
        handler = self.handler
        assert handler is not None, "ModelCheckpoint must be added with handler.add_callback"
        if self.monitor is not None:
            value = logs.get(self.monitor)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                if not self._warned and self.monitor not in logs:
                    nnh_warn(
                        f"ModelCheckpoint: monitored key {self.monitor!r} is not logged "
                        f"(available: {sorted(logs)}); nothing saved for it",
                    )
                    self._warned = True
            elif self._improved(float(value)):
                self.best_score = float(value)
                path = self._path(logs)
                self._save(path)
                previous, self.best_path = self.best_path, str(path)
                if (
                    self.save_best_only
                    and previous
                    and Path(previous).resolve() != path.resolve()
                    and handler.rank == 0
                ):
                    # only a checkpoint this run wrote in dirpath, whatever best_path says
                    remove_owned(previous, folder=self.dirpath, run_id=handler._run_id)
                self.saved.append(str(path))
        if self.every_n_epochs and epoch % self.every_n_epochs == 0:
            path = self._path(logs)
            if str(path) != self.best_path:
                self._save(path)
                self.saved.append(str(path))
        if self.save_last:
            self._save(Path(self.dirpath) / "last.pth")

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_score": self.best_score,
            "best_path": self.best_path,
            "saved": list(self.saved),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a checkpoint; its paths are data (never deleted unless this run wrote
        them) and its saves replace only files this run wrote."""
        best_path = state.get("best_path")
        saved = state.get("saved", [])
        if best_path is not None and not isinstance(best_path, str):
            raise ValueError(f"ModelCheckpoint best_path must be a string, got {best_path!r}")
        if not isinstance(saved, list) or not all(isinstance(p, str) for p in saved):
            raise ValueError(f"ModelCheckpoint saved must be a list of strings, got {saved!r}")
        self.best_score = float(state["best_score"])
        self.best_path = best_path
        self.saved = list(saved)
        self._from_checkpoint = True
