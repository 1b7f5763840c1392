"""Values read from a checkpoint select files inside the working folder, never outside it;
options passed to torch are allowlisted; the CSV file and the log cannot be injected into.

Every test runs in ``tmp_path/work`` (the working folder) with canary files outside it.
"""

import csv
import io
import logging
import os

import pytest

import nnh.warn
from nnh.callbacks import CSVLogger, EarlyStopping, ModelCheckpoint, TensorBoardLogger
from nnh.callbacks.csv_logger import header_cell, read_header
from nnh.checkpoint import CheckpointError
from nnh.checkpoint.confine import (
    confine_auto_saver,
    confine_callback_config,
    confine_path,
    name_pattern_problem,
    safe_repr,
    working_folders,
)
from nnh.checkpoint.options import compile_options, counter, finite_number, loader_options
from nnh.handler.logs import EscapingFormatter, logging_options, make_logger

SRC = "evil.pth"


@pytest.fixture
def work(tmp_path, monkeypatch):
    folder = tmp_path / "work"
    folder.mkdir()
    (tmp_path / "canary.txt").write_text("precious")
    monkeypatch.chdir(folder)
    return folder


def refused(value, **kw):
    path, warning = confine_path(value, record="callbacks[0].config.filename", source=SRC, **kw)
    assert (path is None) == (warning is not None)
    return warning


# -- confine_path ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["log.csv", "runs/a/log.csv", "runs/../log.csv", "./x.csv"])
def test_paths_inside_the_working_folder_are_kept_as_given(work, value):
    assert confine_path(value, record="r", source=SRC) == (value, None)


def test_a_pathlike_is_kept_as_its_string(work):
    from pathlib import Path

    assert confine_path(Path("runs/x.csv"), record="r", source=SRC) == ("runs/x.csv", None)


def test_absolute_paths_outside_are_refused_and_the_warning_says_what_and_how(work, tmp_path):
    warning = refused(str(tmp_path / "canary.txt"))
    assert SRC in warning and "callbacks[0].config.filename" in warning
    assert "outside the working folder" in warning and "reset" in warning
    assert "handler.auto_save(" in warning and "handler.add_callback(" in warning
    assert confine_path(str(work / "in.csv"), record="r", source=SRC)[1] is None  # absolute inside


@pytest.mark.parametrize("value", ["../canary.txt", "runs/../../canary.txt", "..", "a/b/../../.."])
def test_dotdot_escapes_are_refused(work, value):
    assert refused(value) is not None


def test_a_symlink_inside_pointing_outside_is_refused(work, tmp_path):
    (work / "link.csv").symlink_to(tmp_path / "canary.txt")
    (work / "dirlink").symlink_to(tmp_path)
    (work / "dangling.csv").symlink_to(tmp_path / "not-yet.csv")
    assert "outside" in refused("link.csv")
    assert "outside" in refused("dirlink/new/file.csv")  # through an ancestor that exists
    assert "outside" in refused("dangling.csv")  # a dangling final link
    assert "outside" in refused("dirlink", kind="dir")
    (work / "inner").mkdir()
    (work / "ok.csv").symlink_to(work / "inner" / "x.csv")
    assert refused("ok.csv") is None  # a link that stays inside is fine


def test_nul_control_characters_non_strings_empty_and_long_values_are_refused(work):
    assert "NUL" in refused("a\x00.csv")
    assert "control" in refused("a\n.csv")
    assert "control" in refused("a\x1b[2J.csv")
    for value in (None, 3, b"log.csv", ["log.csv"], {"p": 1}):
        assert "not a path string" in refused(value)
    assert "empty" in refused("")
    assert "4096" in refused("a" * 4097)
    assert refused("a/" * 2000 + "x.csv") is None  # 4001 characters: still fine


def test_home_is_never_expanded(work):
    for value in ("~", "~/x.csv", "~root/x.csv"):
        assert "'~'" in refused(value)
    assert not (work / "~").exists()


def test_special_places_are_refused(work):
    assert "hidden" in refused(".git/config")
    assert "hidden" in refused("runs/.ssh/authorized_keys")
    assert "hidden" in refused(".venv", kind="dir")
    assert "code or configuration" in refused("sitecustomize.py")
    assert "code or configuration" in refused("runs/evil.pth")
    assert "code or configuration" in refused("Makefile")
    assert "Python folder" in refused("venv/lib/python3.11/site-packages/x.csv")
    assert "URL" in refused("s3://bucket/log", kind="dir")
    (work / "folder").mkdir()
    (work / "file.csv").write_text("")
    assert "not a regular file" in refused("folder")
    assert "not a folder" in refused("file.csv", kind="dir")
    assert refused("/dev/null") is not None and refused("/proc/self/mem") is not None


def test_the_warning_shows_the_value_safely(work):
    warning = refused("x\n2024-01-01 [INFO] forged" + "y" * 300)
    assert "\n" not in warning and "forged" in warning and "y" * 100 not in warning
    assert "\x1b" not in safe_repr("\x1b[2J") and len(safe_repr(list(range(10_000)))) <= 80


def test_working_folders_add_the_checkpoint_folder_but_never_root_or_home(work, tmp_path):
    ckpt = tmp_path / "ckpts" / "run.pth"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"x")
    folders = working_folders(str(ckpt))
    assert folders == (str(work), str(ckpt.parent.resolve()))
    assert confine_path(str(ckpt.parent / "log.csv"), record="r", source=SRC, base=folders)[1] is None
    assert confine_path(str(tmp_path / "canary.txt"), record="r", source=SRC, base=folders)[0] is None
    assert working_folders(None) == (str(work),) and working_folders("missing.pth") == (str(work),)

def test_working_folders_never_add_home_or_a_folder_above_it(work, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpts" / "run.pth"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"x")
    monkeypatch.setenv("HOME", str(ckpt.parent))  # the checkpoint lies in the home folder
    assert working_folders(str(ckpt)) == (str(work),)
    monkeypatch.setenv("HOME", str(ckpt.parent / "me"))  # ... or above it
    assert working_folders(str(ckpt)) == (str(work),)


# -- callbacks -------------------------------------------------------------------------------


def test_csv_logger_with_a_path_outside_is_dropped_with_the_warning(work, tmp_path):
    config, warnings = confine_callback_config(
        CSVLogger, {"filename": str(tmp_path / "canary.txt"), "separator": ","},
        record="callbacks[0]", source=SRC,
    )
    assert config is None and len(warnings) == 1
    assert "callbacks[0].config.filename" in warnings[0] and "dropped" in warnings[0]
    assert "handler.add_callback(CSVLogger(" in warnings[0]


def test_csv_logger_separator_must_be_a_known_one(work):
    for sep in (",", ";", "\t", "|"):
        assert confine_callback_config(CSVLogger, {"filename": "l.csv", "separator": sep},
                                       record="callbacks[0]", source=SRC) == (
            {"filename": "l.csv", "separator": sep}, [])
    config, warnings = confine_callback_config(
        CSVLogger, {"filename": "l.csv", "separator": "\n"}, record="callbacks[0]", source=SRC)
    assert config == {"filename": "l.csv", "separator": ","}
    assert "callbacks[0].config.separator" in warnings[0]


def test_model_checkpoint_dirpath_is_required_and_filename_must_be_a_name(work):
    ok = {"dirpath": "ckpt", "filename": "best_{epoch:03d}", "monitor": "val_loss"}
    assert confine_callback_config(ModelCheckpoint, ok, record="callbacks[2]", source=SRC) == (ok, [])
    config, warnings = confine_callback_config(
        ModelCheckpoint, {**ok, "dirpath": "/etc"}, record="callbacks[2]", source=SRC)
    assert config is None and "callbacks[2].config.dirpath" in warnings[0]
    for bad in ("../{epoch}", "..\\x", "{loss.__class__}", "{epoch:{fill}^3}", "..", "a\nb"):
        config, warnings = confine_callback_config(
            ModelCheckpoint, {**ok, "filename": bad}, record="callbacks[2]", source=SRC)
        assert config == {**ok, "filename": "epoch{epoch:03d}"}, bad
        assert "callbacks[2].config.filename" in warnings[0]


def test_tensorboard_log_dir_is_reset_to_its_default_and_comment_cannot_escape(work):
    pytest.importorskip("tensorboard")
    config, warnings = confine_callback_config(
        TensorBoardLogger, {"log_dir": "/tmp", "comment": ""}, record="callbacks[1]", source=SRC)
    assert config == {"log_dir": "runs", "comment": ""} and "log_dir" in warnings[0]
    for comment in ("/../../x", ".", "\n"):
        config, warnings = confine_callback_config(
            TensorBoardLogger, {"log_dir": ".", "comment": comment}, record="callbacks[1]",
            source=SRC)
        assert config == {"log_dir": ".", "comment": ""}, comment
        assert "callbacks[1].config.comment" in warnings[0]


def test_other_callbacks_pass_unchanged(work):
    config = {"monitor": "../../etc", "patience": 2}
    assert confine_callback_config(EarlyStopping, config, record="c", source=SRC) == (config, [])


def test_a_subclass_of_csv_logger_is_confined_too(work):
    class Mine(CSVLogger):
        pass

    assert confine_callback_config(Mine, {"filename": "../x.csv"}, record="c", source=SRC)[0] is None


# -- AutoSaver -------------------------------------------------------------------------------


def test_auto_saver_outside_is_disabled_with_how_to_enable_it(work, tmp_path):
    state = {"interval": 1, "save_path": str(tmp_path), "name": "m_{epoch}", "overwrite": True,
             "every_n_steps": 5, "last_saved": str(tmp_path / "canary.txt"), "async_save": False}
    out, warnings = confine_auto_saver(state, source=SRC)
    assert out["interval"] is None and out["every_n_steps"] is None and out["save_path"] == "."
    assert "last_saved" not in out
    assert "auto_saver.save_path" in warnings[0] and "handler.auto_save(" in warnings[0]
    from nnh.handler.autosaver import AutoSaver

    assert not AutoSaver.from_state_dict(out).enabled


def test_auto_saver_name_and_last_saved_are_checked(work, tmp_path):
    state = {"interval": 2, "save_path": "ckpt", "name": "../{epoch}",
             "last_saved": str(tmp_path / "canary.txt")}
    out, warnings = confine_auto_saver(state, source=SRC)
    assert out == {"interval": 2, "save_path": "ckpt", "name": "model_epoch{epoch:02d}",
                   "last_saved": None}
    assert any("auto_saver.name" in w for w in warnings)
    assert any("auto_saver.last_saved" in w for w in warnings)
    ok = {"interval": 2, "save_path": "ckpt", "name": "m_{epoch}", "last_saved": "ckpt/m_2.pth"}
    assert confine_auto_saver(ok, source=SRC) == (ok, [])


def test_auto_saver_values_of_the_wrong_type_are_reset(work):
    out, warnings = confine_auto_saver(
        {"interval": True, "every_n_steps": 0, "overwrite": "yes", "extra": 1}, source=SRC)
    assert out == {"interval": None, "every_n_steps": None, "overwrite": False}
    assert len(warnings) == 3
    assert confine_auto_saver(["x"], source=SRC)[0] == {}


# -- options ---------------------------------------------------------------------------------


def test_compile_options_drop_options_and_unknown_keys():
    kept, warnings = compile_options(
        {"mode": "reduce-overhead", "fullgraph": True, "dynamic": None, "backend": "eager",
         "options": {"trace.enabled": True}, "disable": False}, source=SRC)
    assert kept == {"mode": "reduce-overhead", "fullgraph": True, "dynamic": None,
                    "backend": "eager"}
    assert len(warnings) == 2 and "model.compile.options" in warnings[0]
    assert "never passed on" in warnings[0] and SRC in warnings[0]


def test_compile_options_of_the_wrong_type_are_dropped():
    kept, warnings = compile_options(
        {"mode": "fast", "fullgraph": 1, "dynamic": "yes", "backend": "os.system"}, source=SRC)
    assert kept == {} and len(warnings) == 4
    assert compile_options("inductor", source=SRC)[0] is None
    assert compile_options(None, source=SRC) == (None, [])


def test_loader_options_drop_code_and_absurd_values():
    kept, warnings = loader_options(
        {"batch_size": 16, "shuffle": True, "num_workers": 100000, "collate_fn": "os.system",
         "worker_init_fn": "x", "multiprocessing_context": "fork", "prefetch_factor": 2,
         "persistent_workers": True}, which="train", source=SRC)
    assert kept == {"batch_size": 16, "shuffle": True}
    text = "\n".join(warnings)
    for key in ("num_workers", "collate_fn", "worker_init_fn", "multiprocessing_context",
                "prefetch_factor", "persistent_workers"):
        assert f"data.train.loader_kwargs.{key}" in text, key


def test_loader_options_check_each_value():
    workers = min(32, os.cpu_count() or 1)
    good = {"batch_size": 2**31 - 1, "drop_last": False, "pin_memory": False, "timeout": 3600,
            "num_workers": workers, "prefetch_factor": 64, "persistent_workers": True}
    assert loader_options(good, which="val", source=SRC) == (good, [])
    for key, bad in [("batch_size", 0), ("batch_size", True), ("batch_size", 2**31),
                     ("timeout", float("inf")), ("timeout", 3601), ("timeout", -1),
                     ("num_workers", -1), ("num_workers", workers + 1), ("shuffle", 1),
                     ("prefetch_factor", 65)]:
        kept, warnings = loader_options({**good, key: bad}, which="val", source=SRC)
        assert key not in kept and f"data.val.loader_kwargs.{key}" in warnings[0], (key, bad)
    assert loader_options({"num_workers": 0, "prefetch_factor": None}, which="val",
                          source=SRC) == ({"num_workers": 0, "prefetch_factor": None}, [])
    assert loader_options("x", which="val", source=SRC)[0] == {}


def test_counter_and_finite_number_raise_damaged():
    assert counter(5, record="r", source=SRC, high=5) == 5
    for bad in (True, -1, 6, 1.0, "3", None):
        with pytest.raises(CheckpointError, match=r"r = .* is not an integer") as err:
            counter(bad, record="r", source=SRC, high=5)
        assert err.value.kind == "damaged" and err.value.path == SRC
    assert finite_number(1, record="r", source=SRC) == 1.0
    for bad in (float("nan"), float("inf"), False, "1", 11):
        with pytest.raises(CheckpointError, match="not a finite number") as err:
            finite_number(bad, record="r", source=SRC, high=10)
        assert err.value.kind == "damaged"


# -- CSV -------------------------------------------------------------------------------------

NAMES = ["touch /tmp/x", "=cmd|' /C calc'!A0", "a;b", 'say "hi"', "x\nrm -rf ~", "+1", "@SUM(1)"]


def write_log(path, separator=";"):
    logger = CSVLogger(path, separator=separator)
    logger.on_train_begin()
    for epoch in (1, 2):
        logger.on_epoch_end(epoch, {name: 0.5 * epoch for name in NAMES} | {"note": "=2+2"})
    return logger


def test_csv_header_cannot_inject(work):
    write_log("log.csv")
    text = (work / "log.csv").read_text()
    with open("log.csv", newline="") as f:
        rows = list(csv.reader(f, delimiter=";"))
    assert rows[0] == ["epoch"] + [header_cell(n) for n in NAMES] + ["note"]
    assert rows[0][1] == "touch /tmp/x" and rows[0][2] == "'=cmd|' /C calc'!A0"
    assert read_header("log.csv", ";") == ["epoch", *NAMES, "note"]  # exactly the names
    assert len(text.splitlines()) == 3  # one line per row: no name starts a line of its own
    for line in text.splitlines():
        assert line.startswith(('"epoch"', "1;", "2;")), line
        assert not line.startswith(("touch", "rm", "=", "+", "@", "-"))
    for row in rows:
        assert not any(cell.startswith(("=", "+", "@")) for cell in row), row
    assert rows[1][-1] == "'=2+2"  # text values are neutralised too; numbers are not


def test_a_resumed_csv_logger_reads_its_own_escaped_header_back(work):
    write_log("log.csv")
    again = CSVLogger("log.csv", separator=";")
    again.load_state_dict({"columns": ["epoch", *NAMES, "note"], "started": True})
    again.on_train_begin({"start_epoch": 1})
    again.on_epoch_end(2, {name: 9.0 for name in NAMES} | {"note": "n"})
    header = read_header("log.csv", ";")
    assert header == ["epoch", *NAMES, "note"]  # no duplicated columns after a resume
    with open("log.csv", newline="") as f:
        assert [r[0] for r in csv.reader(f, delimiter=";")] == ["epoch", "1", "2"]


def test_a_restored_csv_logger_leaves_a_file_that_is_not_its_own(work):
    data = work / "data.csv"
    data.write_text("id,value\n1,2\n")
    for started in (False, True):
        nnh.warn.reset()  # nnh shows a warning once per process; each round is a fresh start
        logger = CSVLogger("data.csv")
        logger.load_state_dict({"columns": None, "started": started})
        with pytest.warns(UserWarning, match=r"'data.csv' does not start with an 'epoch' column"):
            logger.on_train_begin({"start_epoch": 0})
        logger.on_epoch_end(1, {"loss": 1.0})
        assert data.read_text() == "id,value\n1,2\n"
    other = work / "other.csv"
    other.write_text("epoch,loss\n1,2\n2,3\n")
    logger = CSVLogger("other.csv")
    logger.load_state_dict({"columns": ["epoch", "acc"], "started": True})
    with pytest.warns(UserWarning, match="other columns"):
        logger.on_train_begin({"start_epoch": 1})
    assert other.read_text() == "epoch,loss\n1,2\n2,3\n"


def test_a_restored_csv_logger_does_not_follow_a_link(work):
    target = work / "real.csv"
    target.write_text("epoch,loss\n1,2\n")
    (work / "link.csv").symlink_to(target)
    logger = CSVLogger("link.csv")
    logger.load_state_dict({"columns": ["epoch", "loss"], "started": False})
    with pytest.warns(UserWarning, match="link"):
        logger.on_train_begin()
    assert target.read_text() == "epoch,loss\n1,2\n" and (work / "link.csv").is_symlink()


def test_a_restored_csv_logger_restarts_its_own_file(work):
    (work / "log.csv").write_text("epoch,loss\n1,2\n")
    logger = CSVLogger("log.csv")
    logger.load_state_dict({"columns": None, "started": False})
    logger.on_train_begin()
    logger.on_epoch_end(1, {"loss": 0.25})
    assert (work / "log.csv").read_text() == '"epoch","loss"\n1,0.25\n'


def test_csv_separator_may_not_be_a_quote_or_line_break():
    for sep in ('"', "\n", "\r", "'"):
        with pytest.raises(ValueError, match="separator"):
            CSVLogger("x.csv", separator=sep)


# -- logging ---------------------------------------------------------------------------------


def test_the_log_escapes_newlines_and_control_characters():
    stream = io.StringIO()
    logger = logging.getLogger("nnh.test.escaping")
    logger.propagate = False
    handler = logging.StreamHandler(stream)
    handler.setFormatter(EscapingFormatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    try:
        logger.warning("bad value %r", "x\nINFO forged line\r\x1b[2J\u2028")
        try:
            raise ValueError("boom\nINFO forged from an exception")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "WARNING bad value 'x\\nINFO forged line\\r\\x1b[2J\\u2028'"
    assert lines[1] == "ERROR failed"
    assert all(line.startswith("  ") for line in lines[2:]) and "Traceback" in lines[2]
    assert not any(line.startswith("INFO") for line in lines)


def test_make_logger_writes_every_record_on_one_line(work):
    logger = make_logger("file", "train.log", logging.INFO)
    logger.info("loaded %s", "evil.pth\n2024-01-01 [INFO] nnh.handler.0: forged")
    for h in logger.handlers:
        h.close()
    lines = (work / "train.log").read_text().splitlines()
    assert len(lines) == 1 and "\\n2024-01-01" in lines[0]


def test_logging_options_confine_the_log_file(work, tmp_path):
    ok = {"mode": "file", "filename": "runs/train.log", "level": 10}
    assert logging_options(ok) == {"logger_mode": "file", "logger_filename": "runs/train.log",
                                   "logger_level": 10}
    for bad in ("../train.log", str(tmp_path / "train.log"), "~/train.log", ".git/x.log", "a\nb.log"):
        with pytest.warns(UserWarning, match=r"logging\.filename"):
            options = logging_options({"mode": "both", "filename": bad, "level": 20}, SRC)
        assert options["logger_mode"] == "console", bad
    with pytest.warns(UserWarning, match="outside"):
        options = logging_options({"mode": "file", "filename": "../x.log", "level": 20},
                                  confine=True)
    assert logging_options({"mode": "file", "filename": "../x.log", "level": 20},
                           confine=False)["logger_mode"] == "file"


def test_logging_options_take_the_checkpoint_folder_but_create_no_folder_there(work, tmp_path):
    ckpt = tmp_path / "run.pth"
    ckpt.write_bytes(b"x")
    record = {"mode": "file", "filename": str(tmp_path / "train.log"), "level": 20}
    assert logging_options(record, str(ckpt))["logger_mode"] == "file"
    record["filename"] = str(tmp_path / "new" / "train.log")
    with pytest.warns(UserWarning, match="does not create it"):
        assert logging_options(record, str(ckpt))["logger_mode"] == "console"
    assert not (tmp_path / "new").exists()


def test_logging_options_validate_mode_and_level(work):
    with pytest.warns(UserWarning, match=r"logging\.mode"):
        assert logging_options({"mode": "syslog", "level": 20})["logger_mode"] == "console"
    with pytest.warns(UserWarning, match=r"logging\.mode"):
        assert logging_options({"mode": 3, "level": 20})["logger_mode"] == "console"
    for level in (True, 51, -1, "10", 2.5):
        with pytest.warns(UserWarning, match=r"logging\.level"):
            assert logging_options({"mode": "console", "level": level})["logger_level"] == 20
    with pytest.warns(UserWarning, match="not a dict"):
        assert logging_options(["file"]) == {}


def test_name_patterns():
    assert name_pattern_problem("m_{epoch:02d}_{val_accuracy:.3f}") is None
    for bad in ("", "a/b", "~x", "{0}", "{a[0]}", "{", 5, "x" * 256):
        assert name_pattern_problem(bad) is not None, bad


def test_a_filled_in_save_name_that_is_a_path_raises():
    from nnh.handler.autosaver import AutoSaver

    cb = ModelCheckpoint("ckpt", filename="m_{tag}", monitor=None, save_last=True)
    with pytest.raises(ValueError, match="not a file name"):
        cb._path({"tag": "../../x", "epoch": 1})
    with pytest.raises(ValueError, match="not a file name"):
        AutoSaver(save_path="ckpt", name="m_{tag}").path_for({"tag": "/x"})
    assert cb._path({"tag": "a", "epoch": 1}).as_posix() == "ckpt/m_a.pth"
