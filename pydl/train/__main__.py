"""``python -m pydl.train``: train a model of the zoo on offline data with the course's recipe.

One process:
    python -m pydl.train --model mlp --data digits --out runs/mlp
Data parallel (gloo on CPU, NCCL on GPU; the same flags, --batch-size stays the global batch):
    torchrun --nproc-per-node 2 -m pydl.train --model mlp --data digits --out runs/mlp-ddp
Across machines, the same command on every node:
    torchrun --nnodes 2 --node-rank K --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 -m pydl.train --model convnext_tiny --data synthetic --out runs/x
"""

from __future__ import annotations

import argparse
import json
import sys

from . import recipe
from .data import DATASETS


def _parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        pass
    if "," in text:
        return [_parse_value(t) for t in text.split(",") if t != ""]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_model_kw(items: list[str]) -> dict:
    """``--model-kw depths=1,1,1,1 dims=16,32,64,128 n_head=2`` or ``--model-kw '{"n_layer": 2}'``:
    values are JSON where they parse as JSON, comma lists become lists, the rest strings."""
    kw: dict = {}
    for item in items:
        item = item.strip()
        if item.startswith("{"):
            try:
                obj = json.loads(item)
            except ValueError as exc:
                raise ValueError(f"--model-kw {item!r}: not a valid JSON object ({exc})") from exc
            if not isinstance(obj, dict):
                raise ValueError(f"--model-kw {item!r}: the JSON must be an object")
            kw.update(obj)
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--model-kw {item!r}: expected KEY=VALUE (e.g. n_layer=2) or a JSON object")
        kw[key] = _parse_value(value)
    return kw


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pydl.train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults marked 'per model' come from pydl.train.recipe.DEFAULTS (mlp, conv nets, gpt2).\n"
               "Outputs: DIR/metrics.json, DIR/checkpoint.pt (resumable), DIR/best.pt, DIR/curves.png.")
    a = p.add_argument
    a("--model", required=True, help="a pydl.models name: mlp, resnet18/34/50, convnext_tiny/small/base, gpt2")
    a("--data", choices=DATASETS, help="dataset (default per model: digits for classifiers, chars for gpt2)")
    a("--out", required=True, metavar="DIR", help="output folder (created)")
    a("--epochs", type=int, help="training epochs (per model)")
    a("--batch-size", type=int, help="global batch size, split over torchrun processes (per model)")
    a("--lr", type=float, help="peak learning rate of AdamW (per model)")
    a("--weight-decay", type=float, help="AdamW weight decay on weight matrices/kernels (per model)")
    a("--label-smoothing", type=float, help="CrossEntropyLoss label_smoothing (per model)")
    a("--drop-path", type=float, help="stochastic depth rate, passed as drop_path_rate (per model; conv nets)")
    a("--warmup", type=float, help="linear warm-up length in epochs, fractions allowed (per model)")
    a("--min-lr-ratio", type=float, default=0.01, help="cosine floor as a fraction of --lr (0.01)")
    a("--clip-grad", type=float, default=1.0, help="clip the global gradient norm (0: off; 1.0)")
    a("--amp", nargs="?", const="auto", default="off", choices=("off", "auto", "bf16", "fp16"),
      help="mixed precision: torch.amp autocast (+ GradScaler for fp16); bare --amp = auto")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N (auto)")
    a("--seed", type=int, default=0, help="seed of initialisation, data order, augmentation (0)")
    a("--split-seed", type=int, default=0, help="seed of the digits train/val/test split (0)")
    a("--augment", help="comma list of crop, flip; or none (per model: crop for the conv nets)")
    a("--mixup", type=float, default=0.0, help="mixup alpha (timm Mixup; 0: off)")
    a("--cutmix", type=float, default=0.0, help="cutmix alpha (timm Mixup; 0: off)")
    a("--image-size", type=int, help="digits upsampled to this size for conv nets (32); synthetic (224)")
    a("--block-size", type=int, default=128, help="characters of context for gpt2 (128)")
    a("--model-kw", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
      help="model constructor keywords, e.g. depths=1,1,1,1 dims=16,32,64,128, or a JSON object")
    a("--steps-per-epoch", type=int, help="cap on optimizer steps per epoch (default: the whole split)")
    a("--eval-batches", type=int, help="cap on evaluation batches per split (default: all)")
    a("--eval-batch-size", type=int, default=256, help="evaluation batch size per process (256)")
    a("--threads", type=int, help="torch intra-op threads per process (default: torch's; torchrun sets 1)")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--resume", metavar="CKPT", help="continue from DIR/checkpoint.pt (or its folder) with the same flags")
    a("--stop-after", type=int, metavar="EPOCH", help="stop after this epoch, checkpoint kept for --resume")
    a("--progress", default="auto", choices=("auto", "on", "off"),
      help="tqdm bars on rank 0: auto = only on a terminal")
    a("-q", "--quiet", action="store_true", help="no epoch summaries either")
    a("--dist-backend", choices=("gloo", "nccl"), help="override the torchrun backend (gloo on CPU, nccl on CUDA)")
    return p


def _check(p: argparse.ArgumentParser, ns: argparse.Namespace) -> None:
    positive = ("epochs", "batch_size", "lr", "block_size", "eval_batch_size", "steps_per_epoch",
                "eval_batches", "stop_after", "image_size", "threads")
    for name in positive:
        v = getattr(ns, name)
        if v is not None and v <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0 (got {v})")
    for name in ("weight_decay", "warmup", "clip_grad", "mixup", "cutmix", "min_lr_ratio"):
        v = getattr(ns, name)
        if v is not None and v < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0 (got {v})")
    for name in ("label_smoothing", "drop_path"):
        v = getattr(ns, name)
        if v is not None and not 0 <= v < 1:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1) (got {v})")
    if ns.min_lr_ratio > 1:
        p.error(f"--min-lr-ratio must be <= 1 (got {ns.min_lr_ratio})")
    if ns.image_size is not None and ns.image_size < 8:
        p.error(f"--image-size must be >= 8 (got {ns.image_size})")


def config_from_args(argv: list[str] | None = None):
    """Parse the command line into a ``TrainConfig`` (per-model defaults filled in)."""
    from .loop import TrainConfig

    p = build_parser()
    ns = p.parse_args(argv)
    _check(p, ns)
    try:
        d = recipe.defaults_for(ns.model)
    except ValueError as exc:
        p.error(str(exc))
    try:
        model_kw = parse_model_kw(ns.model_kw)
    except ValueError as exc:
        p.error(str(exc))
    aug = ns.augment if ns.augment is not None else d["augment"]
    augment = [] if aug.strip().lower() in ("none", "") else [s.strip() for s in aug.split(",") if s.strip()]
    bad = [s for s in augment if s not in ("crop", "flip")]
    if bad:
        p.error(f"--augment: unknown augmentation(s) {', '.join(bad)}; choose from crop, flip, none")
    pick = lambda name: getattr(ns, name) if getattr(ns, name) is not None else d[name]  # noqa: E731
    return TrainConfig(
        model=ns.model, out=ns.out, data=ns.data or d["data"], epochs=pick("epochs"),
        batch_size=pick("batch_size"), lr=pick("lr"), weight_decay=pick("weight_decay"),
        label_smoothing=pick("label_smoothing"), drop_path=pick("drop_path"),
        drop_path_set=ns.drop_path is not None, warmup=pick("warmup"), min_lr_ratio=ns.min_lr_ratio,
        clip_grad=ns.clip_grad, amp=ns.amp, device=ns.device, seed=ns.seed, split_seed=ns.split_seed,
        augment=augment, mixup=ns.mixup, cutmix=ns.cutmix, image_size=ns.image_size,
        block_size=ns.block_size, model_kw=model_kw, steps_per_epoch=ns.steps_per_epoch,
        eval_batches=ns.eval_batches, eval_batch_size=ns.eval_batch_size, compile=ns.compile, threads=ns.threads,
        resume=ns.resume, stop_after=ns.stop_after, progress=ns.progress, quiet=ns.quiet,
        dist_backend=ns.dist_backend)


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(argv)
    from .loop import train

    try:
        train(cfg)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"python -m pydl.train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
