"""The demo generalist shipped in model/released/ (issue 20): what it is, that it loads, and what it scores.

It is the output of the demo's own pretraining recipe (training.demo_recipe.PRETRAIN_STAGES, what `demo.py
--generalist pretrain` reruns), stored in float16 (at most 8 MB), with the checksum model/README.md publishes. Its
zero-shot quality is measured here with eval_generalist.py's defaults, on the demo's test phantoms (results/
demo_study.md: 83.87 % on held-out corpus scenes, 83.09 % on the phantoms, AMD EPYC; the issue's targets are 85 %
and 75 %: the corpus one is not met yet, so this test holds the shipped model to what it measured, not to 85 %).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

import demo
import eval_generalist
from dataloaders import phantoms
from networks.sam_med3d import arch_to_config, load_generalist
from training import demo_recipe as recipe
from training.pretrain import SAME_MODEL_KEYS, config_json_path

REPO = Path(demo.__file__).resolve().parent.parent
SHIPPED = REPO / "model" / "released" / "demo_generalist.pth"


def test_the_shipped_generalist_is_the_recipe_s_output_in_float16_and_loads_strictly():
    saved = torch.load(SHIPPED, map_location="cpu", weights_only=True)
    final = recipe.pretrain_configs(demo.settings_from(demo.parse_args([])), "ck", False, "cpu", False)[-1]
    same = [k for k in SAME_MODEL_KEYS if k != "init"]      # init: where stage 1 was kept on the machine
    assert {k: saved["pretrain_args"][k] for k in same} == {k: getattr(final, k) for k in same}
    assert saved["iteration"] == (final.stop_at or final.iterations)
    assert SHIPPED.stat().st_size <= 8 * 2 ** 20
    assert all(v.dtype == torch.float16 for v in saved["model_state_dict"].values() if v.is_floating_point())
    assert json.loads(config_json_path(SHIPPED).read_text()) == json.loads(json.dumps(arch_to_config(recipe.DEMO_ARCH)))
    sha = hashlib.sha256(SHIPPED.read_bytes()).hexdigest()
    assert f"`{sha}`" in (REPO / "model" / "README.md").read_text()      # the published checksum
    load_generalist(SHIPPED, arch=str(config_json_path(SHIPPED)))           # strict: every key, every shape
    assert Path(recipe.SHIPPED_GENERALIST).name == SHIPPED.name


def test_the_shipped_generalist_scores_what_it_measured(tmp_path):
    """eval_generalist.py's defaults (10 clicks from the ground truth, 32 held-out corpus scenes) and the demo's 20
    test phantoms (version 3, seed 0). Floors 1.3 points under the measured numbers: another CPU's summation order
    moves a click, and a click moves the Dice."""
    phantoms.ensure_phantom_dataset(tmp_path / "phantoms", 16, 20, (96, 96, 64), 0)
    out = tmp_path / "eval.json"
    eval_generalist.main(["--generalist", str(SHIPPED), "--data", str(tmp_path / "phantoms"), "--threads", "1",
                          "--out", str(out)])
    result = json.loads(out.read_text())
    corpus, data = result["corpus"]["summary"], result["data"]["summary"]
    assert corpus["n"] == 32 and data["n"] == 20
    assert corpus["dice_mean"] >= 82.5      # measured 83.87 (issue 20's target: 85, not met yet)
    assert data["dice_mean"] >= 81.5        # measured 83.09 (target: 75)
