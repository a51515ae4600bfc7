"""Embeddings: margin heads and verification metrics by hand, the open-set split, RKD against its formula, and
tiny end-to-end runs on identities never seen in training."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from kdkit.config import load_config
from kdkit.errors import ConfigError, DataError, ModelError
from kdkit.losses.rkd import rkd_angle, rkd_distance
from kdkit.margin_heads import MarginHead
from kdkit.run import execute
from kdkit.tasks.embedding import verification

from .conftest import digits_overrides


def _head(kind: str, **kw) -> MarginHead:
    h = MarginHead(2, 2, kind, **kw)
    with torch.no_grad():
        h.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))  # unit directions e_x and e_y
    return h


def test_margin_heads_by_hand():
    theta = 0.6
    x = torch.tensor([[math.cos(theta), math.sin(theta)]]) * 3.0  # any length: the heads normalise it
    y = torch.tensor([0])
    cos0, cos1 = math.cos(theta), math.sin(theta)
    arc = _head("arcface", scale=10.0, margin=0.5)(x, y)
    assert arc.tolist()[0] == pytest.approx([10 * math.cos(theta + 0.5), 10 * cos1], rel=1e-5)
    cosface = _head("cosface", scale=10.0, margin=0.35)(x, y)
    assert cosface.tolist()[0] == pytest.approx([10 * (cos0 - 0.35), 10 * cos1], rel=1e-5)
    assert _head("arcface", scale=10.0)(x).tolist()[0] == pytest.approx([10 * cos0, 10 * cos1], rel=1e-5)
    # theta + m past pi: the target logit falls back to cos(theta) - m sin(m), still decreasing in theta
    far = torch.tensor([[math.cos(2.9), math.sin(2.9)]])
    z = _head("arcface", scale=1.0, margin=0.5)(far, y)
    assert z[0, 0].item() == pytest.approx(math.cos(2.9) - math.sin(math.pi - 0.5) * 0.5, rel=1e-5)


def test_verification_metrics_by_hand():
    # identities a, a, b, b on a circle: angles 0, 0.1, 1.0, 1.3 -> similarities
    ang = torch.tensor([0.0, 0.1, 1.0, 1.3])
    emb = torch.stack([ang.cos(), ang.sin()], 1)
    labels = torch.tensor([0, 0, 1, 1])
    out = verification(emb, labels)
    assert (out["genuine_pairs"], out["impostor_pairs"]) == (2, 4)
    # genuine similarities cos 0.1, cos 0.3 both exceed every impostor one (cos 0.9 at best): perfect separation
    assert out["eer"] == pytest.approx(0.0) and out["recall_at_1"] == pytest.approx(1.0)
    assert out["tar_far1e-2"] is None and out["far_levels"] == []  # 4 impostor pairs cannot measure FAR 1e-2
    # angles 0, 0.7 (a) and 0.9, 1.5 (b): the impostor pair (0.7, 0.9) is the most similar of all; image 1's
    # nearest is image 2 and image 2's is image 1 (both the wrong identity), images 0 and 3 find their mates
    ang = torch.tensor([0.0, 0.7, 0.9, 1.5])
    out = verification(torch.stack([ang.cos(), ang.sin()], 1), labels)
    assert out["recall_at_1"] == pytest.approx(0.5)
    assert 0 < out["eer"] < 0.5


def test_identities_with_a_single_image_cannot_be_verified():
    from kdkit.tasks.embedding import EmbeddingMeter

    meter = EmbeddingMeter(100, "cpu", "recall_at_1")
    meter.update(torch.randn(5, 4), torch.arange(5))
    with pytest.raises(DataError, match="verification needs two images of an identity"):
        meter.result()


def test_tar_at_far_is_read_from_scikit_learns_roc():
    from sklearn.metrics import roc_curve

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(40).repeat_interleave(6)
    emb = F.one_hot(labels, 40).float() + 0.9 * torch.randn(240, 40, generator=g)
    out = verification(emb, labels)
    e = F.normalize(emb, dim=1)
    iu = torch.triu_indices(240, 240, 1)
    scores, same = (e @ e.T)[iu[0], iu[1]], (labels[:, None] == labels[None])[iu[0], iu[1]]
    fpr, tpr, _ = roc_curve(same.numpy(), scores.numpy())
    assert out["tar_far1e-2"] == pytest.approx(float(tpr[fpr <= 1e-2].max()))
    assert out["tar_far1e-3"] == pytest.approx(float(tpr[fpr <= 1e-3].max()))
    # 28,080 impostor pairs: at least 10 / FAR of them for 1e-2 and 1e-3, not for 1e-4 (100,000)
    assert out["impostor_pairs"] == 28_080 and out["far_levels"] == [1e-2, 1e-3] and out["tar_far1e-4"] is None


def test_rkd_matches_its_formula_on_every_pair_and_triplet():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 3, generator=g), torch.randn(5, 4, generator=g)

    def dist(e):
        d = torch.tensor([[float((e[i] - e[j]).norm()) for j in range(5)] for i in range(5)])
        return d / d[d > 0].mean()

    def angles(e):
        return torch.tensor([float(F.normalize(e[i] - e[j], dim=0) @ F.normalize(e[k] - e[j], dim=0))
                             if i != j and k != j else 0.0
                             for j, i, k in itertools.product(range(5), repeat=3)])

    assert rkd_distance(s, t).item() == pytest.approx(F.smooth_l1_loss(dist(s), dist(t)).item(), rel=1e-4)
    assert rkd_angle(s, t).item() == pytest.approx(F.smooth_l1_loss(angles(s), angles(t)).item(), rel=1e-4)
    assert rkd_distance(3.0 * t, t).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    rot = torch.linalg.qr(torch.randn(4, 4, generator=g))[0]
    assert rkd_angle(t @ rot, t).item() == pytest.approx(0.0, abs=1e-6)  # rotation-free


# ---------------------------------------------------------------------------------------- data and runs
EMB = {"task": "embedding", "data.unseen_classes": "[7,8,9]", "data.val_split": 0.3, "embedding.dim": 16,
       "embedding.metric": "tar_far1e-2", "embedding.head": "cosface", "embedding.scale": 16,
       "embedding.margin": 0.2, "train.epochs": 3}


def test_open_set_split_keeps_unseen_identities_out_of_training():
    from kdkit.data import load_data

    cfg = load_config(None, ["data.name=digits", "data.unseen_classes=[7,8,9]", "data.val_split=0.3"])
    b = load_data(cfg.data)
    assert b.info.classes == [str(i) for i in range(7)] and int(b.train.labels.max()) == 6
    assert set(b.val.labels.tolist()) == {7, 8, 9} and set(b.test.labels.tolist()) == {7, 8, 9}
    with pytest.raises(DataError, match=r"data.unseen_classes=\[3, 12\]: classes are 0..9; \[12\] are not"):
        load_data(load_config(None, ["data.name=digits", "data.unseen_classes=[3,12]"]).data)


@pytest.fixture(scope="module")
def emb_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("emb") / "teacher"
    r = execute(load_config(None, digits_overrides(out, **{"model.arch": "mlp", **EMB}), default_method="supervised"),
                "train")
    s = r.summary
    assert s["task"] == "embedding" and s["primary_metric"] == "tar_far1e-2"
    assert {"eer", "recall_at_1", "tar_far1e-2"} <= set(s["test_metrics"]) and (out / "head.pt").is_file()
    return out / "model.pt"


@pytest.mark.parametrize("method", ["rkd", "embedding_kd", "th_kd", "sp", "pkt"])
def test_embedding_distillation_end_to_end(tmp_path, emb_teacher, method):
    over = {"teacher.checkpoint": str(emb_teacher), "student.arch": "mlp", "student.hidden": "[24]",
            "method.name": method, **EMB}
    r = execute(load_config(None, digits_overrides(tmp_path / method, **over)), "distill")
    s = r.summary
    assert 0 <= s["test_tar_far1e-2"] <= 1 and s["stages"][-1]["val_tar_far1e-2"] is not None
    assert r.model(torch.zeros(2, 1, 16, 16)).shape == (2, 16)  # the exported student gives embeddings
    # no loss is defined on identities never trained on: it is left out, and summary.json stays standard JSON
    strict = json.loads((r.run_dir / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert strict["test_loss"] is None
    records = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("val/loss" not in x and "val/tar_far1e-2" in x for x in records if x["event"] == "epoch")
    if method == "th_kd":  # the teacher's margin head, read from its run folder, stays as it was
        saved = torch.load(emb_teacher.with_name("head.pt"), weights_only=True)["state_dict"]["weight"]
        assert torch.equal(r.method.teacher_margin_head.weight.cpu(), saved)
        epochs = [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert any("train/th" in x for x in epochs if x["event"] == "epoch") and s["head_cosine"] is not None


def test_embedding_bad_input_is_one_line(tmp_path, emb_teacher):
    with pytest.raises(ConfigError, match="data.unseen_classes holds identities out of training"):
        execute(load_config(None, digits_overrides(tmp_path / "a", **{"model.arch": "mlp",
                                                                      "data.unseen_classes": "[9]"}),
                            default_method="supervised"), "train")
    with pytest.raises(DataError, match=r"embedding.metric=tar_far1e-4 cannot be measured on a split of"):
        execute(load_config(None, digits_overrides(tmp_path / "b", **{"model.arch": "mlp", **EMB,
                                                                      "embedding.metric": "tar_far1e-4"}),
                            default_method="supervised"), "train")
    with pytest.raises(ModelError, match=r"outputs embeddings of width 16 but embedding.dim is 32"):
        execute(load_config(None, digits_overrides(tmp_path / "c", **{
            "teacher.checkpoint": str(emb_teacher), "student.arch": "mlp", "method.name": "rkd", **EMB,
            "embedding.dim": 32})), "distill")
    with pytest.raises(ConfigError, match="method 'kd' does not work on embedding"):
        execute(load_config(None, digits_overrides(tmp_path / "d", **{
            "teacher.checkpoint": str(emb_teacher), "student.arch": "mlp", "method.name": "kd", **EMB})), "distill")


def test_report_draws_both_roc_curves_and_the_card_gives_tar_and_eer(tmp_path, emb_teacher):
    from kdkit.report import report

    over = {"teacher.checkpoint": str(emb_teacher), "student.arch": "mlp", "student.hidden": "[24]",
            "method.name": "rkd", "train.epochs": 1, **{k: v for k, v in EMB.items() if k != "train.epochs"}}
    r = execute(load_config(None, digits_overrides(tmp_path / "run", **over)), "distill")
    card = r.summary["report_card"]
    for role in ("teacher", "student"):
        assert {"test_tar_far1e-2", "test_eer", "test_recall_at_1"} <= set(card[role])
    report([r.run_dir])
    text = (r.run_dir / "report.md").read_text()
    assert (r.run_dir / "roc.png").is_file() and "![roc](roc.png)" in text
    assert "| test EER |" in text and "| test TAR@FAR=1e-2 |" in text


@pytest.mark.parametrize("final", ["kd", "th_kd"])
def test_sh_kd_on_embeddings_trains_the_teacher_through_the_first_students_head(tmp_path, emb_teacher, final):
    over = {"teacher.checkpoint": str(emb_teacher), "student.arch": "mlp", "student.hidden": "[24]",
            "method.name": "sh_kd", "method.final": final, "method.teacher_epochs": 1, "method.student_epochs": 1,
            **EMB, "train.epochs": 1, "embedding.dim": 16}
    if final == "th_kd":
        over["method.th_weight"] = 0.02
    r = execute(load_config(None, digits_overrides(tmp_path / final, **over)), "distill")
    m, s = r.method, r.summary
    # the stage-2 teacher's head is the stage-1 student's, frozen: it never moved while the teacher trained
    assert torch.equal(m.sh_head.weight, m.head1.weight) and not m.sh_head.weight.requires_grad
    assert [h["stage"] for h in s["stages"]] == ["student", "teacher", "distill"]
    assert {"test_tar_far1e-2_stage1_student", "test_tar_far1e-2_sh_teacher"} <= set(s)
    assert (r.run_dir / "stage1_student.pt").is_file() and (r.run_dir / "stage2_teacher.pt").is_file()


def write_identities(root, n_ids: int = 10, per_id: int = 4) -> None:
    """Identity folders in LFW's naming, <root>/<name>/<name>_<nnnn>.png: each identity a brightness pattern."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(n_ids):
        d = root / f"id{k}"
        d.mkdir(parents=True, exist_ok=True)
        for j in range(1, per_id + 1):
            a = np.full((12, 12), 20 * k, np.uint8) + rng.integers(0, 10, (12, 12), dtype=np.uint8)
            Image.fromarray(a).save(d / f"id{k}_{j:04d}.png")


PAIRS = "1 4\nid8 1 2\nid9 2 3  # a comment\nid8 1 id9 1\nid9 4 id8 3\n"


def test_a_pairs_file_gives_the_test_pairs_and_keeps_its_identities_out_of_training(tmp_path):
    from kdkit.data import load_data

    write_identities(tmp_path)
    (tmp_path / "pairs.txt").write_text(PAIRS)
    cfg = load_config(None, [f"data.root={tmp_path}", "data.name=imagefolder", "data.pairs=pairs.txt",
                             "data.val_split=0.25", "data.in_memory=true"]).data
    b = load_data(cfg)
    assert b.test.pairs.tolist() == [[0, 1, 1], [2, 3, 1], [0, 4, 0], [5, 6, 0]]
    assert len(b.test) == 7 and "id8" not in b.info.classes and "id9" not in b.info.classes
    # flat identity folders: imagefolder carves its own test split (data.test_split, one image in four here),
    # which the pairs replace; training keeps the other identities' remaining images
    assert len(b.info.classes) == 8 and len(b.train) == 8 * 3 and set(b.val.labels.tolist()) <= {8, 9}
    for bad, message in (("id8 1\n", r"pairs.txt, line 1: 2 fields"), ("id8 1 2\nid8 1 9\n",
                                                                      r"pairs.txt, line 2: no image .*id8_0009")):
        (tmp_path / "pairs.txt").write_text(bad)
        with pytest.raises(DataError, match=message):
            load_data(cfg)


def test_the_test_metrics_come_from_the_listed_pairs(tmp_path, capsys):
    from kdkit.cli import main

    root = tmp_path / "ids"  # the run folder must not sit among the identity folders
    write_identities(root)
    (root / "pairs.txt").write_text(PAIRS)
    over = {"output_dir": str(tmp_path / "run"), "model.arch": "mlp", "data.name": "imagefolder",
            "data.root": str(root), "data.pairs": "pairs.txt", "data.val_split": 0.5, "data.in_memory": "true",
            "task": "embedding", "embedding.dim": 8, "embedding.metric": "recall_at_1", "train.epochs": 1,
            "train.batch_size": 8, "train.progress": "none"}
    r = execute(load_config(None, [f"{k}={v}" for k, v in over.items()], default_method="supervised"), "train")
    m = r.summary["test_metrics"]
    assert (m["genuine_pairs"], m["impostor_pairs"], m["images"]) == (2, 2, 7)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(r.run_dir)]) == 0  # kdkit eval scores the same pairs again
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (out["genuine_pairs"], out["impostor_pairs"], out["images"]) == (2, 2, 7)
    assert out["recall_at_1"] == pytest.approx(m["recall_at_1"], abs=1e-6)


def test_eval_verifies_an_embedding_model_on_the_identities_it_never_saw(emb_teacher, capsys):
    from kdkit.cli import main

    summary = json.loads((emb_teacher.parent / "summary.json").read_text())
    assert main(["eval", "--checkpoint", str(emb_teacher.parent)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["tar_far1e-2"] == pytest.approx(summary["test_tar_far1e-2"], abs=1e-6)
    assert out["eer"] == pytest.approx(summary["test_metrics"]["eer"], abs=1e-6)
