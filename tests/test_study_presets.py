"""The study's multi-config features (issue 15): several seeds and recipes, a class-balanced training
subset, the table attacks by name, black-box transfer from a naturally trained source, presets and their
command line."""
import csv
import json

import pytest
import torch

from bitkern import cli
from bitkern.data import balanced_subset
from bitkern.study import SweepConfig, SweepError, run_sweep
from bitkern.study.config import parse_attack, validate
from bitkern.study.presets import PRESETS, preset_config


def test_balanced_subset_is_fixed_balanced_and_checked():
    y = torch.tensor([2, 0, 1, 0, 2, 1, 0, 1, 2, 0])
    idx = balanced_subset(y, 7)              # 3 classes: 3, 2, 2 in file order
    assert idx.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert torch.bincount(y[balanced_subset(y, 6)]).tolist() == [2, 2, 2]
    assert torch.equal(balanced_subset(y, 6), balanced_subset(y, 6))
    with pytest.raises(ValueError, match="only 10"):
        balanced_subset(y, 11)
    with pytest.raises(ValueError, match="class 1 has 1"):
        balanced_subset(torch.tensor([0, 0, 0, 1, 2, 2, 2]), 6)
    with pytest.raises(ValueError, match=">= 1"):
        balanced_subset(y, 0)


@pytest.mark.parametrize("name,parsed", [("GN", ("GN", 1)), ("FGSM", ("FGSM", 1)), ("PGD-20", ("PGD", 20)),
                                         ("BIM-3", ("BIM", 3)), ("TPGD-7", ("TPGD", 7))])
def test_parse_attack(name, parsed):
    assert parse_attack(name) == parsed


@pytest.mark.parametrize("kw,needle", [
    (dict(attacks=("PGD",)), "unknown attack 'PGD'"), (dict(attacks=("CW-10",)), "unknown attack"),
    (dict(attacks=("FGSM", "FGSM")), "without repeats"), (dict(seeds=(0, 0)), "without repeats"),
    (dict(seeds=(-1,)), "seeds must be"), (dict(recipes=("natural", "magic")), "unknown recipe 'magic'"),
    (dict(train_samples=-5), "train_samples"), (dict(table_budget=4 / 255), "not one of the eval budgets"),
    (dict(transfer_source="mbn0x1"), "transfer source"), (dict(apgd_targets=0), "apgd_targets"),
    (dict(alpha_ratio=0.0), "alpha_ratio")])
def test_bad_study_options_are_refused_before_work(kw, needle):
    with pytest.raises(SweepError, match=needle):
        validate(SweepConfig(eval_eps=(8 / 255, 16 / 255), **kw).resolved())


def _tiny(out, **kw):
    base = dict(specs=("fp", "xnor"), epochs=1, eval_samples=8, restarts=1, pgd_steps=(2,), train_samples=300,
                eval_eps=(8 / 255, 16 / 255), table_budget=16 / 255, progress=False, out=str(out), workers=1)
    return SweepConfig(**{**base, **kw})


def test_seeds_recipes_attacks_and_transfer(tmp_path):
    cfg = _tiny(tmp_path / "s", seeds=(0, 1), recipes=("natural", "fastat"), specs=("xnor",),
                attacks=("GN", "FGSM", "PGD-2", "BIM-2", "TPGD-2"), transfer_source="fp")
    lines = []
    rows = run_sweep(cfg, log=lines.append)
    assert [(r["recipe"], r["seed"]) for r in rows] == [("natural", 0), ("natural", 1), ("fastat", 0),
                                                        ("fastat", 1)]
    assert sorted(p.name for p in (tmp_path / "s" / "configs").iterdir()) == [
        "xnor-fastat-seed0", "xnor-fastat-seed1", "xnor-natural-seed0", "xnor-natural-seed1"]
    assert rows[0]["top1"] != rows[1]["top1"] or rows[0]["train_loss"] != rows[1]["train_loss"]  # other seed
    for r in rows:
        assert r["train_samples"] == 300
        for a in ("GN", "FGSM", "PGD-2", "BIM-2", "TPGD-2"):
            assert 0 <= r[a]["worst"] <= r[a]["mean"] <= r["clean_eval_subset"]
            assert 0 <= r[f"{a}(B)"]["worst"] <= r["clean_eval_subset"]
        assert set(r["by_eps"]["8"]) == {"eps", "eps_255", "PGD-2"}   # the curve budget: the curve attack
    source = json.loads((tmp_path / "s" / "transfer-source" / "source.json").read_text())
    assert source["config"]["spec"] == "fp" and source["config"]["seed"] == 1000
    md = (tmp_path / "s" / "results.md").read_text()
    assert "| Training |" in md and " ± " in md and "TPGD-2(B)" in md and "Seeds" in md
    table = [l for l in md.splitlines() if l.startswith("| natural") or l.startswith("| fastat")]
    assert len(table) == 4   # main table + eps table, one row per (recipe, spec)
    flat = list(csv.DictReader((tmp_path / "s" / "results.csv").open()))
    assert [(r["recipe"], r["seed"]) for r in flat] == [("natural", "0"), ("natural", "1"), ("fastat", "0"),
                                                        ("fastat", "1")]
    assert "tpgd2_b_worst" in flat[0]
    saved = json.loads((tmp_path / "s" / "sweep_config.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["data"]["train_subset"]["samples"] == 300
    assert len(saved["data"]["train_subset"]["indices_sha256"]) == 64

    # resume: nothing is redone, the source is reused only if it was made the same way
    lines.clear()
    again = run_sweep(_tiny(tmp_path / "s", seeds=(0, 1), recipes=("natural", "fastat"), specs=("xnor",),
                            attacks=("GN", "FGSM", "PGD-2", "BIM-2", "TPGD-2"), transfer_source="fp",
                            resume=True), log=lines.append)
    assert sum("done earlier, skipped" in s for s in lines) == 4 and again == rows


def test_one_seed_one_recipe_keeps_the_plain_layout(tmp_path):
    rows = run_sweep(_tiny(tmp_path / "p", specs=("fp",)), log=lambda s: None)
    assert (tmp_path / "p" / "configs" / "fp" / "result.json").is_file()
    md = (tmp_path / "p" / "results.md").read_text()
    assert "| Training |" not in md and " ± " not in md and rows[0]["key"] == "fp"


def test_presets_are_valid_and_explicit_options_win():
    for name in PRESETS:
        cfg = preset_config(name).resolved()
        validate(cfg)
        assert cfg.preset == name and cfg.out == f"results/{name}" and cfg.dataset == "fashion-mnist"
    cfg = preset_config("paper003-odgq", dataset="cifar10", train_samples=0, out="x").resolved()
    assert (cfg.dataset, cfg.train_samples, cfg.out) == ("cifar10", 0, "x")
    assert cfg.recipes == ("natural", "odgq", "dq", "free") and cfg.alpha_for(8 / 255) == pytest.approx(4 / 255)


def test_cli_preset_and_overrides():
    parse = cli.build_parser().parse_args
    cfg = cli.sweep_config(parse(["sweep", "--preset", "paper000-natural", "--seeds", "3", "--recipe", "fastat"]))
    assert cfg.seeds == (3,) and cfg.recipes == ("fastat",) and cfg.preset == "paper000-natural"
    assert cfg.specs == PRESETS["paper000-natural"]["specs"] and cfg.workers is None
    plain = cli.sweep_config(parse(["sweep"]))
    assert (plain.dataset, plain.out, plain.recipe, plain.pgd_steps, plain.restarts) == (
        "digits", "results/sweep", "natural", (20, 50), 5)
    cfg = cli.sweep_config(parse(["sweep", "--seed", "2", "--attacks", "FGSM,PGD-20", "--table-eps", "2/255",
                                  "--eps", "1,2/255", "--transfer-source", "fp", "--train-samples", "500"]))
    assert (cfg.seeds, cfg.attacks, cfg.table_budget, cfg.transfer_source, cfg.train_samples) == (
        (2,), ("FGSM", "PGD-20"), 2 / 255, "fp", 500)


@pytest.mark.parametrize("argv,needle", [
    (["sweep", "--seed", "1", "--seeds", "0,1"], "--seed or --seeds"),
    (["sweep", "--recipe", "fastat", "--recipes", "natural,dq"], "--recipe or --recipes"),
    (["sweep", "--preset", "paper999"], "invalid choice"),
    (["sweep", "--attacks", "PGD"], "unknown attack"),
    (["sweep", "--seeds", "0,0"], "repeated seed"),
])
def test_cli_study_mistakes_are_one_line_exit_2(argv, needle, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def _tiny_preset(name, out, **kw):
    small = dict(dataset="digits", train_samples=300, epochs=1, eval_samples=8, restarts=1, square_queries=20,
                 apgd_steps=5, apgd_targets=2, eval_eps=(8 / 255, 16 / 255), table_budget=16 / 255,
                 progress=False, out=str(out), workers=1)
    return preset_config(name, **{**small, **kw})


def test_compare_tables_in_the_papers_layouts(tmp_path):
    from bitkern.study.compare import compare_markdown

    run_sweep(_tiny_preset("paper000-natural", tmp_path / "c1", specs=("fp", "mbn3x1"), pgd_steps=(2, 3)),
              log=lambda s: None)
    run_sweep(_tiny_preset("paper003-odgq", tmp_path / "c3", recipes=("natural", "dq"),
                           attacks=("GN", "FGSM", "PGD-2", "BIM-2", "TPGD-2"), pgd_steps=(2,)), log=lambda s: None)
    md = compare_markdown([tmp_path / "c1", tmp_path / "c3"])
    assert "### Claim 1" in md and "### Claim 3" in md
    assert "| MBN 3x1 | 3 | 1 | 1.49 / " in md          # paper 000 Table 2's BOPS next to ours
    assert "| Natural | paper CIFAR-10 | 87.5 |" in md and "| DQ | **ours digits** |" in md
    assert "| ODG-Q (N_k = 4) | **ours" not in md     # only the recipes that ran
    run_sweep(_tiny(tmp_path / "plain", specs=("fp",)), log=lambda s: None)
    with pytest.raises(SystemExit, match="not a sweep made with one of the presets"):
        compare_markdown([tmp_path / "plain"])


def test_findings_commands_parse_and_validate():
    """Every `bitkern sweep` command in docs/findings.md (continuation lines joined) is a valid configuration,
    so the study's commands cannot rot silently; GPU commands are validated as if on the CPU."""
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "findings.md").read_text()
    commands = [c.strip() for c in text.replace("\\\n", " ").splitlines() if c.strip().startswith("bitkern sweep")]
    assert len(commands) >= 6
    for command in commands:
        argv = shlex.split(command.split("#")[0].replace("--device cuda", "--device cpu"))[1:]
        cfg = cli.sweep_config(cli.build_parser().parse_args(argv))
        validate(cfg.resolved())
