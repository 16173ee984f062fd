import json

from study.cli import main
from study.report import (
    cost_table,
    load_oneshot_results,
    load_runs,
    method_sparsity_table,
    oneshot_cost_table,
    results_table,
)


def _write(root, name, f1, sparsity, method=None, group="runs"):
    run = root / group / name
    run.mkdir(parents=True)
    config = {"training": {"num_train_epochs": 3}, "pruning": {"method": method} if method else None}
    log = [{"step": s, "sparsity/global": sparsity * s / 100} for s in (0, 50, 100)] if method else []
    (run / "metrics.json").write_text(json.dumps({"name": name, "eval_f1": f1, "sparsity": sparsity,
                                                  "wall_time_s": 600.0, "config": config, "log_history": log}))


def test_report_table_and_plots(tmp_path, capsys):
    _write(tmp_path, "dense", 0.9, 0.0)
    _write(tmp_path, "magnitude_90", 0.81, 0.9, "magnitude")
    _write(tmp_path, "magnitude_80", 0.85, 0.8, "magnitude", group="ablations")
    old = tmp_path / "ablations" / "magnitude_90_1ep"
    _write(tmp_path, "magnitude_90_1ep", 0.7, 0.9, "magnitude", group="ablations")
    metrics = json.loads((old / "metrics.json").read_text())
    (old / "metrics.json").write_text(json.dumps({**metrics, "renamed_from": "magnitude_90 (1 epoch)"}))
    (tmp_path / "runs" / "notes_only").mkdir()  # a folder without metrics is ignored
    _write(tmp_path, "elsewhere", 0.5, 0.5, "magnitude", group="old")  # neither runs/ nor ablations/: ignored
    runs = load_runs(tmp_path)
    assert [r["name"] for r in runs] == ["magnitude_80", "magnitude_90_1ep", "dense", "magnitude_90"]
    table = results_table(runs)
    assert "| [magnitude_90](runs/magnitude_90/) | magnitude | 0.9000 | 0.8100 | 90.0% |" in table
    assert "| [magnitude_80](ablations/magnitude_80/) | magnitude | 0.8000 | 0.8500 |" in table
    assert main(["report", str(tmp_path)]) == 0
    readme = (tmp_path / "README.md").read_text()
    assert "0.8100" in readme and "f1_vs_sparsity.png" in readme
    assert "## Costs" in readme
    assert "| [magnitude_90](runs/magnitude_90/) | magnitude | - | 10.0 min | - | - | - | - |" in readme  # old keys
    assert "[index.md](index.md)" in readme and (tmp_path / "index.md").is_file()
    index = json.loads((tmp_path / "index.json").read_text())
    assert [e["folder"] for e in index] == ["ablations/magnitude_80", "ablations/magnitude_90_1ep", "runs/dense",
                                            "runs/magnitude_90"]
    # the report reads the index: a run another one replaced says so
    assert ("| [magnitude_90_1ep](ablations/magnitude_90_1ep/) (superseded by [magnitude_90](runs/magnitude_90/)) |"
            in readme)
    assert (tmp_path / "f1_vs_sparsity.png").stat().st_size > 1000
    assert (tmp_path / "sparsity_curves.png").stat().st_size > 1000


def test_report_reads_one_oneshot_folder_per_dense_model(tmp_path):
    _write(tmp_path, "dense", 0.9, 0.0)
    _write(tmp_path, "dense_emb64", 0.86, 0.0)  # another dense model: its own row
    for folder, f1, calib in (("oneshot/dense", 0.85, 1024), ("oneshot/dense_emb64", 0.75, 4096)):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "sparsegpt.json").write_text(json.dumps({
            "dense": {"eval_f1": 0.9},
            f"sparsegpt|0.5|uniform|n{calib}|s0": {"eval_f1": f1, "prune_time_s": 40.0, "solve_time_s": 4.0},
            "sparsegpt|0.7|uniform|n1024|s0": {"eval_f1": f1 - 0.1, "prune_time_s": 30.0, "solve_time_s": 3.0},
        }))
    assert main(["report", str(tmp_path)]) == 0
    readme = (tmp_path / "README.md").read_text()
    # the pivot shows the grid on the training runs' dense model only (oneshot/dense), not the factorized one
    assert "| dense (dense_emb64) | 0.8600 (95.6%, 3 ep) | – | – |" in readme
    # beside the dense model's one-shot cells: the authors' code's F1 at the same setting
    assert "| one-shot sparsegpt | – | 0.8500 (authors 0.896) | 0.7500 (authors 0.782) |" in readme
    # the factorized model's 4096-sentence grid: its own table, with the deep-dive's Table 1 beside it
    table1 = readme.split("Table 1 of the unstructured-pruning deep-dive")[1].split("## Costs")[0]
    assert "`dense_emb64` has F1 0.8600" in table1 and "| one-shot sparsegpt | 0.7500 (paper 0.869) |" in table1
    assert "0.6500" not in readme.split("## Costs")[0]  # n1024 in the emb64 folder: in no F1 table
    # the costs list each folder's grid on its own
    assert "(`oneshot/dense/*.json`)" in readme and "(`oneshot/dense_emb64/*.json`)" in readme
    assert "| sparsegpt | 4096 | 1 | 40.0 s (40.0–40.0) | 4.0 s |" in readme


def test_cost_table_with_and_without_the_new_keys(tmp_path):
    _write(tmp_path, "old_run", 0.8, 0.9, "magnitude")  # predates the cost keys: only its wall time
    _write(tmp_path, "new_run", 0.85, 0.9, "movement")
    path = tmp_path / "runs" / "new_run" / "metrics.json"
    new = json.loads(path.read_text())
    new.update(train_steps=400, resumed_from_step=200, pruning_time_s=12.5, pruning_steps=7, peak_rss_mib=2048.4,
               wall_time_s=1200.0)
    new["log_history"].append({"train_runtime": 100.0, "step": 400})  # this call trained steps 201..400
    path.write_text(json.dumps(new))
    table = cost_table(load_runs(tmp_path))
    assert "| [new_run](runs/new_run/) | movement | 400 | 20.0 min | 0.50 | 12.5 s | 12.5% | 2048 MiB |" in table
    assert "| [old_run](runs/old_run/) | magnitude | - | 10.0 min | - | - | - | - |" in table

    assert load_oneshot_results(tmp_path) == {}
    (tmp_path / "sparsegpt.json").write_text(json.dumps({
        "dense": {"eval_f1": 0.9},
        "wanda|0.5|uniform|n1024|s0": {"prune_time_s": 10.0, "solve_time_s": 1.0},
        "sparsegpt|0.5|uniform|n1024|s0": {"prune_time_s": 40.0, "solve_time_s": 4.0},
    }))
    (tmp_path / "wanda.json").write_text(json.dumps({
        "wanda|0.7|owl|n1024|s0": {"prune_time_s": 30.0, "solve_time_s": 2.0},
        "wanda|0.8|uniform|n1024|s0": {"prune_time_s": 20.0},  # no solve time recorded
        "wanda|0.8|uniform|n256|s0": {"prune_time_s": 5.0, "solve_time_s": 0.5},
    }))
    table = oneshot_cost_table(load_oneshot_results(tmp_path))
    assert table.splitlines()[2:] == [
        "| sparsegpt | 1024 | 1 | 40.0 s (40.0–40.0) | 4.0 s |",
        "| wanda | 256 | 1 | 5.0 s (5.0–5.0) | 0.5 s |",
        "| wanda | 1024 | 3 | 20.0 s (10.0–30.0) | 1.5 s |",
    ]


def test_method_sparsity_table_pivots_runs_and_oneshot(tmp_path):
    _write(tmp_path, "dense", 0.9, 0.0)
    _write(tmp_path, "magnitude_90", 0.81, 0.9, "magnitude")
    _write(tmp_path, "obert_80", 0.855, 0.8, "obert")
    obert_m = tmp_path / "ablations" / "obert_90_m64"
    obert_m.mkdir(parents=True)
    (obert_m / "metrics.json").write_text(json.dumps({
        "name": "obert_90_m64", "eval_f1": 0.864, "sparsity": 0.9,
        "config": {"training": {"num_train_epochs": 3},
                   "pruning": {"method": "obert", "method_kwargs": {"num_grads": 64}}},
    }))
    summed = tmp_path / "ablations" / "obert_90_summed"
    summed.mkdir()
    (summed / "metrics.json").write_text(json.dumps({
        "name": "obert_90_summed", "eval_f1": 0.862, "sparsity": 0.9,
        "config": {"training": {"num_train_epochs": 3},
                   "pruning": {"method": "obert", "method_kwargs": {"num_grads": 64, "update": "summed"}}},
    }))
    fast = tmp_path / "ablations" / "obert_90_lr2e-4"
    fast.mkdir()
    (fast / "metrics.json").write_text(json.dumps({
        "name": "obert_90_lr2e-4", "eval_f1": 0.873, "sparsity": 0.9,
        "config": {"training": {"num_train_epochs": 3, "learning_rate": 2.0e-4},
                   "pruning": {"method": "obert", "method_kwargs": {"num_grads": 64}}},
    }))
    new_schema = tmp_path / "ablations" / "nm_2_4_sparsegpt"  # pattern and options on `pruning` (current schema)
    new_schema.mkdir()
    (new_schema / "metrics.json").write_text(json.dumps({
        "name": "nm_2_4_sparsegpt", "eval_f1": 0.89, "sparsity": 0.5,
        "config": {"training": {"num_train_epochs": 2},
                   "pruning": {"method": "nm", "pattern": "2:4", "options": {"score": "sparsegpt"}}},
    }))
    nm = tmp_path / "ablations" / "nm_2_4_wanda"
    nm.mkdir()
    (nm / "metrics.json").write_text(json.dumps({
        "name": "nm_2_4_wanda", "eval_f1": 0.88, "sparsity": 0.5,
        "config": {"training": {"num_train_epochs": 1},
                   "pruning": {"method": "nm", "schedule": {"pattern": "2:4"}, "method_kwargs": {"score": "wanda"}}},
    }))
    oneshot = {
        "sparsegpt|0.8|uniform|n1024|s0": {"eval_f1": 0.6},
        "sparsegpt|0.8|owl|n1024|s0": {"eval_f1": 0.7},
        "sparsegpt|0.8|uniform|n4096|s0": {"eval_f1": 0.65},  # other calibration size: not in the table
    }
    table = method_sparsity_table(load_runs(tmp_path), oneshot, reference={("sparsegpt", "0.8", "owl"): 0.791},
                                  reference_label="paper").splitlines()
    assert table[0] == "| method | 80% | 90% | 2:4 |"
    assert "| magnitude | – | 0.8100 (90.0%, 3 ep) | – |" in table
    assert "| obert | 0.8550 (95.0%, 3 ep) | – | – |" in table
    assert "| obert (m=64) | – | 0.8640 (96.0%, 3 ep) | – |" in table  # m is part of the row: runs differ by it
    assert "| obert (m=64, summed) | – | 0.8620 (95.8%, 3 ep) | – |" in table  # so is a non-default update
    assert "| obert (m=64, lr=2e-04) | – | 0.8730 (97.0%, 3 ep) | – |" in table  # and the learning rate
    assert "| nm (wanda) | – | – | 0.8800 (97.8%, 1 ep) |" in table
    assert "| nm (sparsegpt) | – | – | 0.8900 (98.9%, 2 ep) |" in table
    assert "| one-shot sparsegpt | 0.6000 | – | – |" in table
    assert "| one-shot sparsegpt + OWL | 0.7000 (paper 0.791) | – | – |" in table  # reference of that setting only
    assert not any("0.6500" in line for line in table)
    assert table[-1].startswith("| one-shot")  # training-time methods first


def test_paper_and_authors_references():
    from study.report import authors_reference, paper_reference

    paper, issue = paper_reference(), authors_reference()
    # levels spelled as in the grid's setting keys ("0.8", "2:4"), uniform and OWL columns kept apart
    assert paper[("obs", "0.8", "uniform")] == 0.804 and paper[("obs", "0.8", "owl")] == 0.816
    assert paper[("wanda", "0.6", "owl")] == 0.826 and len(paper) == 4 * 3 * 2
    assert issue[("sparsegpt", "2:4", "uniform")] == 0.875 and len(issue) == 12


def test_structured_runs_get_a_speedup_table_and_plot(tmp_path):
    from study.report import structured_table

    _write(tmp_path, "dense", 0.9, 0.0)
    for name, score, sparsity, f1, speed in (("s_taylor_50", "taylor", 0.5, 0.90, 1.6),
                                             ("s_taylor_70", "taylor", 0.7, 0.88, 2.4),
                                             ("s_mag_70", "magnitude", 0.7, 0.79, 2.3)):
        _write(tmp_path, name, f1, sparsity, "structured", group="ablations")
        f = tmp_path / "ablations" / name / "metrics.json"
        m = json.loads(f.read_text())
        m["config"]["pruning"]["options"] = {"score": score}
        m.update(structure={"heads": [6], "ffn": [64]}, speedup_cpu_b1=speed - 0.2, speedup_cpu_b32=speed,
                 params=1_000_000, device="cpu")
        f.write_text(json.dumps(m))
    runs = load_runs(tmp_path)
    table = structured_table(runs)
    assert table.index("s_mag_70") < table.index("s_taylor_50") < table.index("s_taylor_70")  # by score, removed
    assert "| s_taylor_70 | taylor | 70% | 3 | 0.8800 | 2.20× | 2.40× | 1.0M | cpu |" in table
    assert "dense" not in table  # untimed, unstructured runs are not rows
    _write(tmp_path, "ft", 0.85, 0.0, group="ablations")  # a fine-tune of a one-shot export at its fixed structure
    f = tmp_path / "ablations" / "ft" / "metrics.json"
    extra = {"structure": {"heads": [6], "ffn": [64]}, "params": 1_000_000, "start_params": 1_000_000,
             "speedup_cpu_b1": 1.1, "speedup_cpu_b32": 1.5, "device": "cpu"}
    f.write_text(json.dumps({**json.loads(f.read_text()), **extra}))
    assert "| ft | one-shot (fixed) | (one-shot) | 3 | 0.8500 | 1.10× | 1.50× | 1.0M | cpu |" in \
        structured_table(load_runs(tmp_path))
    assert main(["report", str(tmp_path)]) == 0
    assert "structured_f1_vs_speedup.png" in (tmp_path / "README.md").read_text()
    assert (tmp_path / "structured_f1_vs_speedup.png").stat().st_size > 1000


def test_oneshot_cost_table_finds_the_calibration_part_of_any_key_layout():
    from study.report import oneshot_cost_table

    results = {"sparsegpt|0.5|uniform|n128|s0": {"prune_time_s": 2.0, "solve_time_s": 1.0},
               "llm-surgeon|heads,ffn|0.3|uniform|T2|n128": {"prune_time_s": 4.0},
               "dense|w8": {"perplexity": 17.0}}
    table = oneshot_cost_table(results)
    assert "| sparsegpt | 128 | 1 | 2.0 s (2.0–2.0) | 1.0 s |" in table
    assert "| llm-surgeon | 128 | 1 | 4.0 s (4.0–4.0) | - |" in table and "dense" not in table


def test_causal_lm_runs_get_their_own_table(tmp_path):
    _write(tmp_path, "dense", 0.9, 0.0)
    run = tmp_path / "runs" / "llm_recover"
    run.mkdir(parents=True)
    config = {"model": "/somewhere/sgpt_2of4/model", "pruning": {"method": "fixed_mask"}}
    (run / "metrics.json").write_text(json.dumps({
        "name": "llm_recover", "eval_perplexity": 26.2748, "eval_windows": 8, "eval_seqlen": 512, "sparsity": 0.5,
        "train_steps": 300, "wall_time_s": 1385.3, "config": config}))
    assert [r["name"] for r in load_runs(tmp_path)] == ["dense"]  # not among the F1 runs
    assert main(["report", str(tmp_path)]) == 0
    readme = (tmp_path / "README.md").read_text()
    assert "## Causal-LM runs" in readme
    assert ("| [llm_recover](runs/llm_recover/) | sgpt_2of4 | fixed_mask | 300 | 0.5000 | 26.27 | 8 × 512 | 23.1 min |"
            in readme)
