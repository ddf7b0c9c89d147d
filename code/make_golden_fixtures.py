"""Regenerate the golden fixtures from the official SAM-Med3D and V-Net code at its pinned commits.

    python make_golden_fixtures.py --clone [--compare DIR]       # clones the three repositories into --cache
    python make_golden_fixtures.py --semisam DIR --uamt DIR --sam_med3d DIR [--compare DIR]

Writes sam3d_golden_a.pt, sam3d_golden_b.pt, vnet_golden_a.pt, vnet_golden_b.pt, sam_med3d_vit_b_ori_state_dict.json
and vnet_state_dict.json into --out by the fixtures' recipe (configs, seeds, re-randomisation, inputs, calls,
forward-hook taps: utils/golden.py), running the unmodified official modules: SAM-Med3D as vendored in SemiSAM
(YichiZhang98/SemiSAM @ 6716784) and UA-MT's V-Net (yulequan/UA-MT @ 88ed29a); SAM-Med3D main
(uni-medical/SAM-Med3D @ f3de1fa) and SemiSAM's V-Net copy rerun every file as a check. Work trees given with
--semisam / --uamt / --sam_med3d must be at the pinned commits (--allow_other_commit to use others; the commits are
recorded in each file's meta). Then run the golden tests on them:
SEMISAM_FIXTURES=../fixtures python -m pytest tests/test_sam_golden.py tests/test_vnet.py.

Tensors are bit-exact only with the same torch version and --threads (the shared fixtures: torch 2.13.0+cpu,
2 threads); elsewhere they differ by about 1e-6, within the tests' rtol 1e-4 / atol 1e-5. --compare DIR checks
every tensor against the same-named files there and exits with status 1 if one differs beyond that tolerance.
"""
from __future__ import annotations

import argparse
import contextlib
import filecmp
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path

import torch

from dataloaders.layout import repo_default
from utils import golden
from utils.cli import HelpFormatter, add_threads_flag, apply_threads_flag
from utils.errors import ConfigError, MissingFileError, run_entry
from utils.io import atomic_write

OUT = "../fixtures"                    # git-ignored
CACHE = "../fixtures/official"         # where --clone puts the official repositories
CLONE_URL = "https://github.com/{owner}/{name}.git"
THREADS = 2                            # what the shared fixtures were made with
SAM_FILES = ("modeling/image_encoder3D.py", "modeling/prompt_encoder3D.py", "modeling/mask_decoder3D.py",
             "modeling/sam3D.py", "build_sam3D.py")


@dataclass(frozen=True)
class Source:
    repo: str          # owner/name on GitHub
    commit: str
    sparse: tuple      # the folders a clone checks out
    files: tuple       # the files this script reads


PINNED = {
    "semisam": Source("YichiZhang98/SemiSAM", "6716784cacd8ed93f8032a2c5efa9425bb22b0ac",
                      ("code/segment_anything", "code/networks", "code_semisam+/networks"),
                      tuple(f"code/segment_anything/{f}" for f in SAM_FILES)
                      + ("code/networks/vnet.py", "code_semisam+/networks/vnet.py")),
    "uamt": Source("yulequan/UA-MT", "88ed29ad794f877122e542a7fa9505a76fa83515", ("code/networks",),
                   ("code/networks/vnet.py",)),
    "sam_med3d": Source("uni-medical/SAM-Med3D", "f3de1fa10da98e46f49f176773d2b1e306ba131f", ("segment_anything",),
                        tuple(f"segment_anything/{f}" for f in SAM_FILES)),
}
FILES = ("sam3d_golden_a.pt", "sam3d_golden_b.pt", "vnet_golden_a.pt", "vnet_golden_b.pt",
         "sam_med3d_vit_b_ori_state_dict.json", "vnet_state_dict.json")


# ---------------------------------------------------------------------------------------- official sources
def _git(args: list, cwd=None, check: bool = True) -> subprocess.CompletedProcess:
    if shutil.which("git") is None:
        raise ConfigError("git is not installed: it is needed to clone or check the official repositories")
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if check and proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise ConfigError(f"git {args[0]} failed in {cwd or os.getcwd()}: {last}")
    return proc


def work_tree_commit(folder: Path) -> str | None:
    """HEAD of ``folder`` when it is the top of a git work tree (not a folder inside another repository), else None."""
    top = _git(["rev-parse", "--show-toplevel"], cwd=folder, check=False)
    if top.returncode or Path(top.stdout.strip()).resolve() != folder.resolve():
        return None
    return _git(["rev-parse", "HEAD"], cwd=folder).stdout.strip()


def check_source(key: str, folder, allow_other_commit: bool = False, cloned: bool = False) -> str:
    """The commit to record for the ``--<key>`` tree (``cloned``: made by --clone): its HEAD, which must be the
    pinned one (and the files read unmodified) unless ``allow_other_commit``; 'unknown (not a git work tree)' for a
    plain folder."""
    src = PINNED[key]
    flag = f"--clone's copy of {src.repo}," if cloned else f"--{key}"
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"{flag} {folder}: no such folder (a work tree of {src.repo})")
    missing = [f for f in src.files if not (folder / f).is_file()]
    if missing:
        raise MissingFileError(f"{flag} {folder} is not a work tree of {src.repo}: it lacks {', '.join(missing)}")
    head = work_tree_commit(folder)
    if head is None:
        print(f"note: {flag} {folder} is not a git work tree: its commit cannot be checked", flush=True)
        return "unknown (not a git work tree)"
    if not allow_other_commit:
        if head != src.commit:
            raise ConfigError(f"{flag} {folder} is at commit {head}, not the pinned {src.commit} of {src.repo}: "
                              f"run `git -C {folder} checkout {src.commit}`, or pass --allow_other_commit")
        dirty = _git(["status", "--porcelain", "--untracked-files=no", "--", *src.files], cwd=folder).stdout.split("\n")
        dirty = [line[3:] for line in dirty if line.strip()]
        if dirty:
            raise ConfigError(f"{flag} {folder}: {', '.join(dirty)} modified since commit {src.commit[:12]}: "
                              f"restore (git -C {folder} checkout -- .), or pass --allow_other_commit")
    elif head != src.commit:
        print(f"note: {flag} {folder} is at {head}, not the pinned {src.commit} (--allow_other_commit)", flush=True)
    return head


def clone_sources(cache, url: str = CLONE_URL) -> dict:
    """Clone each official repository into ``cache/<owner>+<name>`` (only the folders read: blob-filtered sparse
    clones) or reuse an earlier clone, and check out its pinned commit. Returns {key: work tree}."""
    trees = {}
    for key, src in PINNED.items():
        owner, name = src.repo.split("/")
        dest = Path(cache) / f"{owner}+{name}"
        if dest.exists() and any(dest.iterdir()):
            if work_tree_commit(dest) is None:
                raise ConfigError(f"--cache: {dest} exists and is not a git clone: remove it or choose another --cache")
        else:
            print(f"cloning {src.repo} into {dest}", flush=True)
            dest.parent.mkdir(parents=True, exist_ok=True)
            _git(["clone", "--quiet", "--filter=blob:none", "--no-checkout", url.format(owner=owner, name=name),
                  str(dest)])
            _git(["sparse-checkout", "set", *src.sparse], cwd=dest)
            _git(["checkout", "--quiet", "--detach", src.commit], cwd=dest)
            _git(["reset", "--quiet", "--hard"], cwd=dest)      # fills the work tree when HEAD was already there
        if work_tree_commit(dest) != src.commit:
            if _git(["checkout", "--quiet", "--detach", src.commit], cwd=dest, check=False).returncode:
                _git(["fetch", "--quiet", "origin", src.commit], cwd=dest)
                _git(["checkout", "--quiet", "--detach", src.commit], cwd=dest)
        trees[key] = dest
    return trees


# ---------------------------------------------------------------------------------------- importing it
PRIVATE = "_golden_official_"     # prefix of the module names the official files are loaded under


@contextlib.contextmanager
def _private_modules():
    """Load official files under private module names, without writing bytecode into the official trees, and
    drop those names from sys.modules afterwards (the classes stay usable): nothing can clash with this
    repository's own ``networks`` / ``utils`` packages, and the official package ``__init__``s (which need
    torchvision and import a top-level ``utils``) are never run."""
    before, dont_write = set(sys.modules), sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        yield
    finally:
        sys.dont_write_bytecode = dont_write
        for name in set(sys.modules) - before:
            if name.startswith(PRIVATE):
                del sys.modules[name]


def _package(name: str, folder: Path) -> types.ModuleType:
    """An empty package ``name`` whose submodules are the files of ``folder`` (its ``__init__.py`` is not run)."""
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(folder)]
    sys.modules[name] = pkg
    return pkg


def load_sam_code(segment_anything: Path, tag: str) -> tuple:
    """(ImageEncoderViT3D, PromptEncoder3D, MaskDecoder3D, Sam3D, build_sam3D_vit_b_ori) of an official
    ``segment_anything`` folder. ``build_sam3D.py``'s ``from .modeling import ...`` finds the four classes on a
    stand-in ``modeling`` package, so ``modeling/__init__.py`` (the 2-D models) is not run either."""
    base = f"{PRIVATE}{tag}_segment_anything"
    with _private_modules():
        _package(base, segment_anything)
        modeling = _package(f"{base}.modeling", segment_anything / "modeling")
        classes = []
        for mod, cls in (("image_encoder3D", "ImageEncoderViT3D"), ("prompt_encoder3D", "PromptEncoder3D"),
                         ("mask_decoder3D", "MaskDecoder3D"), ("sam3D", "Sam3D")):
            classes.append(getattr(importlib.import_module(f"{base}.modeling.{mod}"), cls))
            setattr(modeling, cls, classes[-1])
        build = importlib.import_module(f"{base}.build_sam3D")
    return (*classes, build.sam_model_registry3D["vit_b_ori"])


def load_vnet(path: Path, tag: str) -> type:
    """The ``VNet`` class of an official ``vnet.py``, loaded by file path under a private module name."""
    name = f"{PRIVATE}{tag}_vnet"
    with _private_modules():
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return module.VNet


# ---------------------------------------------------------------------------------------- writing, checking
def save_pt(obj, path: Path) -> None:
    """torch.save through utils.io.atomic_write; saved under the final name (in a temporary folder) because
    torch names the archive's inner folder after the file, so the bytes equal a plain ``torch.save(obj, path)``."""
    def write(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=".golden") as folder:
            named = Path(folder) / path.name
            torch.save(obj, named)
            os.replace(named, tmp)
    atomic_write(path, write)


def save_json(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1)))


def _load(path: Path):
    return json.loads(path.read_text()) if path.suffix == ".json" else torch.load(path, weights_only=True)


def _notes_only(path: str) -> bool:
    """Non-tensor entries that may differ from a reference without failing: meta (torch version, commits,
    generator), descriptions, manifest sources / torch versions and the recorded timing."""
    return (path.startswith(("meta/", "description", "source", "torch_version"))
            or any(part.startswith("_") for part in path.split("/")))


def compare_file(new, ref) -> dict:
    """Tensors (tolerance and bit-exactness) and the other values of a generated file against a reference."""
    report = golden.compare_tensors(new, ref)
    failures, notes = golden.compare_values(new, ref, _notes_only)
    report["failures"] += failures
    report["notes"] = notes
    return report


def _describe(report: dict) -> str:
    if report["failures"]:
        more = f" (+{len(report['failures']) - 3} more)" if len(report["failures"]) > 3 else ""
        return "DIFFERS: " + "; ".join(report["failures"][:3]) + more
    what = (f"{report['tensors']} tensors " + ("bit-exact" if report["bit_exact"] else
            f"within rtol {golden.RTOL:g} / atol {golden.ATOL:g}, max abs diff {report['max_abs']:.3g} "
            f"({report['worst']})")) if report["tensors"] else "no tensors, values equal"
    if report.get("same_bytes"):
        return what + "; the files are byte-identical"
    return what + (f"; differs only in {', '.join(report['notes'])}" if report.get("notes") else "")


def load_official(trees: dict) -> tuple:
    """(generating classes, rerunning classes, SemiSAM's vit_b_ori builder, SAM-Med3D main's) from the work trees:
    SemiSAM's SAM-Med3D copy and UA-MT's V-Net make the files; SAM-Med3D main's modules and SemiSAM's V-Net copy
    rerun them (README section 4)."""
    semisam, uamt, upstream = trees["semisam"], trees["uamt"], trees["sam_med3d"]
    *sam_classes, build_vit_b_ori = load_sam_code(semisam / "code/segment_anything", "semisam")
    *upstream_classes, build_upstream = load_sam_code(upstream / "segment_anything", "sam_med3d")
    official = golden.OfficialModules(*sam_classes, load_vnet(uamt / "code/networks/vnet.py", "uamt"))
    others = golden.OfficialModules(*upstream_classes, load_vnet(semisam / "code/networks/vnet.py", "semisam"))
    return official, others, build_vit_b_ori, build_upstream


def makers(trees: dict, commits: dict, official, others, build_vit_b_ori, build_upstream) -> dict:
    """{file name: function making its content}."""
    sam_sources = {"semisam_commit": commits["semisam"], "semisam_path": golden.SAM_PATHS,
                   "sam_med3d_commit": commits["sam_med3d"]}
    vnet_sources = {"uamt_commit": commits["uamt"], "semisam_commit": commits["semisam"], "path": golden.VNET_PATH}
    vnet_files = {"UA-MT code/networks/vnet.py": trees["uamt"] / "code/networks/vnet.py",
                  "SemiSAM code/networks/vnet.py": trees["semisam"] / "code/networks/vnet.py",
                  "SemiSAM code_semisam+/networks/vnet.py": trees["semisam"] / "code_semisam+/networks/vnet.py"}
    return {
        "sam3d_golden_a.pt": lambda: golden.make_sam_fixture(official, "a", sam_sources),
        "sam3d_golden_b.pt": lambda: golden.make_sam_fixture(official, "b", sam_sources),
        "vnet_golden_a.pt": lambda: golden.make_vnet_fixture(official, "a", vnet_sources),
        "vnet_golden_b.pt": lambda: golden.make_vnet_fixture(official, "b", vnet_sources),
        "sam_med3d_vit_b_ori_state_dict.json": lambda: golden.sam_manifest(
            lambda: build_vit_b_ori(checkpoint=None), lambda: build_upstream(checkpoint=None), commits["semisam"]),
        "vnet_state_dict.json": lambda: golden.vnet_manifest(official.VNet, others.VNet, vnet_files,
                                                             commits["uamt"]),
    }


def rerun_checks(path: Path, classes: dict) -> dict:
    """README 4: reload ``path`` (weights_only), rebuild fresh modules of each of ``classes`` ({label: classes}),
    rerun the calls: {label: comparison report}."""
    fx = torch.load(path, weights_only=True)
    rerun = golden.rerun_sam if path.name.startswith("sam3d") else golden.rerun_vnet
    reports = {}
    for label, cls in classes.items():
        again = rerun(cls, fx)
        reports[label] = golden.compare_tensors(again, {k: fx[k] for k in again})
    return reports


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    for key, src in PINNED.items():
        p.add_argument(f"--{key}", metavar="DIR", help=f"work tree of {src.repo} at commit {src.commit[:12]}")
    p.add_argument("--clone", action="store_true", help="git-clone the three repositories into --cache (or reuse "
                   "the clones there) and check out the pinned commits, instead of --semisam --uamt --sam_med3d")
    p.add_argument("--cache", metavar="DIR", default=repo_default(CACHE), help="where --clone puts the repositories")
    p.add_argument("--clone_url", default=CLONE_URL, help="URL template of the repositories for --clone")
    p.add_argument("--allow_other_commit", action="store_true",
                   help="accept work trees at other commits or with modified files (recorded in the meta)")
    p.add_argument("--out", metavar="DIR", default=repo_default(OUT), help="folder to write the six files into")
    p.add_argument("--overwrite", action="store_true", help="replace files already in --out")
    p.add_argument("--only", nargs="+", choices=FILES, default=list(FILES), metavar="FILE",
                   help="make only these of the six files (the manifests take the longest: they run the full-size "
                        "models)")
    p.add_argument("--compare", metavar="DIR", default=None,
                   help="folder of reference fixtures to compare every written file with (same name); exit status 1 "
                        "if a tensor differs beyond rtol 1e-4 / atol 1e-5")
    add_threads_flag(p, default=THREADS)
    args = p.parse_args(argv)

    given = {k: getattr(args, k) for k in PINNED}
    if args.clone == any(given.values()) or not (args.clone or all(given.values())):
        raise ConfigError("give either --clone or all three of --semisam, --uamt and --sam_med3d")
    out = Path(args.out)
    compare = Path(args.compare) if args.compare else None
    if compare is not None:
        if not compare.is_dir():
            raise MissingFileError(f"--compare {compare}: no such folder")
        if compare.resolve() == out.resolve():
            raise ConfigError("--compare must be another folder than --out (the files there would be replaced)")
    existing = [f for f in args.only if (out / f).exists()]
    if existing and not args.overwrite:
        raise ConfigError(f"--out {out} already holds {', '.join(existing)}: pass --overwrite to replace them")
    threads = apply_threads_flag(args.threads)

    trees = clone_sources(args.cache, args.clone_url) if args.clone else {k: Path(v) for k, v in given.items()}
    commits = {k: check_source(k, trees[k], args.allow_other_commit, args.clone) for k in PINNED}
    official, others, *builders = load_official(trees)
    make = makers(trees, commits, official, others, *builders)
    info = {"out": str(out), "threads": threads, "torch": str(torch.__version__), "commits": commits, "files": {},
            "verify": {}, "compare": {}}
    failed = []
    for name in (f for f in FILES if f in args.only):
        path = out / name
        (save_json if name.endswith(".json") else save_pt)(make[name](), path)
        info["files"][name] = str(path)
        print(f"wrote {path} ({path.stat().st_size} bytes)", flush=True)
        if name.endswith(".pt"):
            reports = rerun_checks(path, {"same copy, fresh modules": official, "other official copy": others})
            for label, report in reports.items():
                info["verify"][f"{name} [{label}]"] = report
                print(f"  rerun ({label}): {_describe(report)}", flush=True)
                failed += [f"{name} rerun ({label})"] if report["failures"] else []
        if compare is None:
            continue
        if not (compare / name).is_file():
            print(f"  (no {name} in {compare} to compare with)", flush=True)
            continue
        report = compare_file(_load(path), _load(compare / name))
        report["same_bytes"] = filecmp.cmp(path, compare / name, shallow=False)
        info["compare"][name] = report
        print(f"  vs {compare / name}: {_describe(report)}", flush=True)
        failed += [f"{name} vs --compare"] if report["failures"] else []
    if failed:
        sys.stdout.flush()
        print(f"{os.path.basename(sys.argv[0])}: error: {len(failed)} check(s) failed: {', '.join(failed)}",
              file=sys.stderr, flush=True)
        raise SystemExit(1)
    return info


if __name__ == "__main__":
    run_entry(main)
