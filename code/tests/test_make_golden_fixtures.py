"""make_golden_fixtures.py without the official code: the fixtures' recipe (utils/golden.py) run on this
repository's own networks reproduces the shared golden files a, which proves the recipe (configs, seeds,
re-randomisation order, inputs, calls, hook taps, file layout) that the script runs on the official modules; plus
the script's refusals (a work tree at another commit: one line, exit status 2) and its --compare failure (exit 1)."""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import make_golden_fixtures as mgf
from networks.sam_med3d import ImageEncoderViT3D, MaskDecoder3D, PromptEncoder3D, Sam3D
from networks.vnet import VNet
from utils import golden

CODE_DIR = Path(__file__).resolve().parents[1]
OURS = golden.OfficialModules(ImageEncoderViT3D, PromptEncoder3D, MaskDecoder3D, Sam3D, VNet)


def _assert_reproduces(new, fx):
    """Same layout (key order at every level), inputs and state_dict bit for bit, every tensor within the
    fixtures' tolerance, every other value equal (meta's generator aside)."""
    assert list(new) == list(fx)
    for key in fx:
        if isinstance(fx[key], dict):
            assert list(new[key]) == list(fx[key]), key
    exact = [("state_dict", k) for k in fx["state_dict"]]
    exact += [("inputs", k) for k in fx["inputs"]] if "inputs" in fx else [("input", None)]
    for key, name in exact:
        got, want = (new[key], fx[key]) if name is None else (new[key][name], fx[key][name])
        assert got.dtype == want.dtype and torch.equal(got, want), f"{key} {name}"
    report = golden.compare_tensors(new, fx)
    assert not report["failures"], report["failures"]
    failures, notes = golden.compare_values(new, fx, lambda path: path == "meta/generator")
    assert not failures, failures


@pytest.mark.parametrize("which", ["sam", "vnet"])
def test_recipe_on_our_networks_reproduces_fixture_a(fixtures_dir, which):
    name = {"sam": "sam3d_golden_a.pt", "vnet": "vnet_golden_a.pt"}[which]
    fx = torch.load(fixtures_dir / name, weights_only=True)
    make = golden.make_sam_fixture if which == "sam" else golden.make_vnet_fixture
    new = make(OURS, "a", fx["meta"]["official_sources"])
    _assert_reproduces(new, fx)
    assert new["meta"]["generator"] == golden.GENERATOR


def test_fixture_b_recipe_matches_the_documented_sizes():
    """b is held back from this repository: check what the fixtures' README says about it."""
    for which, entries, values in (("a", 174, 576_828), ("b", 181, 599_198)):
        spec = golden.SAM_FIXTURES[which]
        model = golden.randomize_(golden.build_sam(OURS, spec["config"], spec["seed"]), spec["seed"] + 1)
        sd = model.state_dict()
        assert (len(sd), sum(v.numel() for v in sd.values())) == (entries, values), which
    rel = [b.attn.rel_pos_d.shape for b in model.image_encoder.blocks]
    assert [b.window_size for b in model.image_encoder.blocks] == [4, 4, 0] and rel == [(7, 16), (7, 16), (11, 16)]
    inputs = golden.sam_inputs(spec["config"], spec["seed"] + 2, spec["n_points"], spec["float_points"])
    assert inputs["point_coords"].dtype == torch.float32 and inputs["point_coords"].shape == (1, 5, 3)
    assert inputs["mask_input"].shape == (1, 1, 24, 24, 24) and inputs["point_labels"][0, :2].tolist() == [1, 0]
    spec = golden.VNET_FIXTURES["b"]
    assert len(golden.build_vnet(OURS, spec["config"], 0).state_dict()) == 60


def test_randomize_refuses_an_entry_without_a_rule():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    net.register_buffer("mystery", torch.zeros(2))
    with pytest.raises(ValueError, match="mystery"):
        golden.randomize_(net, 0)


def _git(repo, *args):
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)


def test_a_work_tree_at_another_commit_is_refused_with_one_line(tmp_path):
    repo = tmp_path / "SemiSAM"
    for rel in mgf.PINNED["semisam"].files:
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_text("# not the official file\n")
    _git(repo.parent, "init", "-q", str(repo))
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "x")
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "make_golden_fixtures.py", "--semisam", str(repo), "--uamt", str(repo),
                           "--sam_med3d", str(repo), "--out", str(out), "--threads", "1"],
                          cwd=CODE_DIR, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"make_golden_fixtures.py: error: --semisam {repo} is at commit {head}, not the pinned "
                     f"{mgf.PINNED['semisam'].commit} of YichiZhang98/SemiSAM: run `git -C {repo} checkout "
                     f"{mgf.PINNED['semisam'].commit}`, or pass --allow_other_commit"], proc.stderr
    assert not out.exists()
    assert mgf.check_source("semisam", repo, allow_other_commit=True) == head


def test_sources_must_be_all_three_or_clone(tmp_path):
    for argv in ([], ["--clone", "--uamt", str(tmp_path)], ["--uamt", str(tmp_path)]):
        with pytest.raises(mgf.ConfigError, match="either --clone or all three"):
            mgf.main(argv + ["--out", str(tmp_path / "out")])


@pytest.fixture
def script_on_our_networks(monkeypatch, tmp_path):
    """The script with this repository's networks in place of the official modules (no official code here)."""
    monkeypatch.setattr(mgf, "check_source", lambda key, folder, *a: mgf.PINNED[key].commit)
    monkeypatch.setattr(mgf, "load_sam_code", lambda folder, tag: (ImageEncoderViT3D, PromptEncoder3D, MaskDecoder3D,
                                                                   Sam3D, None))
    monkeypatch.setattr(mgf, "load_vnet", lambda path, tag: VNet)

    def run(*extra):
        return mgf.main(["--semisam", str(tmp_path), "--uamt", str(tmp_path), "--sam_med3d", str(tmp_path),
                         "--out", str(tmp_path / "out"), "--threads", "1", "--only", "vnet_golden_a.pt", *extra])
    return run


def test_compare_passes_within_tolerance_and_fails_on_a_perturbed_file(fixtures_dir, tmp_path, capsys,
                                                                        script_on_our_networks):
    info = script_on_our_networks("--compare", str(fixtures_dir))
    report = info["compare"]["vnet_golden_a.pt"]
    assert report["tensors"] == 212 and not report["failures"]
    assert all(note.startswith("meta/generator") for note in report["notes"])
    assert all(not r["failures"] for r in info["verify"].values())
    assert torch.load(tmp_path / "out" / "vnet_golden_a.pt", weights_only=True)["meta"]["official_sources"] == {
        "uamt_commit": mgf.PINNED["uamt"].commit, "semisam_commit": mgf.PINNED["semisam"].commit,
        "path": "code/networks/vnet.py"}

    fx = torch.load(fixtures_dir / "vnet_golden_a.pt", weights_only=True)
    bad = copy.deepcopy(fx)
    bad["intermediates"]["block_five"][0, 3, 1, 1, 0] += 1e-3
    (tmp_path / "ref").mkdir()
    torch.save(bad, tmp_path / "ref" / "vnet_golden_a.pt")
    with pytest.raises(mgf.ConfigError, match="--overwrite"):
        script_on_our_networks("--compare", str(tmp_path / "ref"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        script_on_our_networks("--compare", str(tmp_path / "ref"), "--overwrite")
    assert exit_info.value.code == 1
    out, err = capsys.readouterr()
    assert "intermediates/block_five: max abs diff 0.001 beyond rtol 0.0001 / atol 1e-05" in out
    assert err.strip().splitlines()[-1].endswith("error: 1 check(s) failed: vnet_golden_a.pt vs --compare")


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        mgf.main(["-h"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "bit-exact only with the same torch version and --threads" in text
    for flag in ("--semisam", "--clone", "--cache", "--out", "--compare", "--threads", "--only",
                 "--allow_other_commit"):
        assert flag in text
    assert "--threads THREADS torch CPU threads" in text and "(default: 2)" in text
