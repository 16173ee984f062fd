"""Result grid (resumable JSON) and the markdown table / sample-size figure."""

from __future__ import annotations

import json

from prune_trainer.oneshot.experiments import main, setting_key


def test_grid_table_and_samples(tmp_path, model, tokenizer, conll_dir):
    model_dir = tmp_path / "m"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "res.json"
    args = ["grid", "--model", str(model_dir), "--out", str(out), "--methods", "sparsegpt",
            "--sparsities", "0.5,2:4", "--owl", "both", "--calib", "8,16", "--data-dir", str(conll_dir)]
    assert main(args) == 0
    res = json.loads(out.read_text())
    # (0.5 uniform + 0.5 OWL + 2:4 uniform) × 2 calibration sizes + dense
    assert len(res) == 3 * 2 + 1
    key = setting_key("sparsegpt", "0.5", True, 16)
    stamp = res[key]["finished_at"]
    assert main(args) == 0  # resumable: nothing re-run
    assert json.loads(out.read_text())[key]["finished_at"] == stamp
    md = tmp_path / "t.md"
    assert main(["table", "--json", str(out), "--md", str(md), "--calib", "16"]) == 0
    text = md.read_text()
    assert "| 50% | sparsegpt |" in text and "| 2:4 | sparsegpt |" in text and "0.869" in text
    smd, png = tmp_path / "s.md", tmp_path / "s.png"
    assert main(["samples", "--json", str(out), "--md", str(smd), "--png", str(png)]) == 0
    assert "| sparsegpt | 50% |" in smd.read_text() and png.stat().st_size > 0
