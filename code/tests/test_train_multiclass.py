"""Training on a prepared dataset (--dataset) with K classes: supervised, MT, UA-MT, SemiSAM and SemiSAM+."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from dataloaders.prepare import prepare_dataset
from training.config import parse_config
from training.run import main as train_main
from utils import losses, ramps
from utils.errors import ConfigError
from utils.inference import load_specialist
from utils.generalist import GeneralistStats, PseudoLabels, combine_classes
from tests.test_prepare_dataset import _phantom, _write_dataset
from tests.test_train_common import sam_args, write_tiny_sam


@pytest.fixture(scope="module")
def three_class(tmp_path_factory):
    root = tmp_path_factory.mktemp("three")
    cases = {f"c{i}": _phantom(i, shape=(40, 40, 24)) for i in range(6)}
    cases.update({f"u{i}": (_phantom(20 + i, shape=(40, 40, 24))[0], None) for i in range(2)})
    src = _write_dataset(root / "src", cases, {"background": 0, "a": 1, "b": 2})
    info = prepare_dataset(src, root / "prepared", test_fraction=0.34, seed=0)
    return root / "prepared", info


def _args(dataset, out, exp, *extra, iters=2):
    return ["--dataset", str(dataset), "--model_dir", str(out), "--exp", exp, "--max_iterations", str(iters),
            "--patch_size", "32", "32", "16", "--n_filters", "4", "--num_workers", "0", "--device", "cpu",
            "--progress", "0", "--image_every", "1", "--tune_malloc", "0", "--save_every", str(iters), *extra]


def test_dataset_sets_data_classes_and_labeled_count(three_class, tmp_path):
    dataset, info = three_class
    cfg = parse_config({"labeled_num": 16}, ["--dataset", str(dataset)])     # a script's LA default does not count
    assert cfg.num_classes == 3 and cfg.labeled_num == info["n_labeled_train"] == 4
    assert cfg.root_path == str(dataset / "cases") and cfg.train_list == str(dataset / "train.list")
    assert cfg.vnet_kwargs["n_classes"] == 3
    assert parse_config({}, ["--dataset", str(dataset), "--labeled_n", "2"]).labeled_num == 2   # abbreviation too
    with pytest.raises(ConfigError, match="--num_classes 2 contradicts .*dataset.json \\(3 classes"):
        parse_config({}, ["--dataset", str(dataset), "--num_classes", "2"])
    with pytest.raises(ConfigError, match="no dataset.json"):
        parse_config({}, ["--dataset", str(tmp_path)])
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {}}))
    with pytest.raises(ConfigError, match="not written by prepare_dataset.py"):
        parse_config({}, ["--dataset", str(tmp_path)])
    assert parse_config({}, []).num_classes == 2 and parse_config({}, []).dataset is None   # LA unchanged


@pytest.mark.parametrize("specialist", ["none", "mt", "uamt"])
def test_k_class_training_of_every_specialist(three_class, tmp_path, specialist):
    dataset, info = three_class
    val = tmp_path / "val.list"
    val.write_text((dataset / "test.list").read_text())
    extra = ["--uamt_passes", "2"] if specialist == "uamt" else []
    trainer = train_main({"specialist": specialist},
                         _args(dataset, tmp_path, specialist, "--val_list", str(val), "--val_every", "2", *extra))
    values = trainer.last_result.values
    assert all(math.isfinite(v) for v in values.values())
    if specialist == "uamt":   # ln 3 scale: at t = 1 the threshold is about 0.75 ln 3
        assert values["uncertainty/threshold"] == pytest.approx(ramps.uamt_threshold(1, 2, 3))
        assert values["uncertainty/threshold"] > 0.75 * math.log(3) - 1e-6
    net, config = load_specialist(tmp_path / specialist / "iter_2.pth")
    assert config["n_classes"] == 3
    assert 0.0 <= trainer.best["dice"] <= 1.0
    assert json.loads((tmp_path / specialist / "config.json").read_text())["num_classes"] == 3


def test_k_class_supervised_loss_and_threshold():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4)
    labels = torch.randint(0, 3, (2, 4, 4, 4))
    loss, terms = losses.ce_dice_loss(logits, labels)
    prob = F.softmax(logits, dim=1)
    want_dice = (losses.dice_loss(prob[:, 1], labels == 1) + losses.dice_loss(prob[:, 2], labels == 2)) / 2
    torch.testing.assert_close(terms["dice"], want_dice)
    torch.testing.assert_close(loss, 0.5 * (F.cross_entropy(logits, labels) + want_dice))
    # two classes: UA-MT's formula exactly
    two = logits[:, :2]
    lab2 = labels.clamp(max=1)
    assert torch.equal(losses.ce_dice_loss(two, lab2)[1]["dice"], losses.dice_loss(F.softmax(two, 1)[:, 1], lab2 == 1))
    assert ramps.uamt_threshold(0, 6000) == ramps.uamt_threshold(0, 6000, 2)
    assert ramps.uamt_threshold(6000, 6000, 3) == pytest.approx(math.log(3))


@pytest.mark.parametrize("term,prompt", [("semisam", "point"), ("semisam_plus", "unc")])
def test_k_class_generalist_terms(three_class, tmp_path, term, prompt):
    dataset, _ = three_class
    sams = [write_tiny_sam(tmp_path / "sam", seed=s, name=f"sam{s}.pth") for s in range(2 if term == "semisam_plus" else 1)]
    args = _args(dataset, tmp_path, term, "--prompt", prompt, "--geometry", "resample",
                 *sam_args([c for c, _ in sams], sams[0][1]))
    trainer = train_main({"specialist": "mt", "generalist_term": term}, args)
    values = trainer.last_result.values
    assert all(math.isfinite(v) for v in values.values()) and values["loss/generalist"] > 0
    assert 0 <= values["generalist/foreground_fraction"] <= 1 and 0 <= values["generalist/mean_confidence"] <= 1
    assert set(torch.unique(trainer.last_result.visuals["unlabeled/pseudo_label"]).tolist()) <= {0.0, 1.0, 2.0}


def _answer(mask, conf):
    z = torch.tensor(0.0)
    return PseudoLabels(torch.tensor(mask, dtype=torch.float32), torch.tensor(conf), (),
                        GeneralistStats(z, z, 1, z, z, z))


def test_combine_classes_resolves_overlaps_by_confidence():
    # voxels: only class 1 | only class 2 | both, 2 more confident | both, tie | neither
    a1 = _answer([[1, 0, 1, 1, 0]], [[0.9, 0.8, 0.5, 0.7, 0.6]])
    a2 = _answer([[0, 1, 1, 1, 0]], [[0.3, 0.4, 0.6, 0.7, 0.2]])
    label, conf = combine_classes([a1, a2])
    assert label.tolist() == [[1, 2, 2, 1, 0]] and label.dtype == torch.int64
    torch.testing.assert_close(conf, torch.tensor([[0.9, 0.4, 0.6, 0.7, 0.2]]))
    # one class: its own mask and confidence (the binary case)
    label, conf = combine_classes([a1])
    assert label.tolist() == [[1, 0, 1, 1, 0]] and torch.equal(conf, a1.confidence)
