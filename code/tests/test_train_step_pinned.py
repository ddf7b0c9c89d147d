"""Pinned numerics of the training step: every method's logged values and final weights, exactly.

Three steps of each method (sup, mt, uamt, semisam, semisam_plus with the 'unc' prompt and two generalists)
on tiny phantom data (``dataloaders.phantoms``, 48 x 48 x 32 volumes, 32 x 32 x 16 patches, V-Net
n_filters 4) with tiny random SAM-Med3D generalists (``test_train_common.write_tiny_sam``). The expected
values were recorded from the code before the step's parts got their common interface (commit 968e829); a
refactor of the engine, the method parts or the generalist branch must reproduce them bit for bit. They were
re-recorded when the phantom generator changed (version 2, issue 20): 968e829's engine with the new phantoms and
the current engine gave bit-identical values. Re-recorded for phantoms version 3 (each scan's intensity scale and
offset) on the project's AMD EPYC machine with the engine unchanged since.

Floating-point results depend on the CPU's kernels (oneDNN's blocking follows the processor, not only its
instruction set): the values below are exact on the recorded machine (ATen capability and CPU model, oneDNN
unrestricted); elsewhere they are compared with a relative tolerance (the weights' hash is then not comparable
and only the weights' sums are checked).
"""
import hashlib
import math
import os

import pytest
import torch

from dataloaders.phantoms import write_phantom_dataset
from training.config import parse_config
from training.engine import Trainer
from training.outputs import RunOutput

from test_train_common import one_thread, run_args, sam_args, write_tiny_sam  # noqa: F401 (autouse)

ITERS = 3
SHORT_RAMPS = dict(rampup_block=1, consistency_rampup=4.0, sam_rampdown=4.0)
METHODS = {
    # name: (script settings, number of tiny generalists)
    "sup": (dict(specialist="none", generalist_term="none"), 0),
    "mt": (dict(specialist="mt", generalist_term="none"), 0),
    "uamt": (dict(specialist="uamt", generalist_term="none"), 0),
    "semisam": (dict(specialist="mt", generalist_term="semisam", prompt="point"), 1),
    "semisam_plus_unc": (dict(specialist="mt", generalist_term="semisam_plus", prompt="unc"), 2),
}
RECORDED_CAPABILITY = "AVX512"
RECORDED_CPU = "AMD EPYC"      # /proc/cpuinfo "model name" of the recording machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def on_recorded_machine() -> bool:
    return (torch.backends.cpu.get_cpu_capability() == RECORDED_CAPABILITY and cpu_model() == RECORDED_CPU
            and not os.environ.get("ONEDNN_MAX_CPU_ISA"))

# name -> per step: logged values and the logged volumes' sums; sha256 of the final student and teacher state; sum of the student's floats
PINNED: dict = {'sup': {'steps': [{'loss/total': 0.5886769890785217,
                    'loss/supervised': 0.5886769890785217,
                    'loss/ce': 0.5649704933166504,
                    'loss/dice': 0.6123834848403931,
                    'train/lr': 0.01,
                    'weights/consistency': 0.0,
                    'weights/generalist': 0.0},
                   {'loss/total': 0.566621720790863,
                    'loss/supervised': 0.566621720790863,
                    'loss/ce': 0.5792372226715088,
                    'loss/dice': 0.5540062189102173,
                    'train/lr': 0.01,
                    'weights/consistency': 0.0,
                    'weights/generalist': 0.0},
                   {'loss/total': 0.5721797943115234,
                    'loss/supervised': 0.5721797943115234,
                    'loss/ce': 0.6334198117256165,
                    'loss/dice': 0.5109397172927856,
                    'train/lr': 0.01,
                    'weights/consistency': 0.0,
                    'weights/generalist': 0.0}],
         'visuals': [{'labeled/image': 11651.721170023084,
                      'labeled/label': 2237.0,
                      'labeled/prediction': 6694.355901926756},
                     None,
                     {'labeled/image': 17264.51041200757,
                      'labeled/label': 4091.0,
                      'labeled/prediction': 8302.379712253809}],
         'student': '2ec7b29a2f6d22bf5e558c38e00e9c63fcf32919c2087d3745f55a6f3afcba70',
         'teacher': None,
         'student_sum': 1236.1376468024198},
 'mt': {'steps': [{'loss/total': 0.5560272932052612,
                   'loss/supervised': 0.5559999942779541,
                   'loss/ce': 0.5125628709793091,
                   'loss/dice': 0.5994371175765991,
                   'loss/consistency': 0.04048965871334076,
                   'train/lr': 0.01,
                   'weights/consistency': 0.0006737946999085467,
                   'weights/generalist': 0.0},
                  {'loss/total': 0.5469473004341125,
                   'loss/supervised': 0.5467591285705566,
                   'loss/ce': 0.5115203857421875,
                   'loss/dice': 0.5819979310035706,
                   'loss/consistency': 0.031331293284893036,
                   'train/lr': 0.01,
                   'weights/consistency': 0.006005466789530795,
                   'weights/generalist': 0.0},
                  {'loss/total': 0.5375574231147766,
                   'loss/supervised': 0.5361068248748779,
                   'loss/ce': 0.5357350707054138,
                   'loss/dice': 0.5364785194396973,
                   'loss/consistency': 0.05063038319349289,
                   'train/lr': 0.01,
                   'weights/consistency': 0.028650479686019012,
                   'weights/generalist': 0.0}],
        'visuals': [{'labeled/image': 11651.721170023084,
                     'labeled/label': 2237.0,
                     'labeled/prediction': 5630.857679784298,
                     'unlabeled/image': 16474.31143796444,
                     'unlabeled/prediction': 5926.286805540323},
                    None,
                    {'labeled/image': 17264.51041200757,
                     'labeled/label': 4091.0,
                     'labeled/prediction': 5281.958542235196,
                     'unlabeled/image': 15694.597731858492,
                     'unlabeled/prediction': 7934.146021157503}],
        'student': 'e2e761cf706f431ab6f7a7054c797392fec9bc68ab2c4976d456a21750399f8b',
        'teacher': 'd03e11bf5784c70ed03b6a0e97239e46f40b11242a067794ab1bf2515dead45a',
        'student_sum': 1234.407121485854},
 'uamt': {'steps': [{'loss/total': 0.5561769604682922,
                     'loss/supervised': 0.5559999942779541,
                     'loss/ce': 0.5125628709793091,
                     'loss/dice': 0.5994371175765991,
                     'loss/consistency': 0.2626507878303528,
                     'train/lr': 0.01,
                     'weights/consistency': 0.0006737946999085467,
                     'weights/generalist': 0.0,
                     'uncertainty/threshold': 0.5210279826612536,
                     'uncertainty/mask_fraction': 0.021636962890625},
                    {'loss/total': 0.5798924565315247,
                     'loss/supervised': 0.579790472984314,
                     'loss/ce': 0.5864920616149902,
                     'loss/dice': 0.5730888247489929,
                     'loss/consistency': 0.016982799395918846,
                     'train/lr': 0.01,
                     'weights/consistency': 0.006005466789530795,
                     'weights/generalist': 0.0,
                     'uncertainty/threshold': 0.538639132859737,
                     'uncertainty/mask_fraction': 0.076934814453125},
                    {'loss/total': 0.5697923898696899,
                     'loss/supervised': 0.5694001913070679,
                     'loss/ce': 0.6258281469345093,
                     'loss/dice': 0.5129722356796265,
                     'loss/consistency': 0.013688521459698677,
                     'train/lr': 0.01,
                     'weights/consistency': 0.028650479686019012,
                     'weights/generalist': 0.0,
                     'uncertainty/threshold': 0.6192842769001529,
                     'uncertainty/mask_fraction': 0.259429931640625}],
          'visuals': [{'labeled/image': 11651.721170023084,
                       'labeled/label': 2237.0,
                       'labeled/prediction': 5630.857679784298,
                       'unlabeled/image': 16474.31143796444,
                       'unlabeled/prediction': 5926.286805540323,
                       'unlabeled/uncertainty': 10306.844446510077},
                      None,
                      {'labeled/image': 17264.51041200757,
                       'labeled/label': 4091.0,
                       'labeled/prediction': 7395.254452891648,
                       'unlabeled/image': 15694.597731858492,
                       'unlabeled/prediction': 7881.643852561712,
                       'unlabeled/uncertainty': 10587.495500266552}],
          'student': '559770681c02353f39febae8da7997cdf8d325f9c78c87b7f562d2cef9a344e0',
          'teacher': '9a3489f50d0d3b175426c0349062f97d7d1b71369c23e32162b781ef351ea009',
          'student_sum': 1234.719515772806},
 'semisam': {'steps': [{'loss/total': 0.5737376809120178,
                        'loss/supervised': 0.5559999942779541,
                        'loss/ce': 0.5125628709793091,
                        'loss/dice': 0.5994371175765991,
                        'loss/consistency': 0.04048965871334076,
                        'loss/generalist': 0.2420719563961029,
                        'train/lr': 0.01,
                        'weights/consistency': 0.0006737946999085467,
                        'weights/generalist': 0.07316156289466418,
                        'generalist/dice_vs_student': 0.2165466696023941,
                        'generalist/foreground_fraction': 0.314361572265625,
                        'generalist/mean_confidence': 1.0},
                       {'loss/total': 0.5536950826644897,
                        'loss/supervised': 0.54677814245224,
                        'loss/ce': 0.5115302801132202,
                        'loss/dice': 0.5820260047912598,
                        'loss/consistency': 0.03131990134716034,
                        'loss/generalist': 0.2348601520061493,
                        'train/lr': 0.01,
                        'weights/consistency': 0.006005466789530795,
                        'weights/generalist': 0.028650479686019012,
                        'generalist/dice_vs_student': 0.1966017782688141,
                        'generalist/foreground_fraction': 0.2786865234375,
                        'generalist/mean_confidence': 1.0},
                       {'loss/total': 0.53939288854599,
                        'loss/supervised': 0.5363436937332153,
                        'loss/ce': 0.5359165668487549,
                        'loss/dice': 0.5367708206176758,
                        'loss/consistency': 0.05064190924167633,
                        'loss/generalist': 0.26613909006118774,
                        'train/lr': 0.01,
                        'weights/consistency': 0.028650479686019012,
                        'weights/generalist': 0.006005466789530795,
                        'generalist/dice_vs_student': 0.29815673828125,
                        'generalist/foreground_fraction': 0.2467041015625,
                        'generalist/mean_confidence': 1.0}],
             'visuals': [{'labeled/image': 11651.721170023084,
                          'labeled/label': 2237.0,
                          'labeled/prediction': 5630.857679784298,
                          'unlabeled/image': 16474.31143796444,
                          'unlabeled/prediction': 5926.286805540323,
                          'unlabeled/pseudo_label': 2418.0,
                          'unlabeled/confidence': 16384.0},
                         None,
                         {'labeled/image': 17264.51041200757,
                          'labeled/label': 4091.0,
                          'labeled/prediction': 5283.316133521497,
                          'unlabeled/image': 15694.597731858492,
                          'unlabeled/prediction': 7936.257132083178,
                          'unlabeled/pseudo_label': 4970.0,
                          'unlabeled/confidence': 16384.0}],
             'student': '4d28e13758b3ad005f9e5f0026e15ecaecfdaf5c27a1c191ca3dc68119348b88',
             'teacher': '06addc7c153d8d5c485bd2a8a46e2cbc23e841058edf37ee710e70d2d95bcff1',
             'student_sum': 1234.374851191983},
 'semisam_plus_unc': {'steps': [{'loss/total': 0.569638729095459,
                                 'loss/supervised': 0.5559999942779541,
                                 'loss/ce': 0.5125628709793091,
                                 'loss/dice': 0.5994371175765991,
                                 'loss/consistency': 0.04048965871334076,
                                 'loss/generalist': 0.18604616820812225,
                                 'train/lr': 0.01,
                                 'weights/consistency': 0.0006737946999085467,
                                 'weights/generalist': 0.07316156289466418,
                                 'generalist/dice_vs_student': 0.12380250543355942,
                                 'generalist/foreground_fraction': 0.113555908203125,
                                 'generalist/mean_confidence': 0.9999489188194275},
                                {'loss/total': 0.5529866218566895,
                                 'loss/supervised': 0.5467929840087891,
                                 'loss/ce': 0.5115234851837158,
                                 'loss/dice': 0.5820624232292175,
                                 'loss/consistency': 0.03133748844265938,
                                 'loss/generalist': 0.20961053669452667,
                                 'train/lr': 0.01,
                                 'weights/consistency': 0.006005466789530795,
                                 'weights/generalist': 0.028650479686019012,
                                 'generalist/dice_vs_student': 0.12211935967206955,
                                 'generalist/foreground_fraction': 0.145294189453125,
                                 'generalist/mean_confidence': 0.9999544024467468},
                                {'loss/total': 0.5389274954795837,
                                 'loss/supervised': 0.5359200239181519,
                                 'loss/ce': 0.5354651808738708,
                                 'loss/dice': 0.5363749265670776,
                                 'loss/consistency': 0.050632406026124954,
                                 'loss/generalist': 0.2592354118824005,
                                 'train/lr': 0.01,
                                 'weights/consistency': 0.028650479686019012,
                                 'weights/generalist': 0.006005466789530795,
                                 'generalist/dice_vs_student': 0.15763908624649048,
                                 'generalist/foreground_fraction': 0.09576416015625,
                                 'generalist/mean_confidence': 0.9999572038650513}],
                      'visuals': [{'labeled/image': 11651.721170023084,
                                   'labeled/label': 2237.0,
                                   'labeled/prediction': 5630.857679784298,
                                   'unlabeled/image': 16474.31143796444,
                                   'unlabeled/prediction': 5926.286805540323,
                                   'unlabeled/pseudo_label': 1462.0,
                                   'unlabeled/confidence': 16383.332005918026},
                                  None,
                                  {'labeled/image': 17264.51041200757,
                                   'labeled/label': 4091.0,
                                   'labeled/prediction': 5280.09303432703,
                                   'unlabeled/image': 15694.597731858492,
                                   'unlabeled/prediction': 7933.47053027153,
                                   'unlabeled/pseudo_label': 1706.0,
                                   'unlabeled/confidence': 16383.371501147747}],
                      'student': '9f3502f5aa4850e8d790390a9a645badb6e5bbdc4aa385b379e9393776c95be3',
                      'teacher': 'ad3fc4f467bd3bf7e80fc632d6ee556646fa10850f73b63d83d621158a421da0',
                      'student_sum': 1234.307201737241}}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pinned")
    write_phantom_dataset(folder / "phantoms", n_train=4, n_test=1, size=(48, 48, 32), seed=0)
    sams = [write_tiny_sam(folder, seed=s, name=f"sam_{s}.pth") for s in range(2)]
    return dict(folder=folder, root=folder / "phantoms", sams=[s[0] for s in sams], cfg_json=sams[0][1])



def state_hash(module) -> str:
    """sha256 over the state dict's names and bytes (in its order)."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def run_method(name: str, data: dict, tmp_path) -> dict:
    """Train ``ITERS`` steps of ``name`` as ``Trainer.fit`` does (no files); the pinned quantities."""
    settings, n_gen = METHODS[name]
    root = data["root"]
    argv = run_args(root / "2018LA_Seg_Training Set", root / "train.list", tmp_path, name, iters=ITERS)
    if n_gen:
        argv += sam_args(data["sams"][:n_gen], data["cfg_json"])
    cfg = parse_config({**settings, **SHORT_RAMPS}, argv)
    trainer = Trainer(cfg, output=RunOutput(cfg, is_main=False))
    batches = iter(trainer.make_loader())
    results = [trainer.train_step(next(batches)) for _ in range(ITERS)]
    del batches
    steps = [r.values for r in results]
    # the images logged (sum of each volume, exact in float64 for these sizes)
    visuals = [None if r.visuals is None else {k: float(v.detach().double().sum()) for k, v in r.visuals.items()}
               for r in results]
    voxels = [None if r.visuals is None else {k: v.numel() for k, v in r.visuals.items()} for r in results]
    student_sum = math.fsum(float(v.double().sum()) for v in trainer.student.state_dict().values()
                            if v.is_floating_point())
    return {"steps": steps, "visuals": visuals, "visual_voxels": voxels, "student": state_hash(trainer.student),
            "teacher": None if trainer.teacher is None else state_hash(trainer.teacher),
            "student_sum": student_sum}


@pytest.mark.parametrize("name", list(METHODS))
def test_train_step_numerics_are_pinned(name, data, tmp_path):
    got = run_method(name, data, tmp_path)
    want = PINNED[name]
    exact = on_recorded_machine()
    assert [list(s) for s in got["steps"]] == [list(s) for s in want["steps"]], "logged names or order changed"
    for t, (g, w) in enumerate(zip(got["steps"], want["steps"])):
        for key in w:
            if exact:
                assert g[key] == w[key] or (math.isnan(g[key]) and math.isnan(w[key])), (t, key, g[key], w[key])
            elif key.startswith("generalist/"):
                # statistics of the thresholded pseudo-label (fractions of the patches' voxels): the tiny random
                # generalist answers with logits near 0 over much of its crop, so another CPU's rounding moves
                # whole voxels across the threshold (up to 0.9 % of a patch's voxels seen on an AMD EPYC): 2 %
                assert g[key] == pytest.approx(w[key], abs=2e-2, nan_ok=True), (t, key)
            else:
                # other kernels round differently, and UA-MT's thresholded mask turns a rounding difference into
                # whole voxels in or out: a loose check there (the exact one runs on the recording machine)
                assert g[key] == pytest.approx(w[key], rel=1e-2, abs=1e-5, nan_ok=True), (t, key)
    assert [v and sorted(v) for v in got["visuals"]] == [v and sorted(v) for v in want["visuals"]]
    for g, w, n in zip(got["visuals"], want["visuals"], got["visual_voxels"]):
        for key in (w or {}):
            if exact:
                assert g[key] == w[key], key
            elif key.endswith("pseudo_label"):
                # the generalist's thresholded answer (see above): within 2 % of the volume's voxels
                assert g[key] == pytest.approx(w[key], abs=2e-2 * n[key]), key
            else:
                assert g[key] == pytest.approx(w[key], rel=1e-3), key
    if exact:
        assert got["student"] == want["student"] and got["teacher"] == want["teacher"]
        assert got["student_sum"] == want["student_sum"]
    else:
        # a thresholded mask in the loss (UA-MT's uncertainty mask, the generalist's pseudo-label) turns rounding
        # into whole voxels, so those students drift further (7e-5 relative for UA-MT under AVX2 kernels)
        thresholded = name not in ("sup", "mt")
        assert got["student_sum"] == pytest.approx(want["student_sum"], rel=5e-4 if thresholded else 1e-5)


if __name__ == "__main__":     # record, from code/: PYTHONPATH=.:tests python tests/test_train_step_pinned.py
    import pprint
    import sys
    import tempfile
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_phantom_dataset(tmp / "phantoms", n_train=4, n_test=1, size=(48, 48, 32), seed=0)
        sams = [write_tiny_sam(tmp, seed=s, name=f"sam_{s}.pth") for s in range(2)]
        d = dict(folder=tmp, root=tmp / "phantoms", sams=[s[0] for s in sams], cfg_json=sams[0][1])
        print("RECORDED_CAPABILITY =", repr(torch.backends.cpu.get_cpu_capability()))
        print("RECORDED_CPU =", repr(cpu_model()))
        pinned = {n: {k: v for k, v in run_method(n, d, tmp / n).items() if k != "visual_voxels"} for n in METHODS}
        pprint.pprint(pinned, width=120, sort_dicts=False)
