"""The benchmark runner runs end to end on tiny shapes (a smoke test, not a timed test)."""

import json


def test_runner_quick_correspondence_job_writes_a_table_and_json(tmp_path, monkeypatch, capsys):
    from benchmarks.run import main

    out = tmp_path / "rows.json"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the job's own process inherits it
    # the runner here (its imports are this process's), the job in its child process, as always
    code = main(["--quick", "--only", "corr-exact-*", "--json", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-2000:]
    assert "| per query point, 128 px | exact |" in printed.out
    result = json.loads(out.read_text())
    assert result["failed"] == [] and result["peaks"]["fp32"] > 0  # the run's own peak
    (job,) = result["results"]
    assert job["job"] == "corr-exact-128" and job["peak_memory_gb"] > 0
    rows = {r["unit"]: r for r in job["rows"]}
    step = rows["optimisation step, 1 embedding, 128 px"]
    assert step["seconds"] > 0 and step["flops"] > 0
    point = rows["per query point, 128 px"]
    # 129 steps x 5 restarts + 20 crops x 5: far more work than one step
    assert point["seconds"] > 100 * step["seconds"] / 5
    assert point["flops"] > 600 * (step["flops"] - rows["VAE encode, one crop, 128 px"]["flops"])


def test_render_computes_floors_against_the_peak_the_run_saved(tmp_path):
    from benchmarks.run import render

    row = {"section": "s", "unit": "u", "mode": "exact", "seconds": 4.0, "flops": 2e11, "note": ""}
    saved = {"header": "device: cpu, saved", "peaks": {"fp32": 1e11}, "failed": []}
    path = tmp_path / "run.json"
    path.write_text(json.dumps({**saved, "results": [{"rows": [row], "peak_memory_gb": 1.5}]}))
    text = render([str(path)], "cpu")
    # 2e11 FLOP at the saved 100 GFLOP/s: a 2 s floor, reached at 50% in 4 s; nothing re-measured
    assert "| s | u | exact | 4.000 | 200.0 | 0.050 | 2.00 (50%) | 1.50 |  |" in text
    assert text.splitlines()[0] == (
        "run.json: device: cpu, saved, measured peak (best of matmul and 3x3 conv) fp32 100 "
        "GFLOP/s (in the run)"
    )
