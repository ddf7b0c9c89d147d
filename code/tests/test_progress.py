"""Progress of long stages (utils.progress): a bar on a terminal, plain periodic lines in a pipe or a log."""
import io
import re

import pytest

from training.config import TrainConfig
from training.outputs import RunOutput
from utils import progress as P
from utils.progress import Progress, format_seconds


class Clock:
    """A fake time.perf_counter, advanced by hand."""

    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(P, "_now", c)
    return c


def test_lines_every_five_percent_with_loss_elapsed_and_eta(clock):
    stream = io.StringIO()
    p = Progress(100, desc="train MT", stream=stream)   # a StringIO is not a terminal
    for _ in range(100):
        clock.t += 2.0
        p.update(loss=0.5)
    p.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 20
    assert lines[0] == "[train MT] 5/100 (5%)  loss 0.5  elapsed 0:00:10  ETA 0:03:10"
    assert lines[-1] == "[train MT] 100/100 (100%)  loss 0.5  elapsed 0:03:20  ETA 0:00:00"


def test_slow_steps_get_a_line_every_30_seconds_and_a_resume_counts_from_its_start(clock):
    stream = io.StringIO()
    p = Progress(1000, desc="pretrain generalist", initial=500, stream=stream)
    clock.t += 31.0
    p.update(loss=1.25, dice=0.5)            # 501 is no multiple of 50, but 31 s passed
    clock.t += 1.0
    p.update(loss=1.0, dice=0.5)             # 1 s later: no line
    lines = stream.getvalue().splitlines()
    assert lines == ["[pretrain generalist] 501/1000 (50%)  loss 1.25  dice 0.5  elapsed 0:00:31  ETA 4:17:49"]


def test_disabled_or_forced_bar_prints_no_lines(clock, capsys):
    stream = io.StringIO()
    p = Progress(10, desc="x", enabled=False, stream=stream)
    for _ in range(10):
        p.update()
    bar = Progress(10, desc="x", bar=True, stream=stream)
    for _ in range(10):
        bar.update(loss=0.1)
    bar.close()
    assert stream.getvalue() == "" and "10/10" in capsys.readouterr().err


def test_format_seconds():
    assert format_seconds(0) == "0:00:00" and format_seconds(3725.9) == "1:02:05" and format_seconds(-3) == "0:00:00"


def test_training_output_prints_progress_lines_when_stdout_is_not_a_terminal(tmp_path, capsys):
    out = RunOutput(TrainConfig(exp="LA/MT", model_dir=str(tmp_path), progress=True))
    out.start_progress(0, 40)
    for i in range(40):
        out.advance(1.0 / (i + 1))
    out.close()
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[train LA/MT]")]
    assert len(lines) == 20
    assert re.fullmatch(r"\[train LA/MT\] 40/40 \(100%\)  loss 0\.025  elapsed \d+:\d\d:\d\d  ETA 0:00:00", lines[-1])
    quiet = RunOutput(TrainConfig(exp="LA/MT", model_dir=str(tmp_path), progress=False))
    quiet.start_progress(0, 40)
    quiet.advance(1.0)
    quiet.close()
    assert "[train" not in capsys.readouterr().out
