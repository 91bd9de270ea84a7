"""The run folder: nothing created before the data are valid, one process per folder, resume
mismatches named key by key, Ctrl-C prints the resume command, run.log, portable file names."""

import fcntl
import logging

import pytest

from sdzero.callbacks import portable
from sdzero.config import compose
from sdzero.errors import ConfigError, UserError
from sdzero.records import read_records
from sdzero.run_folder import RunFolder, resume_command
from sdzero.runs import run_eval

FAST = ["data.num_pairs=2", "logger=none", "trainer.enable_progress_bar=false"]


def _eval(out, *extra):
    return run_eval(compose("demo_train", [f"output_dir={out}", *FAST, *extra]))


def test_a_run_failing_validation_leaves_no_folder(tmp_path):
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(
        "defaults:\n  - backbone: tiny\n  - method: conv_matcher\n  - data: spair\n"
        "  - trainer: cpu\n  - logger: none\n"
    )
    out = tmp_path / "never"
    cfg = compose(str(experiment), [f"output_dir={out}", f"data.root={tmp_path / 'x'}"])
    with pytest.raises(UserError, match="data.root"):
        run_eval(cfg)
    assert not out.exists()


def test_a_folder_in_use_is_refused(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match="in use by another sdzero process"):
            _eval(out)
    _eval(out)  # free again


def test_resume_names_each_differing_key_and_logs(tmp_path, caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO):
        _eval(out, "visuals=1")
    with pytest.raises(ConfigError, match=r"method.channels: 32 vs 16; method.lr: 0.003 vs 0.1"):
        run_eval(
            compose("demo_train", [f"resume={out}", *FAST, "method.lr=0.1", "method.channels=16"])
        )
    assert "samples evaluated" in (out / "run.log").read_text()
    assert all(":" not in p.name for p in (out / "visuals").iterdir())


def test_a_broken_config_yaml_is_one_clear_error(tmp_path):
    out = tmp_path / "run"
    _eval(out)
    (out / "config.yaml").write_text("seed: [unclosed\n")
    with pytest.raises(ConfigError, match="config.yaml cannot be read"):
        run_eval(compose("demo_train", [f"resume={out}", *FAST]))


def test_interrupt_prints_the_resume_command(tmp_path, capsys):
    cfg = compose("demo_train", [f"output_dir={tmp_path / 'r'}", *FAST])
    with pytest.raises(KeyboardInterrupt), RunFolder(cfg) as folder:
        folder.create()
        raise KeyboardInterrupt
    err = capsys.readouterr().err
    assert f"resume={tmp_path / 'r'}" in err
    argv = ["eval", "spair_ldm", "data.root=/d", f"output_dir={tmp_path}", "seed=3"]
    assert (
        resume_command(tmp_path, argv)
        == f"sdzero eval spair_ldm data.root=/d seed=3 resume={tmp_path}"
    )


def test_a_garbled_record_line_is_logged_and_dropped(tmp_path, caplog):
    path = tmp_path / "rank0.jsonl"
    path.write_text('{"index": 0}\nnot json\n[1, 2]\n{"index": 1}\n')
    with caplog.at_level(logging.WARNING):
        got = list(read_records(path))
    assert [r["index"] for r in got] == [0, 1]
    assert "line 2 is not a JSON record" in caplog.text and "line 3" in caplog.text


def test_portable_names():
    assert portable("000001-2008_000:aeroplane/x y") == "000001-2008_000_aeroplane_x_y"


def test_files_written_atomically_follow_the_umask(tmp_path):
    import os

    from sdzero.records import write_json_atomic

    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644
