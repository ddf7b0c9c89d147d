"""The training command line and the part registries: every setting has a flag that shows its default, the
method flags list the registries, ``--print_config`` touches nothing, and a new part is one registered class
(the engine is not edited to use it)."""
import argparse
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from training.config import TrainConfig, build_parser, parse_config
from training.generalist_terms import GeneralistTerm
from training.methods import (CONSISTENCY_TERMS, GENERALIST_TERMS, SUPERVISED_LOSSES, MeanTeacherConsistency,
                              build_method)
from training.parts import Registry, Term, register_consistency, register_generalist_term
from training.run import main

from test_train_common import (CODE_DIR, one_thread,  # noqa: F401 (autouse)
                               read_iteration_lines, run_args, sam_args, write_tiny_sam, write_train_list)


def _option_actions(parser):
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def test_every_setting_has_a_flag_and_every_flag_shows_its_default():
    parser = build_parser({"exp": "LA/x"})
    dests = {a.dest for a in _option_actions(parser)}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert fields <= dests, f"settings without a flag: {sorted(fields - dests)}"
    assert dests - fields == {"print_config"}
    shown = [a for a in _option_actions(parser) if a.help != argparse.SUPPRESS]
    assert {a.dest for a in _option_actions(parser)} - {a.dest for a in shown} == {"stop_after"}   # hidden
    text = " ".join(parser.format_help().split())
    for action in shown:
        assert action.help, f"--{action.dest} has no help text, so -h would not show its default"
    # ArgumentDefaultsHelpFormatter appends the default to each help text: one per shown flag
    assert text.count("(default: ") == len(shown)
    assert "(default: auto)" in text and "(default: LA/x)" in text and "(default: None)" in text
    assert parse_config({}, []).channels_last is None                  # 'auto' is still None in the config
    assert parse_config({}, ["--channels_last", "0"]).channels_last is False


def test_method_flags_list_the_registries():
    text = " ".join(build_parser().format_help().split())
    for flag, registry in (("--supervised_loss", SUPERVISED_LOSSES), ("--specialist", CONSISTENCY_TERMS),
                           ("--generalist_term", GENERALIST_TERMS)):
        assert flag in text
        for name, cls in registry.items():
            assert f"{name}: {cls.__doc__.strip().splitlines()[0].rstrip('.')}" in text
    assert set(CONSISTENCY_TERMS) == {"none", "mt", "uamt"}
    assert set(GENERALIST_TERMS) == {"none", "semisam", "semisam_plus"} and set(SUPERVISED_LOSSES) == {"ce_dice"}


def test_registry_refuses_a_second_class_under_a_taken_name():
    reg = Registry("part")

    @reg.register
    class A(Term):
        name = "a"

    assert reg.register(A) is A                                   # the same class again is harmless

    class B(Term):
        name = "a"

    with pytest.raises(ValueError, match="part 'a' is registered twice"):
        reg.register(B)
    with pytest.raises(KeyError, match="part 'b' is not registered; choose from \\['a'\\]"):
        reg.build("b", None)


def test_print_config_prints_the_resolved_settings_and_touches_nothing(tmp_path):
    missing = tmp_path / "no_data"
    argv = ["--print_config", "--root_path", str(missing), "--model_dir", str(tmp_path / "model"),
            "--labeled_num", "8", "--lr_step", "100"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "train_LA_semisam_mt.py", *argv], cwd=CODE_DIR, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = json.loads(proc.stdout)
    import runpy
    settings = runpy.run_path(str(CODE_DIR / "train_LA_semisam_mt.py"), run_name="not_main")["SETTINGS"]
    assert printed == parse_config(settings, argv[1:]).to_dict()
    assert printed["labeled_num"] == 8 and printed["lr_step"] == 100 and printed["generalist_term"] == "semisam"
    assert list(tmp_path.iterdir()) == []                       # no data read (none there), no file written
    with pytest.raises(SystemExit) as exit_:
        parse_config({}, ["--print_config"])
    assert exit_.value.code == 0


# ------------------------------------------------------------------------------- a new part, one class
@pytest.fixture
def registered():
    """Registers the classes the test defines and removes them afterwards."""
    added = []
    yield added
    for registry, name in added:
        del registry[name]


def test_a_new_consistency_term_is_one_registered_class(registered):
    @register_consistency
    class HalvedMeanTeacher(MeanTeacherConsistency):
        """half the mean-teacher distance."""
        name = "mt_half"

        def __call__(self, batch):
            out = super().__call__(batch)
            out.loss = 0.5 * out.loss
            return out

    registered.append((CONSISTENCY_TERMS, "mt_half"))
    assert "mt_half: half the mean-teacher distance" in " ".join(build_parser().format_help().split())
    parts = build_method(parse_config({}, ["--specialist", "mt_half"]))
    assert isinstance(parts.consistency, HalvedMeanTeacher) and parts.needs_teacher


def test_a_generalist_term_using_sams_logits_needs_no_engine_change(registered, la_root, la_data_dir, tmp_path):
    """A term written against the branch's full output (here SAM's logits of each prompt variant) trains
    through the unchanged engine and logs under the generalist slot."""
    seen = {}

    @register_generalist_term
    class SoftLogitTerm(GeneralistTerm):
        """MSE to sigmoid of SAM's mean logits."""
        name = "soft_logits"

        def loss(self, student_fg_prob, labels):
            seen["variants"] = len(labels.variant_logits)
            target = torch.sigmoid(torch.stack(labels.variant_logits).mean(0)).clone()
            return ((student_fg_prob - target) ** 2).mean()

    registered.append((GENERALIST_TERMS, "soft_logits"))
    sam, cfg_json = write_tiny_sam(tmp_path / "sam")
    train_list = write_train_list(tmp_path, la_root)
    args = run_args(la_data_dir, train_list, tmp_path, "soft", iters=2) + sam_args([sam], cfg_json)
    trainer = main({"specialist": "none", "generalist_term": "soft_logits", "prompt": "mask"}, args)
    assert trainer.iteration == 2 and seen == {"variants": 1}
    rows = read_iteration_lines(tmp_path / "soft" / "log.txt")
    assert all(0.0 <= r["generalist"] <= 1.0 and "generalist/dice_vs_student" in r for r in rows)
    assert all(r["total"] == pytest.approx(r["supervised"] + r["weights/generalist"] * r["generalist"], rel=1e-4)
               for r in rows)


def test_print_config_of_the_evaluation_and_pretraining_scripts(tmp_path, capsys):
    import pretrain_generalist
    import test_LA
    ckpt = tmp_path / "model" / "iter_9.pth"
    assert test_LA.main(["--print_config", "--model_path", str(ckpt), "--root_path", str(tmp_path / "no_data")]) == {}
    printed = json.loads(capsys.readouterr().out)
    assert printed["model_path"] == str(ckpt) and printed["out_dir"] == str(ckpt.parent / "prediction" / "iter_9_post")
    assert printed["test_list"] == str(tmp_path / "no_data" / ".." / "test.list") and printed["stride_xy"] == 18
    assert pretrain_generalist.main(["--print_config", "--out", str(tmp_path / "g.pth"), "--iterations", "7"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["out"] == str(tmp_path / "g.pth") and printed["iterations"] == 7 and printed["progress"] is True
    assert list(tmp_path.iterdir()) == []
