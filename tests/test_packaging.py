"""The kernels import under our own name, beside any other top-level `kernels` package.

Hugging Face's `kernels` distribution (transformers depends on it, for hub kernels) installs a
top-level `kernels` package; ours is `wmtp.kernels`, so a user who has both imports each of them.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STANDIN_PYPROJECT = """\
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "kernels"
version = "0.0.1"

[tool.setuptools]
packages = ["kernels"]
"""


def test_standin_kernels_distribution_and_ours_both_import(tmp_path):
    project = tmp_path / "standin"
    (project / "kernels").mkdir(parents=True)
    (project / "pyproject.toml").write_text(STANDIN_PYPROJECT)
    (project / "kernels" / "__init__.py").write_text('WHO = "stand-in"\n')
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"]
        + ["--target", str(site), str(project)],
        check=True,
    )
    assert (site / "kernels" / "__init__.py").is_file()
    assert list(site.glob("kernels-0.0.1.dist-info"))
    probe = textwrap.dedent(
        """
        import importlib.metadata, json, kernels
        import wmtp.kernels.backend, wmtp.kernels.fused_mtp_ce, wmtp.kernels.td_weights
        print(json.dumps({"standin": kernels.WHO, "standin_file": kernels.__file__,
                          "ours": wmtp.kernels.backend.__file__,
                          "dist": importlib.metadata.version("kernels")}))
        """
    )
    # A user whose environment holds both distributions: from any folder, and from the checkout's
    # root, which `python -c` and `python -m pytest` put first on the path.
    for cwd in (tmp_path, ROOT):
        out = subprocess.run(
            [sys.executable, "-c", probe],
            cwd=cwd,
            env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        found = json.loads(out)
        assert found["standin"] == "stand-in" and found["dist"] == "0.0.1", cwd
        assert Path(found["standin_file"]).parent == site / "kernels", cwd
        assert Path(found["ours"]) == ROOT / "wmtp" / "kernels" / "backend.py", cwd


def test_no_top_level_kernels_package_in_the_checkout():
    # A `kernels` package at the root would shadow Hugging Face's (which transformers imports)
    # whenever the checkout is on the path: an uninstalled checkout (PYTHONPATH), `python -m pytest`.
    assert not (ROOT / "kernels" / "__init__.py").exists()
