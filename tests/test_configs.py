"""Every shipped config resolves with its recipe (`--dry-run`) and keeps every value it sets."""

from __future__ import annotations

import pytest
import tomllib

from tests.conftest import ROOT, load_recipe


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_config_dry_run(path, capsys):
    name = path.stem.split("_", 1)[0]  # <recipe>_<target>.toml; eval_* belong to recipes/evaluate.py
    recipe = load_recipe("evaluate" if name == "eval" else f"full_finetune_{name}")
    with pytest.raises(SystemExit) as done:
        recipe.main(["--config", str(path), "--dry-run"])
    assert done.value.code == 0
    resolved = tomllib.loads(capsys.readouterr().out)
    for section, values in tomllib.loads(path.read_text()).items():
        for key, value in values.items():
            assert resolved[section][key] == value, f"{path.name}: {section}.{key}"
