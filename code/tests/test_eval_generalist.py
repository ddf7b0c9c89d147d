"""eval_generalist.py and the generalist-quality scores of utils.compare (clicks from the ground truth)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval_generalist
from dataloaders.la_heart import load_case
from dataloaders.layout import TRAINING_FOLDER
from dataloaders.phantoms import write_phantom_dataset
from utils.compare import corpus_click_scores, crop_box, ground_truth_click_scores, summarize_scores
from tests.test_pretrain_generalist import TINY


class Oracle:
    """A 'generalist' that answers with the mask it was prompted from (or with nothing): what a perfect (or
    useless) generalist would return for clicks from that mask."""
    num_clicks = 10

    def __init__(self, perfect=True):
        self.perfect = perfect
        self.seen = []

    def __call__(self, images, target_prob):
        self.seen.append(tuple(images.shape))
        mask = (target_prob > 0.5).float() if self.perfect else torch.zeros_like(target_prob)
        return mask, torch.ones_like(mask)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(root, n_train=1, n_test=2, size=(48, 40, 32), seed=5)
    return root


def test_ground_truth_scores_crop_around_the_target_and_score_in_it(phantoms):
    base = phantoms / TRAINING_FOLDER
    cases = (phantoms / "test.list").read_text().split()
    perfect = ground_truth_click_scores(Oracle(True), base, cases, (32, 32, 24), "cpu")
    assert [r["dice"] for r in perfect] == [1.0, 1.0]
    useless = Oracle(False)
    scores = ground_truth_click_scores(useless, base, cases, (32, 32, 24), "cpu")
    assert [r["dice"] for r in scores] == [0.0, 0.0]
    assert useless.seen == [(1, 1, 32, 32, 24)] * 2
    _, label = load_case(base, cases[0], with_label=True)
    assert scores[0]["box"] == [list(b) for b in crop_box(label, (32, 32, 24))]
    sl = tuple(slice(a, b) for a, b in crop_box(label, (32, 32, 24)))
    assert scores[0]["target_voxels"] == int((label[sl] > 0).sum()) > 0
    s = summarize_scores([{"dice": 0.5}, {"dice": 1.0}])
    assert s == dict(n=2, dice_mean=75.0, dice_std=25.0, dice_min=50.0)


def test_corpus_scores_are_whole_scenes_of_the_given_seed():
    perfect = corpus_click_scores(Oracle(True), 32, 3, seed=11, device="cpu")
    assert [r["dice"] for r in perfect] == [1.0] * 3 and [r["index"] for r in perfect] == [0, 1, 2]
    other = corpus_click_scores(Oracle(True), 32, 3, seed=12, device="cpu")
    assert [r["target_voxels"] for r in perfect] != [r["target_voxels"] for r in other]


def test_script_scores_random_weights_and_writes_json(phantoms, tmp_path, capsys):
    arch = tmp_path / "tiny.json"
    arch.write_text(json.dumps(TINY))
    out = tmp_path / "scores.json"
    rc = eval_generalist.main(["--random_arch", str(arch), "--data", str(phantoms), "--corpus_scenes", "2",
                               "--num_clicks", "3", "--patch_size", "32", "32", "24", "--threads", "1",
                               "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["num_clicks"] == 3 and result["corpus"]["summary"]["n"] == 2
    assert result["data"]["summary"]["n"] == 2 and len(result["data"]["cases"]) == 2
    dices = [r["dice"] for r in result["data"]["cases"] + result["corpus"]["scenes"]]
    assert all(0.0 <= d <= 1.0 for d in dices)
    assert f"Dice {result['data']['summary']['dice_mean']:.2f}" in capsys.readouterr().out
    # the same seeds give the same scores
    rc = eval_generalist.main(["--random_arch", str(arch), "--data", str(phantoms), "--corpus_scenes", "2",
                               "--num_clicks", "3", "--patch_size", "32", "32", "24", "--threads", "1",
                               "--out", str(tmp_path / "again.json")])
    again = json.loads((tmp_path / "again.json").read_text())
    assert [r["dice"] for r in again["data"]["cases"]] == [r["dice"] for r in result["data"]["cases"]]


def test_script_user_errors_are_one_line(tmp_path):
    code = Path(eval_generalist.__file__).parent
    proc = subprocess.run([sys.executable, "eval_generalist.py", "--random_arch", "vit_tiny_demo", "--data",
                           str(tmp_path / "nowhere"), "--threads", "1"], cwd=code, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "nowhere" in proc.stderr and "Traceback" not in proc.stderr
