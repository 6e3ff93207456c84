"""Figures from run folders: a short quickstart run, plotted against steps and epochs."""

import pytest

from utils.plots import FAMILIES, main, read_run

from .conftest import QUICKSTART, TINY, only_run_dir, run_train

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# a 2-epoch GroCo run with k-NN before training and after the second epoch has every family but the probe
EXPECTED = ["loss", "lr", "grad_norm", "samples_per_s", "knn", "similarity", "pos_neg_dist"]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("runs")
    code = run_train("--config", QUICKSTART, *TINY, "--device", "cpu", "--epochs", "2", f"save_dir={save_dir}",
                     "evaluator.0.args.apply_evaluator_per_epoch=2")
    assert code == 0
    return only_run_dir(save_dir, "quickstart")


@pytest.mark.slow
def test_families_cover_the_metrics_of_a_run(quickstart_run):
    run = read_run(quickstart_run)
    assert len(run.steps) == 10 and [r["epoch"] for r in run.epochs] == [-1, 0, 1]
    assert ["knn@20_online" in r for r in run.epochs] == [True, False, True]
    assert run.label == f"quickstart/{quickstart_run.name}"
    assert [f.name for f in FAMILIES if f.name != "linear_probe"] == EXPECTED


@pytest.mark.slow
@pytest.mark.parametrize("axis", ["step", "epoch"])
def test_one_png_per_metric_family(quickstart_run, tmp_path, capsys, axis):
    out = tmp_path / "figures"
    assert main([str(quickstart_run), str(quickstart_run / "metrics.jsonl"), "--out", str(out), "--x", axis]) == 0
    written = capsys.readouterr().out.split()
    assert written == [str(out / f"{name}.png") for name in EXPECTED]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{name}.png" for name in EXPECTED)
    for name in EXPECTED:
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, name


@pytest.mark.slow
def test_positions_against_epochs(quickstart_run):
    run = read_run(quickstart_run)
    assert run.step_x("epoch").tolist() == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, 1.8]
    assert run.epoch_x("epoch").tolist() == [0.0, 1.0, 2.0]  # before training, after epochs 0 and 1
    assert run.epoch_x("step").tolist() == [0.0, 5.0, 10.0]


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    assert main([str(tmp_path), "--out", str(tmp_path / "figures")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}: no metrics.jsonl"
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\nnot json\n')
    assert main([str(tmp_path), "--out", str(tmp_path / "figures")]) == 2
    assert "metrics.jsonl: not JSON lines" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 0, "step": 5, "note": "x"}\n')
    assert main([str(tmp_path), "--out", str(tmp_path / "figures")]) == 2
    assert "no metrics to plot" in capsys.readouterr().err
