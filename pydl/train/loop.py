"""The training loop: epochs, validation, the checkpoint chosen on validation, one test at the end.

ERM on the training split; the validation split picks the epoch whose weights are kept
(highest validation accuracy, ties to the lower validation loss; lowest validation loss for a
language model); the test split is evaluated once, after training, with those weights.

``DIR/checkpoint.pt`` is written after every epoch (model, optimizer, scheduler, scaler, every
rank's RNG states, epoch, history, the best weights so far) and ``--resume`` continues from it
exactly: the data order of epoch e is a pure function of (seed, e) and the RNG states are
restored, so an interrupted and resumed run ends with the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import data as data_mod
from . import distributed as dist_mod
from . import recipe
from .report import plot_curves, write_json

CHECKPOINT_FORMAT = "pydl.train/1"
# Config fields that may differ between a run and its --resume (they do not change the result).
RESUME_FREE = {"out", "resume", "stop_after", "progress", "quiet", "device", "dist_backend", "threads"}


@dataclass
class TrainConfig:
    model: str
    out: str
    data: str = "digits"
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    drop_path: float = 0.0
    drop_path_set: bool = False
    warmup: float = 1.0  # epochs
    min_lr_ratio: float = 0.01
    clip_grad: float = 1.0
    amp: str = "off"
    device: str = "auto"
    seed: int = 0
    split_seed: int = 0
    augment: list = field(default_factory=list)
    mixup: float = 0.0
    cutmix: float = 0.0
    image_size: int | None = None
    block_size: int = 128
    model_kw: dict = field(default_factory=dict)
    steps_per_epoch: int | None = None
    eval_batches: int | None = None
    eval_batch_size: int = 256
    compile: bool = False
    threads: int | None = None
    resume: str | None = None
    stop_after: int | None = None
    progress: str = "auto"  # auto | on | off
    quiet: bool = False
    dist_backend: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def create_model(name: str, **kw) -> torch.nn.Module:
    """``pydl.models.create(name, **kw)``; keyword errors become a clear ``ValueError``."""
    from pydl import models

    try:
        return models.create(name, **kw)
    except TypeError as exc:
        raise ValueError(f"--model {name}: the model does not take these keywords {kw}: {exc} "
                         "(check --model-kw and --drop-path)") from exc


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch sees no CUDA device here")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    return device


# ----------------------------------------------------------------------------- RNG states

def rng_state(device: torch.device) -> dict:
    """The states of every generator the loop draws from, in a ``weights_only``-loadable form."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"python": random.getstate(), "torch": torch.get_rng_state(),
          "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: dict, device: torch.device) -> None:
    random.setstate(_as_tuple(st["python"]))
    torch.set_rng_state(st["torch"].cpu())
    kind, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"].cpu(), device)


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- steps

def _logits(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"the model returned {type(out).__name__}; expected logits")


def _loss(loss_fn, logits, y):
    if logits.dim() == 3:  # (B, T, V) language model
        return loss_fn(logits.flatten(0, 1).float(), y.flatten())
    return loss_fn(logits.float(), y)


@torch.no_grad()
def evaluate(model, split, *, batch_size: int, info, device, amp, task: str,
             limit: int | None = None) -> dict:
    """Mean cross-entropy (no smoothing) and accuracy (classifiers) or perplexity (LMs) over the
    whole split, sharded over the ranks without padding and summed exactly."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for idx in dist_mod.eval_batches(len(split), batch_size, info, limit):
        x, y = split.batch(idx)
        with recipe.autocast(device, amp):
            logits = _logits(model(x))
        logits = logits.float()
        if logits.dim() == 3:
            logits, y = logits.flatten(0, 1), y.flatten()
        loss_sum += torch.nn.functional.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(-1) == y).sum().double()
        count += y.numel()
    loss_sum, correct, count = dist_mod.all_reduce_sum([loss_sum.item(), correct.item(), float(count)],
                                                       device, info)
    count = max(count, 1.0)
    out = {"loss": loss_sum / count}
    if task == "lm":
        out["perplexity"] = math.exp(min(out["loss"], 700.0))
        out["accuracy"] = correct / count  # next-character accuracy
    else:
        out["accuracy"] = correct / count
    return out


def _better(task: str, new: dict, best: dict | None) -> bool:
    if best is None:
        return True
    if task == "lm":
        return new["loss"] < best["loss"]
    return (new["accuracy"], -new["loss"]) > (best["accuracy"], -best["loss"])


def _cpu_state(model) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _progress_enabled(cfg: TrainConfig, info) -> bool:
    if not info.is_main or cfg.quiet or cfg.progress == "off":
        return False
    return cfg.progress == "on" or sys.stderr.isatty()


def _say(cfg: TrainConfig, info, msg: str) -> None:
    if info.is_main and not cfg.quiet:
        print(msg, flush=True)


def _resume_path(p: str) -> Path:
    path = Path(p)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"--resume {p}: no checkpoint file there")
    return path


def _check_resumable(ckpt: dict, cfg: TrainConfig, path: Path) -> None:
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"--resume {path}: not a pydl.train checkpoint (format {ckpt.get('format')!r})")
    old, new = ckpt["config"], cfg.to_dict()
    diff = sorted(k for k in new if k not in RESUME_FREE and k in old and old[k] != new[k])
    if diff:
        detail = ", ".join(f"{k}: checkpoint {old[k]!r} vs now {new[k]!r}" for k in diff)
        raise ValueError(f"--resume {path}: the run's settings differ from the checkpoint's ({detail}); "
                         "resume with the same flags")


# ----------------------------------------------------------------------------- the run

def train(cfg: TrainConfig) -> dict:
    """Run the whole recipe; returns the metrics (also written to ``cfg.out``/metrics.json)."""
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device_name = resolve_device(cfg.device)
    world = dist_mod.env_world_size()
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} (the global batch) must be divisible by the "
                         f"number of processes ({world})")
    info, device = dist_mod.setup(device_name, cfg.dist_backend)
    try:
        return _train(cfg, info, device, t_start)
    finally:
        dist_mod.teardown(info)


def _train(cfg: TrainConfig, info, device: torch.device, t_start: float) -> dict:
    out = Path(cfg.out)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    family = recipe.family_of(cfg.model)
    seed_everything(cfg.seed)
    bundle = data_mod.load(cfg.data, model_family=family, image_size=cfg.image_size,
                           block_size=cfg.block_size, split_seed=cfg.split_seed, seed=cfg.seed,
                           augment=cfg.augment, device=device).to(device)
    task = bundle.task
    if (cfg.mixup or cfg.cutmix) and task != "classify":
        raise ValueError("--mixup/--cutmix apply to image classification only")
    if (cfg.mixup or cfg.cutmix) and family == "mlp":
        raise ValueError("--mixup/--cutmix mix images; the MLP takes flat features")
    mix, smoothing_in_targets = (None, False)
    if cfg.mixup or cfg.cutmix:
        mix, smoothing_in_targets = data_mod.make_mixup(cfg.mixup, cfg.cutmix, cfg.label_smoothing,
                                                        bundle.num_classes)
    kw = recipe.model_kwargs(cfg.model, bundle, drop_path=cfg.drop_path, block_size=cfg.block_size,
                             user_kw=cfg.model_kw, drop_path_set=cfg.drop_path_set)
    model = create_model(cfg.model, **kw).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    ddp_model = dist_mod.wrap(model, info, device)
    run_model = torch.compile(ddp_model) if cfg.compile else ddp_model

    steps = dist_mod.steps_per_epoch(len(bundle.train), cfg.batch_size, cfg.steps_per_epoch)
    if steps == 0:
        raise ValueError(f"--batch-size {cfg.batch_size} is larger than the training split "
                         f"({len(bundle.train)} samples)")
    total_steps = steps * cfg.epochs
    warmup_steps = min(int(round(cfg.warmup * steps)), max(total_steps - 1, 0))
    optimizer = recipe.make_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = recipe.make_scheduler(optimizer, total_steps=total_steps, warmup_steps=warmup_steps,
                                      min_lr_ratio=cfg.min_lr_ratio)
    amp = recipe.amp_dtype(cfg.amp, device)
    scaler = recipe.make_scaler(device, amp)
    loss_fn = recipe.make_loss(0.0 if smoothing_in_targets else cfg.label_smoothing)

    history: list[dict] = []
    best: dict | None = None
    start_epoch = 0
    # Per-rank streams for augmentation/dropout; the model was initialised identically above.
    seed_everything(cfg.seed + 7919 * info.rank)
    if cfg.resume:
        path = _resume_path(cfg.resume)
        ckpt = torch.load(path, map_location=device, weights_only=True)
        _check_resumable(ckpt, cfg, path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, history = ckpt["epoch"], list(ckpt["history"])
        best = ckpt["best"]
        best["model"] = {k: v.cpu() for k, v in best["model"].items()}
        rngs = ckpt["rng"]
        if len(rngs) == info.world_size:
            set_rng_state(rngs[info.rank], device)
        else:
            _say(cfg, info, f"note: checkpoint from {len(rngs)} process(es), now {info.world_size}: "
                            "data order is kept, augmentation/dropout streams are re-seeded")
            seed_everything(cfg.seed + 7919 * info.rank + 104729 * start_epoch)
        _say(cfg, info, f"resumed from {path} after epoch {start_epoch}")

    _say(cfg, info, f"pydl.train: {cfg.model} ({n_params / 1e6:.2f} M parameters) on {cfg.data} "
                    f"{bundle.sizes()} | {device} x {info.world_size} | {cfg.epochs} epochs x {steps} "
                    f"steps, batch {cfg.batch_size}, lr {cfg.lr:g}, amp {cfg.amp}")
    show_bar = _progress_enabled(cfg, info)
    stop_at = min(cfg.epochs, cfg.stop_after) if cfg.stop_after else cfg.epochs
    t_train = time.perf_counter()
    samples_seen = 0
    for epoch in range(start_epoch, stop_at):
        t0 = time.perf_counter()
        if hasattr(bundle.train, "set_epoch"):
            bundle.train.set_epoch(epoch)
        batches = dist_mod.train_batches(len(bundle.train), cfg.batch_size, info, seed=cfg.seed,
                                         epoch=epoch, limit=cfg.steps_per_epoch)
        train_loss = _train_epoch(run_model, bundle, batches, optimizer, scheduler, scaler, loss_fn,
                                  mix, amp, device, cfg, epoch, show_bar)
        train_loss = dist_mod.all_reduce_sum([train_loss], device, info)[0] / info.world_size
        samples_seen += len(batches) * cfg.batch_size
        val = evaluate(model, bundle.val, batch_size=cfg.eval_batch_size, info=info, device=device,
                       amp=amp, task=task, limit=cfg.eval_batches)
        rec = {"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val["loss"],
               "val_accuracy": val["accuracy"], "lr": optimizer.param_groups[0]["lr"],
               "time_s": time.perf_counter() - t0}
        if task == "lm":
            rec["val_perplexity"] = val["perplexity"]
        history.append(rec)
        improved = _better(task, val, best)
        if improved:
            best = {"epoch": epoch + 1, "loss": val["loss"], "accuracy": val["accuracy"],
                    "model": _cpu_state(model)}
        _say(cfg, info, _summary(rec, cfg.epochs, task, improved))
        _save_checkpoint(out / "checkpoint.pt", cfg, info, device, model, optimizer, scheduler,
                         scaler, epoch + 1, history, best, bundle, kw)
    train_time = time.perf_counter() - t_train

    metrics = _metrics(cfg, info, device, bundle, kw, n_params, history, best, train_time,
                       samples_seen, t_start)
    if stop_at < cfg.epochs:
        metrics["stopped_after_epoch"] = stop_at
        _say(cfg, info, f"stopped after epoch {stop_at} (--stop-after); continue with --resume "
                        f"{out / 'checkpoint.pt'}")
    else:
        # The test split, once, with the weights chosen on validation.
        model.load_state_dict(best["model"])
        test = evaluate(model, bundle.test, batch_size=cfg.eval_batch_size, info=info, device=device,
                        amp=amp, task=task, limit=cfg.eval_batches)
        metrics["test_loss"] = test["loss"]
        metrics["test_accuracy"] = test["accuracy"]
        if task == "lm":
            metrics["test_perplexity"] = test["perplexity"]
        if info.is_main:
            torch.save({"format": CHECKPOINT_FORMAT, "model": best["model"], "model_name": cfg.model,
                        "model_kw": kw, "epoch": best["epoch"], "data_meta": bundle.meta},
                       out / "best.pt")
        what = (f"test perplexity {test['perplexity']:.3f} (loss {test['loss']:.4f})" if task == "lm"
                else f"test accuracy {100 * test['accuracy']:.2f}%")
        _say(cfg, info, f"{what} with the epoch-{best['epoch']} weights chosen on validation; "
                        f"total {time.perf_counter() - t_start:.1f} s -> {out}")
    metrics["wall_time_s"] = time.perf_counter() - t_start
    if info.is_main:
        write_json(out / "metrics.json", metrics)
        plot_curves(out / "curves.png", metrics)
    dist_mod.barrier(info)
    return metrics


def _train_epoch(model, bundle, batches, optimizer, scheduler, scaler, loss_fn, mix, amp, device,
                 cfg, epoch, show_bar) -> float:
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    bar = None
    if show_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   dynamic_ncols=True, file=sys.stderr)
    for i, idx in enumerate(batches):
        x, y = bundle.train.batch(idx)
        if bundle.augment is not None:
            x = bundle.augment(x)
        if mix is not None:
            x, y = mix(x, y)
        with recipe.autocast(device, amp):
            logits = _logits(model(x))
        loss = _loss(loss_fn, logits, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.clip_grad > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss_sum += loss.detach().double()
        if bar is not None:
            bar.update(1)
            if i % 10 == 0 or i == len(batches) - 1:
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    if bar is not None:
        bar.close()
    if not torch.isfinite(loss_sum):
        raise FloatingPointError(f"epoch {epoch + 1}: the training loss is not finite "
                                 "(lower --lr, or use --amp bf16 instead of fp16)")
    return loss_sum.item() / max(len(batches), 1)


def _summary(rec: dict, epochs: int, task: str, improved: bool) -> str:
    width = len(str(epochs))
    s = f"epoch {rec['epoch']:>{width}}/{epochs}  train_loss {rec['train_loss']:.4f}  val_loss {rec['val_loss']:.4f}  "
    if task == "lm":
        s += f"val_ppl {rec['val_perplexity']:.3f}  "
    else:
        s += f"val_acc {100 * rec['val_accuracy']:6.2f}%  "
    return s + f"lr {rec['lr']:.2e}  {rec['time_s']:.1f}s" + ("  *" if improved else "")


def _save_checkpoint(path: Path, cfg, info, device, model, optimizer, scheduler, scaler, epoch,
                     history, best, bundle, kw) -> None:
    rngs = dist_mod.gather_objects(rng_state(device), info) if info.enabled else [rng_state(device)]
    if not info.is_main:
        return
    ckpt = {"format": CHECKPOINT_FORMAT, "epoch": epoch, "config": cfg.to_dict(),
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rngs,
            "history": history, "best": best, "model_kw": kw, "data_meta": bundle.meta}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def _metrics(cfg, info, device, bundle, kw, n_params, history, best, train_time, samples_seen,
             t_start) -> dict:
    task = bundle.task
    m = {"model": cfg.model, "data": cfg.data, "task": task, "epochs": len(history),
         "train_loss": [h["train_loss"] for h in history],
         "val_loss": [h["val_loss"] for h in history]}
    if task == "lm":
        m["val_perplexity"] = [h["val_perplexity"] for h in history]
    else:
        m["val_accuracy"] = [h["val_accuracy"] for h in history]
    m["lr"] = [h["lr"] for h in history]
    m["epoch_time_s"] = [h["time_s"] for h in history]
    if best is not None:
        m["best_epoch"] = best["epoch"]
        m["best_val_loss" if task == "lm" else "best_val_accuracy"] = (
            best["loss"] if task == "lm" else best["accuracy"])
    per_sample = bundle.input_shape[0] if task == "lm" else 1
    m.update({
        "train_time_s": train_time,
        ("tokens_per_s" if task == "lm" else "samples_per_s"):
            samples_seen * per_sample / train_time if train_time > 0 and samples_seen else None,
        "parameters": n_params, "world_size": info.world_size, "device": str(device),
        "dist_backend": info.backend, "amp": cfg.amp, "PYDL_BACKEND": os.environ.get("PYDL_BACKEND"), "threads_per_process": torch.get_num_threads(),
        "dataset": {"sizes": bundle.sizes(), **{k: v for k, v in bundle.meta.items() if k != "vocab"}},
        "model_kw": kw, "config": cfg.to_dict(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "machine": {"platform": platform.platform(), "processor": _cpu_name(), "cpus": os.cpu_count(),
                    "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
    })
    try:
        from pydl._version import __version__

        m["versions"]["pydl"] = __version__
    except ImportError:  # pragma: no cover
        pass
    return m


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
