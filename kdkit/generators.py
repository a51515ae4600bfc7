"""Image generators for data-free distillation, and the file they are saved in (``generator.pt``).

:class:`DAFLGenerator` is the generator of DAFL (Chen et al., ICCV 2019), reused unchanged by RDSKD
(Han et al., ICASSP 2021): ``z -> linear -> 128 x s/4 x s/4 -> BN -> up x2 -> conv 128, BN, LeakyReLU(0.2)
-> up x2 -> conv 64, BN, LeakyReLU(0.2) -> conv C -> tanh -> BN without affine``. ``width`` scales the
128/64 channels (128 is the authors'); ``bn_eps=0.8`` keeps the authors' code, which passes 0.8 as the
BatchNorm's eps (its second positional argument) in the two middle layers.

The images it makes live directly in the teacher's (normalised) input space.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .engine.checkpoint import atomic_save, read
from .errors import CheckpointError, ModelError

FORMAT = "kdkit-generator"


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling of ``[N, C, H, W]``, equal to ``F.interpolate(x, scale_factor=2)``.

    Written as a broadcast and a reshape: on this project's 2-core CPU it is several times faster than
    ``F.interpolate`` for the generator's large feature maps, forward and backward (see BENCHMARKS.md)."""
    n, c, h, w = x.shape
    return x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)


class ImageGenerator(nn.Module):
    """What the generators share: noise, sampling without touching BatchNorm statistics, re-initialisation and
    the arguments that rebuild them (``spec``). ``latent_dim`` and ``input_shape`` are set by subclasses."""

    latent_dim: int
    input_shape: tuple[int, int, int]

    def noise(self, n: int, generator: torch.Generator | None = None, device: torch.device | None = None
              ) -> torch.Tensor:
        device = device or next(self.parameters()).device
        return torch.randn(n, self.latent_dim, generator=generator).to(device)

    @torch.no_grad()
    def sample(self, n: int, *, batch_stats: bool = False, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        """``n`` images without gradients. ``batch_stats=True`` normalises with the batch's own statistics
        (as in training) without touching the running statistics; otherwise the running ones (eval mode)."""
        was = self.training
        bns = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in bns]
        counts = [None if m.num_batches_tracked is None else m.num_batches_tracked.clone() for m in bns]
        try:
            self.train(batch_stats)
            if batch_stats:
                for m in bns:
                    m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
            return self(self.noise(n, generator))
        finally:
            for m, mom, count in zip(bns, momenta, counts):
                m.momentum = mom
                if count is not None:
                    m.num_batches_tracked.copy_(count)
            self.train(was)

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError

    def reset(self, seed: int | None = None) -> None:
        """Re-initialise every weight (and BatchNorm statistic), as a new generator would be."""
        state = torch.random.get_rng_state()
        if seed is not None:
            torch.manual_seed(seed)
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        if seed is not None:
            torch.random.set_rng_state(state)


def _square_side(input_shape: tuple[int, int, int] | list[int], what: str) -> tuple[int, int, int]:
    c, h, w = (int(v) for v in input_shape)
    if h != w or h % 4:
        raise ModelError(
            f"the {what} generator makes square images whose side is a multiple of 4; the teacher takes {h}x{w}; "
            "set data.image_size to a multiple of 4 (the teacher must have been trained at that size)")
    return c, h, w


class DAFLGenerator(ImageGenerator):
    def __init__(self, input_shape: tuple[int, int, int] | list[int], latent_dim: int = 100, width: int = 128,
                 bn_eps: float = 0.8):
        super().__init__()
        c, h, w = _square_side(input_shape, "DAFL")
        if width < 2:
            raise ModelError(f"method.generator_width must be at least 2, got {width}")
        self.input_shape = (c, h, w)
        self.latent_dim = latent_dim
        self.width = width
        self.bn_eps = bn_eps
        self.init_size = h // 4
        self.fc = nn.Linear(latent_dim, width * self.init_size**2)
        self.bn0 = nn.BatchNorm2d(width)
        self.block1 = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width, eps=bn_eps),
                                    nn.LeakyReLU(0.2))
        half = max(1, width // 2)
        self.block2 = nn.Sequential(nn.Conv2d(width, half, 3, padding=1), nn.BatchNorm2d(half, eps=bn_eps),
                                    nn.LeakyReLU(0.2), nn.Conv2d(half, c, 3, padding=1), nn.Tanh(),
                                    nn.BatchNorm2d(c, affine=False))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).view(len(z), self.width, self.init_size, self.init_size)
        x = self.block1(upsample2x(self.bn0(x)))
        return self.block2(upsample2x(x))

    def spec(self) -> dict[str, Any]:
        return {"input_shape": list(self.input_shape), "latent_dim": self.latent_dim, "width": self.width,
                "bn_eps": self.bn_eps}


class FastGenerator(ImageGenerator):
    """The generator of Fast-Datafree (Fang et al., AAAI 2022; also CMI's): ``z -> linear -> 2w x s/4 x s/4 ->
    BN -> up x2 -> conv 2w (no bias), BN, LeakyReLU(0.2) -> up x2 -> conv w (no bias), BN, LeakyReLU(0.2) ->
    conv C -> sigmoid``, images in [0, 1] then normalised with the teacher's mean and std (kept as buffers), so
    its images live in the teacher's input space like :class:`DAFLGenerator`'s. ``width`` is the authors'
    ngf (64)."""

    def __init__(self, input_shape: tuple[int, int, int] | list[int], latent_dim: int = 256, width: int = 64,
                 mean: list[float] | None = None, std: list[float] | None = None):
        super().__init__()
        c, h, w = _square_side(input_shape, "FastDFKD")
        if width < 1:
            raise ModelError(f"method.generator_width must be at least 1, got {width}")
        self.input_shape, self.latent_dim, self.width = (c, h, w), latent_dim, width
        self.init_size = h // 4
        self.l1 = nn.Linear(latent_dim, 2 * width * self.init_size**2)
        self.bn0 = nn.BatchNorm2d(2 * width)
        self.block1 = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False),
                                    nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2))
        self.block2 = nn.Sequential(nn.Conv2d(2 * width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                    nn.LeakyReLU(0.2), nn.Conv2d(width, c, 3, padding=1), nn.Sigmoid())
        self.register_buffer("mean", torch.tensor(mean if mean is not None else [0.0] * c).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(std if std is not None else [1.0] * c).view(1, c, 1, 1))

    def unit(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (before the teacher's normalisation)."""
        x = self.l1(z).view(len(z), 2 * self.width, self.init_size, self.init_size)
        x = self.block1(upsample2x(self.bn0(x)))
        return self.block2(upsample2x(x))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (self.unit(z) - self.mean) / self.std

    def spec(self) -> dict[str, Any]:
        return {"input_shape": list(self.input_shape), "latent_dim": self.latent_dim, "width": self.width,
                "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}


GENERATORS: dict[str, type[ImageGenerator]] = {"DAFLGenerator": DAFLGenerator, "FastGenerator": FastGenerator}


def save_generator(path: str | os.PathLike, gen: ImageGenerator, meta: dict[str, Any]) -> None:
    """A self-describing generator file: ``kdkit sample RUN_DIR`` and :func:`load_generator` need nothing else.

    ``meta`` records what the images mean (the teacher's normalisation and classes, the sampling mode)."""
    atomic_save({"format": FORMAT, "version": 1, "class": type(gen).__name__, "args": gen.spec(), "meta": dict(meta),
                 "state_dict": {k: v.detach().cpu() for k, v in gen.state_dict().items()}}, path)


def load_generator(path: str | os.PathLike) -> tuple[ImageGenerator, dict[str, Any]]:
    obj = read(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a kdkit generator file (generator.pt written by a data-free run)")
    cls = GENERATORS.get(obj.get("class", "DAFLGenerator"))
    if cls is None:
        raise CheckpointError(f"{path}: unknown generator class {obj.get('class')!r} (a newer kdkit wrote it?)")
    gen = cls(**obj["args"])
    try:
        gen.load_state_dict(obj["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the generator weights do not fit its recorded shape ({str(e)[:160]})") from None
    return gen.eval(), obj.get("meta", {})


def _teacher_labels(run: Any, images: torch.Tensor, meta: dict[str, Any]) -> list[str] | None:
    """The run's teacher's predicted class of each image (None when the teacher cannot be loaded)."""
    import yaml

    from .errors import KdkitError
    from .modelfile import load

    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
        teacher = load(cfg["teacher"]["checkpoint"])
    except (OSError, KeyError, TypeError, KdkitError, yaml.YAMLError):
        return None
    with torch.no_grad():
        pred = teacher(images.float()).argmax(1)
    classes = meta.get("classes") or [str(i) for i in range(int(pred.max()) + 1)]
    return [str(classes[int(c)]) for c in pred]


def sample_run(run_dir: str | os.PathLike, n: int, out: str | os.PathLike | None = None, seed: int = 0,
               tensors: bool = False) -> dict[str, Any]:
    """``kdkit sample``: ``n`` images from a data-free run's generator (``generator.pt``), or the first ``n``
    of its synthesised set (``synthetic.pt``, DeepInversion), as a PNG grid (and optionally a tensor file
    of the normalised images, ready for the teacher or the student)."""
    from pathlib import Path

    from .diagnostics import save_grid

    run = Path(run_dir)
    if n <= 0:
        raise CheckpointError(f"-n must be a positive number of images, got {n}")
    if (run / "generator.pt").is_file():
        gen, meta = load_generator(run / "generator.pt")
        images = gen.sample(n, batch_stats=bool(meta.get("batch_stats")), generator=torch.Generator().manual_seed(seed))
    elif (run / "synthetic.pt").is_file():
        meta = read(run / "synthetic.pt")
        if not isinstance(meta, dict) or meta.get("format") != "kdkit-synthetic":
            raise CheckpointError(f"{run / 'synthetic.pt'} is not a kdkit synthetic-image file")
        images = meta["images"][:n]
    else:
        raise CheckpointError(f"{run} holds no generator.pt or synthetic.pt: is it the folder of a finished "
                              "data-free run (rdskd, dafl, dfad, deepinversion)?")
    png = Path(out) if out is not None else run / "samples" / f"sample_n{n}_seed{seed}.png"
    save_grid(png, images, meta["mean"], meta["std"], _teacher_labels(run, images, meta))
    result: dict[str, Any] = {"png": str(png), "images": len(images)}
    if tensors:
        path = png.with_suffix(".pt")
        torch.save(images.cpu(), path)
        result["tensors"] = str(path)
    return result
