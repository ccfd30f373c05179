"""`rectflow ablate`: ranking maths, image metrics, the grid runner (resume, workers, locks), one real tiny study."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import types

import pytest
import torch

from rectflow import ablate
from rectflow.evaluate.protocol import metric_value, normalize_scores
from rectflow.files import write_json
from rectflow.studies import formulations, ranking
from rectflow.studies.common import Run, StudyOptions, study_config
from rectflow.studies.evaluation import Setting, normalize_result
from rectflow.studies.reconstruction import psnr, ssim

# ---------------------------------------------------------------- non-dominated sorting and ranks

POINTS = {  # (CLIP score, FID)
    "A": (0.30, 10.0), "B": (0.25, 8.0), "C": (0.20, 12.0), "D": (0.28, 9.0), "E": (0.30, 10.0), "F": (0.22, 11.0),
}


def test_dominates():
    assert ranking.dominates((0.3, 9.0), (0.3, 10.0))       # same CLIP, lower FID
    assert ranking.dominates((0.31, 10.0), (0.3, 10.0))     # higher CLIP, same FID
    assert not ranking.dominates((0.3, 10.0), (0.3, 10.0))  # equal points do not dominate each other
    assert not ranking.dominates((0.31, 11.0), (0.3, 10.0))  # a trade-off
    assert ranking.dominates((1.0, 2.0, 3.0), (1.0, 2.0, 2.0), ("max", "min", "max"))
    with pytest.raises(ValueError, match="direction"):
        ranking.dominates((1, 2), (0, 3), ("up", "min"))


def test_pareto_fronts_on_hand_made_points():
    # front 1: nobody beats A/E (best CLIP), B (best FID) or D (trade-off); F is beaten only by front-1 points
    # (B, D); C is beaten by F as well
    assert ranking.pareto_fronts(POINTS) == [["A", "B", "D", "E"], ["F"], ["C"]]
    ranks = ranking.pareto_ranks(POINTS)
    assert ranks == {"A": 1, "B": 1, "D": 1, "E": 1, "F": 2, "C": 3}
    # a third objective where C is best lifts it to the first front
    three = {k: (*p, 0.9 if k == "C" else 0.1) for k, p in POINTS.items()}
    assert ranking.pareto_ranks(three, ("max", "min", "max"))["C"] == 1
    with pytest.raises(ValueError, match="finite"):
        ranking.pareto_fronts({"x": (math.nan, 1.0), "y": (0.1, 2.0)})


def test_average_ranks():
    ranks = {"s1": {"a": 1, "b": 2}, "s2": {"a": 3, "b": 1}, "s3": {"a": 1, "b": 1}}
    assert ranking.average_ranks(ranks) == {"a": 5 / 3, "b": 4 / 3}
    assert ranking.average_ranks(ranks, ["s1", "s2"]) == {"a": 2.0, "b": 1.5}
    assert ranking.order({"a": 2.0, "b": 1.5, "c": 1.5}) == ["b", "c", "a"]
    with pytest.raises(ValueError, match="missing"):
        ranking.average_ranks({"s1": {"a": 1, "b": 2}, "s2": {"a": 1}})


def test_spearman_against_the_paper():
    top5 = list(ranking.PAPER_TABLE1)[:5]  # the paper ranks them 1..5 (its 'all' column increases)
    ours = dict(zip(top5, [1.0, 3.0, 2.0, 5.0, 4.0]))
    rho, p, shared = ranking.spearman_vs_paper({**ours, "not-in-table-1": 1.0})
    assert shared == top5
    assert rho == pytest.approx(1 - 6 * 4 / (5 * (5**2 - 1)))  # sum d^2 = 4 -> 0.8
    assert 0 < p < 1
    same = {n: ranking.PAPER_TABLE1[n][0] for n in ranking.PAPER_TABLE1}
    assert ranking.spearman_vs_paper(same)[0] == pytest.approx(1.0)
    reverse = {n: -v for n, v in same.items()}
    assert ranking.spearman_vs_paper(reverse)[0] == pytest.approx(-1.0)
    # the 5-step column orders differently from 'all' (edm(0.00, 0.60) is 9th overall, 15th on 5 steps)
    rho5 = ranking.spearman_vs_paper(same, "5 steps")[0]
    assert 0.5 < rho5 < 1.0
    assert math.isnan(ranking.spearman_vs_paper(dict(list(same.items())[:2]))[0])


def _scores(clip, fid, geneval):
    return {"clip_score": clip, "fid": fid, "geneval": {"overall": geneval}}


def test_formulation_rank_table():
    # X wins every 5-step setting, Y every other one; Z is dominated everywhere
    results = {}
    for name in ("X", "Y", "Z"):
        scores = {}
        for s in formulations.SETTINGS:
            good = (name == "X") == (s.steps == 5)
            scores[s.key] = _scores(0.3, 10.0, 0.5) if name != "Z" and good else _scores(0.2, 20.0, 0.1) \
                if name == "Z" else _scores(0.25, 15.0, 0.3)
        results[name] = {"scores": scores}
    table = formulations.rank_table(results, ("clip_score", "fid"))
    assert table["5 steps"] == {"X": 1.0, "Y": 2.0, "Z": 3.0}
    assert table["50 steps"] == {"X": 2.0, "Y": 1.0, "Z": 3.0}
    n5 = sum(s.steps == 5 for s in formulations.SETTINGS)
    n = len(formulations.SETTINGS)
    assert table["all"]["X"] == pytest.approx((n5 * 1 + (n - n5) * 2) / n)


def test_the_formulation_grid_matches_the_paper():
    from rectflow.flow import TABLE1
    assert len(formulations.SETTINGS) == 12  # 6 sampler settings x EMA / raw (PAPER 3)
    assert set(ranking.PAPER_TABLE1) == set(TABLE1)
    assert len(formulations.variants(StudyOptions("formulations", grid="paper"))) == 61


# ---------------------------------------------------------------- reconstruction metrics


def test_psnr_and_ssim():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    noisy = (ref + 0.2 * torch.randn(ref.shape, generator=g)).clamp(-1, 1)
    mse = ((noisy - ref) / 2).double().pow(2).flatten(1).mean(1)
    assert torch.allclose(psnr(noisy, ref), 10 * torch.log10(1 / mse))
    assert torch.allclose(ssim(ref, ref), torch.ones(3, dtype=torch.float64))
    worse = (ref + 0.5 * torch.randn(ref.shape, generator=g)).clamp(-1, 1)
    assert (ssim(worse, ref) < ssim(noisy, ref)).all()


def test_ssim_matches_torchmetrics_on_the_valid_region():
    pytest.importorskip("torchmetrics")
    from torchmetrics.functional.image import structural_similarity_index_measure
    g = torch.Generator().manual_seed(1)
    ref = torch.rand(2, 3, 24, 24, generator=g) * 2 - 1
    noisy = (ref + 0.3 * torch.randn(ref.shape, generator=g)).clamp(-1, 1)
    _, full = structural_similarity_index_measure((noisy.double() + 1) / 2, (ref.double() + 1) / 2, data_range=1.0,
                                                  reduction="none", return_full_image=True)
    # torchmetrics pads by reflection; the 11 x 11 windows that fit inside the image are Wang et al.'s SSIM
    expected = full[..., 5:-5, 5:-5].flatten(1).mean(1)
    assert torch.allclose(ssim(noisy, ref), expected, atol=1e-10)


# ---------------------------------------------------------------- the grid runner (no training)


def fake_study(calls: list):
    """A study module whose runs only record that they ran."""
    def execute(run, run_dir, opts):
        calls.append(run.name)
        return {"value": run.spec["x"]}

    def report(results, opts, fig_dir):
        return "## fake\n" + json.dumps({k: v["value"] for k, v in sorted(results.items())})

    return types.SimpleNamespace(TITLE="fake", execute=execute, report=report)


def fake_runs():
    return [Run("a", {"x": 1}), Run("b/c", {"x": 2}), Run("d", {"x": 3}, needs=("a",)), Run("e", {"x": 4})]


def test_grid_workers_skip_finished_runs_and_report(tmp_path):
    calls: list = []
    opts = StudyOptions("fake", runs_dir=tmp_path / "runs", out=tmp_path / "out")
    grid = ablate.Grid(fake_study(calls), opts, fake_runs())
    grid.work((1, 2))  # runs 1 and 3: b/c and e
    assert calls == ["b/c", "e"]
    assert (opts.study_dir / "b_c" / "result.json").is_file()  # folder names are file-system safe
    grid.work((0, 2))  # runs 0 and 2: a, then d (which needs a, done by now)
    assert calls == ["b/c", "e", "a", "d"]
    grid.work((0, 1))  # everything is finished: nothing runs again
    assert calls == ["b/c", "e", "a", "d"]
    path = ablate.write_report(fake_study(calls), opts, grid)
    text = path.read_text()
    assert '{"a": 1, "b/c": 2, "d": 3, "e": 4}' in text and "rectflow ablate fake --budget 1" in text
    with open(opts.out / "fake" / "results.csv") as fh:
        table = {row["run"]: row for row in csv.DictReader(fh)}
    assert sorted(table) == ["a", "b/c", "d", "e"] and table["d"]["value"] == "3"
    saved = json.loads((opts.out / "fake" / "results.json").read_text())
    assert saved["command"] == "rectflow ablate fake --budget 1" and sorted(saved["runs"]) == ["a", "b/c", "d", "e"]
    # hand-written notes of the same runs survive a rewrite; a report of other runs drops them
    path.write_text(text + "\n## Notes on this run\n\nOne seed only.\n")
    rewritten = ablate.write_report(fake_study(calls), opts, grid).read_text()
    assert rewritten.endswith("## Notes on this run\n\nOne seed only.\n")
    other = StudyOptions("fake", runs_dir=tmp_path / "runs", out=tmp_path / "out", budget=0.5)
    other_grid = ablate.Grid(fake_study(calls), other, [])
    assert "One seed" not in ablate.write_report(fake_study(calls), other, other_grid).read_text()


def test_needed_runs_are_done_first_and_locks_are_respected(tmp_path):
    calls: list = []
    opts = StudyOptions("fake", runs_dir=tmp_path / "runs")
    grid = ablate.Grid(fake_study(calls), opts, fake_runs())
    held = ablate.RunLock(grid.dir(grid.by_name["e"]))
    assert held.acquire()
    grid.work((0, 1))
    assert calls == ["a", "b/c", "d"]  # d pulled nothing extra (a ran first); e is held by "another process"
    held.release()
    grid.work((0, 1))
    assert calls == ["a", "b/c", "d", "e"]
    calls.clear()
    grid2 = ablate.Grid(fake_study(calls), StudyOptions("fake", runs_dir=tmp_path / "other"), fake_runs())
    assert grid2.attempt(grid2.by_name["d"])
    assert calls == ["a", "d"]  # a dependency is done before the run that needs it


def test_a_changed_run_is_not_resumed_in_the_same_folder(tmp_path):
    opts = StudyOptions("fake", runs_dir=tmp_path)
    grid = ablate.Grid(fake_study([]), opts, [Run("a", {"x": 1})])
    grid._check_spec(grid.runs[0])
    other = ablate.Grid(fake_study([]), opts, [Run("a", {"x": 2})])
    with pytest.raises(ValueError, match="spec.json describes a different run.*x"):
        other.attempt(other.runs[0])


def test_old_study_scores_are_read_with_the_shared_keys(tmp_path):
    """eval/<key>.json and result.json of runs made before the metric keys were shared (clip, a float geneval,
    geneval_categories) read as the new layout (clip_score, a geneval dict with overall)."""
    old = {"clip": 28.0, "fid": 88.1, "geneval": 0.25, "geneval_categories": {"colors": 0.5, "position": 0.0},
           "n": 96, "encoder": "rectflow-scorer@x", "seconds": 4.4}
    new = {"clip_score": 28.0, "fid": 88.1, "geneval": {"colors": 0.5, "position": 0.0, "overall": 0.25}, "n": 96,
           "encoder": "rectflow-scorer@x", "seconds": 4.4}
    assert normalize_scores(old) == new
    assert normalize_scores(new) == new  # the new layout passes unchanged
    assert normalize_scores({"clip": 1.0, "fid": 2.0}) == {"clip_score": 1.0, "fid": 2.0}  # no GenEval off shapes
    assert metric_value(new, "geneval") == 0.25 and metric_value(new, "clip_score") == 28.0
    assert metric_value({"fid": 1.0}, "geneval") is None
    # a finished run of the old layout is read by the grid in the new one (reports and --report-only see new keys)
    grid = ablate.Grid(fake_study([]), StudyOptions("fake", runs_dir=tmp_path), [Run("a", {"x": 1})])
    key = Setting("ema", 25, 5.0).key
    write_json(grid.dir(grid.runs[0]) / "result.json", {"final_loss": 0.5, "scores": {key: old}})
    assert grid.result(grid.runs[0]) == {"final_loss": 0.5, "scores": {key: new}}
    assert normalize_result({"psnr": 20.0}) == {"psnr": 20.0} and normalize_result(None) is None


def test_result_changing_options_get_their_own_runs_folder(tmp_path):
    base = StudyOptions("shift", runs_dir=tmp_path)
    assert base.study_dir == tmp_path / "shift" / "budget-1"
    # picking runs (--variants, --grid) or where they run shares the folder: the runs are the same
    same = StudyOptions("shift", runs_dir=tmp_path, variants=["shift-3"], grid="paper", device="cpu", out=tmp_path)
    assert same.study_dir == base.study_dir
    changed = [StudyOptions("shift", runs_dir=tmp_path, **kw).study_dir
               for kw in ({"overrides": ["resolution=32"]}, {"seed": 1}, {"samples": 12}, {"data": "emoji"})]
    assert len(set(changed)) == 4 and base.study_dir not in changed
    assert all(d.parent == base.study_dir.parent and d.name.startswith("budget-1-") for d in changed)
    assert StudyOptions("shift", runs_dir=tmp_path, seed=1).study_dir == changed[1]  # stable across processes


def test_variants_workers_and_overrides():
    runs = fake_runs()
    assert [r.name for r in ablate.select(runs, ["d"])] == ["a", "d"]  # with what d needs
    with pytest.raises(ValueError, match="unknown run"):
        ablate.select(runs, ["zz"])
    assert ablate.parse_worker("1/3") == (1, 3)
    for bad in ("3/3", "x", "1/0"):
        with pytest.raises(ValueError, match="--worker"):
            ablate.parse_worker(bad)
    opts = StudyOptions("formulations", overrides=["formulation=rf"])
    with pytest.raises(ValueError, match="varies formulation"):
        study_config(opts, 10, formulation="v/cos")
    cfg = study_config(StudyOptions("formulations", budget=0.5, overrides=["depth=1"]), 100, formulation="rf")
    assert (cfg.max_steps, cfg.depth, cfg.checkpoint_every) == (50, 1, 12)


def test_cli_parses_ablate():
    from rectflow.cli import build_parser
    args = build_parser().parse_args(["ablate", "shift", "--budget", "0.1", "--worker", "0/2", "--set", "depth=2"])
    opts = ablate.options_from_args(args)
    assert (opts.study, opts.budget, opts.overrides) == ("shift", 0.1, ["depth=2"])
    assert ablate.reproduce_command(opts) == "rectflow ablate shift --budget 0.1 --set depth=2"


# ---------------------------------------------------------------- one real study, tiny


TINY = ["resolution=16", "patch_size=4", "depth=1", "hidden=48", "heads=2", "batch_size=8"]


@pytest.fixture
def tiny_scorer(tmp_path):
    """A small random CLIP-style scorer (the metrics only need to be computable and deterministic here)."""
    from rectflow.evaluate.scorer import Scorer
    torch.manual_seed(0)
    path = tmp_path / "scorer.safetensors"
    Scorer({"resolution": 8, "widths": [8, 8, 8, 8], "embed_dim": 16, "hidden": 16}, name="test-scorer").save(path)
    return f"scorer:{path}"


@pytest.mark.slow  # trains and evaluates a two-run study, three times
def test_formulation_study_resumes_and_never_redoes_a_finished_run(tmp_path, tiny_scorer):
    opts = StudyOptions("formulations", budget=0.005, variants=["rf", "rf/lognorm(0.00, 1.00)"], samples=6,
                        overrides=TINY, encoder=tiny_scorer, runs_dir=tmp_path / "runs", out=tmp_path / "out")
    first = ablate.run_study(opts)
    assert first["trained"] == ["rf/lognorm(0.00, 1.00)", "rf"]  # the study's order (Table 1's)
    report = (tmp_path / "out" / "formulations.md").read_text()
    assert "Spearman" in report and "`rf/lognorm(0.00, 1.00)`" in report and "--budget 0.005" in report
    assert (tmp_path / "out" / "formulations" / "clip_fid.png").stat().st_size > 0
    run_dir = opts.study_dir / "rf"
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == round(formulations.STEPS * 0.005)
    stamp = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}

    second = ablate.run_study(opts)
    assert second["trained"] == [] and len(second["finished"]) == 2
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == stamp  # nothing was redone

    # an interrupted evaluation: the run resumes from its final checkpoint (no training) and redoes one setting
    key = Setting("raw", 5, 5.0).key
    before = json.loads((run_dir / "eval" / f"{key}.json").read_text())
    (run_dir / "result.json").unlink()
    (run_dir / "eval" / f"{key}.json").unlink()
    third = ablate.run_study(opts)
    assert third["trained"] == ["rf"]
    assert (run_dir / "metrics.jsonl").stat().st_mtime_ns == stamp[run_dir / "metrics.jsonl"]
    after = json.loads((run_dir / "eval" / f"{key}.json").read_text())
    keys = ("clip_score", "fid", "geneval")
    assert {k: after[k] for k in keys} == {k: before[k] for k in keys}


@pytest.mark.slow  # trains and evaluates a study run
def test_architecture_study_sets_arch_in_the_config(tmp_path, tiny_scorer):
    from rectflow.models.baselines import DiT
    from rectflow.studies import architectures
    from rectflow.studies.common import train_spec
    opts = StudyOptions("architectures", budget=0.005, variants=["dit"], samples=6, overrides=TINY,
                        encoder=tiny_scorer, runs_dir=tmp_path / "runs", out=tmp_path / "out")
    assert architectures.config(opts, "dit").arch == "dit"
    # the MM-DiT's spec has no arch key, like the spec.json files written before the config had the field
    assert "arch" not in train_spec(architectures.config(opts)) and "arch" in train_spec(architectures.config(opts,
                                                                                                              "uvit"))
    assert {r.spec["arch"] for r in architectures.runs(opts)} == set(architectures.ARCHS)
    with pytest.raises(ValueError, match="varies arch"):
        architectures.config(StudyOptions("architectures", overrides=["arch=dit"]), "mmdit")
    assert ablate.run_study(opts)["trained"] == ["dit"]
    run_dir = opts.study_dir / "dit"
    from rectflow.sample import load_pipeline
    assert isinstance(load_pipeline(run=str(run_dir)).model, DiT)
    result = json.loads((run_dir / "result.json").read_text())
    assert result["arch"] == "dit" and len(result["curve"]) >= 2


def test_no_study_run_has_a_patch_wider_than_its_hidden_width(tmp_path):
    # patch^2 x channels > hidden makes the patch embedding a rank bottleneck (rectflow.train.warn_patch_bottleneck)
    import importlib

    from rectflow.studies import STUDIES
    for study, module in STUDIES.items():
        for run in importlib.import_module(module).runs(StudyOptions(study, runs_dir=tmp_path)):
            if "train" in run.spec:
                t, channels = run.spec["train"], run.spec.get("channels", 3)
                assert t["patch_size"] ** 2 * channels <= t["hidden"], (study, run.name)


def test_runs_kept_in_the_report_count_as_finished_on_the_same_machine(tmp_path):
    """A new session (empty runs folder) continues a study from its committed results.json: runs kept there with
    the same spec and machine are not redone; a changed spec or another machine's result is."""
    calls: list = []
    opts = StudyOptions("fake", runs_dir=tmp_path / "session1", out=tmp_path / "out")
    grid = ablate.Grid(fake_study(calls), opts, fake_runs()[:2])
    grid.work((0, 1))
    ablate.write_report(fake_study(calls), opts, grid)
    assert calls == ["a", "b/c"]
    saved = json.loads((opts.out / "fake" / "results.json").read_text())
    assert saved["runs"]["a"]["spec"] == {"x": 1}
    saved["runs"]["b/c"]["machine"] = "another CPU"
    (opts.out / "fake" / "results.json").write_text(json.dumps(saved))
    later = dataclasses.replace(opts, runs_dir=tmp_path / "session2")
    runs = [Run("a", {"x": 1}), Run("b/c", {"x": 2}), Run("e", {"x": 4})]
    grid = ablate.Grid(fake_study(calls), later, runs)
    grid.work((0, 1))
    assert calls == ["a", "b/c", "b/c", "e"]  # a kept; b/c (other machine) and the new e trained
    assert sorted(grid.results()) == ["a", "b/c", "e"]
    changed = ablate.Grid(fake_study(calls), dataclasses.replace(opts, runs_dir=tmp_path / "s3"), [Run("a", {"x": 9})])
    assert changed.result(changed.runs[0]) is None
