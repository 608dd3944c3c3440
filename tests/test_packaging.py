"""The checkout never shadows somebody else's package: its top-level folders named like published
packages (`kernels` on PyPI; `convert`) are plain folders, not packages, and the engine imports
their modules through itself (gpt_fast_magicdec.kernels / .convert)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["kernels", "convert"])
def test_a_published_package_of_the_same_name_wins_over_the_checkout(tmp_path, name):
    assert not (ROOT / name / "__init__.py").exists()
    site = tmp_path / "site-packages" / name
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("PUBLISHED = True\n")
    # The checkout first on sys.path (as `python -m pytest` or `python generate.py` put it), the
    # published package right after it, as site-packages is (ahead of the real site-packages, which
    # may hold the real `kernels`).
    code = (f"import sys; sys.path[:0] = [{str(ROOT)!r}, {str(site.parent)!r}]; "
            f"import {name}; assert {name}.PUBLISHED, {name}.__path__; "
            f"import gpt_fast_magicdec.{name} as ours; assert 'gpt_fast_magicdec' in ours.__file__")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
