"""The same entry point under DistributedDataParallel: 2 CPU processes (gloo), as torchrun would start them."""
import os
import socket

import torch
import torch.multiprocessing as mp

from test_train_common import (one_thread,  # noqa: F401 (autouse)
                               read_iteration_lines, run_args, sam_args, write_tiny_sam, write_train_list)

WORLD = 2
ITERS = 3
SETTINGS = {"specialist": "uamt", "generalist_term": "semisam", "prompt": "point"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, argv, result_dir):
    """One rank: the environment torchrun would set, then the shared main()."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from training.run import main
    trainer = main(SETTINGS, argv)
    torch.save({"student": trainer.student.state_dict(), "teacher": trainer.teacher.state_dict(),
                "loss": trainer.last_result.values["loss/total"], "iteration": trainer.iteration},
               os.path.join(result_dir, f"rank{rank}.pt"))


def test_two_ranks_stay_in_sync_and_only_rank0_writes(la_root, la_data_dir, tmp_path):
    sam, cfg_json = write_tiny_sam(tmp_path / "sam")
    train_list = write_train_list(tmp_path, la_root)
    argv = run_args(la_data_dir, train_list, tmp_path / "model", "ddp", "--save_every", "2", iters=ITERS) + \
        sam_args([sam], cfg_json)
    mp.spawn(_worker, args=(_free_port(), argv, str(tmp_path)), nprocs=WORLD, join=True)

    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert r0["iteration"] == r1["iteration"] == ITERS
    for part in ("student", "teacher"):
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), f"{part} {k} differs across ranks"
    assert r0["loss"] != r1["loss"]                 # each rank trained on its own batches

    out = tmp_path / "model" / "ddp"
    assert len(list((out / "log").glob("events.out.tfevents.*"))) == 1
    rows = read_iteration_lines(out / "log.txt")
    assert [r["iteration"] for r in rows] == list(range(1, ITERS + 1))      # logged once, by rank 0
    log = (out / "log.txt").read_text()
    assert log.count("save model to") == 2                                 # iter_2 and iter_3, once each
    state = torch.load(out / "train_state.pth", weights_only=True)
    assert state["config"]["world_size"] == WORLD and len(state["rng"]) == WORLD
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # per-rank random streams
    for k, v in torch.load(out / f"iter_{ITERS}.pth", weights_only=True).items():
        assert torch.equal(v, r0["student"][k])


def _stopping_worker(rank, port, argv, result_dir):
    """Like _worker, but rank 1 alone receives SIGTERM during its second step (as when a scheduler signals one
    process): every rank must stop after that same iteration and take part in saving the state."""
    import signal
    from training.engine import Trainer
    from training.interrupt import TrainingInterrupted
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    step = Trainer.train_step

    def train_step(self, batch):
        if rank == 1 and self.iteration == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batch)
    Trainer.train_step = train_step
    from training.run import main
    try:
        main(SETTINGS, argv)
        stopped = None
    except TrainingInterrupted as err:
        stopped = {"iteration": err.iteration, "saved": err.saved, "status": err.exit_status}
    torch.save(stopped, os.path.join(result_dir, f"stop{rank}.pt"))


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_iteration(la_root, la_data_dir, tmp_path):
    sam, cfg_json = write_tiny_sam(tmp_path / "sam")
    train_list = write_train_list(tmp_path, la_root)
    argv = run_args(la_data_dir, train_list, tmp_path / "model", "ddp_stop", iters=50) + sam_args([sam], cfg_json)
    mp.spawn(_stopping_worker, args=(_free_port(), argv, str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"stop{r}.pt", weights_only=True) for r in range(WORLD))
    assert r0 == r1 == {"iteration": 2, "saved": True, "status": 143}
    state = torch.load(tmp_path / "model" / "ddp_stop" / "train_state.pth", weights_only=True)
    assert state["iteration"] == 2 and len(state["rng"]) == WORLD
    log = (tmp_path / "model" / "ddp_stop" / "log.txt").read_text()
    assert "interrupted by SIGTERM at iteration 2" in log and "torchrun --nproc_per_node=2" in log
