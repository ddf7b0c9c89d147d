"""Shared test fixtures.

Real data and golden fixtures are found through environment variables:

- ``LA_DATA_ROOT``: folder holding ``2018LA_Seg_Training Set/``, ``train.list`` and ``test.list``
  (UA-MT's layout), e.g. ``../shared/data/LA``.
- ``SEMISAM_FIXTURES``: folder holding ``vnet_golden_a.pt``, ``sam3d_golden_a.pt`` and the manifests.

Unset variable: the tests that need it skip with a reason. Set variable whose files are missing: they
fail. With ``SEMISAM_REQUIRE_ALL=1`` (CI) any skipped test fails the run.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

CODE_DIR = Path(__file__).resolve().parents[1]
if str(CODE_DIR) not in sys.path:
    sys.path.insert(0, str(CODE_DIR))

torch.set_num_threads(min(2, os.cpu_count() or 1))


def cpu_training_amp() -> str:
    """'bf16' where this CPU computes bfloat16 natively, else 'none': the scripts refuse ``--amp bf16`` on CPUs
    without it (utils.bf16), so tests of other paths (timers, layouts, ratios) train in float32 there."""
    from utils.bf16 import native_cpu_bf16
    return "bf16" if native_cpu_bf16() else "none"


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Give every test the session's torch thread count back: the benchmarks' in-process runs set it (their
    --threads, as the scripts must), and results such as the generalist's float rounding depend on it, so a
    later test would otherwise see whatever the previous one left."""
    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


def _env_dir(var: str, must_contain: list[str]) -> Path:
    value = os.environ.get(var)
    if not value:
        pytest.skip(f"environment variable {var} is not set; point it at the folder to run this test")
    path = Path(value)
    missing = [m for m in must_contain if not (path / m).exists()]
    if missing:
        pytest.fail(f"{var}={value} is set but lacks {missing}")
    return path


@pytest.fixture(scope="session")
def la_root() -> Path:
    """The real LA dataset folder (UA-MT layout)."""
    return _env_dir("LA_DATA_ROOT", ["2018LA_Seg_Training Set", "train.list", "test.list"])


@pytest.fixture(scope="session")
def la_data_dir(la_root) -> Path:
    """The folder of case sub-folders, ``<LA_DATA_ROOT>/2018LA_Seg_Training Set``."""
    return la_root / "2018LA_Seg_Training Set"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The golden-fixture folder."""
    return _env_dir("SEMISAM_FIXTURES", ["vnet_golden_a.pt", "sam3d_golden_a.pt",
                                          "vnet_state_dict.json", "sam_med3d_vit_b_ori_state_dict.json"])


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("SEMISAM_REQUIRE_ALL") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        print(f"\nSEMISAM_REQUIRE_ALL=1 but {len(skipped)} test(s) skipped: failing the run")
        session.exitstatus = 1
