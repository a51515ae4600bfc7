"""Adaptive multi-path distillation (Chennupati, Kamani, Cheng & Chen, "Adaptive Distillation: Aggregating
Knowledge from Multiple Paths for Efficient Distillation", BMVC 2021).

Knowledge flows along several paths at once, each one loss ``L_i`` between the student and the teacher:

=====================  =============================================================================
``soft_target``        T^2 * KL(softmax(z_t/T) || softmax(z_s/T))                      (Hinton et al.)
``logits``             mean((z_s - z_t)^2)                                              (Ba & Caruana)
``hint``               mean((r(F_s) - F_t)^2) on layer pairs, r a learned adapter            (FitNets)
``attention``          mean((A(F_s) - A(F_t))^2), A the normalised channel sum of |F|^2           (AT)
``gram``               mean((G(r(F_s)) - G(F_t))^2), G the Gram of L2-normalised channel maps: the
                       path the authors' code calls "NST"                        (kdkit.losses.gram)
``nst_mmd``            MMD^2 between the channel maps, polynomial kernel: the NST paper's loss   (NST)
``feature_map``        mean((pool(r(F_s)) - pool(F_t))^2), globally pooled features        (SRRL FM)
``softmax_regression`` mean((h_t(r(e_s)) - z_t)^2), student embedding through the teacher's frozen
                       classifier h_t                                                     (SRRL SR)
``cwd``                channel-wise distillation of the logit maps (dense tasks)       (Shu et al.)
``pairwise``           pair-wise similarity of pooled feature maps, on layer pairs     (Liu et al.)
``dkd``                decoupled KD: T^2 (TCKD + dkd_beta NCKD), reads the labels     (Zhao et al.)
``dist``               DIST: inter- and intra-class Pearson correlation of the predictions   (Huang et al.)
``sp``                 similarity-preserving: the batch's row-normalised Gram matrices, on layer pairs (Tung & Mori)
``pkt``                probabilistic knowledge transfer: cosine-kernel neighbourhoods of (pooled) features,
                       on layer pairs                                                 (Passalis & Tefas)
``rkd``                relational KD: distances + 2 x angles between the batch's flattened features, on layer
                       pairs (the authors' 25 : 50)                                   (Park et al.)
``boxes``              detection: L1 between the box outputs, where the teacher sees objects
``imitation``          detection: feature imitation near the ground-truth objects, on adapted layer pairs
                       (Wang et al., CVPR 2019; kdkit.losses.imitation)
``fgd``                detection: focal (box-masked, attention-weighted) and global (GcBlock) feature
                       distillation, on layer pairs, with the authors' term weights    (Yang et al., CVPR 2022)
``ce``                 CE(z_s, y), when labels are to be weighted like a path
=====================  =============================================================================

Feature paths take a list of ``[student_layer, teacher_layer]`` pairs (default: every pair of matched
stages whose outputs are both feature maps), summed into one path or kept one path per pair
(``layer_wise``). Adapters (1x1 conv + BN for maps, linear for vectors) are created from the observed
shapes where widths differ, one per layer pair, shared by the paths that use that pair.

The paths become one loss through a :mod:`kdkit.weighting` strategy; the paper's adaptive rule is
``uncertainty``:

    L = ce_weight * CE(z_s, y) + alpha * ( sum_i exp(-s_i) w_i L_i + sum_i s_i )

with s_i learned (init 0) and w_i the per-path ``weight``. In the authors' code the s_i share the
model's optimizer, SGD at 0.1 with momentum 0.9 and weight decay 1e-4 (their CIFAR schedule); kdkit gives
them that optimizer whatever the student's is (``weights_optimizer``): under the student's Adam at 1e-3
they could move by about 1e-3 per step, and 1,500 steps leave the weights inside [0.47, 2.1], which is
equal weighting in all but name. Effective weights are logged to ``metrics.jsonl`` every epoch
(``weight/<path>``).

The authors' "all" configuration aggregates four paths, ``[gram, logits, attention, soft_target]`` (the
default), with attention on the raw stage outputs and the Gram path on adapted ones; their equal-weight
baseline is ``[attention, soft_target]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Batch
from ..errors import ConfigError, ModelError
from ..losses import Adapter, AttentionLoss, GramLoss, NSTLoss, PairwiseLoss, SoftmaxRegressionLoss, cwd_loss
from ..losses.adapters import AdapterKind, needs_resize
from ..losses.dist import dist_loss
from ..losses.dkd import dkd_loss
from ..losses.fgd import FGDLoss
from ..losses.imitation import box_imitation, imitation_mask, masked_imitation
from ..losses.regression import feature_map_loss, logit_regression
from ..losses.rkd import RKDLoss
from ..losses.similarity import PKTLoss, SPLoss
from ..models import model_parts
from ..schema import opt
from ..taps import resolve
from ..weighting import LossWeighting, make_weighting
from . import register
from .base import Stage, Update, params_of
from .distiller import Distiller, SoftTargets
from .pairs import matched_stages, same_grid

PathKind = Literal["soft_target", "logits", "hint", "attention", "gram", "nst_mmd", "feature_map",
                   "softmax_regression", "ce", "cwd", "pairwise", "boxes", "imitation", "nst", "dkd",
                   "dist", "sp", "pkt", "rkd", "fgd"]
FEATURE_PATHS = ("hint", "attention", "gram", "nst_mmd", "feature_map", "pairwise", "imitation", "sp", "pkt", "rkd",
                 "fgd")
RAW_PATHS = ("attention", "nst_mmd", "pairwise", "sp", "pkt", "rkd")  # feature paths on raw student maps (no adapter)
ADAPTED = ("hint", "gram", "feature_map", "imitation")  # paths that compare adapted student features
MAP_PATHS = ("attention", "gram", "nst_mmd", "pairwise", "imitation", "fgd")  # paths that need [B, C, H, W] maps
DENSE_PATHS = ("cwd",)  # paths that need dense outputs [B, K, H, W]
DETECTION_PATHS = ("boxes", "imitation", "fgd")  # paths that read a detector's boxes
#: the s_i's optimizer in the authors' code (their CIFAR schedule: SGD 0.1, momentum 0.9, weight decay 1e-4)
AUTHORS_WEIGHTS_OPTIMIZER = {"optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4}


@dataclass
class PathSpec:
    name: PathKind = opt("soft_target", "the kind of path")
    pairs: list[list[str]] = opt([], "feature paths: [[student_layer, teacher_layer], ...] (default: matched stages)")
    weight: float = opt(1.0, "the path's weight w_i (the fixed weight, or the prior of adaptive weightings)", ge=0)
    label: str | None = opt(None, "name in logs and metrics (default: the kind)")


@dataclass
class AdaptiveOptions(SoftTargets):
    paths: list[PathKind | PathSpec] = opt(
        ["gram", "logits", "attention", "soft_target"],
        "paths: kinds, or mappings {name, pairs, weight, label}; default: the authors' four")
    weighting: Literal["equal", "fixed", "uncertainty", "gradnorm", "dwa", "normalized"] = opt(
        "uncertainty", "how the paths become one loss (see kdkit.weighting)")
    alpha: float = opt(1.0, "weight of the aggregated distillation loss against the CE term", ge=0)
    ce_weight: float = opt(1.0, "weight of the cross-entropy on labels, outside the weighting (0: labels unused)", ge=0)
    layer_wise: bool = opt(False, "one path per layer pair for feature paths, instead of their sum")
    adapter: AdapterKind = opt("auto", "adapter kind where widths differ: auto (1x1 conv + BN / linear), conv, conv_bn")
    resize: bool = opt(False, "hint/attention: resize student maps to the teacher's size instead of failing")
    student_classifier: str | None = opt(None, "softmax_regression: the student's classifier (default: found)")
    teacher_classifier: str | None = opt(None, "softmax_regression: the teacher's classifier (default: found)")
    gradnorm_alpha: float = opt(1.5, "GradNorm asymmetry alpha", ge=0)
    gradnorm_lr: float = opt(0.025, "GradNorm learning rate of the loss weights", gt=0)
    gradnorm_every: int = opt(1, "GradNorm updates the loss weights every this many steps (1: every step, as in "
                                 "the paper; k divides the cost of its extra backward passes by k)", ge=1)
    gradnorm_layer: str | None = opt(None, "GradNorm shared weights W: a student module (default: its first stage)")
    gradnorm_rule: Literal["relative", "adam"] = opt(
        "relative", "GradNorm's step on the weights: relative (kdkit's: multiplicative, scale-free; a weight whose "
        "share became tiny keeps falling) or adam (the paper's gradient on the weights themselves, by Adam)")
    dwa_temperature: float = opt(2.0, "DWA temperature T", gt=0)
    pairwise_scale: float = opt(0.5, "pairwise path: node size as a fraction of the map", gt=0, le=1)
    dkd_beta: float = opt(8.0, "dkd path: weight of the non-target-class term (TCKD's is 1)", ge=0)
    dist_temperature: float = opt(1.0, "dist path: softmax temperature tau", gt=0)
    fgd_temperature: float = opt(0.5, "fgd path: temperature of its spatial and channel attention", gt=0)
    weights_optimizer: dict[str, Any] = opt(
        AUTHORS_WEIGHTS_OPTIMIZER, "uncertainty: optimizer settings of the s_i (train-section keys; the authors' "
        "SGD by default; {} trains them with the student's optimizer, without weight decay)")
    specs: list[PathSpec] = field(default_factory=list, init=False, repr=False)

    def validate(self, where: str) -> None:
        self.specs = [p if isinstance(p, PathSpec) else PathSpec(name=p) for p in self.paths]
        if not self.specs:
            raise ConfigError(f"{where}.paths: give at least one path")
        labels = [s.label or s.name for s in self.specs]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ConfigError(f"{where}.paths: {', '.join(dup)} appear(s) twice; give each a distinct 'label'")
        for s in self.specs:
            if s.pairs and s.name not in FEATURE_PATHS:
                raise ConfigError(f"{where}.paths: '{s.name}' compares outputs, not layers; remove its pairs")
            for p in s.pairs:
                if len(p) != 2:
                    raise ConfigError(f"{where}.paths: {s.name} pair {p} is not [student_layer, teacher_layer]")
        if "nst" in [s.name for s in self.specs]:
            raise ConfigError(f"{where}.paths: 'nst' is ambiguous and was split in two: 'gram' is the Gram-matrix "
                              "MSE that the Adaptive Distillation code calls NST (what 'nst' meant before), "
                              "'nst_mmd' is the NST paper's polynomial-kernel MMD; use one of them")
        if self.weights_optimizer:
            from ..config import TrainConfig
            from ..engine.optim import update_config

            update_config(TrainConfig(), self.weights_optimizer, f"{where}.weights_optimizer")
        if "ce" in labels and self.ce_weight > 0:
            raise ConfigError(f"{where}: CE is both a path and ce_weight={self.ce_weight}; set ce_weight=0")


@dataclass
class _Path:
    label: str
    kind: str
    pairs: list[tuple[str, str]]
    weight: float


def _pair_key(i: int) -> str:
    return f"pair{i}"


@register
class Adaptive(Distiller):
    name = "adaptive"
    Options = AdaptiveOptions
    tasks = ("classification", "segmentation", "detection")

    def __init__(self, opts: AdaptiveOptions, **kw: Any):
        super().__init__(opts, **kw)
        self.path_specs = opts.specs
        kinds = {s.name for s in self.path_specs}
        # candidate pairs for feature paths without explicit ones: all matched stages; maps only, chosen in setup
        self.default_pairs: list[tuple[str, str]] = []
        if any(s.name in FEATURE_PATHS and not s.pairs for s in self.path_specs):
            self.default_pairs = matched_stages(
                self.student, self.teacher, "all", "give each feature path its pairs: method.paths=[{name: hint, "
                "pairs: [[student_layer, teacher_layer]]}, ...]")
        self.s_head = self.t_head = None
        if "softmax_regression" in kinds:
            self.s_head = model_parts(self.student, classifier=opts.student_classifier).classifier
            self.t_head = model_parts(self.teacher, classifier=opts.teacher_classifier).classifier
        explicit = [tuple(p) for s in self.path_specs for p in s.pairs]
        s_paths = [s for s, _ in explicit + self.default_pairs] + ([f"{self.s_head}:input"] if self.s_head else [])
        t_paths = [t for _, t in explicit + self.default_pairs]
        self.tap(s_paths, t_paths)  # every path checked now, with the closest valid paths on error
        self.shared_layer = opts.gradnorm_layer
        if opts.weighting == "gradnorm":
            self.shared_layer = self.shared_layer or (model_parts(self.student).stages or (None,))[0]
            if self.shared_layer is None:
                raise ModelError("gradnorm weighting needs shared weights: set method.gradnorm_layer to a student "
                                 "module")
            resolve(self.student, self.shared_layer)
        self.paths: list[_Path] = []
        self.pair_index: dict[tuple[str, str], int] = {}
        self.fgd_index: dict[tuple[str, str], int] = {}  # the FGD loss module (alignment, GcBlocks) of each pair
        self.adapters = nn.ModuleDict()
        self.path_losses = nn.ModuleDict()
        self.weighting: LossWeighting | None = None

    # ---- construction from observed shapes ----------------------------------------------------
    @torch.no_grad()
    def setup(self, sample: Batch) -> None:
        s_seen, t_seen = self.probe(sample)
        shapes = {("s", p): v.shape for p, v in s_seen.items()}
        shapes.update({("t", p): v.shape for p, v in t_seen.items()})
        maps = [(s, t) for s, t in self.default_pairs if len(shapes[("s", s)]) == 4 and len(shapes[("t", t)]) == 4]
        for spec in self.path_specs:
            label = spec.label or spec.name
            if spec.name not in FEATURE_PATHS:
                self.paths.append(_Path(label, spec.name, [], spec.weight))
                continue
            pairs = [(s, t) for s, t in spec.pairs] or maps
            if not pairs:
                raise ModelError(
                    f"path {label!r}: no pair of matched stages outputs feature maps in both models; "
                    "give the path's pairs: {name: " + spec.name + ", pairs: [[student_layer, teacher_layer]]}"
                )
            for s, t in pairs:
                self._check_pair(spec.name, s, t, shapes[("s", s)], shapes[("t", t)], sample.x.device)
            if self.opts.layer_wise:
                self.paths += [_Path(f"{label}:{s}", spec.name, [(s, t)], spec.weight) for s, t in pairs]
            else:
                self.paths.append(_Path(label, spec.name, pairs, spec.weight))
        if self.s_head is not None:
            emb = shapes[("s", f"{self.s_head}:input")]
            head = resolve(self.teacher, self.t_head)
            if not isinstance(head, nn.Linear):
                raise ModelError(f"softmax_regression: the teacher's classifier {self.t_head!r} is a "
                                 f"{type(head).__name__}, not nn.Linear; set method.teacher_classifier")
            adapter = Adapter(torch.Size([emb[0], int(torch.tensor(emb[1:]).prod())]),
                              torch.Size([emb[0], head.in_features]), "auto", "any",
                              (f"{self.s_head}:input", f"{self.t_head}:input"))
            self.path_losses["softmax_regression"] = SoftmaxRegressionLoss(head, adapter).to(sample.x.device)
        if any(p.kind in DENSE_PATHS for p in self.paths) and self.task.name == "classification":
            raise ModelError("the 'cwd' path compares dense outputs [B, K, H, W] (segmentation); this run classifies: "
                             "remove it")
        wrong = sorted({p.kind for p in self.paths if p.kind in DETECTION_PATHS} if self.task.name != "detection"
                       else set())
        if wrong:
            raise ModelError(f"the {', '.join(wrong)} path(s) read a detector's boxes; this run is "
                             f"{self.task.name}: remove them")
        if any(p.kind == "attention" for p in self.paths):
            self.path_losses["attention"] = AttentionLoss(resize=self.opts.resize)
        self.path_losses["pairwise"] = PairwiseLoss(self.opts.pairwise_scale)
        self.path_losses["gram"] = GramLoss()
        self.path_losses["nst_mmd"] = NSTLoss(resize=self.opts.resize)
        self.path_losses["sp"] = SPLoss()
        self.path_losses["pkt"] = PKTLoss()
        self.path_losses["rkd"] = RKDLoss()
        self.weighting = make_weighting(
            self.opts.weighting, [p.label for p in self.paths], {p.label: p.weight for p in self.paths},
            shared=self._shared_params, gradnorm_alpha=self.opts.gradnorm_alpha, gradnorm_lr=self.opts.gradnorm_lr,
            gradnorm_every=self.opts.gradnorm_every, gradnorm_rule=self.opts.gradnorm_rule,
            dwa_temperature=self.opts.dwa_temperature,
        ).to(sample.x.device)

    def _check_pair(self, kind: str, s: str, t: str, s_shape: torch.Size, t_shape: torch.Size,
                    device: torch.device) -> None:
        if kind in MAP_PATHS and (len(s_shape) != 4 or len(t_shape) != 4):
            raise ModelError(f"path {kind!r} needs [B, C, H, W] maps: student {s!r} is {tuple(s_shape)}, "
                             f"teacher {t!r} is {tuple(t_shape)}; pick convolutional layers")
        if kind in ("hint", "attention", "nst_mmd"):
            needs_resize(s_shape, t_shape, (s, t), self.opts.resize)
        if kind == "fgd" and (s, t) not in self.fgd_index:
            same_grid(s_shape, t_shape, (s, t), "path 'fgd'")
            i = self.fgd_index[(s, t)] = len(self.fgd_index)
            self.path_losses[f"fgd{i}"] = FGDLoss(s_shape[1], t_shape[1], self.opts.fgd_temperature).to(device)
        if kind in ADAPTED and (s, t) not in self.pair_index:
            i = self.pair_index[(s, t)] = len(self.pair_index)
            spatial = "resize" if self.opts.resize else "any"
            self.adapters[_pair_key(i)] = Adapter(s_shape, t_shape, self.opts.adapter, spatial, (s, t)).to(device)

    def _shared_params(self) -> list[nn.Parameter]:
        return list(resolve(self.student, self.shared_layer).parameters()) if self.shared_layer else []

    # ---- training -------------------------------------------------------------------------------
    def adapted(self, s: str, t: str, cache: dict[tuple[str, str], torch.Tensor]) -> torch.Tensor:
        """The student feature at `s` mapped to the teacher's width at `t`, computed once per step."""
        if (s, t) not in cache:
            assert self.student_taps is not None
            cache[(s, t)] = self.adapters[_pair_key(self.pair_index[(s, t)])](self.student_taps[s])
        return cache[(s, t)]

    def path_loss(self, path: _Path, batch: Batch, s_logits: torch.Tensor, t_logits: torch.Tensor,
                  cache: dict[tuple[str, str], torch.Tensor] | None = None) -> torch.Tensor:
        """The raw (unweighted) loss of one path on the current batch (`cache` shares adapted features)."""
        assert self.student_taps is not None and self.teacher_taps is not None
        cache = {} if cache is None else cache
        k = path.kind
        if k == "soft_target":
            return self.task.soft_target(s_logits, t_logits, self.opts)
        if k == "logits":
            return logit_regression(self.task.class_logits(s_logits), self.task.class_logits(t_logits))
        if k == "ce":
            return self.supervised(s_logits, batch, "the 'ce' path")
        if k == "dkd":
            if batch.y is None:
                self.supervised(s_logits, batch, "the 'dkd' path (its target-class term)")
            return dkd_loss(self.task.class_logits(s_logits), self.task.class_logits(t_logits), batch.y, 1.0,
                            self.opts.dkd_beta, self.opts.temperature, self.opts.logit_standardization)
        if k == "dist":
            return dist_loss(self.task.class_logits(s_logits), self.task.class_logits(t_logits),
                             tau=self.opts.dist_temperature)
        if k == "boxes":
            return box_imitation(self.task.box_outputs(s_logits), self.task.box_outputs(t_logits),
                                 self.task.class_logits(t_logits))
        if k == "cwd":
            return cwd_loss(self.task.class_logits(s_logits), self.task.class_logits(t_logits), self.opts.temperature)
        if k == "softmax_regression":
            return self.path_losses["softmax_regression"](self.student_taps[f"{self.s_head}:input"], t_logits)
        if k in ("imitation", "fgd") and batch.y is None:
            raise ModelError(f"the {k!r} path reads the ground-truth boxes; this data has no labels")
        total = s_logits.new_zeros(())
        for s, t in path.pairs:
            ft = self.teacher_taps[t].detach()
            if k == "fgd":
                total = total + self.path_losses[f"fgd{self.fgd_index[(s, t)]}"](self.student_taps[s], ft, batch.y)
                continue
            if k in RAW_PATHS:  # raw student maps: channel counts may differ
                total = total + self.path_losses[k](self.student_taps[s], ft)
                continue
            fs = self.adapted(s, t, cache)
            if k == "imitation":
                assert batch.y is not None
                mask = imitation_mask(batch.y.float(), ft.shape[-2], ft.shape[-1])
                total = total + masked_imitation(fs, ft, mask)
            elif k == "hint":
                total = total + F.mse_loss(fs.float(), ft.float())
            elif k == "gram":
                total = total + self.path_losses["gram"](fs, ft)
            else:  # feature_map: the adapter is already applied
                total = total + feature_map_loss(fs, ft)
        return total

    def student_step(self, batch: Batch | None) -> dict[str, torch.Tensor]:
        assert batch is not None and self.weighting is not None
        s_logits, t_logits = self.outputs(batch)
        cache: dict[tuple[str, str], torch.Tensor] = {}
        raw = {p.label: self.path_loss(p, batch, s_logits, t_logits, cache) for p in self.paths}
        total = self.opts.alpha * self.weighting(raw)
        out = {f"path/{k}": v.detach() for k, v in raw.items()}
        if self.opts.ce_weight > 0:
            ce = self.supervised(s_logits, batch)
            out[self.task.loss_name] = ce.detach()
            total = total + self.opts.ce_weight * ce
        assert self.student_taps is not None and self.teacher_taps is not None
        self.student_taps.clear()
        self.teacher_taps.clear()
        return {"loss": total, **out}

    def extra_modules(self) -> list[nn.Module]:
        return [self.adapters, self.path_losses]

    def effective_weights(self) -> dict[str, float]:
        assert self.weighting is not None
        return {f"weight/{k}": v * self.opts.alpha for k, v in self.weighting.effective_weights().items()}

    def _end_epoch(self, epoch: int) -> dict[str, float]:
        assert self.weighting is not None
        weights = self.effective_weights()  # the weights in force during the epoch that just ended
        stats = self.weighting.epoch_stats()
        self.weighting.end_epoch()
        return {**weights, **stats}

    def stages(self) -> list[Stage]:
        assert self.weighting is not None, "setup() must run before stages()"
        trained = [self.student, self.adapters, self.path_losses]
        weights = self.weighting.param_groups()
        if self.opts.weights_optimizer:  # the s_i with their own optimizer (the authors' SGD by default)
            weights = [{"params": g["params"], "optimizer": dict(self.opts.weights_optimizer)} for g in weights]
        params: list[Any] = params_of(*trained) + weights
        return [Stage("distill", [Update("student", params, self.student_step)], self.train_cfg.epochs,
                      train_modules=[*trained, self.weighting], on_epoch_end=self._end_epoch)]

    def summary(self) -> dict[str, Any]:
        return {"paths": [p.label for p in self.paths], "weighting": self.opts.weighting,
                "final_weights": self.effective_weights() if self.weighting is not None else {}}
