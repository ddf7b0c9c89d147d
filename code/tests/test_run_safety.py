"""Issue 18's traps, replayed: a new run never replaces another run's files (1); what a run needs is checked
before its first iteration and its state is saved before its first validation (2); Ctrl-C and SIGTERM leave a
resumable state and the command that continues it (3); threads chosen from the load and logged (4); default
paths that do not depend on the working directory (5); ``-h`` shows every default (8); the malloc tuning only
where memory leaves room for it (11). (Trap 9, a file that is not a checkpoint: test_entry_errors.py.)
"""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from training import state as S
from training.interrupt import StopRequests, TrainingInterrupted, resume_command
from training.run import MALLOC_AUTO_HEADROOM, main, malloc_auto_decision, malloc_choice
from utils import runtime

from test_train_common import (one_thread,  # noqa: F401 (autouse)
                               CODE_DIR, assert_identical, run_args, write_train_list)

REPO = CODE_DIR.parent
MT = {"specialist": "mt"}


@pytest.fixture(scope="module")
def train_list(la_root, tmp_path_factory):
    return write_train_list(tmp_path_factory.mktemp("safety"), la_root)


def _state_weights(path: Path) -> dict:
    st = torch.load(path, weights_only=True)
    return {"student": st["student"], "teacher": st["teacher"],
            "momentum": [s["momentum_buffer"] for s in st["optimizer"]["state"].values()], "iteration": st["iteration"]}


# ------------------------------------------------------------------------------------ 1. overwrite
def test_a_run_folder_with_a_run_needs_resume_or_overwrite(la_data_dir, train_list, tmp_path):
    args = run_args(la_data_dir, train_list, tmp_path, "run", iters=1)
    main(MT, args)
    run = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match=r"run already holds a run \(config.json, iter_1.pth, log/, log.txt, "
                                         r"train_state.pth\); pass --resume to continue it, --overwrite"):
        main(MT, args)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before

    main(MT, args + ["--overwrite"])
    previous = [p for p in run.iterdir() if p.name.startswith("previous_")]
    assert len(previous) == 1 and re.fullmatch(r"previous_\d{8}T\d{6}Z", previous[0].name)
    assert {p.name: p.read_bytes() for p in previous[0].iterdir() if p.is_file()} == before   # moved, intact
    assert (previous[0] / "log").is_dir()
    log = (run / "log.txt").read_text()
    assert f"moved to {previous[0]}" in log and "--overwrite" in log
    assert log.count("settings:") == 1           # the new log starts afresh (the old one moved)
    assert (run / "train_state.pth").is_file() and (run / "iter_1.pth").is_file()


# --------------------------------------------------------------------------- 2. before the first iteration
def test_state_is_saved_before_the_first_validation_and_a_resume_validates_first(la_root, la_data_dir, train_list,
                                                                                 tmp_path, monkeypatch):
    from training.engine import Trainer
    val_list = tmp_path / "val.list"
    val_list.write_text((la_root / "test.list").read_text().splitlines()[0] + "\n")
    args = run_args(la_data_dir, train_list, tmp_path, "val", "--val_list", val_list, "--val_every", "2",
                    "--val_stride_xy", "32", "--val_stride_z", "16", iters=3)
    calls = []

    def failing_validation(self):
        calls.append(self.iteration)
        raise RuntimeError("validation broke")
    monkeypatch.setattr(Trainer, "validate", failing_validation)
    with pytest.raises(RuntimeError, match="validation broke"):
        main(MT, args)
    state = torch.load(tmp_path / "val" / "train_state.pth", weights_only=True)
    assert calls == [2] and state["iteration"] == 2 and state["pending_validation"] is True
    monkeypatch.undo()
    resumed = main(MT, args + ["--resume"])
    assert resumed.iteration == 3 and resumed.best is not None and resumed.best["iteration"] == 2
    log = (tmp_path / "val" / "log.txt").read_text()
    assert log.count("validation at iteration 2") == 1 and "validation at iteration 3" in log


def test_bf16_validation_path_is_probed_at_start(la_root, la_data_dir, train_list, tmp_path, monkeypatch):
    """--amp bf16 --val_every N: validation's inference path runs once before the first iteration, so a device
    that cannot run it stops the run there (here: simulated), with nothing written."""
    import training.engine as E
    monkeypatch.setattr(E, "check_bf16_training", lambda *a, **k: None)

    def broken(device):
        raise E.ConfigError("--amp bf16 with --val_every: this device (cpu) cannot run validation's bfloat16 "
                            "inference (simulated)")
    monkeypatch.setattr(E, "check_bf16_validation", broken)
    val_list = tmp_path / "val.list"
    val_list.write_text((la_root / "test.list").read_text().splitlines()[0] + "\n")
    with pytest.raises(ValueError, match="cannot run validation's bfloat16"):
        main(MT, run_args(la_data_dir, train_list, tmp_path, "bf16", "--amp", "bf16", "--val_list", val_list,
                          "--val_every", "2", iters=2))
    assert not (tmp_path / "bf16").exists()


def test_the_real_bf16_validation_probe_passes_where_bf16_is_native_and_refuses_elsewhere():
    from training.amp_check import check_bf16_validation
    from utils.bf16 import NoNativeBf16Error, native_cpu_bf16
    before = torch.get_rng_state()
    if native_cpu_bf16():
        check_bf16_validation(torch.device("cpu"))
    else:   # a CPU without native bfloat16: refused with the one-line reason, before any inference
        with pytest.raises(NoNativeBf16Error, match=r"--amp bf16 \(validation\): this CPU has no native bfloat16"):
            check_bf16_validation(torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before)      # the run's random streams are untouched


# ------------------------------------------------------------------------------------ 3. signals
def test_stop_requests_defer_the_first_signal_and_stop_at_the_second():
    stop = StopRequests()
    before = signal.getsignal(signal.SIGINT)
    with stop.installed():
        with stop.deferring():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert stop.requested == signal.SIGINT
            with pytest.raises(TrainingInterrupted) as second:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.5)
        assert second.value.exit_status == 130
    assert signal.getsignal(signal.SIGINT) is before
    assert TrainingInterrupted(signal.SIGTERM).exit_status == 143


def test_resume_command_keeps_the_flags_and_adds_resume():
    assert resume_command(["--exp", "a b", "--overwrite", "--seed", "3"], "train_LA_mt.py").endswith(
        "train_LA_mt.py --exp 'a b' --seed 3 --resume")
    assert resume_command(["--resume", "x/train_state.pth", "--overwrite", "1"], "t.py").endswith("t.py --resume")
    assert resume_command(["--seed", "1"], "t.py", world_size=2) == "torchrun --nproc_per_node=2 t.py --seed 1 --resume"


def _start(args, tmp_path, name, command=("train_LA_mt.py",)):
    env = dict(os.environ, OMP_NUM_THREADS="1", SEMISAM_NO_REEXEC="1")
    out, err = open(tmp_path / f"{name}.out", "w"), open(tmp_path / f"{name}.err", "w")
    return subprocess.Popen([sys.executable, *command, *args], cwd=CODE_DIR, env=env, stdout=out, stderr=err)


def _signal_after(proc, log: Path, iteration: int, signum: int) -> None:
    deadline = time.time() + 240
    while not (log.is_file() and f"] iteration {iteration} :" in log.read_text()):
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.time() < deadline, "the run did not reach its first iterations"
        time.sleep(0.1)
    proc.send_signal(signum)


def test_ctrl_c_saves_a_resumable_state_and_the_logged_command_continues_bit_identically(la_data_dir, train_list,
                                                                                       tmp_path):
    """SIGINT after the first iterations: exit 130 without a traceback, log.txt says where the state is and
    the exact command that resumes; that command (with a stop two iterations later) ends bit-identical to a
    run never interrupted (DataLoader workers included: the terminal's Ctrl-C reaches them too)."""
    args = run_args(la_data_dir, train_list, tmp_path, "int", "--num_workers", "2", "--save_every", "1000",
                    iters=1000)
    proc = _start(args, tmp_path, "first")
    _signal_after(proc, tmp_path / "int" / "log.txt", 1, signal.SIGINT)
    assert proc.wait(timeout=240) == 130
    err = (tmp_path / "first.err").read_text()
    assert "Traceback" not in err, err[-3000:]
    log = (tmp_path / "int" / "log.txt").read_text()
    line = next(x for x in log.splitlines() if "interrupted by SIGINT" in x)
    k = int(re.search(r"at iteration (\d+)", line).group(1))
    assert f"resumable state saved to {tmp_path / 'int' / 'train_state.pth'}" in line
    assert S.load_train_state(tmp_path / "int" / "train_state.pth")["iteration"] == k
    command = line.split("continue with: ", 1)[1]
    argv = shlex.split(command)
    assert argv[-1] == "--resume" and argv[1] == "train_LA_mt.py"

    stop = k + 2
    resumed = subprocess.run([sys.executable, *argv[1:], "--stop_after", str(stop)], cwd=CODE_DIR,
                             env=dict(os.environ, OMP_NUM_THREADS="1", SEMISAM_NO_REEXEC="1"),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full = main(MT, run_args(la_data_dir, train_list, tmp_path, "full", "--num_workers", "2",
                             "--save_every", "1000", "--stop_after", stop, iters=1000))
    got = _state_weights(tmp_path / "int" / "train_state.pth")
    assert got.pop("iteration") == stop == full.iteration
    assert_identical(got, {"student": full.student.state_dict(), "teacher": full.teacher.state_dict(),
                           "momentum": [s["momentum_buffer"] for s in full.optimizer.state_dict()["state"].values()]})


def test_a_caller_that_is_not_a_training_script_logs_its_own_resume_hint(la_data_dir, train_list, tmp_path):
    """demo.py and study_generalist.py train through training.run.main without flags of their own: an
    interrupted run's log says what their user should do, not a `<script> --resume` that does not exist."""
    program = ("import sys; from training.run import main; "
               "main({'specialist': 'mt'}, sys.argv[1:], resume_hint='running the same study again resumes')")
    proc = _start(run_args(la_data_dir, train_list, tmp_path, "hint", iters=1000), tmp_path, "hint", ("-c", program))
    _signal_after(proc, tmp_path / "hint" / "log.txt", 1, signal.SIGINT)
    proc.wait(timeout=240)
    line = next(x for x in (tmp_path / "hint" / "log.txt").read_text().splitlines() if "interrupted by SIGINT" in x)
    assert line.endswith("train_state.pth; running the same study again resumes") and "--resume" not in line


def test_sigterm_saves_and_exits_143(la_data_dir, train_list, tmp_path):
    args = run_args(la_data_dir, train_list, tmp_path, "term", iters=1000)
    proc = _start(args, tmp_path, "term")
    _signal_after(proc, tmp_path / "term" / "log.txt", 1, signal.SIGTERM)
    assert proc.wait(timeout=240) == 143
    assert "Traceback" not in (tmp_path / "term.err").read_text()
    log = (tmp_path / "term" / "log.txt").read_text()
    assert "interrupted by SIGTERM" in log and "--resume" in log
    assert S.load_train_state(tmp_path / "term" / "train_state.pth")["iteration"] >= 1


# ------------------------------------------------------------------------------------ 4. threads
def test_threads_default_to_the_idle_cores_and_are_logged(la_data_dir, train_list, tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "usable_cores", lambda: 8)
    monkeypatch.setattr(os, "getloadavg", lambda: (5.2, 0.0, 0.0))
    assert runtime.default_threads() == 3 and runtime.default_threads(share=2) == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (20.0, 0.0, 0.0))
    assert runtime.default_threads() == 1
    args = [a for a in run_args(la_data_dir, train_list, tmp_path, "thr", iters=1)]
    i = args.index("--threads")
    args[i + 1] = "0"
    main(MT, args)
    assert torch.get_num_threads() == 1
    assert "1 torch thread(s): the cores left idle by the load (8 usable" in (tmp_path / "thr" / "log.txt").read_text()


# ------------------------------------------------------------------------------------ 5. paths
@pytest.mark.parametrize("script", ["train_LA_semisam_plus.py", "test_LA.py"])
def test_default_paths_are_the_same_from_code_and_from_the_repository_root(script, tmp_path):
    def resolved(cwd: Path, command: str) -> dict:
        proc = subprocess.run([sys.executable, command, "--print_config"], cwd=cwd, capture_output=True, text=True,
                              timeout=120, env=dict(os.environ, SEMISAM_NO_REEXEC="1"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        cfg = json.loads(proc.stdout[proc.stdout.index("{"):])
        keys = ("root_path", "train_list", "model_dir", "generalist", "model_path", "test_list", "out_dir")
        return {k: [os.path.normpath(cwd / p) for p in v] if isinstance(v, list) else os.path.normpath(cwd / v)
                for k, v in cfg.items() if k in keys and v}
    from_code = resolved(CODE_DIR, script)
    assert from_code == resolved(REPO, f"code/{script}")
    assert any(v == str(REPO / "data" / "2018LA_Seg_Training Set") for v in from_code.values())
    for v in from_code.values():
        for p in (v if isinstance(v, list) else [v]):
            assert p.startswith(str(REPO) + os.sep), p


def test_a_path_given_on_the_command_line_stays_relative_to_the_working_directory():
    from training.config import parse_config
    cfg = parse_config({}, ["--model_dir", "mine"])
    assert cfg.model_dir == "mine" and cfg.root_path == os.path.relpath(REPO / "data" / "2018LA_Seg_Training Set")


# ------------------------------------------------------------------------------------ 8. -h
HELP_SCRIPTS = ["train_LA_mt.py", "test_LA.py", "predict.py", "test.py", "prepare_dataset.py", "release_model.py",
                "plot_training.py", "pretrain_generalist.py", "make_phantoms.py"]


def option_blocks(text: str) -> list[str]:
    """Each option's lines of an argparse help text, joined (the description before the options is skipped)."""
    blocks, inside = [], False
    for line in text.splitlines():
        if re.match(r"^(options|optional arguments|[a-z].*):$", line):
            inside = True
        elif inside and re.match(r"^  -", line):
            blocks.append(line.strip())
        elif inside and blocks and re.match(r"^\s{3,}\S", line):
            blocks[-1] += " " + line.strip()
    return blocks


def test_every_script_help_shows_every_default():
    procs = {s: subprocess.Popen([sys.executable, s, "-h"], cwd=CODE_DIR, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for s in HELP_SCRIPTS}
    for script, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, (script, err[-2000:])
        blocks = [b for b in option_blocks(out) if not b.startswith("-h, --help")]
        assert len(blocks) >= 3, (script, out)
        missing = [b.split()[0] for b in blocks if "default" not in b.lower()]
        assert not missing, f"{script}: -h shows no default for {missing}"
        if script == "train_LA_mt.py":
            for flag in ("--patch_size", "--max_iterations", "--batch_size", "--amp", "--threads", "--overwrite"):
                assert any(b.startswith(flag) for b in blocks), flag
            assert re.search(r"--channels_last .*\(default: auto\)", out.replace("\n", " "))
            assert re.search(r"--tune_malloc .*\(default: auto\)", " ".join(out.split()))


# ------------------------------------------------------------------------------------ 11. malloc
def test_malloc_tuning_auto_follows_available_memory(la_data_dir, train_list, tmp_path, monkeypatch):
    assert malloc_choice(True) == (True, "--tune_malloc 1") and malloc_choice(False)[0] is False
    assert malloc_choice(None) == (None, "--tune_malloc auto: decided after the first training step")
    gib = 2**30
    on, why = malloc_auto_decision(peak=6 * gib, available=int(6 * gib * MALLOC_AUTO_HEADROOM))
    assert on is True and why == "--tune_malloc auto: 6.0 GiB available >= 1 x the 6.0 GiB peak of the first step"
    on, why = malloc_auto_decision(peak=6 * gib, available=5 * gib)
    assert on is False and "5.0 GiB available < 1 x the 6.0 GiB peak" in why
    assert malloc_auto_decision(None, 64 * gib)[0] is False and malloc_auto_decision(gib, None)[0] is False
    on, why = malloc_auto_decision(peak=6 * gib, available=20 * gib, processes=4)   # 4 DDP ranks share it
    assert on is False and why.endswith("peak of the first step per process (4 on this machine)")
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       65536000 kB\nMemAvailable:   40000000 kB\n")
    assert runtime.mem_available_bytes(str(meminfo)) == 40000000 * 1024
    assert runtime.mem_available_bytes(str(tmp_path / "none")) is None
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmHWM:\t  123456 kB\nVmRSS:\t  1000 kB\n")
    assert runtime.peak_rss_bytes(str(status)) == 123456 * 1024 and runtime.peak_rss_bytes(str(meminfo)) is None
    assert runtime.peak_rss_bytes() > 0          # this process, on Linux

    import training.run as R
    args = run_args(la_data_dir, train_list, tmp_path, "mal", iters=2)
    i = args.index("--tune_malloc")
    auto_args = args[:i] + args[i + 2:]
    # short of memory after the first step: stays untuned, and says so
    monkeypatch.setattr(R, "mem_available_bytes", lambda: 2**20)
    monkeypatch.setattr(R, "tune_malloc", lambda: pytest.fail("tuned although memory is short"))
    main(MT, auto_args)
    log = (tmp_path / "mal" / "log.txt").read_text()
    assert "glibc malloc tuning --tune_malloc auto: decided after the first training step" in log
    assert re.search(r"glibc malloc tuning off from here \(--tune_malloc auto: 0\.0 GiB available < 1 x the "
                     r"[\d.]+ GiB peak of the first step\)", log)
    assert log.index("malloc tuning off from here") > log.index("iteration 1 ")
    assert "iteration 2 " in log
    # room for it: tuned once, after the first step
    calls = []
    monkeypatch.setattr(R, "mem_available_bytes", lambda: 1024 * gib)
    monkeypatch.setattr(R, "tune_malloc", lambda: calls.append(1) or True)
    main(MT, auto_args + ["--overwrite"])
    log = (tmp_path / "mal" / "log.txt").read_text()
    assert calls == [1] and "glibc malloc tuning on from here (--tune_malloc auto: 1024.0 GiB available >= 1 x" in log