"""Progressive network grafting: blocks, adapters, labels never read, frozen parts, exact plain export."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import kdkit
from kdkit.config import load_config
from kdkit.data import ImageSet
from kdkit.errors import ConfigError, ModelError
from kdkit.grafting import commutes, first_layer, fold_into, graft_blocks, make_adapter, swapped
from kdkit.models import create
from kdkit.run import execute

from .conftest import crash_at, digits_overrides, train_run

FAST = {"method.name": "netgraft", "data.shots_per_class": 5, "method.block_epochs": 3, "method.net_epochs": 3,
        "train.deterministic": True}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    out = tmp_path_factory.mktemp("graft_teachers")
    for arch in ("vgg8_bn", "resnet8"):
        train_run(out / arch, **{"train.epochs": 3, "model.arch": arch, "model.width": 0.25})
    return {a: out / a / "model.pt" for a in ("vgg8_bn", "resnet8")}


def graft(tmp_path, teacher, arch, **extra):
    cfg = load_config(None, digits_overrides(tmp_path, **{
        "teacher.checkpoint": str(teacher), "student.arch": arch, "student.width": 0.125, **FAST, **extra}))
    return execute(cfg, "distill")


def test_blocks_of_zoo_models_and_user_models():
    assert graft_blocks(create("vgg8_bn")) == ["stage1", "stage2", "stage3", "stage4", "stage5", "classifier"]
    assert graft_blocks(create("resnet20")) == ["stem", "layer1", "layer2", "layer3", "fc"]
    assert graft_blocks(create("wrn_16_1")) == ["stem", "layer1", "layer2", "layer3", "head", "fc"]
    assert graft_blocks(create("mobilenetv2"))[:3] == ["stem", "blocks.0", "blocks.1"]
    assert graft_blocks(create("mlp", in_channels=1)) == ["layers.0", "layers.1", "classifier"]
    user = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    with pytest.raises(ModelError, match="method.student_blocks"):
        graft_blocks(user, who="student")
    assert graft_blocks(user, ["0", "3"]) == ["0", "3"]
    with pytest.raises(ModelError, match="closest"):
        graft_blocks(user, ["0", "33"])


def test_adapter_is_a_kaiming_1x1_conv_with_bias():
    torch.manual_seed(0)
    a = make_adapter(64, 256, 4)
    assert isinstance(a, nn.Conv2d) and a.kernel_size == (1, 1) and a.bias is not None and a.bias.abs().max() == 0
    assert a.weight.std().item() == pytest.approx((2.0 / 256) ** 0.5, rel=0.05)
    assert isinstance(make_adapter(8, 4, 2), nn.Linear)


def test_folding_is_exact_where_claimed():
    torch.manual_seed(0)
    w, b = torch.randn(6, 6), torch.randn(6)
    x = torch.randn(3, 6, 5, 5)
    unpadded = nn.Conv2d(6, 4, 3)
    ref = unpadded(torch.einsum("oc,bchw->bohw", w, x) + b.view(1, -1, 1, 1))
    assert fold_into(unpadded, w, b) and torch.allclose(unpadded(x), ref, atol=1e-5)
    padded = nn.Conv2d(6, 4, 3, padding=1)
    assert not fold_into(padded, w, b)  # the zero border would see 0 instead of b
    before = padded.weight.clone()
    assert torch.equal(padded.weight, before)  # refused folds leave the layer untouched
    ref = padded(torch.einsum("oc,bchw->bohw", w, x))
    assert fold_into(padded, w, torch.zeros(6)) and torch.allclose(padded(x), ref, atol=1e-5)
    lin = nn.Linear(6, 3)
    v = torch.randn(5, 6)
    ref = lin(v @ w.T + b)
    assert fold_into(lin, w, b) and torch.allclose(lin(v), ref, atol=1e-5)
    assert not fold_into(nn.Linear(6, 3), torch.randn(4, 6), torch.zeros(4))  # not square: shape would change
    assert commutes([nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())]) and not commutes([nn.MaxPool2d(2)])
    assert first_layer(nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, 3)), nn.ReLU())) is not None
    assert first_layer(create("resnet8").layer1) is None  # a residual block: its input also feeds the shortcut


def test_swapped_restores_the_original_modules():
    m = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    original = m[0]
    with swapped(m, {"0": nn.Identity()}):
        assert isinstance(m[0], nn.Identity)
    assert m[0] is original


@pytest.mark.parametrize("arch", ["vgg8_bn", "resnet8"])
def test_exported_plain_student_equals_the_grafted_network(tmp_path, teachers, arch):
    res = graft(tmp_path / arch, teachers[arch], arch)
    s = res.summary
    assert s["export_max_abs_diff"] < 1e-5
    assert s["params"] < s["teacher_params"] / 2 and s["params"] == sum(p.numel() for p in res.model.parameters())
    assert [x["stage"] for x in s["stages"]][:2] == [f"block {s['blocks'][0]}", f"block {s['blocks'][1]}"]
    assert s["stages"][-1]["stage"] == f"chain {len(s['blocks'])}/{len(s['blocks'])}"
    assert s["folded_boundaries"] >= 1  # the last boundary (pool, then a linear classifier) folds exactly
    loaded = kdkit.load(res.run_dir / "model.pt")
    assert not any("adapters" in k for k in loaded.state_dict())  # no grafting machinery
    x = torch.randn(6, 1, 16, 16)
    res.model.eval()
    assert torch.allclose(loaded(x), res.model(x), atol=1e-6)
    # the teacher is untouched: bit-identical to its file, and kept out of the checkpoint
    t = kdkit.load(teachers[arch]).state_dict()
    after = res.method.teacher.state_dict()
    assert all(torch.equal(t[k], after[k]) for k in t)
    ckpt = torch.load(res.run_dir / "checkpoint.pt", weights_only=True)["method"]
    assert not any(k.startswith("teacher.") for k in ckpt)


def test_labels_are_never_read(tmp_path, teachers, monkeypatch):
    seen = []
    from kdkit.methods.netgraft import NetGraft

    orig = NetGraft.graft_loss

    def spy(self, net, batch):
        seen.append(batch.y)
        return orig(self, net, batch)

    monkeypatch.setattr(NetGraft, "graft_loss", spy)
    ref = graft(tmp_path / "ref", teachers["vgg8_bn"], "vgg8_bn")
    assert seen and all(y is None for y in seen)

    import kdkit.run

    real = kdkit.run.load_data

    def shuffled(cfg):  # the same images, with random labels everywhere (also on the few-shot view)
        b = real(cfg)
        g = torch.Generator().manual_seed(123)
        b.train = ImageSet(b.train.images, torch.randint(0, 10, (len(b.train),), generator=g), b.train.classes)
        b.fewshot = ImageSet(b.fewshot.images, torch.randint(0, 10, (len(b.fewshot),), generator=g), b.fewshot.classes)
        return b

    monkeypatch.setattr(kdkit.run, "load_data", shuffled)
    other = graft(tmp_path / "shuffled", teachers["vgg8_bn"], "vgg8_bn")
    a, b = ref.model.state_dict(), other.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kept_blocks_are_the_teachers_and_stay_frozen(tmp_path, teachers):
    res = graft(tmp_path, teachers["vgg8_bn"], "vgg8_bn", **{"method.keep_blocks": "[stage1, stage2]"})
    s = res.summary
    assert s["kept"] == ["stage1", "stage2"] and s["grafted"] == ["stage3", "stage4", "stage5", "classifier"]
    t = kdkit.load(teachers["vgg8_bn"])
    loaded = kdkit.load(res.run_dir / "model.pt")
    for name in ("stage1", "stage2"):
        a, b = t.get_submodule(name).state_dict(), loaded.get_submodule(name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert s["export_max_abs_diff"] < 1e-5


@pytest.mark.parametrize("arch,keep,widened", [
    ("vgg8_bn", "[stage1, stage2]", ["stage3.0"]),
    ("resnet8", "[stem, layer1]", ["layer2.0.conv1", "layer2.0.shortcut.0"]),
])
def test_first_grafted_block_reads_the_teachers_width(tmp_path, teachers, arch, keep, widened):
    """As in the authors' code, the block grafted right after the kept teacher blocks takes the teacher's width
    itself (its input layers are built wider: a VGG stage's first conv, a residual block's conv1 and shortcut):
    no adapter at that boundary, and the exported student still equals the grafted network."""
    res = graft(tmp_path / "w", teachers[arch], arch, **{"method.keep_blocks": keep})
    s = res.summary
    assert s["widened_inputs"] == widened
    first = s["blocks"].index(s["grafted"][0])
    assert str(first) not in res.method.adapters_in
    loaded = kdkit.load(res.run_dir / "model.pt")
    for path in widened:
        assert loaded.get_submodule(path).weight.shape[1] == res.method.teacher.get_submodule(path).weight.shape[1]
    x = torch.randn(6, 1, 16, 16)
    res.model.eval()
    assert torch.allclose(loaded(x), res.model(x), atol=1e-5) and s["export_max_abs_diff"] < 1e-5
    other = graft(tmp_path / "a", teachers[arch], arch, **{"method.keep_blocks": keep,
                                                           "method.input_adapter": "adapter"})
    assert other.summary["widened_inputs"] == [] and str(first) in other.method.adapters_in


def test_every_epoch_reads_every_shot_and_stage2_is_one_adam(tmp_path, teachers):
    """The authors' loader keeps the last partial batch (50 images at batch 16 x 5/10 = 8: 7 steps, not 6), and
    their stage 2 trains the chain, adapters included, with one Adam at its learning rate, not rescaled by N/10."""
    res = graft(tmp_path, teachers["vgg8_bn"], "vgg8_bn", **{"method.batch_size": 16, "method.scale_with_shots": True,
                                                             "data.shots_per_class": 5})
    stages = res.summary["stages"]
    assert all(st["steps_per_epoch"] == 7 and st["batch_size"] == 8 for st in stages)
    chain = [st for st in stages if st["stage"].startswith("chain")]
    blocks = [st for st in stages if st["stage"].startswith("block")]
    assert all(st["lr_end"] == {st["stage"]: 1e-4} for st in chain)
    assert all(st["lr_end"] == {st["stage"]: 2.5e-4 * 0.5} for st in blocks)
    groups = res.method.stages()[-1].updates[0].params
    assert len(groups) == 2 and groups[1].get("lr_scale", 1.0) == 1.0  # adapters at the chain's rate


def test_agreement_selection_uses_no_labels(tmp_path, teachers):
    res = graft(tmp_path, teachers["resnet8"], "resnet8", **{"method.select": "agreement"})
    lines = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [x for x in lines if x["event"] == "epoch"]
    assert all("monitor" in e and 0 <= e["monitor"] <= 1 and "val/accuracy" not in e for e in epochs)
    assert all("monitor" in st for st in res.summary["stages"])


def test_resume_mid_chain_is_bit_identical(tmp_path, teachers, monkeypatch):
    ref = graft(tmp_path / "ref", teachers["resnet8"], "resnet8")
    cfg = load_config(None, digits_overrides(tmp_path / "run", **{
        "teacher.checkpoint": str(teachers["resnet8"]), "student.arch": "resnet8", "student.width": 0.125, **FAST}))
    crash_at(cfg, 20, monkeypatch)  # past the five block stages (3 epochs of 1 step each)
    res = execute(cfg, "distill", resume=True)
    a, b = ref.model.state_dict(), res.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_netgraft_errors(tmp_path, teachers):
    with pytest.raises(ConfigError, match="set data.shots_per_class"):
        graft(tmp_path / "a", teachers["vgg8_bn"], "vgg8_bn", **{"data.shots_per_class": None})
    with pytest.raises(ConfigError, match="'stage9' is not a student block"):
        graft(tmp_path / "b", teachers["vgg8_bn"], "vgg8_bn", **{"method.keep_blocks": "[stage9]"})
    with pytest.raises(ModelError, match="as many blocks"):
        graft(tmp_path / "c", teachers["vgg8_bn"], "resnet8")
