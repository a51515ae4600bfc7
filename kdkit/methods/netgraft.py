"""Few-shot distillation by progressive network grafting (Shen, Xue, Wang, Song, Sun & Song, "Progressive
Network Grafting for Few-Shot Knowledge Distillation", AAAI 2021).

For a teacher and a few *unlabeled* images per class. Teacher and student are cut into the same number
of blocks (see :mod:`kdkit.grafting`); where a student block's width differs from the teacher's, 1x1
convolution adapters (bias, Kaiming init) translate channels into it (teacher -> student) and out of it
(student -> teacher). Where kept teacher blocks (``keep_blocks``) meet the first grafted block, that block
reads the teacher's full width itself, as in the authors' code: the layers that take its input are built
wider, and no adapter sits there (``input_adapter: widen``; ``adapter`` puts a 1x1 adapter there instead).

1. Block grafting: each student block, wrapped in its adapters, replaces its teacher block inside the
   otherwise frozen teacher and is trained alone (one stage per block).
2. Progressive net grafting: student blocks are connected one more at a time, and the growing chain,
   adapters included, is trained inside the teacher until it replaces all of it (one stage per length).

Loss, with z the grafted network's logits and t the teacher's (default ``loss: norm_mse``):

    L = (1/B) sum_b || z_b/||z_b|| - t_b/||t_b|| ||^2        or, with loss: kl, T^2 KL(p_t || p_z) at T

(the authors sum over the batch instead of averaging: the same steps under Adam, up to its eps).

Labels are never read: the stages iterate the few-shot view, which holds images only. Defaults are the
authors' (``graft_block.py``, ``graft_net.py``): Adam; in stage 1 blocks at 2.5e-4 and adapters at 2.5e-3,
both and the batch (64) rescaled by N/10 (``scale_with_shots``); in stage 2 one Adam at 1e-4 for the whole
chain, adapters included, not rescaled; every epoch reads all N-shot images, the last batch partial. The
authors' CIFAR schedule is 100, 60, 60 epochs for the three grafted blocks and 100 per chain length
(``block_epochs`` takes a list). The final model is chosen without labels (the authors select stage 2's
epoch on the test set; kdkit never does): the last epoch of each stage, or the epoch whose grafted network
agrees best with the teacher's predictions on the few-shot images (``select: agreement``).

At the end the adapters at each boundary are folded into one affine map, folded further into the next
block's first convolution or linear layer where that is exact, and the rest kept as 1x1 layers: the
exported ``model.pt`` is a plain student, whose outputs equal the grafted network's (checked; the
largest difference is ``export_max_abs_diff`` in the summary).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..data import Batch, make_loader
from ..errors import ConfigError, ModelError
from ..grafting import (
    adapter_patch,
    commutes,
    compose,
    first_layer,
    fold_into,
    gap_between,
    graft_blocks,
    input_consumers,
    l2n_mse,
    layer,
    load_affine,
    make_adapter,
    max_abs_diff,
    swapped,
    widened,
)
from ..losses import kd_loss
from ..schema import opt
from ..taps import Taps, resolve
from . import register
from .base import Method, Stage, Update
from .distiller import frozen


@dataclass
class NetGraftOptions:
    loss: Literal["norm_mse", "kl"] = opt("norm_mse", "MSE of L2-normalised logits (the paper's), or KL at T")
    temperature: float = opt(4.0, "temperature of loss=kl", gt=0)
    block_epochs: int | list[int] = opt(60, "stage 1: epochs per grafted block (a list: one per grafted block, "
                                               "in order; the authors' CIFAR: [100, 60, 60])")
    net_epochs: int = opt(100, "stage 2: epochs per chain length", ge=0)
    block_lr: float = opt(2.5e-4, "stage 1 learning rate of the student blocks (Adam)", gt=0)
    adapter_lr: float = opt(2.5e-3, "stage 1 learning rate of the adapters", gt=0)
    net_lr: float = opt(1e-4, "stage 2 learning rate of the student blocks", gt=0)
    net_adapter_lr: float | None = opt(None, "stage 2 learning rate of the adapters (default: net_lr, the "
                                                 "authors' one Adam for the whole chain)", gt=0)
    batch_size: int = opt(64, "batch size (rescaled by N/10 with scale_with_shots)", gt=0)
    scale_with_shots: bool = opt(True, "multiply stage 1's learning rates and the batch size by N/10, as the "
                                       "authors do (their stage 2 learning rate is not rescaled)")
    input_adapter: Literal["widen", "adapter"] = opt(
        "widen", "where kept teacher blocks meet the first grafted block: that block reads the teacher's width "
        "itself (the authors'), or through a 1x1 adapter")
    keep_blocks: list[str] = opt([], "student blocks replaced by the teacher's (full width) and not grafted")
    copy_teacher: bool = opt(True, "kept blocks start from the teacher's weights (else re-initialised, grafted)")
    teacher_blocks: list[str] = opt([], "the teacher's blocks in forward order (default: from its stages)")
    student_blocks: list[str] = opt([], "the student's blocks in forward order (default: from its stages)")
    select: Literal["last", "agreement"] = opt("last", "per stage: the last epoch, or best teacher agreement on "
                                                       "the few-shot images (no labels either way)")


class _Grafted(nn.Module):
    """The teacher with some blocks replaced by wrapped student blocks (registered here, so eval()/train()
    reach them; the method keeps these views outside its own module tree)."""

    def __init__(self, teacher: nn.Module, replacements: dict[str, nn.Module]):
        super().__init__()
        self.wrapped = nn.ModuleList(replacements.values())
        self._teacher = [teacher]
        self._paths = list(replacements)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with swapped(self._teacher[0], dict(zip(self._paths, self.wrapped))):
            return self._teacher[0](x)


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent_path) if parent_path else root, name, module)


@register
class NetGraft(Method):
    name = "netgraft"
    Options = NetGraftOptions
    has_alone_baseline = False  # unlabeled few-shot images: there is no student alone to train

    def __init__(self, opts: NetGraftOptions, *, student: nn.Module, teacher: nn.Module | None, info: Any,
                 train: Any):
        super().__init__(opts, student=student, teacher=teacher, info=info, train=train)
        if teacher is None:
            raise ModelError("netgraft needs a teacher: set teacher.checkpoint")
        if not info.shots:
            raise ConfigError("netgraft learns from a few unlabeled images per class: set data.shots_per_class")
        self.teacher = frozen(teacher)
        self.t_blocks = graft_blocks(self.teacher, opts.teacher_blocks, "teacher")
        self.s_blocks = graft_blocks(self.student, opts.student_blocks, "student")
        if len(self.t_blocks) != len(self.s_blocks):
            raise ModelError(
                f"teacher and student must have as many blocks: teacher {self.t_blocks}, student {self.s_blocks}; "
                "give method.teacher_blocks and method.student_blocks"
            )
        # the student as built, for the shapes of its blocks (with teacher blocks swapped in, the student
        # alone is not a consistent network until the boundary adapters exist)
        self._as_built = [copy.deepcopy(self.student)] if opts.keep_blocks else [self.student]
        self.kept: list[int] = []  # teacher blocks copied in and frozen: not grafted
        self.replaced: list[int] = []  # every block that now has the teacher's architecture
        for path in opts.keep_blocks:
            if path not in self.s_blocks:
                raise ConfigError(f"method.keep_blocks: {path!r} is not a student block; blocks: {self.s_blocks}")
            i = self.s_blocks.index(path)
            self.replaced.append(i)
            block = copy.deepcopy(resolve(self.teacher, self.t_blocks[i])).requires_grad_(True)
            if not opts.copy_teacher:
                for m in block.modules():
                    if hasattr(m, "reset_parameters"):
                        m.reset_parameters()
            else:
                self.kept.append(i)
            parent_path, _, name = path.rpartition(".")
            setattr(self.student.get_submodule(parent_path) if parent_path else self.student, name, block)
        self.grafted = [i for i in range(len(self.s_blocks)) if i not in self.kept]
        if not self.grafted:
            raise ConfigError("method.keep_blocks keeps every block: nothing is left to graft")
        factor = info.shots / 10 if opts.scale_with_shots else 1.0
        self.factor = factor
        self.batch = max(1, round(opts.batch_size * factor))
        self.adapters_in = nn.ModuleDict()
        self.adapters_out = nn.ModuleDict()
        self.in_dims: list[int] = []  # rank of each student block's input (4: maps, 2: vectors)
        self.exported: nn.Module | None = None
        self.widen_patches: list[dict[str, Any]] = []  # first grafted layers built wider (input_adapter: widen)
        self.patches: list[dict[str, Any]] = []
        self.export_diff: float | None = None
        self.folded = 0

    # ---- adapters from observed shapes ----------------------------------------------------------
    @torch.no_grad()
    def setup(self, sample: Batch) -> None:
        x = sample.x[:2]
        shapes = {}
        inputs = {}
        for who, model, blocks in (("t", self.teacher, self.t_blocks), ("s", self._as_built[0], self.s_blocks)):
            with Taps(model, [*blocks, *(f"{b}:input" for b in blocks)]) as taps:
                was = model.training
                model.eval()
                model(x)
                model.train(was)
                shapes[who] = [(taps[f"{b}:input"].shape, taps[b].shape) for b in blocks]
                inputs[who] = [taps[f"{b}:input"] for b in blocks]
        as_built = self._as_built[0]
        for i in self.replaced:  # teacher blocks in the student take and give the teacher's shapes
            shapes["s"][i] = shapes["t"][i]
        self._as_built = []
        self.in_dims = [len(s_in) for s_in, _ in shapes["s"]]
        for i, ((t_in, t_out), (s_in, s_out)) in enumerate(zip(shapes["t"], shapes["s"])):
            names = (self.s_blocks[i], self.t_blocks[i])
            for a, b, what in ((t_in, s_in, "input"), (t_out, s_out, "output")):
                if len(a) != len(b) or a[2:] != b[2:]:
                    raise ModelError(f"block {names[0]!r} of the student and {names[1]!r} of the teacher differ in "
                                     f"{what} shape beyond channels: {tuple(b)} vs {tuple(a)}")
            if t_in[1] != s_in[1] and not self._widen_input(i, as_built, inputs, shapes):
                self.adapters_in[str(i)] = make_adapter(t_in[1], s_in[1], len(t_in)).to(x.device)
            if t_out[1] != s_out[1]:
                self.adapters_out[str(i)] = make_adapter(s_out[1], t_out[1], len(t_out)).to(x.device)

    def _widen_input(self, i: int, as_built: nn.Module, inputs: dict[str, list[torch.Tensor]],
                     shapes: dict[str, list[Any]]) -> bool:
        """``input_adapter: widen``: when block i is grafted right after a block of the teacher's architecture,
        rebuild the layers that read its input to take the teacher's width (as the authors' student does).
        True when done; False leaves the boundary to a 1x1 adapter (another option, or a block whose input
        also feeds something that cannot be widened, e.g. an identity shortcut)."""
        if self.opts.input_adapter != "widen" or i == 0 or i - 1 not in self.replaced or i in self.replaced:
            return False
        path = self.s_blocks[i]
        consumers = input_consumers(resolve(as_built, path), inputs["s"][i])
        block = resolve(self.student, path)
        width = int(shapes["t"][i][0][1])
        try:
            args = {c: widened(resolve(block, c), width) for c in consumers}
        except ModelError:
            return False
        if not args:
            return False
        saved = {c: resolve(block, c) for c in args}
        device = inputs["t"][i].device
        for c, a in args.items():
            _set(block, c, layer(**a).to(device))
        was = block.training
        try:
            block.eval()
            with torch.no_grad():
                ok = block(inputs["t"][i]).shape == shapes["s"][i][1]
        except RuntimeError:
            ok = False
        finally:
            block.train(was)
        if not ok:
            for c, m in saved.items():
                _set(block, c, m)
            return False
        self.widen_patches += [{"path": f"{path}.{c}", "factory": "kdkit.grafting:layer", "args": a}
                               for c, a in args.items()]
        return True

    def wrapped(self, i: int) -> nn.Module:
        parts = [a] if (a := self._adapter(self.adapters_in, i)) is not None else []
        parts.append(resolve(self.student, self.s_blocks[i]))
        parts += [a] if (a := self._adapter(self.adapters_out, i)) is not None else []
        return nn.Sequential(*parts)

    def grafted_net(self, blocks: list[int]) -> _Grafted:
        """The teacher with student blocks `blocks` grafted in (a view, not a copy)."""
        return _Grafted(self.teacher, {self.t_blocks[i]: self.wrapped(i) for i in blocks})

    # ---- training ---------------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(x)

    def graft_loss(self, net: _Grafted, batch: Batch | None) -> dict[str, torch.Tensor]:
        assert batch is not None  # batch.y is never read: the few-shot view has no labels
        t = self.teacher_logits(batch.x)
        z = net(batch.x)
        if self.opts.loss == "kl":
            return {"graft": kd_loss(z, t, self.opts.temperature)}
        return {"graft": l2n_mse(z, t)}

    def _fewshot_loader(self, batch_size: int) -> Any:
        """The few-shot images in order, unaugmented, on the teacher's device (decoded in this process)."""
        from ..config import DataConfig

        return make_loader(self.data.split("fewshot"), batch_size, DataConfig(workers=0), train=False,
                           info=self.info, device=next(self.teacher.parameters()).device)

    @torch.no_grad()
    def agreement(self, net: nn.Module) -> float:
        """Fraction of the few-shot images on which `net` predicts the teacher's class (no labels)."""
        fewshot = self.data.split("fewshot")
        loader = self._fewshot_loader(256)
        was = net.training
        net.eval()
        hits = sum(int((net(b.x).argmax(1) == self.teacher(b.x).argmax(1)).sum()) for b in loader)
        net.train(was)
        return hits / max(1, len(fewshot))

    def _stage(self, name: str, blocks: list[int], trained: list[int], epochs: int, lr: float,
               adapter_lr: float, factor: float) -> Stage:
        net = self.grafted_net(blocks)
        block_params = [p for i in trained for p in resolve(self.student, self.s_blocks[i]).parameters()]
        adapters = [m for i in trained for d in (self.adapters_in, self.adapters_out) if str(i) in d
                    for m in [d[str(i)]]]
        groups: list[Any] = [{"params": block_params}]
        if adapters:
            groups.append({"params": [p for m in adapters for p in m.parameters()], "lr_scale": adapter_lr / lr})
        optimizer = {"optimizer": "adam", "lr": lr * factor, "weight_decay": 0.0, "schedule": "constant",
                     "warmup_epochs": 0}
        agree = self.opts.select == "agreement"
        return Stage(name, [Update(name, groups, lambda b, net=net: self.graft_loss(net, b), optimizer=optimizer)],
                     epochs, train_modules=[resolve(self.student, self.s_blocks[i]) for i in trained] + adapters,
                     data="fewshot", batch_size=self.batch, drop_last=False, evaluate=lambda net=net: net,
                     monitor=(lambda net=net: self.agreement(net)) if agree else None,
                     select="best_val" if agree else "last")

    def stages(self) -> list[Stage]:
        o = self.opts
        epochs = o.block_epochs if isinstance(o.block_epochs, list) else [o.block_epochs] * len(self.grafted)
        if len(epochs) != len(self.grafted):
            raise ConfigError(f"method.block_epochs lists {len(epochs)} epoch counts for {len(self.grafted)} grafted "
                              f"blocks ({', '.join(self.s_blocks[i] for i in self.grafted)}); give one per block")
        stages = [self._stage(f"block {self.s_blocks[i]}", [i], [i], e, o.block_lr, o.adapter_lr, self.factor)
                  for i, e in zip(self.grafted, epochs)]
        for k in range(1, len(self.grafted)):
            chain = self.grafted[:k + 1]
            stages.append(self._stage(f"chain {len(chain)}/{len(self.grafted)}", chain, chain, o.net_epochs,
                                      o.net_lr, o.net_adapter_lr or o.net_lr, 1.0))
        return stages

    def eval_model(self) -> nn.Module:
        return self.exported if self.exported is not None else self.grafted_net(self.grafted)

    # ---- export -------------------------------------------------------------------------------------
    @torch.no_grad()
    def finish(self) -> None:
        """Fold the adapters into a plain student and check it against the grafted network."""
        self.eval()
        student = copy.deepcopy(self.student).eval()
        patches: list[dict[str, Any]] = list(self.widen_patches)  # before any wrapping changes the paths
        if self.replaced:  # blocks of the teacher's architecture: kdkit.load rebuilds them from it
            if "teacher" not in self.specs:
                raise ModelError("netgraft with keep_blocks needs the teacher's architecture to export the student")
            spec, args = self.specs["teacher"]
            patches += [{"path": self.s_blocks[i], "factory": "kdkit.grafting:model_block",
                         "args": {"arch": spec.arch, "module": spec.module, "args": args, "path": self.t_blocks[i]}}
                        for i in self.replaced]
        n = len(self.s_blocks)
        folded = 0
        for i in range(n - 1):
            out_a = self._adapter(self.adapters_out, i)
            in_a = self._adapter(self.adapters_in, i + 1)
            if out_a is None and in_a is None:
                continue
            gap = gap_between(self.teacher, self.t_blocks[i], self.t_blocks[i + 1])
            nxt_path = self.s_blocks[i + 1]
            if gap is not None and commutes(gap):
                w, b = compose(out_a, in_a)
                layer = first_layer(resolve(student, nxt_path))
                if layer is not None and fold_into(layer, w, b):
                    folded += 1
                    continue
                # the combined map sits right before the next block, in the form its input takes
                m = make_adapter(w.shape[1], w.shape[0], self.in_dims[i + 1])
                patches.append(adapter_patch(nxt_path, m, "prepend"))
                self._wrap_block(student, patches[-1], load_affine(m, w, b))
                continue
            for a, path, where in ((out_a, self.s_blocks[i], "append"), (in_a, nxt_path, "prepend")):
                if a is not None:
                    patches.append(adapter_patch(path, a, where))
                    self._wrap_block(student, patches[-1], copy.deepcopy(a))
        self.folded = folded
        self.patches = patches
        self.exported = student
        sample = next(iter(self._fewshot_loader(64)))
        self.export_diff = max_abs_diff(student(sample.x), self.grafted_net(self.grafted).eval()(sample.x))

    @staticmethod
    def _adapter(adapters: nn.ModuleDict, i: int) -> nn.Module | None:
        return adapters[str(i)] if str(i) in adapters else None  # noqa: SIM401 (ModuleDict has no get)

    @staticmethod
    def _wrap_block(model: nn.Module, patch: dict[str, Any], adapter: nn.Module) -> None:
        parent_path, _, name = patch["path"].rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        block = getattr(parent, name)
        seq = [adapter, block] if patch["factory"].endswith("prepend") else [block, adapter]
        setattr(parent, name, nn.Sequential(*seq))

    def export_model(self) -> nn.Module:
        assert self.exported is not None, "finish() builds the exported student"
        return self.exported

    def export_patches(self) -> list[dict[str, Any]]:
        return self.patches

    def summary(self) -> dict[str, Any]:
        return {"blocks": self.s_blocks, "grafted": [self.s_blocks[i] for i in self.grafted],
                "kept": [self.s_blocks[i] for i in self.kept], "shots": self.info.shots, "batch_size": self.batch,
                "adapters": len(self.adapters_in) + len(self.adapters_out), "folded_boundaries": self.folded,
                "widened_inputs": [p["path"] for p in self.widen_patches],
                "kept_adapter_layers": sum(1 for p in self.patches if p["factory"].endswith(("prepend", "append"))),
                "export_max_abs_diff": self.export_diff}
