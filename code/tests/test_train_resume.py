"""Exact resume, atomic train-state writes, and the non-finite-loss stop."""
import pytest
import torch

from training import methods, state as S
from utils import io
from training.engine import NonFiniteLossError
from training.run import main

from test_train_common import (one_thread,  # noqa: F401 (autouse)
                               assert_identical, run_args, sam_args, weights, write_tiny_sam, write_train_list)

METHOD = {"specialist": "uamt", "generalist_term": "semisam", "prompt": "point"}
N = 4


@pytest.fixture(scope="module")
def setup(la_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume")
    sam, cfg_json = write_tiny_sam(folder)
    return dict(train_list=write_train_list(folder, la_root), sam=sam, cfg_json=cfg_json)


def _args(setup, la_data_dir, model_dir, exp, *extra):
    return run_args(la_data_dir, setup["train_list"], model_dir, exp, *extra, iters=N) + \
        sam_args([setup["sam"]], setup["cfg_json"])


def test_interrupted_and_resumed_run_is_bit_identical(setup, la_data_dir, tmp_path):
    """UA-MT + SemiSAM (teacher noise, dropout, T passes, random clicks, augmentation): stop after 2 of 4
    iterations, resume (with DataLoader workers this time), end bit-identical to the uninterrupted run."""
    full = main(METHOD, _args(setup, la_data_dir, tmp_path, "full"))
    first = main(METHOD, _args(setup, la_data_dir, tmp_path, "split", "--stop_after", "2"))
    assert first.iteration == 2
    out = tmp_path / "split"
    assert not (out / f"iter_{N}.pth").exists()
    saved = torch.load(out / "train_state.pth", weights_only=True)
    assert saved["iteration"] == 2 and saved["sampler"]["next_batch"] == 2
    assert saved["config"]["max_iterations"] == N and len(saved["rng"]) == 1
    assert saved["rng"][0]["generator"] is not None        # the click generator travels with the state
    resumed = main(METHOD, _args(setup, la_data_dir, tmp_path, "split", "--resume", "--num_workers", "2"))
    assert resumed.iteration == N
    assert_identical(weights(full), weights(resumed))
    assert torch.equal(full.term_generator.get_state(), resumed.term_generator.get_state())
    assert torch.equal(torch.load(tmp_path / "full" / f"iter_{N}.pth", weights_only=True)["out_conv.weight"],
                       torch.load(out / f"iter_{N}.pth", weights_only=True)["out_conv.weight"])
    assert "resumed from" in (out / "log.txt").read_text()


def test_resume_refuses_a_different_experiment_and_plain_weights(setup, la_data_dir, tmp_path):
    main(METHOD, _args(setup, la_data_dir, tmp_path, "base", "--stop_after", "1"))
    state = tmp_path / "base" / "train_state.pth"
    with pytest.raises(S.TrainStateError, match=r"settings differ \(patch_size"):
        main(METHOD, _args(setup, la_data_dir, tmp_path, "other", "--resume", str(state))
             + ["--patch_size", "32", "32", "32"])
    plain = tmp_path / "plain.pth"
    torch.save({"block_one.conv.0.weight": torch.zeros(1)}, plain)
    with pytest.raises(S.TrainStateError, match="plain iter_N.pth holds only student weights"):
        main(METHOD, _args(setup, la_data_dir, tmp_path, "other2", "--resume", str(plain)))
    with pytest.raises(FileNotFoundError, match="nope.pth does not exist"):
        main(METHOD, _args(setup, la_data_dir, tmp_path, "other3", "--resume", str(tmp_path / "nope.pth")))


def test_crash_while_writing_keeps_the_previous_state(setup, la_data_dir, tmp_path, monkeypatch):
    trainer = main({"specialist": "mt"}, run_args(la_data_dir, setup["train_list"], tmp_path, "atomic", iters=2))
    path = trainer.state_path
    before = path.read_bytes()

    def crash(obj, f):
        f.write(b"half a checkpoint")          # the temporary file gets some bytes, then the process dies
        raise OSError("simulated crash during write")

    monkeypatch.setattr(io, "_serialize", crash)   # the serializer behind every checkpoint write
    trainer.iteration = 99
    with pytest.raises(OSError, match="simulated crash"):
        trainer.save_state()
    assert path.read_bytes() == before
    assert S.load_train_state(path)["iteration"] == 2
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".train_state.pth.tmp")]
    # and a normal write replaces the file as a whole
    monkeypatch.undo()
    trainer.save_state()
    assert S.load_train_state(path)["iteration"] == 99


def test_non_finite_loss_stops_with_a_clear_message(setup, la_data_dir, tmp_path, monkeypatch):
    real = methods.SUPERVISED_LOSSES["ce_dice"]
    calls = {"n": 0}

    class NanOnFourthStep(real):          # a supervised part (training.parts.Term) returning a TermOutput
        def __call__(self, batch):
            calls["n"] += 1
            out = super().__call__(batch)
            if calls["n"] == 4:
                out.loss = out.loss * float("nan")
            return out

    monkeypatch.setitem(methods.SUPERVISED_LOSSES, "ce_dice", NanOnFourthStep)
    args = run_args(la_data_dir, setup["train_list"], tmp_path, "nan", "--save_every", "2", iters=6)
    with pytest.raises(NonFiniteLossError) as err:
        main({"specialist": "mt"}, args)
    msg = str(err.value)
    assert "non-finite loss at iteration 3" in msg and "supervised=nan" in msg and "consistency=" in msg
    assert "train_state.pth (iteration 2)" in msg
    out = tmp_path / "nan"
    state = S.load_train_state(out / "train_state.pth")
    assert state["iteration"] == 2
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())
    assert not (out / "iter_4.pth").exists()
    assert "non-finite loss at iteration 3" in (out / "log.txt").read_text()
