"""The contract every registered method keeps (``configs/method/*.yaml``), checked on its declared
test-sized run (:class:`~sdzero.evaluation.SmokeTest`: synthetic data, tiny backbone):

- ``metrics.json`` is recomputable from the records alone (no model loaded);
- batching changes nothing: the declared batching settings, and evaluating a prefix of the split
  (``data.limit``), give the reference run's records exactly;
- 2-process DDP gives the 1-process records and metrics, each sample evaluated once;
- an interrupted run (a torn record, a lost artifact, no ``metrics.json``) resumed gives the
  uninterrupted metrics and redoes only the lost samples;
- a wrong-typed value of any ``method.*`` key fails when the config is composed, naming the key
  (so before any dataset file is read or model loaded).

A new method gets these by being registered with a ``smoke_test``.
"""

import shutil

import pytest
from cli_runs import DDP2, TIMING, metrics, records_per_rank, sdzero_many

from sdzero.config import _import, available, compose
from sdzero.errors import ConfigError
from sdzero.records import read_records
from sdzero.runs import recompute_metrics, run_eval

QUIET = ("logger=none", "trainer.enable_progress_bar=false", "visuals=0")


def _target(option):
    return str(compose(None, ["data=synthetic_correspondence", f"method={option}"]).method._target_)


def _methods():
    """One option per method class (``ldm_corr_clean`` is ``ldm_corr``'s class with other keys)."""
    first = {}
    for option in available("method"):
        first.setdefault(_target(option), option)
    return sorted(first.values())


METHODS = _methods()


def _smoke(option):
    cls = _import(_target(option))
    smoke = getattr(cls, "smoke_test", None)
    assert smoke is not None, f"{cls.__name__} (method={option}) declares no smoke_test"
    return smoke, [f"method={option}", *smoke.overrides, *QUIET]


def _run(option, out, *extra):
    smoke, overrides = _smoke(option)
    return run_eval(compose(smoke.experiment, [f"output_dir={out}", *overrides, *extra]))


def _records(run_dir):
    out = {}
    for path in sorted((run_dir / "predictions").glob("*.jsonl")):
        for record in read_records(path):
            out.setdefault(record["index"], record)
    return out


def _artifacts(run_dir):
    """Every artifact file next to the records: relative path -> bytes."""
    folder = run_dir / "predictions"
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.suffix != ".jsonl"
    }


def _untimed(m):
    return {k: v for k, v in m.items() if k not in TIMING}


@pytest.fixture(scope="module", params=METHODS)
def reference(request, tmp_path_factory):
    option = request.param
    out = tmp_path_factory.mktemp(f"contract-{option}") / "run"
    return option, out, _run(option, out)


def test_metrics_are_recomputable_from_the_records(reference):
    option, out, got = reference
    expected = {k: v for k, v in _untimed(got).items() if k != "warning"}  # weights: not in records
    assert recompute_metrics(out) == expected


def test_batching_and_limits_change_no_record(reference, tmp_path):
    option, out, _ = reference
    smoke, _ = _smoke(option)
    ref = _records(out)
    for i, batching in enumerate(((), *smoke.batching)):
        run = tmp_path / f"b{i}"
        _run(option, run, "data.limit=2", *batching)
        got = _records(run)
        assert sorted(got) == [0, 1], batching
        assert all(got[k] == ref[k] for k in got), f"method={option} {batching}"
        assert all(
            ref_bytes == _artifacts(out)[name] for name, ref_bytes in _artifacts(run).items()
        )


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Every method's smoke run as ``sdzero eval`` in one 2-process DDP world (one launch for all:
    ``ddp_many.py``): option -> (run folder, the command's stdout)."""
    folder = tmp_path_factory.mktemp("contract-ddp")
    commands = []
    for option in METHODS:
        smoke, overrides = _smoke(option)
        out = folder / option
        commands.append(
            [option, ["eval", smoke.experiment, f"output_dir={out}", *overrides, *DDP2]]
        )
    sections = sdzero_many(commands, folder)
    return {option: (folder / option, sections[option]) for option in METHODS}


def test_two_processes_equal_one(reference, ddp_runs):
    option, out, _ = reference
    ddp, stdout = ddp_runs[option]
    assert stdout.count("split_size") == 1  # only rank 0 prints the table
    assert records_per_rank(ddp) == {"rank0.jsonl": 2, "rank1.jsonl": 1}  # no padding repeats
    assert _records(ddp) == _records(out)
    assert _artifacts(ddp) == _artifacts(out)
    assert metrics(ddp) == metrics(out)


def test_interrupted_then_resumed_equals_uninterrupted(reference, tmp_path, caplog):
    option, out, got = reference
    smoke, overrides = _smoke(option)
    run = tmp_path / "killed"
    shutil.copytree(out, run)
    records = run / "predictions" / "rank0.jsonl"
    lines = records.read_text().splitlines()
    records.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # torn second record
    for name in list(_artifacts(run))[1:]:  # artifacts of unfinished samples may be lost too
        (run / "predictions" / name).unlink()
    (run / "metrics.json").unlink()
    with caplog.at_level("INFO"):
        resumed = run_eval(compose(smoke.experiment, [f"resume={run}", *overrides]))
    assert "2 samples evaluated" in caplog.text and "1 reused from records" in caplog.text
    assert _untimed(resumed) == _untimed(got)
    assert _records(run) == _records(out)


@pytest.mark.parametrize("option", METHODS)
def test_every_method_key_is_type_checked_when_composed(option):
    smoke, overrides = _smoke(option)
    keys = [k for k in compose(smoke.experiment, overrides).method if k != "_target_"]
    assert keys
    for key in keys:
        with pytest.raises(ConfigError, match=f"method.{key}"):
            compose(smoke.experiment, [*overrides, f"method.{key}={{bad: 1}}"])
