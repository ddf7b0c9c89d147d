"""Release a trained student as a float16 state dict (half the size; UA-MT key names, loadable by test_LA.py).

    python release_model.py --model_path ../model/LA/UAMT/iter_6000.pth --out ../model/released/LA_UAMT_16.pth
    python release_model.py --generalist --model_path ../ckpt/demo_generalist.pth \
        --out ../model/released/demo_generalist.pth

With ``--generalist`` the input is a checkpoint of pretrain_generalist.py (its architecture inside) and the output
is the official SAM-Med3D format, ``{'model_state_dict': float16 weights}`` (plus ``iteration`` and
``pretrain_args``, the run's settings, which loaders ignore), with the architecture JSON beside it
(``<out>.json``), so ``load_generalist(out, arch=<out>.json)`` and ``--generalist out`` read it (each weight is
the float16 value, exactly, in the float32 model).

Reads a plain student state dict (``iter_N.pth``, ``best_model.pth``) or a ``train_state.pth`` (its student),
stores every floating-point tensor as float16 (integer buffers such as BatchNorm's ``num_batches_tracked`` as
they are), and prints the file's sha256. ``test_LA.py --model_path <released file>`` loads it into the float32
V-Net (each weight is the float16 value, exactly), so metrics must be computed from the released file itself
to be reproducible from it. An existing output file is never replaced unless ``--overwrite`` is given.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from utils.errors import CheckpointError, ConfigError, run_entry
from utils.io import atomic_save, file_sha256 as sha256
from utils.inference import load_specialist

FLOAT16_MAX = float(torch.finfo(torch.float16).max)
FLOAT16_TINY = float(torch.finfo(torch.float16).tiny)      # smallest normal float16


def half_state_dict(sd: dict) -> tuple[dict, dict]:
    """(float16 copy of ``sd``'s floating tensors, report) where report holds ``max_abs`` (largest |value|),
    ``max_abs_rounding`` (largest |x16 - x|) and ``max_rel_rounding`` (largest |x16 - x| / |x| over values in
    float16's normal range; smaller ones lose relative precision but are below 6.1e-5 in size). Raises
    ValueError naming the key when a value does not fit float16's range (it would become inf)."""
    out, max_abs, max_rel, max_err = {}, 0.0, 0.0, 0.0
    for key, value in sd.items():
        if not torch.is_floating_point(value):
            out[key] = value.clone()
            continue
        v = value.detach().to("cpu", torch.float32)
        biggest = float(v.abs().max()) if v.numel() else 0.0
        if biggest > FLOAT16_MAX:
            raise CheckpointError(f"{key}: |value| up to {biggest:.4g} does not fit float16 (max {FLOAT16_MAX:.0f})")
        half = v.to(torch.float16)
        err = (half.float() - v).abs()
        normal = v.abs() >= FLOAT16_TINY
        if bool(normal.any()):
            max_rel = max(max_rel, float((err[normal] / v.abs()[normal]).max()))
        if v.numel():
            max_err = max(max_err, float(err.max()))
        max_abs = max(max_abs, biggest)
        out[key] = half
    return out, {"max_abs": max_abs, "max_abs_rounding": max_err, "max_rel_rounding": max_rel}


def release(model_path, out, overwrite: bool = False) -> dict:
    """Write the float16 release of ``model_path`` to ``out``; returns {'out', 'sha256', 'bytes', 'vnet', ...}."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it")
    net, config = load_specialist(model_path)      # strict: the file must be a V-Net student
    half, report = half_state_dict(net.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(half, out)
    return {"out": str(out), "sha256": sha256(out), "bytes": out.stat().st_size, "vnet": config, **report}


def release_generalist(model_path, out, overwrite: bool = False) -> dict:
    """Write the float16 release of the pretrain_generalist.py checkpoint ``model_path`` to ``out`` (official
    format) and its architecture to ``<out>.json``; returns {'out', 'json', 'sha256', 'bytes', 'iteration', ...}."""
    import json
    from networks.sam_med3d import build_sam3d_from_config
    from networks.sam_med3d.build import config_label
    from networks.sam_med3d.checkpoint import load_state_dict_strict
    from training.pretrain import config_json_path, read_checkpoint
    from utils.io import atomic_write
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it")
    state = read_checkpoint(model_path, "--model_path", CheckpointError,
                            hint=" of pretrain_generalist.py (expected its 'format', 'config' and 'model_state_dict')")
    model = build_sam3d_from_config(state["config"])
    load_state_dict_strict(model, state["model_state_dict"], config_label(state["config"]), source=str(model_path))
    half, report = half_state_dict(model.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    # the official format ({'model_state_dict'}) plus what made it, which load_generalist ignores
    atomic_save({"model_state_dict": half, "iteration": state.get("iteration"),
                 "pretrain_args": state.get("train_args")}, out)
    json_path = config_json_path(out)
    atomic_write(json_path, lambda tmp: tmp.write_text(json.dumps(state["config"], indent=2) + "\n"))
    return {"out": str(out), "json": str(json_path), "sha256": sha256(out), "bytes": out.stat().st_size,
            "iteration": state.get("iteration"), "arch": config_label(state["config"]), **report}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_path", required=True, help="iter_N.pth, best_model.pth or train_state.pth")
    p.add_argument("--out", required=True, help="the float16 file to write (e.g. ../model/released/LA_UAMT_16.pth)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--generalist", action="store_true",
                   help="--model_path is a pretrain_generalist.py checkpoint: write the official format + <out>.json")
    args = p.parse_args(argv)
    if args.generalist:
        info = release_generalist(args.model_path, args.out, args.overwrite)
        print(f"{info['out']}: {info['bytes'] / 2**20:.1f} MiB, sha256 {info['sha256']}, {info['arch']} at iteration "
              f"{info['iteration']}, architecture in {info['json']}, rounding at most {info['max_rel_rounding']:.2e} "
              f"relative, {info['max_abs_rounding']:.2e} absolute")
        return info
    info = release(args.model_path, args.out, args.overwrite)
    print(f"{info['out']}: {info['bytes'] / 2**20:.1f} MiB, sha256 {info['sha256']}, VNet({info['vnet']}), "
          f"rounding at most {info['max_rel_rounding']:.2e} relative, {info['max_abs_rounding']:.2e} absolute")
    return info


if __name__ == "__main__":
    run_entry(main)
