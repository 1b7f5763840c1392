"""The AutoSaver: when and where the handler saves during training."""

from __future__ import annotations

import hashlib
import re
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
    ``overwrite`` deletes the previous file once the new one is safely written, and only if
    it is a checkpoint this run wrote in ``save_path`` (see :mod:`nnh.checkpoint.ownership`).
    ``every_n_steps`` also writes a mid-epoch checkpoint every N micro-steps to one file per
    name pattern, :meth:`step_path` (replaced atomically), for exact resume.
    ``async_save`` writes every automatic save on a background thread (the state is
    snapshotted at the save point; see :func:`nnh.handler.saving.submit_checkpoint`).
    ``from_checkpoint`` marks a configuration read from a file rather than set by the user:
    its automatic saves then replace only files this run wrote.

    Example:
        >>> saver = AutoSaver(interval=2, save_path="ckpt", name="m_{epoch:03d}_{loss:.2f}")
        >>> saver.path_for({"epoch": 4, "loss": 0.1234}).as_posix()
        'ckpt/m_004_0.12.pth'
        >>> saver.due(4, final=False), saver.due(3, final=False)
        (True, False)
        >>> saver.step_path().as_posix()
        'ckpt/m_epoch_loss.step-e2b53010.pth'
    """

    interval: int | None = None
    save_path: str = "."
    name: str = "model_epoch{epoch:02d}"
    overwrite: bool = False
    every_n_steps: int | None = None
    last_saved: str | None = None
    async_save: bool = False
    from_checkpoint: bool = attrs.field(default=False, kw_only=True)

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
        if "/" in self.name or "\\" in self.name:
            raise ValueError(
                f"auto_save name {self.name!r} must be a file name, not a path: put the folder "
                "in save_path"
            )

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
        """The file for an epoch's logs; a filled name that is not a file name raises.

        Example:
            >>> AutoSaver(save_path="ckpt", name="m_{tag}").path_for({"tag": "../../x"})
            Traceback (most recent call last):
            ...
            ValueError: auto_save name 'm_{tag}' filled from the logged values gives 'm_../../x', which is not a file name (a logged value or format spec must not produce a path separator)
        """
        values = {k: v for k, v in logs.items()}
        try:
            name = self.name.format(**values)
        except (KeyError, ValueError) as err:
            raise ValueError(
                f"cannot fill auto_save name {self.name!r} from {sorted(values)}: {err}"
            ) from err
        if "/" in name or "\\" in name or "\x00" in name or name in (".", ".."):
            raise ValueError(
                f"auto_save name {self.name!r} filled from the logged values gives {name!r}, "
                "which is not a file name (a logged value or format spec must not produce a path separator)"
            )
        if not name.endswith(".pth"):
            name += ".pth"
        return Path(self.save_path) / name

    def step_path(self) -> Path:
        """The mid-epoch checkpoint file of this name pattern.

        Readable (the pattern with its fields' names, ``exp_{epoch}_A`` gives
        ``exp_epoch_A``) and unique per pattern (a short hash of the whole pattern), so two
        runs with different names in one folder never share a recovery file.
        """
        readable = re.sub(r"\{([^{}:!]*)[^{}]*\}", r"\1", self.name)
        readable = re.sub(r"[^A-Za-z0-9._-]+", "_", readable).strip("._-") or "model"
        tag = hashlib.sha256(self.name.encode("utf-8")).hexdigest()[:8]
        return Path(self.save_path) / f"{readable}.step-{tag}.pth"

    def remove_previous(self, path: Path, run_id: str) -> bool:
        """When overwriting, delete ``last_saved`` now that ``path`` is written, if this run
        wrote it; return whether a file was deleted.

        Only a checkpoint of run ``run_id`` inside ``save_path`` is deleted (never a file a
        checkpoint merely names); anything else is left where it is.
        """
        from nnh.checkpoint.ownership import remove_owned

        previous = self.last_saved
        if not (self.overwrite and previous) or Path(previous).resolve() == Path(path).resolve():
            return False
        return remove_owned(previous, folder=self.save_path, run_id=run_id)

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in attrs.asdict(self).items() if k != "from_checkpoint"}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> AutoSaver:
        """Rebuild a saved configuration (marked ``from_checkpoint``); bad values raise."""
        fields = {f.name for f in attrs.fields(cls)} - {"from_checkpoint"}
        values = {k: v for k, v in state.items() if k in fields}
        for key in ("save_path", "name", "last_saved"):
            if values.get(key) is not None and not isinstance(values[key], str):
                raise ValueError(f"auto_saver {key!r} must be a string, got {values[key]!r}")
        for key in ("overwrite", "async_save"):
            if not isinstance(values.get(key, False), bool):
                raise ValueError(f"auto_saver {key!r} must be a bool, got {values[key]!r}")
        return cls(**values, from_checkpoint=True)
