"""Result grid (resumable JSON) and the markdown table / sample-size figure."""

from __future__ import annotations

import json

from study.cli import main
from study.oneshot_grid import setting_key


def test_grid_table_and_samples(tmp_path, model, tokenizer, conll_dir):
    model_dir = tmp_path / "m"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "grids" / "res.json"  # the folder is created
    args = ["oneshot-grid", "--model", str(model_dir), "--out", str(out), "--methods", "sparsegpt",
            "--sparsities", "0.5,2:4", "--owl", "both", "--calib", "8,16", "--data-dir", str(conll_dir)]
    assert main(args) == 0
    res = json.loads(out.read_text())
    # (0.5 uniform + 0.5 OWL + 2:4 uniform) × 2 calibration sizes + dense
    assert len(res) == 3 * 2 + 1
    key = setting_key("sparsegpt", "0.5", True, 16)
    stamp = res[key]["finished_at"]
    assert res[key]["git_commit"]  # the code that ran
    assert main(args) == 0  # resumable: nothing re-run
    assert json.loads(out.read_text())[key]["finished_at"] == stamp
    md = tmp_path / "t.md"
    assert main(["oneshot-table", "--json", str(out), "--md", str(md), "--calib", "16"]) == 0
    text = md.read_text()
    assert "| 50% | sparsegpt |" in text and "| 2:4 | sparsegpt |" in text and "0.869" in text
    assert "factorization unknown (no metrics.json" in text and "authors' SparseGPT / Wanda code" not in text
    assert res["dense"]["trained"].startswith("embedding factorization unknown")  # recorded when the grid ran
    res["dense"].pop("trained")  # an older grid JSON: the table reads metrics.json beside the model instead
    out.write_text(json.dumps(res))
    # the recipe runner's metrics.json beside the model says how it was trained
    (tmp_path / "metrics.json").write_text(json.dumps({"name": "d64", "git_commit": "abc", "config": {
        "factorize_embeddings": 64}}))
    assert main(["oneshot-table", "--json", str(out), "--md", str(md), "--calib", "16", "--reference"]) == 0
    text = md.read_text()
    assert "recipe `d64`, word embeddings factorized to rank 64" in text
    assert "| sparsegpt | 0.5 | – | 0.896 | – |" in text  # no 1024-sentence settings in this grid
    md.write_text(md.read_text() + "\n## Notes\n\nhand-written analysis\n")
    assert main(["oneshot-table", "--json", str(out), "--md", str(md), "--calib", "16"]) == 0  # regenerated: notes kept
    text = md.read_text()
    assert text.count("## Notes") == 1 and text.endswith("## Notes\n\nhand-written analysis\n")
    smd, png = tmp_path / "s.md", tmp_path / "s.png"
    assert main(["oneshot-samples", "--json", str(out), "--md", str(smd), "--png", str(png)]) == 0
    assert "| sparsegpt | 50% |" in smd.read_text() and png.stat().st_size > 0


def test_surgeon_settings_in_the_grid_and_the_structured_study(tmp_path, tokenizer, conll_dir):
    from helpers import tiny_bert

    model_dir = tmp_path / "m"
    tiny_bert(num_attention_heads=4, intermediate_size=64).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "surgeon.json"
    assert main(["oneshot-grid", "--model", str(model_dir), "--out", str(out), "--methods", "llm-surgeon",
                 "--sparsities", "0.5", "--allocations", "global,uniform", "--options", '{"cg_iters": 5}',
                 "--calib", "8", "--data-dir", str(conll_dir)]) == 0
    res = json.loads(out.read_text())
    assert {setting_key("llm-surgeon", "0.5", a, 8) for a in ("global", "uniform")} <= set(res)
    assert res[setting_key("llm-surgeon", "0.5", "global", 8)]["config"]["options"]["allocation"] == "global"
    md = tmp_path / "u.md"
    assert main(["oneshot-surgeon-table", "--json", str(out), "--md", str(md), "--calib", "8"]) == 0
    assert "| 50% | llm-surgeon | global | 8 | 1 |" in md.read_text()
    structured = tmp_path / "structured.json"
    assert main(["surgeon-structured", "--model", str(model_dir), "--out", str(structured), "--methods",
                 "llm-surgeon,structured-magnitude", "--targets", "0.3", "--shots", "1", "--calib", "8",
                 "--threads", "1", "--seq-len", "16", "--data-dir", str(conll_dir)]) == 0
    rows = json.loads(structured.read_text())
    assert len(rows) == 2 and all(r["params"] < r["dense_params"] for r in rows.values())
    md = tmp_path / "s.md"
    assert main(["surgeon-structured-table", "--json", str(structured), "--md", str(md), "--dense-f1", "0.5"]) == 0
    assert "| 30% | llm-surgeon | uniform | 1 | 8 |" in md.read_text()
