"""The lab end to end on a tiny configuration: every method runs, the run folder holds JSON, CSV
and plots with the right columns and sane values, a resume skips completed cells, and an existing
run is never overwritten."""
import csv
import json

import pytest

from cpl_lab.cli import main
from cpl_lab.runs import CSV_COLUMNS

TINY = ["--entities", "8", "--relations", "3", "--hidden", "32", "--layers", "1", "--heads", "2",
        "--intermediate", "64", "--pretrain-lr", "1e-2", "--pretrain-max-epochs", "60",
        "--pretrain-target", "0.9", "--epochs", "2", "--batch-size", "8", "--ref-batch", "8",
        "--threads", "1", "--no-progress", "--lrs", "1e-3"]
ALL = "ft,cpl,cpl-once,cpl-masked-epoch,random,random-once,agem,replay,lora,ewc,surgery"


@pytest.fixture(scope="module", autouse=True)
def keep_threads():
    import torch
    n = torch.get_num_threads()  # the cli sets --threads process-wide; other tests keep theirs
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("runs") / "r"
    assert main(["inject", *TINY, "--methods", ALL, "--cache-dir", str(cache), "--out", str(out)]) == 0
    return out


def test_results_files(run, capsys):
    results = json.loads((run / "results.json").read_text())
    cells = results["cells"]
    assert sorted(c["method"] for c in cells) == sorted(ALL.split(","))
    lab = results["meta"]["lab"]
    assert lab["mastered_in"] >= 1 and lab["inject"] >= 1
    with open(run / "results.csv") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    assert len(rows) == len(cells) * 3  # epoch 0 (before training) + 2 epochs
    for r in rows:
        assert 0 <= int(r["learned"]) <= int(r["n_inject"])
        assert 0 <= int(r["forgotten_in"]) <= int(r["n_mastered_in"])
        assert 0 <= int(r["forgotten_out"]) <= int(r["n_mastered_out"])
        assert int(r["forgotten"]) == int(r["forgotten_in"]) + int(r["forgotten_out"])
        assert 0.0 <= float(r["frozen"]) <= 1.0
        if r["epoch"] == "0":
            assert r["learned"] == "0" and r["forgotten"] == "0"
        else:
            assert float(r["wall_s"]) > 0 and float(r["peak_mem_mb"]) > 0 and float(r["loss"]) > 0
    last = {c["method"]: c["rows"][-1] for c in cells}
    assert last["ft"]["frozen"] == 0.0
    for m in ("cpl", "random", "cpl-once", "cpl-masked-epoch", "random-once"):
        assert 0.0 < last[m]["frozen"] < 1.0, m
    # random matches CPL's frozen fraction (same lr, seed), epoch by epoch
    assert abs(last["random"]["frozen"] - last["cpl"]["frozen"]) < 0.1
    # cpl-once and random-once freeze exactly the same number of elements
    assert last["cpl-once"]["frozen"] == pytest.approx(last["random-once"]["frozen"])
    # MaskedAdamW keeps state only for trained elements
    assert last["cpl-once"]["state_mb"] < last["ft"]["state_mb"]
    assert last["cpl-masked-epoch"]["state_mb"] < last["ft"]["state_mb"]
    for name in ("curves_lr0.001.png", "sweep.png", "frontier.png"):
        assert (run / name).stat().st_size > 1000
    budget = {r["method"]: r for r in results["meta"]["budget"]}
    assert set(budget) == set(ALL.split(","))
    assert budget["ft"]["vs_ft"] in (1.0, None)  # None when fine-tuning learned nothing in budget
    for r in budget.values():
        assert r["forgotten"] <= r["budget_facts"] + 1e-9
        assert 0 <= r["learned"] <= r["n_inject"]


def test_resume_skips_completed_cells(run, cache, capsys):
    before = (run / "cells" / "ft_lr0.001_seed0.json").read_text()
    assert main(["inject", *TINY, "--methods", "ft", "--seeds", "0,1", "--cache-dir", str(cache),
                 "--out", str(run), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "skip ft lr=0.001 seed=0" in out
    assert "ft lr=0.001 seed=1:" in out
    assert (run / "cells" / "ft_lr0.001_seed0.json").read_text() == before
    assert (run / "cells" / "ft_lr0.001_seed1.json").is_file()
    table = out[out.index("method"):]
    assert "learned" in table and "forgot" in table and "out-set" in table
    # The budgeted table comes first, then the last-epoch table.
    assert out.index("learned within a forgetting budget of 1%") < out.index("after 2 epochs")


def test_grid_of_learning_rates_and_ref_every(tmp_path, cache, capsys):
    """Several lrs: one row per (method, lr) in the last-epoch table, and the budgeted table names
    the lr it picked; --ref-every reaches the CPL method; --xp-every 0 measures held-out templates
    only at the last epoch."""
    out = tmp_path / "g"
    assert main(["inject", *TINY, "--methods", "ft,cpl", "--lrs", "3e-4,1e-3,3e-3", "--ref-every",
                 "2", "--xp-every", "0", "--forget-budget", "0.05", "--cache-dir", str(cache),
                 "--out", str(out), "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert "learned within a forgetting budget of 5%" in text
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["ref_every"] == 2
    assert {(c["method"], c["lr"]) for c in results["cells"]} == \
        {(m, lr) for m in ("ft", "cpl") for lr in (3e-4, 1e-3, 3e-3)}
    rows = results["cells"][0]["rows"]
    assert [r["xp_learned"] is None for r in rows] == [False, True, False]
    assert [r["step"] for r in rows] == [0, rows[1]["step"], 2 * rows[1]["step"]]
    budget = {r["method"]: r for r in results["meta"]["budget"]}
    assert budget["cpl"]["lr"] in (3e-4, 1e-3, 3e-3)


def test_existing_run_is_never_overwritten(run, cache, capsys):
    args = ["inject", *TINY, "--methods", "ft", "--cache-dir", str(cache), "--out", str(run)]
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--resume", "--epochs", "3"]) == 2
    assert "epochs" in capsys.readouterr().err


def test_analyze(tmp_path, cache):
    out = tmp_path / "a"
    assert main(["analyze", *TINY, "--cache-dir", str(cache), "--out", str(out)]) == 0
    result = json.loads((out / "analysis.json").read_text())
    assert result["layers"][-1]["name"] == "total"
    assert all(0.0 <= l["conflicting"] <= 1.0 for l in result["layers"])
    assert sum(b["n"] for b in result["bins"]) == result["lab"]["mastered_in"] + result["lab"]["mastered_out"]
    assert (out / "similarity.csv").is_file() and (out / "analysis.png").stat().st_size > 1000


def test_multiple_choice_jsonl_with_the_tiny_model(tmp_path, cache):
    colors = ["red", "blue", "green", "amber"]
    lines = []
    for i, name in enumerate(["ka", "bo", "ci", "du", "ev", "fo", "gu", "hi", "jo", "ku", "lu", "mo"]):
        lines.append(json.dumps({"question": f"which color does {name} like ?",
                                 "label": "ABCD"[i % 4], "choices": colors}))
    data = tmp_path / "mc.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "r"
    assert main(["inject", *TINY, "--data", str(data), "--methods", "ft,cpl", "--cache-dir",
                 str(cache), "--out", str(out), "--no-plots"]) == 0
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert {c["method"] for c in cells} == {"ft", "cpl"}
    assert cells[0]["rows"][-1]["xp_learned"] is None  # no paraphrases in this file


def test_bad_data_file_is_a_clean_error(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n{oops\n')
    assert main(["inject", *TINY, "--data", str(data), "--out", str(tmp_path / "r")]) == 2
    assert f"{data}:2:" in capsys.readouterr().err


def test_a_config_from_before_the_new_options_keeps_their_old_behaviour():
    from cpl_lab.config import LabConfig
    old = LabConfig().as_dict()
    for key in ("lora_lr_scale", "ref_every", "xp_every", "ewc_lambda", "forget_budget"):
        del old[key]
    cfg = LabConfig.from_dict(old)
    assert (cfg.lora_lr_scale, cfg.ref_every, cfg.xp_every) == (1.0, 1, 1)
    assert LabConfig.from_dict(LabConfig().as_dict()) == LabConfig()


@pytest.mark.parametrize("reference", ["step", "epoch"])
def test_in_backward_gives_the_same_numbers(tmp_path, cache, capsys, reference):
    """--in-backward: ft (torch's per-parameter optimizers in hooks) and cpl (cpl_kernels.in_backward)
    learn and forget exactly what they do stepping normally, epoch by epoch."""
    def cells(name, *extra):
        out = tmp_path / name
        assert main(["inject", *TINY, "--methods", "ft,cpl", "--reference", reference, "--cache-dir",
                     str(cache), "--out", str(out), "--no-plots", *extra]) == 0
        results = json.loads((out / "results.json").read_text())
        return results, {c["method"]: c["rows"] for c in results["cells"]}

    normal, normal_rows = cells("normal")
    inside, inside_rows = cells("inside", "--in-backward")
    assert inside["config"]["in_backward"] is True and normal["config"]["in_backward"] is False
    same = ("learned", "forgotten", "forgotten_in", "forgotten_out", "loss", "mastered_loss", "frozen",
            "state_mb", "xp_learned")
    for method in ("ft", "cpl"):
        assert len(normal_rows[method]) == len(inside_rows[method]) == 3
        for a, b in zip(normal_rows[method], inside_rows[method]):
            assert {k: a[k] for k in same} == {k: b[k] for k in same}, method
    assert inside_rows["cpl"][-1]["frozen"] > 0


def test_in_backward_refuses_methods_that_need_whole_gradients(tmp_path, cache, capsys):
    assert main(["inject", *TINY, "--methods", "ft,replay", "--in-backward", "--cache-dir", str(cache),
                 "--out", str(tmp_path / "x")]) == 2
    assert "replay" in capsys.readouterr().err
