"""The practitioners' baselines (DKD, DIST, similarity-preserving, PKT, CRD, ReviewKD): each loss against values
computed with the authors' code on the same tensors, the property that defines it, and end-to-end runs as methods
and as paths of adaptive."""

from __future__ import annotations

import json

import pytest
import torch

from kdkit.losses import kd_loss
from kdkit.losses.dist import dist_loss, dist_terms
from kdkit.losses.dkd import dkd_loss, dkd_terms
from kdkit.losses.similarity import pkt_loss, sp_loss

from .conftest import distill_run

CNN = {"student.arch": "vgg8_bn", "student.width": 0.0625}


def _t(n: int, k: float, shape: tuple[int, ...], scale: float) -> torch.Tensor:
    """Deterministic test tensors (no random generator involved): scale * sin(k * i)."""
    return (torch.sin(torch.arange(n, dtype=torch.float64) * k) * scale).reshape(shape).float()


ZS, ZT, Y = _t(24, 0.7, (4, 6), 3.0), _t(24, 1.3, (4, 6), 5.0), torch.tensor([0, 3, 5, 2])
FS, FT = _t(48, 0.37, (4, 3, 2, 2), 1.0), _t(80, 0.91, (4, 5, 2, 2), 2.0)
ES, ET = _t(12, 0.37, (4, 3), 1.0), _t(20, 0.91, (4, 5), 2.0)


def test_losses_match_the_authors_code_on_the_same_tensors():
    # Reference values printed by the authors' functions on ZS, ZT, Y, FS, FT, ES, ET (no code copied):
    # mdistiller (megvii-research/mdistiller) distillers/DKD.py dkd_loss(zs, zt, y, alpha, beta, T),
    # distillers/SP.py similarity_loss, distillers/PKT.py pkt_loss; DIST_KD (hunto/DIST_KD)
    # segmentation/losses/dist_kd.py DIST(beta, gamma).
    assert dkd_loss(ZS, ZT, Y, 1.0, 8.0, 4.0).item() == pytest.approx(48.344444274902344, rel=1e-5)
    assert [x.item() for x in dkd_terms(ZS, ZT, Y, 4.0)] == pytest.approx([0.4493086338043213, 5.986891746520996],
                                                                          rel=1e-5)
    assert dkd_loss(ZS, ZT, Y, 1.0, 2.0, 1.0).item() == pytest.approx(4.69899320602417, rel=1e-5)
    assert dist_loss(ZS, ZT).item() == pytest.approx(1.4745579957962036, rel=1e-5)
    assert dist_loss(ZS, ZT, beta=2.0, gamma=0.5).item() == pytest.approx(1.8357234001159668, rel=1e-5)
    assert sp_loss(FS, FT).item() == pytest.approx(0.42569997906684875, rel=1e-5)
    assert pkt_loss(ES, ET).item() == pytest.approx(0.17876885831356049, rel=1e-5)


def test_dkd_terms_recompose_kd_per_sample():
    """Eq. 1 of the DKD paper: KD = TCKD + (1 - p_t,y) NCKD, sample by sample, at any temperature."""
    for temperature in (1.0, 4.0):
        for i in range(4):
            zs, zt, y = ZS[i:i + 1], ZT[i:i + 1], Y[i:i + 1]
            tckd, nckd = dkd_terms(zs, zt, y, temperature)
            p_ty = torch.softmax(zt / temperature, dim=1)[0, y[0]]
            assert (tckd + (1 - p_ty) * nckd).item() == pytest.approx(kd_loss(zs, zt, temperature).item(), rel=1e-5)


def test_dkd_on_label_maps_leaves_out_ignored_pixels():
    zs, zt = ZS.T.reshape(1, 6, 2, 2), ZT.T.reshape(1, 6, 2, 2)  # the 4 rows as the pixels of a 2x2 map
    y = Y.reshape(1, 2, 2)
    assert dkd_loss(zs, zt, y).item() == pytest.approx(dkd_loss(ZS, ZT, Y).item(), rel=1e-5)
    ignored = y.clone()
    ignored[0, 1, 1] = 255
    assert dkd_loss(zs, zt, ignored).item() == pytest.approx(dkd_loss(ZS[:3], ZT[:3], Y[:3]).item(), rel=1e-5)


def test_relation_losses_see_only_relations():
    """DIST: zero when the predictions agree. SP: blind to a positive scale of the features. PKT: blind to a
    positive scale of each sample's features (cosine kernel). Teachers are never given gradients."""
    assert dist_loss(ZT, ZT).item() == pytest.approx(0.0, abs=1e-6)
    inter, intra = dist_terms(ZS, ZT, tau=2.0)
    base = dist_terms(ZS / 2, ZT / 2, tau=1.0)
    assert [inter.item(), intra.item()] == pytest.approx([4 * base[0].item(), 4 * base[1].item()], rel=1e-5)
    assert sp_loss(3.5 * FS, FT).item() == pytest.approx(sp_loss(FS, FT).item(), rel=1e-5)
    assert sp_loss(FT, FT).item() == pytest.approx(0.0, abs=1e-7)
    scale = torch.tensor([[0.5], [2.0], [3.0], [7.0]])
    assert pkt_loss(ES * scale, ET).item() == pytest.approx(pkt_loss(ES, ET).item(), rel=1e-5)
    fs, ft = FS.clone().requires_grad_(), FT.clone().requires_grad_()
    (sp_loss(fs, ft) + pkt_loss(fs, ft) + dist_loss(fs.flatten(1)[:, :5], ft.flatten(1)[:, :5])).backward()
    assert fs.grad is not None and ft.grad is None


@pytest.mark.parametrize("method", ["dkd", "dist", "sp", "pkt", "reviewkd"])
def test_baselines_train_end_to_end(tmp_path, cnn_teacher_file, method):
    extra = {"method.warmup_epochs": 2} if method in ("dkd", "reviewkd") else {}
    res = distill_run(tmp_path / method, cnn_teacher_file, **{"method.name": method, "train.epochs": 3, **CNN,
                                                               **extra})
    s = res.summary
    assert s["method"] == method and s["test_accuracy"] > 0.3
    epochs = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if e["event"] == "epoch"]
    assert all(e[f"train/{method}"] > 0 for e in epochs)
    if extra:  # the linear warm-up of the authors' code: epoch / warmup, from epoch 1
        assert [e[f"{method}_warmup"] for e in epochs] == [0.5, 1.0, 1.0]


def test_dkd_warmup_continues_where_a_resumed_run_stopped(tmp_path, cnn_teacher_file, monkeypatch):
    from kdkit.config import load_config
    from kdkit.run import execute

    from .conftest import crash_at, digits_overrides

    over = {"teacher.checkpoint": str(cnn_teacher_file), "method.name": "dkd", "method.warmup_epochs": 4,
            "train.epochs": 3, **CNN}
    cfg = load_config(None, digits_overrides(tmp_path / "r", **over))
    crash_at(cfg, 30, monkeypatch)  # in the second epoch (22 steps per epoch)
    res = execute(cfg, "distill", resume=True)
    epochs = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["dkd_warmup"] for e in epochs if e["event"] == "epoch"] == [0.25, 0.5, 0.75]


def test_new_paths_of_adaptive(tmp_path, cnn_teacher_file):
    res = distill_run(tmp_path / "a", cnn_teacher_file, **{
        "method.name": "adaptive", "method.paths": "[dkd, dist, sp, pkt, rkd]", "method.weighting": "uncertainty",
        "train.epochs": 2, **CNN})
    s = res.summary
    assert s["test_accuracy"] > 0.3 and s["paths"] == ["dkd", "dist", "sp", "pkt", "rkd"]
    epochs = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(e[f"train/path/{p}"] > 0 for e in epochs if e["event"] == "epoch" for p in s["paths"])


def test_rkd_path_loss_matches_the_authors_code():
    """mdistiller's distillers/RKD.py rkd_loss(FS, FT) with its weights 25 and 50 (distance only: 1 and 0)."""
    from kdkit.losses.rkd import RKDLoss, rkd_distance

    assert 25 * RKDLoss()(FS, FT).item() == pytest.approx(10.273672103881836, rel=1e-5)
    assert rkd_distance(FS, FT).item() == pytest.approx(0.11814021319150925, rel=1e-5)


def test_crd_memory_and_nce_match_the_authors_code():
    """mdistiller's ContrastMemory + ContrastLoss (distillers/CRD.py) with N=10, D=4, K=3, T=0.07, momentum 0.5,
    the same memories, embeddings and rows: its loss, normalisation constants, scores and updated rows."""
    from kdkit.losses.crd import ContrastMemory, nce_loss

    n, d, k = 10, 4, 3
    mem = ContrastMemory(d, n, k, 0.07, 0.5, "bank", None, "all")
    mem.mem_s.copy_(_t(n * d, 0.3, (n, d), 0.5))
    mem.mem_t.copy_(_t(n * d, 0.8, (n, d), 0.5))
    v_s = torch.nn.functional.normalize(_t(12, 1.1, (3, d), 1.0), dim=1)
    v_t = torch.nn.functional.normalize(_t(12, 0.45, (3, d), 1.0), dim=1)
    index = torch.tensor([2, 5, 7])
    rows = torch.tensor([[2, 0, 9, 4], [5, 1, 1, 8], [7, 3, 6, 0]])
    out_s, out_t = mem(v_s, v_t, index, rows)
    assert (nce_loss(out_s, n) + nce_loss(out_t, n)).item() == pytest.approx(17.830793380737305, rel=1e-5)
    assert nce_loss(out_s, n).item() == pytest.approx(3.9837892055511475, rel=1e-5)
    assert mem.z.tolist() == pytest.approx([13818.548828125, 192015.96875], rel=1e-5)
    assert out_s[0].tolist() == pytest.approx([0.29945907, 0.19368535, 9.536966e-09, 0.41331381], rel=1e-4)
    assert mem.mem_s[5].tolist() == pytest.approx([-0.56859696, -0.33602512, 0.27020183, 0.70055377], rel=1e-5)
    assert mem.mem_t[7].tolist() == pytest.approx([-0.28054312, -0.56799406, -0.62794048, -0.45207188], rel=1e-5)


def test_crd_negatives_come_from_other_classes_and_the_queue_wraps():
    from kdkit.losses.crd import ContrastMemory

    labels = torch.arange(40) % 4
    mem = ContrastMemory(8, 40, 50, labels=labels)
    index = torch.tensor([0, 1, 2, 3, 4, 5])
    rows = mem.sample(index)
    assert rows.shape == (6, 51) and torch.equal(rows[:, 0], index)
    assert not (labels[rows[:, 1:]] == labels[index][:, None]).any()
    queue = ContrastMemory(8, 40, 5, memory="queue")
    v = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    queue(v, v, index[:4])
    queue(2 * v, 2 * v, index[:4])  # 8 rows into a queue of 5: the last 5 stay, the head wraps to 3
    assert int(queue.head) == 3 and torch.equal(queue.mem_s[:3], 2 * v[1:])


@pytest.mark.parametrize("bank_rows", [50, 5000])  # a product with the whole bank, and a gather of the rows
def test_crd_bank_scores_are_the_dot_products_with_the_drawn_rows(bank_rows):
    from kdkit.losses.crd import ContrastMemory

    g = torch.Generator().manual_seed(0)
    mem, anchor = torch.randn(bank_rows, 16, generator=g), torch.randn(4, 16, generator=g, requires_grad=True)
    rows = torch.randint(0, bank_rows, (4, 9), generator=g)
    dots = ContrastMemory.bank_dots(anchor, mem, rows)
    assert torch.allclose(dots, (mem[rows] * anchor[:, None]).sum(-1), atol=1e-5)
    dots.sum().backward()
    assert torch.allclose(anchor.grad, mem[rows].sum(1), atol=1e-5)


@pytest.mark.parametrize("memory", ["bank", "queue"])
def test_crd_trains_end_to_end(tmp_path, cnn_teacher_file, memory):
    res = distill_run(tmp_path / memory, cnn_teacher_file, **{
        "method.name": "crd", "method.memory": memory, "method.negatives": 256, "train.epochs": 2, **CNN})
    assert res.summary["test_accuracy"] > 0.3
    assert res.summary["params"] == sum(p.numel() for p in res.model.parameters())  # projections not exported
    epochs = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(e["train/crd"] > 0 for e in epochs if e["event"] == "epoch")


def test_review_fusion_and_hcl_match_the_authors_code():
    """mdistiller's distillers/ReviewKD.py (ABF chain and hcl_loss) on the same tensors and weights: student levels of
    3, 6 and 8 channels at 8x8, 4x4 and 1x1, teacher levels of 4, 5 and 7 channels at the same sizes; every float
    of the ABF state dict (sorted by name, the k-th) set to 0.5 sin((0.17 + 0.05 k) i), running variances
    |.| + 0.5. The authors' layer names load as they are."""
    from kdkit.losses.review import ReviewFusion, hcl_loss

    fs = [_t(384, 0.37, (2, 3, 8, 8), 1.0), _t(32, 0.91, (2, 4, 2, 2), 2.0), _t(10, 0.13, (2, 5, 1, 1), 1.5)]
    ft = [_t(384, 0.53, (2, 3, 8, 8), 0.7), _t(32, 0.29, (2, 4, 2, 2), 1.0), _t(10, 0.71, (2, 5, 1, 1), 0.5)]
    assert hcl_loss(fs, ft).item() == pytest.approx(3.501241683959961, rel=1e-5)
    fusion = ReviewFusion([3, 6, 8], [(4, 8, 8), (5, 4, 4), (7, 1, 1)])
    with torch.no_grad():
        for k, (name, p) in enumerate(sorted(fusion.abfs.state_dict().items())):
            if p.dtype.is_floating_point:
                v = _t(p.numel(), 0.17 + 0.05 * k, tuple(p.shape), 0.5)
                p.copy_(v.abs() + 0.5 if "running_var" in name else v)
    x = [_t(384, 0.23, (2, 3, 8, 8), 1.0), _t(192, 0.41, (2, 6, 4, 4), 1.0), _t(16, 0.67, (2, 8, 1, 1), 1.0)]
    t = [_t(512, 0.31, (2, 4, 8, 8), 1.0), _t(160, 0.57, (2, 5, 4, 4), 1.0), _t(14, 0.83, (2, 7, 1, 1), 1.0)]
    fusion.eval()
    out = fusion(x)
    assert [tuple(o.shape) for o in out] == [(2, 4, 8, 8), (2, 5, 4, 4), (2, 7, 1, 1)]
    assert [o.sum().item() for o in out] == pytest.approx([79.00444030761719, -18.95099639892578,
                                                           0.12886804342269897], rel=1e-4, abs=1e-5)
    assert hcl_loss(out, t).item() == pytest.approx(1.3910365104675293, rel=1e-5)
    fusion.train()  # batch statistics
    assert hcl_loss(fusion(x), t).item() == pytest.approx(1.6368273496627808, rel=1e-5)


def test_review_deepest_level_is_not_fused_and_teacher_gets_no_gradient():
    from kdkit.losses.review import ReviewFusion, hcl_loss

    fusion = ReviewFusion([3, 8], [(4, 8, 8), (6, 1, 1)], max_mid_channels=5)
    assert fusion.abfs[-1].att_conv is None and fusion.abfs[0].att_conv is not None
    assert fusion.abfs[0].conv1[0].out_channels == 5  # min(max_mid_channels, the student's last width)
    t = [torch.randn(2, 4, 8, 8, requires_grad=True), torch.randn(2, 6, 1, 1, requires_grad=True)]
    hcl_loss(fusion([torch.randn(2, 3, 8, 8), torch.randn(2, 8, 1, 1)]), t).backward()
    assert all(f.grad is None for f in t) and fusion.abfs[0].att_conv[0].weight.grad is not None


def test_reviewkd_level_lists_must_match(tmp_path, cnn_teacher_file):
    from kdkit.errors import ConfigError

    with pytest.raises(ConfigError, match="as many levels"):
        distill_run(tmp_path / "r", cnn_teacher_file, **{"method.name": "reviewkd", **CNN,
                                                          "method.student_layers": ["features.0"]})
