"""Config loading, overrides and validation: every mistake is one clear ConfigError before work starts."""

from __future__ import annotations

import pytest
import yaml

from kdkit.config import apply_overrides, build_config, load_config
from kdkit.errors import ConfigError
from kdkit.methods.kd import KD

from .conftest import ROOT


def cfg(*overrides: str, method: str = "kd"):
    return load_config(None, list(overrides), default_method=method)


@pytest.mark.parametrize("override,message", [
    ("train.epoch=3", r"unknown key 'train.epoch' \(did you mean 'epochs'\?\)"),
    ("trian.epochs=3", r"unknown config section 'trian' \(did you mean 'train'\?\)"),
    ("train.epochs=abc", r"train.epochs: expected a whole number, got 'abc'"),
    ("train.epochs=-1", r"train.epochs: must be >= 0, got -1"),
    ("train.lr=0", r"train.lr: must be > 0"),
    ("train.optimizer=sgdd", r"train.optimizer: 'sgdd' is not one of 'sgd', 'adam', 'adamw' \(did you mean 'sgd'"),
    ("train.amp=maybe", r"train.amp: expected true or false"),
    ("data.name=mnits", r"unknown dataset 'mnits' \(did you mean 'mnist'"),
    ("data.augment.crop=4", r"unknown key 'data.augment.crop' \(did you mean 'crop_padding'"),
    ("data.val_split=2.5", r"a fraction below 1 or a whole count"),
    ("student.arch=resnet200", r"unknown model 'resnet200' \(did you mean 'resnet20'"),
    ("student.widht=0.5", r"student: lenet5_half takes no argument 'widht' \(did you mean 'width'\?\)"),
    ("method.temprature=2", r"unknown key 'method.temprature' \(did you mean 'temperature'"),
    ("method.name=kdd", r"unknown method 'kdd' \(did you mean 'kd'"),
    ("method.kd_weight=-1", r"method.kd_weight: must be >= 0"),
    ("train.betas=[0.9]", r"train.betas: expected two numbers"),
    ("train.milestones=[20,10]", r"milestones: must be increasing"),
    ("student.module=nocolon", r"student.module: expected 'package.module:factory'"),
    ("student.module=not_a_pkg_xyz:f", r"cannot import module 'not_a_pkg_xyz'"),
    ("train.epochs", r"not of the form key=value"),
])
def test_bad_settings_are_rejected_with_a_hint(override, message):
    base = ["student.arch=lenet5_half"] if not override.startswith(("student.arch", "student.module")) else []
    with pytest.raises(ConfigError, match=message):
        cfg(*base, override)


def test_values_are_typed_and_coerced():
    c = cfg("train.lr=1e-3", "train.epochs=3", "data.val_split=500", "train.milestones=[0.5, 0.75]",
            "student.arch=resnet8", "student.width=0.5", "method.temperature=2")
    assert c.train.lr == 0.001 and c.train.epochs == 3 and c.data.val_split == 500
    assert c.student.args == {"width": 0.5} and isinstance(c.method.options, KD.Options)
    assert c.method.options.temperature == 2.0


def test_round_trip_through_yaml():
    c = cfg("student.arch=resnet8", "student.width=0.5", "teacher.checkpoint=t.pt", "train.epochs=2",
            "method.name=fitnets", "method.pairs=[[layer2, layer2]]")
    again = build_config(yaml.safe_load(yaml.safe_dump(c.to_dict())))
    assert again.to_dict() == c.to_dict()


def test_overrides_create_sections_and_replace_shorthand():
    raw = apply_overrides({"student": "lenet5"}, ["student.width=0.5", "a.b.c=[1, 2]", "x=null"])
    assert raw == {"student": {"arch": "lenet5", "width": 0.5}, "a": {"b": {"c": [1, 2]}}, "x": None}
    with pytest.raises(ConfigError, match="is not a section"):
        apply_overrides({"train": 3}, ["train.lr=1"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(recipe):
    method = "supervised" if "model" in yaml.safe_load(recipe.read_text()) else "kd"
    load_config(recipe, default_method=method)


def test_config_reference_page_is_generated_from_the_schema():
    from kdkit.docgen import config_reference

    page = (ROOT / "docs" / "config.md").read_text()
    assert page == config_reference(), "regenerate it: python -m kdkit.docgen > docs/config.md"


def test_every_method_has_a_current_page():
    from kdkit.docgen import method_page, public_methods

    for name in public_methods():
        path = ROOT / "docs" / "methods" / f"{name}.md"
        assert path.is_file(), f"docs/methods/{name}.md is missing"
        text = path.read_text()
        assert "When to use" in text and "## Measured" in text and "## Options" in text, name
        assert text == method_page(name, text), "regenerate: python -m kdkit.docgen --method-pages docs/methods"


def test_relative_links_in_the_docs_point_at_files():
    import re

    pages = [ROOT / "README.md", ROOT / "RELIABILITY.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"
