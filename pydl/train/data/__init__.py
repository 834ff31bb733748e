"""Offline datasets for ``python -m pydl.train``: real data that needs no network.

- ``digits``: scikit-learn's bundled handwritten digits (1,797 images of 8x8, 10 classes), split
  into train/validation/test (70/10/20 %, stratified) by a fixed seed; flattened to 64 features
  for the MLP, upsampled (bilinear) to ``image_size`` x ``image_size`` for the conv nets.
- ``chars``: a character-level corpus of real public-domain prose shipped in this folder
  (Jane Austen's *Persuasion*, see README.md), split by position 90/5/5 % into contiguous
  train/validation/test ranges; samples are windows of ``block_size + 1`` characters.
- ``synthetic``: random images and labels made on the device (throughput runs: no data-loader
  stall by construction; the accuracy means nothing).

Every split is a small in-memory tensor that is moved to the training device once; a batch is
gathered there by index (``split.batch(indices)``), so there is no DataLoader and no worker
process, and the data order is a pure function of (seed, epoch) — what makes ``--resume`` exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

DATA_DIR = Path(__file__).resolve().parent
CORPUS_FILE = DATA_DIR / "persuasion.txt"
DATASETS = ("digits", "chars", "synthetic")


class ImageSplit:
    """Images ``x`` (N, C, H, W) or features (N, F) with integer labels ``y`` (N,)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"{x.shape[0]} inputs but {y.shape[0]} labels")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device) -> "ImageSplit":
        return ImageSplit(self.x.to(device), self.y.to(device))

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = idx.to(self.x.device)
        return self.x[idx], self.y[idx]


class CharSplit:
    """Token ids (L,) cut into windows: sample i is ``tokens[s : s + block + 1]`` with
    ``s = offset + i * block``; ``set_epoch`` moves the offset (train only) so that the windows
    differ from epoch to epoch, as a pure function of (seed, epoch)."""

    def __init__(self, tokens: torch.Tensor, block_size: int, *, shift: bool = False, seed: int = 0):
        if tokens.numel() < block_size + 2:
            raise ValueError(f"a split of {tokens.numel()} characters is shorter than "
                             f"--block-size {block_size} + 2")
        self.tokens, self.block, self.shift, self.seed = tokens, block_size, shift, seed
        self.offset = 0

    def __len__(self) -> int:
        n = self.tokens.numel()
        # with a shifting offset (< one block) keep the count that fits at every offset
        return n // self.block - 1 if self.shift else (n - 1) // self.block

    def set_epoch(self, epoch: int) -> None:
        if self.shift:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self.offset = int(torch.randint(0, self.block, (1,), generator=g))

    def to(self, device) -> "CharSplit":
        s = CharSplit(self.tokens.to(device), self.block, shift=self.shift, seed=self.seed)
        s.offset = self.offset
        return s

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = idx.to(self.tokens.device)
        starts = self.offset + idx * self.block  # (B,)
        win = self.tokens[starts[:, None] + torch.arange(self.block + 1, device=idx.device)]
        return win[:, :-1], win[:, 1:]  # (B, T) inputs, (B, T) next-character targets


@dataclass
class DataBundle:
    """What the training loop needs to know about a dataset."""

    name: str
    task: str  # "classify" or "lm"
    train: object
    val: object
    test: object
    num_classes: int = 0  # classify
    vocab_size: int = 0  # lm
    input_shape: tuple = ()
    meta: dict = field(default_factory=dict)
    augment: Callable | None = None  # batched train-time augmentation on the device

    def to(self, device) -> "DataBundle":
        self.train, self.val, self.test = (s.to(device) for s in (self.train, self.val, self.test))
        return self

    def sizes(self) -> dict:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


# ----------------------------------------------------------------------------- digits

def _split_indices(labels, seed: int, val_frac: float, test_frac: float):
    from sklearn.model_selection import train_test_split

    idx = list(range(len(labels)))
    rest, test = train_test_split(idx, test_size=test_frac, random_state=seed, stratify=labels)
    rest_labels = [labels[i] for i in rest]
    train, val = train_test_split(rest, test_size=val_frac / (1 - test_frac), random_state=seed,
                                  stratify=rest_labels)
    return sorted(train), sorted(val), sorted(test)


def load_digits(*, flatten: bool, image_size: int = 8, split_seed: int = 0,
                val_frac: float = 0.1, test_frac: float = 0.2) -> DataBundle:
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:  # pragma: no cover - a declared dependency of pydl.train
        raise ImportError("--data digits needs scikit-learn (pip install scikit-learn)") from exc
    d = sk_load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    tr, va, te = _split_indices(d.target.tolist(), split_seed, val_frac, test_frac)
    if not flatten and image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    mean, std = x[tr].mean(), x[tr].std()  # statistics of the training split only
    x = (x - mean) / std
    if flatten:
        x = x.flatten(1)  # (N, 64)
    splits = [ImageSplit(x[i], y[i]) for i in (tr, va, te)]
    return DataBundle("digits", "classify", *splits, num_classes=10, input_shape=tuple(x.shape[1:]),
                      meta={"split_seed": split_seed, "mean": float(mean), "std": float(std)})


# ----------------------------------------------------------------------------- chars

def load_corpus(path: str | Path | None = None) -> str:
    return Path(path or CORPUS_FILE).read_text(encoding="utf-8")


def load_chars(*, block_size: int, seed: int = 0, path: str | Path | None = None,
               val_frac: float = 0.05, test_frac: float = 0.05) -> DataBundle:
    text = load_corpus(path)
    vocab = sorted(set(text))
    stoi = {c: i for i, c in enumerate(vocab)}
    tokens = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = tokens.numel()
    n_val, n_test = int(n * val_frac), int(n * test_frac)
    n_train = n - n_val - n_test
    train = CharSplit(tokens[:n_train], block_size, shift=True, seed=seed)
    val = CharSplit(tokens[n_train:n_train + n_val], block_size)
    test = CharSplit(tokens[n_train + n_val:], block_size)
    return DataBundle("chars", "lm", train, val, test, vocab_size=len(vocab),
                      input_shape=(block_size,),
                      meta={"vocab": "".join(vocab), "block_size": block_size,
                            "corpus": Path(path or CORPUS_FILE).name, "characters": n})


# ----------------------------------------------------------------------------- synthetic

def load_synthetic(*, image_size: int, in_chans: int = 3, num_classes: int = 1000,
                   sizes: tuple[int, int, int] = (1024, 256, 256), seed: int = 0,
                   device="cpu") -> DataBundle:
    g = torch.Generator(device=device).manual_seed(seed)

    def make(n):
        x = torch.randn(n, in_chans, image_size, image_size, generator=g, device=device)
        return ImageSplit(x, torch.randint(0, num_classes, (n,), generator=g, device=device))

    return DataBundle("synthetic", "classify", *(make(n) for n in sizes), num_classes=num_classes,
                      input_shape=(in_chans, image_size, image_size), meta={"random": True})


# ----------------------------------------------------------------------------- augmentation

def random_crop(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Per-sample random translation by up to ``pad`` pixels (zero padding), i.e. the classic
    pad-and-random-crop; batched on the device. torchvision's v2 ``RandomCrop`` draws one crop
    per call, so on a batch it would move every image the same way."""
    B, C, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (B, 1), device=x.device)
    ox = torch.randint(0, 2 * pad + 1, (B, 1), device=x.device)
    rows = (oy + torch.arange(H, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (ox + torch.arange(W, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    b = torch.arange(B, device=x.device)[:, None, None, None]
    c = torch.arange(C, device=x.device)[None, :, None, None]
    return xp[b, c, rows, cols]


def random_hflip(x: torch.Tensor) -> torch.Tensor:
    """Per-sample horizontal flip with probability 1/2 (batched)."""
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def make_augment(names: list[str], image_size: int) -> Callable | None:
    """Train-time augmentation over a batch (B, C, H, W): ``crop`` and/or ``flip``."""
    unknown = [n for n in names if n not in ("crop", "flip")]
    if unknown:
        raise ValueError(f"--augment: unknown augmentation(s) {unknown}; choose from crop, flip")
    if not names:
        return None
    pad = max(1, image_size // 8)

    def augment(x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError("--augment needs image inputs (B, C, H, W); the MLP takes flat features")
        if "crop" in names:
            x = random_crop(x, pad)
        if "flip" in names:
            x = random_hflip(x)
        return x

    return augment


def import_timm():
    """timm, imported the way pydl.models does (it works around torchvision builds that do not
    match the installed torch) when that helper exists."""
    try:
        from pydl.models._timm import import_timm as _import
    except ImportError:
        import timm

        return timm
    return _import()


def make_mixup(mixup: float, cutmix: float, label_smoothing: float, num_classes: int):
    """timm's ``Mixup`` (batch-level mixup/cutmix with smoothed soft targets), or torchvision's
    v2 ``MixUp``/``CutMix`` when timm is missing. Returns ``f(x, y) -> (x, soft_targets)`` and
    whether the targets already carry the label smoothing."""
    try:
        timm = import_timm()
        from timm.data import Mixup
    except Exception:  # noqa: BLE001 - timm missing or its import broken: try torchvision
        Mixup = None
    if Mixup is not None:
        m = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                  num_classes=num_classes)
        del timm
        return m, True
    try:
        from torchvision.transforms import v2
    except Exception as exc:  # noqa: BLE001
        raise ImportError("--mixup/--cutmix need timm (or torchvision >= 0.16)") from exc
    ops = []
    if mixup > 0:
        ops.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        ops.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    t = ops[0] if len(ops) == 1 else v2.RandomChoice(ops)
    return (lambda x, y: t(x, y)), False


def load(name: str, *, model_family: str, image_size: int | None = None, block_size: int = 128,
         split_seed: int = 0, seed: int = 0, augment: list[str] | None = None,
         in_chans: int = 3, num_classes: int = 1000, device="cpu") -> DataBundle:
    """The dataset ``name`` shaped for a model of ``model_family`` ("mlp", "conv" or "lm")."""
    if name not in DATASETS:
        raise ValueError(f"--data: unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if name == "chars":
        if model_family != "lm":
            raise ValueError("--data chars is a language-modelling corpus: use a language model "
                             "(--model gpt2)")
        bundle = load_chars(block_size=block_size, seed=seed)
    else:
        if model_family == "lm":
            raise ValueError(f"--data {name} holds images: a language model needs --data chars")
        if name == "digits":
            size = image_size or (8 if model_family == "mlp" else 32)
            bundle = load_digits(flatten=model_family == "mlp", image_size=size, split_seed=split_seed)
        else:
            size = image_size or 224
            if model_family == "mlp":
                raise ValueError("--data synthetic makes images for the conv nets, not the MLP")
            bundle = load_synthetic(image_size=size, in_chans=in_chans, num_classes=num_classes,
                                    seed=split_seed, device=device)
        if augment:
            if model_family == "mlp":
                raise ValueError("--augment applies to images; the MLP takes flat features "
                                 "(use --augment none)")
            bundle.augment = make_augment(augment, bundle.input_shape[-1])
    return bundle


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)
