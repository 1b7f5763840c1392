"""The AutoSaver: when and where the handler saves during training."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import attrs

__all__ = ["AutoSaver"]


def _format_fields(template: str) -> set[str]:
    fields = set()
    for _, field, _, _ in string.Formatter().parse(template):
        if field is None:
            continue
        if field == "" or field.isdigit():
            raise ValueError(
                f"auto_save name {template!r} has a positional field; use named fields such as {{epoch}}"
            )
        fields.add(field.split(".")[0].split("[")[0])
    return fields


@attrs.frozen
class AutoSaver:
    """Periodic saving configuration.

    ``interval``: save every N epochs (counted from 1); ``-1`` after the last epoch only;
    ``0``/``None`` never. ``name`` is a format string over ``epoch`` and the epoch's logged
    values (``loss``, ``val_loss``, metrics, ``lr``); ``.pth`` is added when absent.
    ``overwrite`` deletes the previous file once the new one is safely written.
    ``every_n_steps`` also writes a mid-epoch checkpoint every N micro-steps to
    ``save_path/<name stem>_step.pth`` (one file, replaced atomically) for exact resume.

    Example:
        >>> saver = AutoSaver(interval=2, save_path="ckpt", name="m_{epoch:03d}_{loss:.2f}")
        >>> saver.path_for({"epoch": 4, "loss": 0.1234}).as_posix()
        'ckpt/m_004_0.12.pth'
        >>> saver.due(4, final=False), saver.due(3, final=False)
        (True, False)
    """

    interval: int | None = None
    save_path: str = "."
    name: str = "model_epoch{epoch:02d}"
    overwrite: bool = False
    every_n_steps: int | None = None
    last_saved: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.interval is not None and (not isinstance(self.interval, int) or self.interval < -1):
            raise ValueError(
                f"auto_save interval must be an int >= -1 or None, got {self.interval!r}"
            )
        if self.every_n_steps is not None and (
            not isinstance(self.every_n_steps, int) or self.every_n_steps < 1
        ):
            raise ValueError(
                f"every_n_steps must be an int >= 1 or None, got {self.every_n_steps!r}"
            )
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("auto_save name must be a non-empty format string")

    @property
    def enabled(self) -> bool:
        return bool(self.interval)

    def check_name(self, known_keys: set[str]) -> None:
        """Raise when ``name`` uses a field that will never be logged."""
        unknown = _format_fields(self.name) - set(known_keys)
        if unknown:
            raise ValueError(
                f"auto_save name {self.name!r} uses unknown field(s) {sorted(unknown)}; available: "
                f"{sorted(known_keys)} (register metrics with add_metric before auto_save)"
            )

    def due(self, epoch: int, final: bool) -> bool:
        """Whether to save after ``epoch`` (``final``: last epoch of a save_on_last_epoch run)."""
        if not self.interval:
            return False
        if self.interval == -1:
            return final
        return epoch % self.interval == 0 or final

    def path_for(self, logs: dict[str, Any]) -> Path:
        """The file for an epoch's logs."""
        values = {k: v for k, v in logs.items()}
        try:
            name = self.name.format(**values)
        except (KeyError, ValueError) as err:
            raise ValueError(
                f"cannot fill auto_save name {self.name!r} from {sorted(values)}: {err}"
            ) from err
        if not name.endswith(".pth"):
            name += ".pth"
        return Path(self.save_path) / name

    def step_path(self) -> Path:
        """The single mid-epoch checkpoint file."""
        stem = self.name.split("{")[0].rstrip("_-") or "model"
        return Path(self.save_path) / f"{stem}_step.pth"

    def after_save(self, path: Path) -> AutoSaver:
        """Delete the previous file when overwriting (only after the new one is written)."""
        previous = self.last_saved
        if self.overwrite and previous and Path(previous).resolve() != Path(path).resolve():
            Path(previous).unlink(missing_ok=True)
        return attrs.evolve(self, last_saved=str(path))

    def state_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> AutoSaver:
        fields = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in state.items() if k in fields})
