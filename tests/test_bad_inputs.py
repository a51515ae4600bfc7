"""The bad-input catalogue: every mistake a user can make before work starts is one line from the command line,
``kdkit: error: <the problem>; <how to fix it>``, exit status 2, no traceback and no run started.

RELIABILITY.md lists this catalogue; a test keeps the two in step."""

from __future__ import annotations

import gzip
import os
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from kdkit.cli import main

from .conftest import ROOT, digits_overrides
from .test_data import idx_bytes, write_cifar, write_images, write_mnist


@dataclass
class Ctx:
    tmp: Path
    teacher: Path  # an MLP trained on digits at 16x16 (no BatchNorm)

    def train(self, *extra: str, **o: object) -> list[str]:
        return ["train", *digits_overrides(self.tmp / "run", **{"model.arch": "mlp", **o}), *extra]

    def distill(self, *extra: str, **o: object) -> list[str]:
        o = {"teacher.checkpoint": str(self.teacher), "student.arch": "mlp", **o}
        if o["student.arch"] == "mlp":
            o.setdefault("student.hidden", "[16]")
        return ["distill", *digits_overrides(self.tmp / "run", **o), *extra]


def _mnist(c: Ctx, damage: Callable[[Path], None] | None = None) -> list[str]:
    root = c.tmp / "mnist"
    write_mnist(root, gz=False)
    if damage is not None:
        damage(root / "train-images-idx3-ubyte")
    return c.train(**{"data.name": "mnist", "data.root": str(root), "data.image_size": None})


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-100])


def _wrong_magic(p: Path) -> None:
    p.write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 20)


def _mnist_root(c: Ctx) -> Path:
    write_mnist(c.tmp / "mnist", gz=False)
    return c.tmp / "mnist"


def _broken_gzip(c: Ctx) -> list[str]:
    def damage(p: Path) -> None:
        packed = gzip.compress(p.read_bytes())
        p.unlink()
        p.with_name(p.name + ".gz").write_bytes(packed[:50])
    return _mnist(c, damage)


def _label_count(c: Ctx) -> list[str]:
    def damage(p: Path) -> None:
        p.with_name("train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(7, np.uint8)))
    return _mnist(c, damage)


def _cifar(c: Ctx, data: bytes | None) -> list[str]:
    write_cifar(c.tmp, "cifar10")
    batch = c.tmp / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(batch.read_bytes()[: len(batch.read_bytes()) // 2] if data is None else data)
    return c.train(**{"data.name": "cifar10", "data.root": str(c.tmp), "data.image_size": None})


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _existing_run(c: Ctx) -> list[str]:
    (c.tmp / "run").mkdir()
    (c.tmp / "run" / "config.yaml").write_text("name: another\n")
    return c.train()


def _three_class_images(c: Ctx) -> list[str]:
    write_images(c.tmp / "imgs", classes=3, per=6, size=(16, 16), mode="L")
    return c.distill(**{"data.name": "imagefolder", "data.root": str(c.tmp / "imgs")})


def _raw_state_dict(c: Ctx) -> list[str]:
    torch.save({"fc.weight": torch.zeros(3, 3)}, c.tmp / "raw.pt")
    return c.distill(**{"teacher.checkpoint": str(c.tmp / "raw.pt"), "teacher.arch": "mlp"})


def _junk_teacher(c: Ctx) -> list[str]:
    (c.tmp / "junk.pt").write_bytes(b"\x80\x02garbage")
    return c.distill(**{"teacher.checkpoint": str(c.tmp / "junk.pt")})


def _bad_yaml(c: Ctx) -> list[str]:
    (c.tmp / "bad.yaml").write_text("train: [unclosed\n")
    return ["train", str(c.tmp / "bad.yaml")]


def _resume_with_overrides(c: Ctx) -> list[str]:
    assert main(c.train(**{"train.epochs": 1})) == 0
    return ["train", "--resume", str(c.tmp / "run"), "train.lr=0.5"]


def _resume_other_config(c: Ctx) -> list[str]:
    assert main(c.train(**{"train.epochs": 1})) == 0
    return ["train", "configs/digits/teacher_lenet5.yaml", "--resume", str(c.tmp / "run")]


def _empty_image_folder(c: Ctx) -> list[str]:
    (c.tmp / "empty").mkdir()
    return c.train(**{"data.name": "imagefolder", "data.root": str(c.tmp / "empty")})


def _broken_image(c: Ctx) -> list[str]:
    write_images(c.tmp / "imgs", per=2)
    (c.tmp / "imgs" / "class1" / "broken.png").write_bytes(b"not a png")
    return c.train(**{"data.name": "imagefolder", "data.root": str(c.tmp / "imgs")})


@dataclass
class Bad:
    id: str
    what: str
    args: Callable[[Ctx], list[str]]
    message: str  # a regex for the problem and the fix


CATALOGUE = [
    Bad("misspelled-key", "a misspelled config key", lambda c: c.train("train.epoch=3"),
        r"unknown key 'train.epoch' \(did you mean 'epochs'\?\); valid keys of train: "),
    Bad("unknown-section", "an unknown config section", lambda c: c.train("trian.epochs=3"),
        r"unknown config section 'trian' \(did you mean 'train'\?\)"),
    Bad("wrong-type", "a value of the wrong type", lambda c: c.train("train.epochs=abc"),
        r"train.epochs: expected a whole number, got 'abc'"),
    Bad("out-of-range", "a value out of range", lambda c: c.train("train.lr=0"),
        r"train.lr: must be > 0, got 0"),
    Bad("bad-choice", "a value that is not one of the choices", lambda c: c.train("train.optimizer=sgdd"),
        r"train.optimizer: 'sgdd' is not one of 'sgd', 'adam', 'adamw' \(did you mean 'sgd'"),
    Bad("unknown-model", "an unknown model name", lambda c: c.train("model.arch=resnet200"),
        r"unknown model 'resnet200' \(did you mean 'resnet20'.*\); .*resnet56"),
    Bad("unknown-model-argument", "an argument the model does not take", lambda c: c.train("model.widht=0.5"),
        r"mlp takes no argument 'widht'"),
    Bad("unknown-dataset", "an unknown dataset name", lambda c: c.train("data.name=mnits"),
        r"unknown dataset 'mnits' \(did you mean 'mnist'.*cifar10"),
    Bad("unknown-method", "an unknown method name", lambda c: c.distill("method.name=kdd"),
        r"unknown method 'kdd' \(did you mean 'kd'.*rdskd"),
    Bad("method-for-other-command", "a distillation method given to kdkit train",
        lambda c: c.train("method.name=kd"), r"method 'kd' distills from a teacher; use kdkit distill"),
    Bad("missing-config-file", "a config file that does not exist", lambda c: ["train", "nope.yaml"],
        r"config file 'nope.yaml' not found"),
    Bad("invalid-yaml", "a config file that is not valid YAML", _bad_yaml,
        r"bad.yaml' is not valid YAML: .* at line \d+, column \d+; fix the file"),
    Bad("missing-data-folder", "a data folder that does not exist",
        lambda c: c.train(**{"data.name": "mnist", "data.root": str(c.tmp / "nope"), "data.image_size": None}),
        r"nope.* is not a folder"),
    Bad("missing-data-files", "a data folder without the dataset's files",
        lambda c: c.train(**{"data.name": "mnist", "data.root": str(c.tmp), "data.image_size": None}),
        r"train-images-idx3-ubyte\[\.gz\] not found in .*put the four original idx"),
    Bad("truncated-idx", "a truncated idx file", lambda c: _mnist(c, _truncate),
        r"train-images-idx3-ubyte: truncated.*download it again"),
    Bad("corrupt-idx", "an idx file with a wrong header", lambda c: _mnist(c, _wrong_magic),
        r"not an idx uint8 file .*; download the original file again"),
    Bad("corrupt-gzip", "a truncated .gz idx file", _broken_gzip, r"\.gz: cannot read it.*corrupt or truncated"),
    Bad("image-label-count", "an images file and a labels file of different lengths", _label_count,
        r"holds 60 images but .* holds 7 labels; .*download both again"),
    Bad("truncated-pickle", "a truncated CIFAR pickle batch", lambda c: _cifar(c, None),
        r"data_batch_2: not a readable CIFAR pickle batch"),
    Bad("malicious-pickle", "a CIFAR batch that would run code when unpickled",
        lambda c: _cifar(c, pickle.dumps({b"data": _Evil()})),
        r"data_batch_2: it would load \w+.system, .*refusing to unpickle it; replace it"),
    Bad("empty-image-folder", "an image folder with no class sub-folders", _empty_image_folder,
        r"no class sub-folders"),
    Bad("broken-image", "an image file that cannot be decoded", _broken_image, r"broken\.png: not a readable image"),
    Bad("image-too-small", "images too small for the model",
        lambda c: c.train(**{"model.arch": "lenet5", "data.image_size": 8}),
        r"LeNet-5 needs inputs of at least 24x24.*data.image_size"),
    Bad("input-size-mismatch", "a model input size that differs from the data's",
        lambda c: c.train(**{"model.input_size": 28}),
        r"model.input_size=28 but the data \(digits\) has input_size=16"),
    Bad("teacher-architecture", "a teacher checkpoint of another architecture than the config says",
        lambda c: c.distill(**{"teacher.arch": "lenet5"}), r"holds a mlp but the config says lenet5"),
    Bad("teacher-class-count", "a teacher trained for another number of classes than the data has",
        _three_class_images, r"trained for 10 classes .* has 3"),
    Bad("teacher-input-shape", "a teacher trained on images of another size",
        lambda c: c.distill(**{"data.image_size": 8}),
        r"expects inputs of shape \(1, 16, 16\) but the data gives \(1, 8, 8\)"),
    Bad("teacher-state-dict-mismatch", "a raw state_dict that does not fit the named model", _raw_state_dict,
        r"does not fit model mlp: .*missing key"),
    Bad("corrupt-teacher", "a teacher file that is not a PyTorch file", _junk_teacher,
        r"junk.pt' is corrupt or not a PyTorch file \(Unsupported operand .*\); point at a model.pt"),
    Bad("missing-teacher", "no teacher checkpoint for kdkit distill",
        lambda c: c.distill(**{"teacher.checkpoint": None, "teacher.arch": "lenet5"}),
        r"kdkit distill needs a trained teacher: teacher.checkpoint=PATH/model.pt"),
    Bad("unknown-layer-path", "a layer path that does not exist in the model",
        lambda c: c.distill(**{"method.name": "fitnets", "method.pairs": "[[layers.9, layers.0]]"}),
        r"MLP has no module 'layers.9'; closest: layers"),
    Bad("unadaptable-features", "a feature pair whose shapes cannot be adapted",
        lambda c: c.distill(**{"method.name": "fitnets", "method.pairs": "[[stage1, layers.0]]",
                               "student.arch": "vgg8_bn", "student.width": 0.125}),
        r"cannot adapt student layer 'stage1' \(.*\) to teacher layer 'layers.0' .*; pair layers of the same kind"),
    Bad("existing-run", "an output directory given explicitly that already holds a run", _existing_run,
        r"already holds a run: continue it with --resume .*replace it with --overwrite .*or choose another output_dir"),
    Bad("output-dir-under-a-file", "an output_dir that cannot be created (a path under an existing file)",
        lambda c: (c.tmp / "afile").write_text("x") and c.train(**{"output_dir": str(c.tmp / "afile" / "run")}),
        r"cannot create the run folder .*afile/run \(Not a directory\); choose another output_dir"),
    Bad("image-size-too-large", "a data.image_size the machine cannot hold",
        lambda c: c.train(**{"data.name": "mnist", "data.root": str(_mnist_root(c)), "data.image_size": 100000}),
        r"resizing .* images to data.image_size=100000 would take [\d,.]+ GB, more than half of this machine's"),
    Bad("resume-other-config", "--resume with a config file that differs from the run's", _resume_other_config,
        r"config differs from the one .*run was started with \(in: .*\); resume with the run's own config"),
    Bad("resume-with-overrides", "--resume with settings changed on the command line", _resume_with_overrides,
        r"--resume continues a run as it was configured, so it takes no key=value overrides; .*start a new run"),
    Bad("resume-nothing", "--resume of a folder that holds no run",
        lambda c: ["train", "--resume", str(c.tmp / "nothing")],
        r"--resume .*nothing: no config.yaml there; give the folder of an earlier run"),
    Bad("deepinversion-without-bn", "DeepInversion on a teacher without BatchNorm",
        lambda c: c.distill(**{"method.name": "deepinversion"}), r"BatchNorm"),
    Bad("few-shot-too-many", "more few-shot samples per class than a class has",
        lambda c: c.distill(**{"method.name": "netgraft", "data.shots_per_class": 1000}),
        r"shots_per_class=1000 .*has only"),
    Bad("no-cuda", "train.device=cuda on a machine without CUDA", lambda c: c.train(**{"train.device": "cuda"}),
        r"train.device=cuda but CUDA is not available here; use train.device=cpu"),
    Bad("corrupt-model-for-eval", "kdkit eval of a file that is not a model",
        lambda c: (c.tmp / "m.pt").write_bytes(b"junk") and ["eval", "--checkpoint", str(c.tmp / "m.pt")],
        r"m.pt' is corrupt or not a PyTorch file"),
]


@pytest.mark.parametrize("bad", CATALOGUE, ids=[b.id for b in CATALOGUE])
def test_bad_input_is_one_line_with_status_2(bad, tmp_path, teacher_file, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = bad.args(Ctx(tmp_path, teacher_file))
    capsys.readouterr()
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("kdkit: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(bad.message, err), err
    # no work started: no file in the run folder was written or changed
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    assert {p: t for p, t in after.items() if before.get(p) != t and p.parent.name == "run"} == {}


def test_the_catalogue_is_long_enough_and_listed_in_reliability_md():
    assert len(CATALOGUE) >= 25 and len({b.id for b in CATALOGUE}) == len(CATALOGUE)
    page = (ROOT / "RELIABILITY.md").read_text(encoding="utf-8")
    missing = [b.id for b in CATALOGUE if f"`{b.id}`" not in page]
    assert not missing, f"RELIABILITY.md does not list {missing}"
