"""Training: the paper's recipe (tau-scaled cross-entropy, AdamW, cosine schedule).

One loop serves a laptop CPU, one GPU (optional AMP) and several GPUs or nodes under
torchrun (DistributedDataParallel; gloo on CPU, nccl on CUDA). Every epoch writes a
resumable `last.pt`; the end writes `model.pt` (weights + ModelCard), `card.json`,
`history.json` and `curves.png`. Validation certifies the FUSED model, as deployment will.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from certseg.errors import UserError
from certseg.inference import pick_device
from certseg.losses import certified_offset, tau_cross_entropy
from certseg.nn.position import position_bias_names

__all__ = [
    "NothingToDo",
    "Recipe",
    "TrainConfig",
    "fit",
    "make_optimizer",
    "train",
]

#: What a resumable last.pt holds; its "config" (TrainConfig) and "classes" are checked
#: on resume where present (older files lack "classes", some "config" fields).
_RESUME_KEYS = ("model", "optimizer", "scheduler", "epoch", "history", "elapsed")

#: TrainConfig fields a resumed run may change: how long it runs, and where (neither
#: changes what a step computes). Every other one would be silently half-applied.
_MAY_CHANGE_ON_RESUME = frozenset({"recipe.epochs", "out", "device", "workers", "progress"})

#: TrainConfig fields that name files: compared as the paths they resolve to.
_PATH_FIELDS = frozenset({"root", "init"})

#: How a TrainConfig field is given on the command line, where not `--<field>`.
_FLAG_OF_FIELD = {"size": "--height/--width", "arch_kwargs": "--arch-kwarg"}

#: Model arguments training sets itself (from the data), not --arch-kwarg.
_SET_BY_TRAINING = ("mean", "std")


class NothingToDo(Exception):
    """A resumed run already trained its --epochs and wrote model.pt: nothing is written."""


@dataclass
class Recipe:
    """Optimisation settings; defaults are the paper's (AdamW, betas 0.95, cosine to 1e-6)."""

    epochs: int = 10
    lr: float = 1e-3
    lr_min: float = 1e-6
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.95, 0.95)
    tau: float = 8.0
    train_eps: float = 0.0  # > 0: Lipschitz-margin offset sqrt(2) L train_eps on wrong classes
    position_lr_scale: float = 1.0  # lr multiplier of position biases (no weight decay)
    ignore_index: int = 255

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, lipschitz: float) -> torch.Tensor:
        """The training loss of this recipe for a net of Lipschitz constant `lipschitz`."""
        offset = certified_offset(self.train_eps, lipschitz)
        return tau_cross_entropy(logits.float(), labels, self.tau, self.ignore_index, offset)


@dataclass
class TrainConfig:
    """What to train on what; also stored in the checkpoint and the ModelCard."""

    out: str
    arch: str = "lipdeeplab_xs"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    data: str = "synthetic"  # synthetic | cityscapes | folder
    root: str | None = None
    num_images: int = 512  # synthetic: training scenes
    val_images: int = 64  # synthetic: held-out scenes (another seed)
    size: tuple[int, int] = (96, 192)
    batch_size: int = 8
    recipe: Recipe = field(default_factory=Recipe)
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    workers: int = 0
    eps: float = 0.1  # validation certificate and the card's default eps
    noise_sigma: float = 0.0  # Gaussian noise augmentation (the smoothing baseline's twin)
    name: str | None = None
    init: str | None = None  # start from this checkpoint's weights (fine-tuning)
    max_steps_per_epoch: int | None = None  # for smoke tests
    progress: bool = True


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively: a config read back from last.pt compares equal."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _changed_settings(saved: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """'--flag old -> new' for each field of `now` that differs from `saved` and may not
    change on resume; fields `saved` lacks (an older last.pt) are not compared."""
    changed = []
    for key, value in now.items():
        name = prefix + key
        if key not in saved or name in _MAY_CHANGE_ON_RESUME:
            continue
        if name in _PATH_FIELDS and saved[key] is not None:
            if value is None and name == "init":  # a resume need not repeat --init
                continue
            if value is not None and Path(value).resolve() == Path(saved[key]).resolve():
                continue  # ./a/model.pt is a/model.pt
        if isinstance(value, dict) and key == "recipe" and isinstance(saved[key], dict):
            changed += _changed_settings(saved[key], value, "recipe.")
        elif _plain(saved[key]) != _plain(value):
            flag = _FLAG_OF_FIELD.get(key, "--" + key.replace("_", "-"))
            changed.append(f"{flag} {_plain(saved[key])!r} -> {_plain(value)!r}")
    return changed


def _check_resumable(last: Path, state: dict[str, Any], cfg: TrainConfig) -> None:
    """A resumed run keeps its model, optimiser state and data, so a changed setting
    (lr, image size, data, seed, ...) would be ignored or half-applied while the card
    recorded it: refused, naming each. Only --epochs (and --device, --workers) may
    change. A run that already trained --epochs and wrote model.pt has nothing to do."""
    changed = _changed_settings(state.get("config") or {}, asdict(cfg))
    if changed:
        raise UserError(
            f"{last} (resumed) was trained with other settings: {'; '.join(changed)}; resume "
            "with the same settings (only --epochs, --device and --workers may change) or "
            "use a new --out"
        )
    done, epochs = int(state["epoch"]), cfg.recipe.epochs
    if done >= epochs and (last.parent / "model.pt").exists():
        raise NothingToDo(
            f"{last} already trained {done} epochs (>= --epochs {epochs}): nothing to do; "
            f"{last.parent / 'model.pt'} is unchanged"
        )
    if done > epochs:  # model.pt lost: writing it would record a recipe never run
        raise UserError(
            f"{last} already trained {done} epochs (> --epochs {epochs}) and its model.pt is "
            f"missing: rerun with --epochs {done} to write it"
        )


def _check_same_classes(last: Path, saved: list[str] | None, classes: list[str]) -> None:
    """The data's classes must be the resumed run's (a folder's ids may have changed)."""
    from certseg.data.sources import describe_classes

    if saved is not None and list(saved) != list(classes):
        raise UserError(
            f"{last} (resumed) was trained on {describe_classes(saved)}, the data now has "
            f"{describe_classes(classes)}: use a new --out"
        )


def _check_model_arguments(cfg: TrainConfig) -> None:
    """A UserError, before any data is read, for an argument the model does not take
    (naming those it does) or of another kind than its default's."""
    from certseg.models.registry import check_model_arguments

    try:
        check_model_arguments(cfg.arch, cfg.arch_kwargs, reserved=_SET_BY_TRAINING)
    except TypeError as exc:
        raise UserError(f"--arch-kwarg: {exc}") from None


def _build_model(cfg: TrainConfig, num_classes: int, mean, std) -> nn.Module:
    """The configured model (its arguments checked: `_check_model_arguments`); a value
    it cannot build with is a UserError naming it, not a layer constructor's traceback."""
    from certseg.models import create_model

    try:
        return create_model(cfg.arch, num_classes=num_classes, mean=mean, std=std,
                            **cfg.arch_kwargs)  # fmt: skip
    except (TypeError, ValueError) as exc:
        args = ", ".join(f"{k}={v!r}" for k, v in cfg.arch_kwargs.items())
        raise UserError(
            f"--arch {cfg.arch} cannot be built with {args or 'its defaults'} "
            f"({type(exc).__name__}: {exc})"
        ) from None


def make_optimizer(
    model: nn.Module, recipe: Recipe, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW + cosine. Position biases get their own group: each grid cell sees the
    gradient of a small patch only, so at the net's lr a layout prior barely moves."""
    names = position_bias_names(model)
    params = dict(model.named_parameters())
    position = [p for k, p in params.items() if k in names]
    rest = [p for k, p in params.items() if k not in names]
    groups = [{"params": rest}]
    if position:
        groups.append(
            {"params": position, "lr": recipe.lr * recipe.position_lr_scale, "weight_decay": 0.0}
        )
    opt = torch.optim.AdamW(
        groups, lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=max(total_steps, 1), eta_min=recipe.lr_min
    )
    return opt, sched


def aim_cosine(sched: torch.optim.lr_scheduler.CosineAnnealingLR, total_steps: int) -> None:
    """Re-aim a resumed cosine at a new end, as if it had been planned for it.

    The scheduler updates the lr recursively from the last one, so a new T_max alone
    keeps a finished run at lr_min for all its added epochs (and the saved T_max would
    wrap the lr back up past the old end). Setting each lr to the closed form at the
    step reached puts the recursion on the new curve.
    """
    sched.T_max = max(total_steps, 1)
    t = min(sched.last_epoch, sched.T_max)
    share = (1 + math.cos(math.pi * t / sched.T_max)) / 2
    lrs = [sched.eta_min + (base - sched.eta_min) * share for base in sched.base_lrs]
    for group, lr in zip(sched.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    sched._last_lr = lrs  # what get_last_lr() reports until the next step


def fit(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    recipe: Recipe,
    steps_per_epoch: int | None = None,
) -> list[float]:
    """Minimal single-process loop over a re-iterable of (images, labels) batches;
    returns each epoch's mean loss. For tests and notebooks; `train` is the full one."""
    steps = steps_per_epoch or len(batches)  # type: ignore[arg-type]
    opt, sched = make_optimizer(model, recipe, recipe.epochs * steps)
    lipschitz = _lipschitz(model, recipe)
    history = []
    model.train()
    for _ in range(recipe.epochs):
        total, count = 0.0, 0
        for images, labels in batches:
            total += train_step(model, images, labels, recipe, lipschitz, opt, sched)
            count += 1
        history.append(total / max(count, 1))
    model.eval()
    return history


def train_step(
    net: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    recipe: Recipe,
    lipschitz: float,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None = None,
    amp: bool = False,
) -> float:
    """One optimisation step (optional autocast and grad scaling); returns the loss."""
    with torch.autocast(images.device.type, enabled=amp):
        logits = net(images)
    loss = recipe.loss(logits, labels, lipschitz)
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    sched.step()
    return loss.item()


def _lipschitz(model: nn.Module, recipe: Recipe) -> float:
    """The structural L the certificate will use; the margin offset needs one."""
    from certseg.models import is_lipschitz
    from certseg.nn import structural_lipschitz

    if is_lipschitz(model):
        return structural_lipschitz(model)
    if recipe.train_eps > 0:
        raise UserError(
            "--train-eps > 0 needs a Lipschitz model (its offset is sqrt(2) L eps); the "
            "--unconstrained twin trains with --train-eps 0"
        )
    return 1.0


# ----------------------------------------------------------------------------- data


def open_datasets(cfg: TrainConfig):
    """(train, val, classes, palette) for the configured source."""
    from certseg.data import open_split
    from certseg.data.sources import placeholder_classes

    common = {"root": cfg.root, "cache": True}
    train = open_split(cfg.data, "train", cfg.size, num_images=cfg.num_images, seed=cfg.seed,
                       **common)  # fmt: skip
    val = open_split(cfg.data, "val", cfg.size, num_images=cfg.val_images,
                     seed=cfg.seed + 10_000, **common)  # fmt: skip
    if getattr(train, "classes", None):
        classes = list(train.classes)
    else:  # a folder set without class names: count the ids it uses
        n = int(train.num_classes or 0) or 1 + max(int(lab[lab != 255].max()) for _, lab in train)
        classes = placeholder_classes(n)
    palette = (
        list(train.palette) if getattr(train, "palette", None) else _default_palette(len(classes))
    )
    return train, val, classes, palette


def _default_palette(n: int) -> list[tuple[int, int, int]]:
    rng = np.random.default_rng(0)
    return [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(n)]


def channel_stats(dataset, limit: int = 64) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of up to `limit` images (rounded: they go in the card)."""
    pix = np.concatenate(
        [dataset[i][0].reshape(3, -1) for i in range(min(limit, len(dataset)))], axis=1
    )
    mean = tuple(round(float(v), 3) for v in pix.mean(axis=1))
    std = tuple(round(float(v), 3) for v in pix.std(axis=1))
    return mean, std


# ----------------------------------------------------------------------------- runtime


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device: torch.device) -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist

    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def _loader(dataset, cfg: TrainConfig, dist: _Dist, shuffle: bool):
    from torch.utils.data import DataLoader, DistributedSampler

    from certseg.data import as_torch_dataset

    ds = as_torch_dataset(dataset)
    sampler = (
        DistributedSampler(ds, dist.world, dist.rank, shuffle=shuffle, seed=cfg.seed)
        if dist.world > 1
        else None
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    return DataLoader(
        ds,
        batch_size=cfg.batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=cfg.workers,
        # a ragged last batch is dropped when training, unless it is the only one: a set
        # smaller than a batch (per process) trained on nothing, loss 0, and said done
        drop_last=shuffle and len(ds) >= cfg.batch_size * dist.world,
        generator=gen,
    )


# ----------------------------------------------------------------------------- validation


@torch.no_grad()
def validate(model: nn.Module, loader, num_classes: int, eps: float, device) -> dict[str, float]:
    """Clean and certified figures of the fused model on a loader."""
    from certseg.certify import DatasetCertifier
    from certseg.models import is_lipschitz
    from certseg.nn import certified_lipschitz, fuse_module

    if not is_lipschitz(model):  # unconstrained twin: clean figures only (eps = 0)
        eps, fused, lip = 0.0, model.eval(), 1.0
    else:
        fused = fuse_module(model).eval()
        lip = certified_lipschitz(fused)
    cert = DatasetCertifier(num_classes, lip)
    for images, labels in loader:
        logits = fused(images.to(device)).float().cpu().numpy()
        cert.update(logits, labels.numpy(), eps)
    res = cert.compute()
    if eps == 0.0 and not is_lipschitz(model):
        return {"pixel_accuracy": res.pixel_accuracy, "miou": res.miou}
    return {
        "pixel_accuracy": res.pixel_accuracy,
        "miou": res.miou,
        f"worst_pixel_accuracy@{eps:g}": res.worst_pixel_accuracy,
        f"certified_pixel_accuracy@{eps:g}": res.certified_pixel_accuracy,
        f"worst_miou@{eps:g}": res.worst_miou,
        "lipschitz": lip,
    }


def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.plot(epochs, [h["loss"] for h in history], marker="o")
    ax1.set(xlabel="epoch", ylabel="tau cross-entropy / tau", title="training loss")
    for key in history[-1]:
        if key.startswith(("pixel_accuracy", "miou", "worst_", "certified_")):
            ax2.plot(epochs, [h.get(key, math.nan) for h in history], marker="o", label=key)
    ax2.set(xlabel="epoch", ylim=(0, 1), title="validation (fused model)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- train


def train(cfg: TrainConfig) -> Path:
    """Train (or resume) and return the path of the final checkpoint `model.pt`."""
    from tqdm.auto import tqdm

    from certseg.data import Augmented, Compose, RandomHorizontalFlip
    from certseg.models import ModelCard, save_checkpoint
    from certseg.models.checkpoint import first_problem, load_grown, read_checkpoint

    device = pick_device(cfg.device)
    dist = _init_distributed(device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
    torch.manual_seed(cfg.seed)
    _check_model_arguments(cfg)
    out = Path(cfg.out)
    last = out / "last.pt"
    state = read_checkpoint(last, _RESUME_KEYS, map_location=device) if last.exists() else None
    if state is not None:  # before the data is read: a refusal costs nothing
        _check_resumable(last, state, cfg)
        saved_init = (state.get("config") or {}).get("init")
        if cfg.init is None and saved_init:  # the card records what the run began from
            cfg = replace(cfg, init=saved_init)

    train_set, val_set, classes, palette = open_datasets(cfg)
    init = None  # a resume starts from last.pt: the --init file is read only for its stats
    if cfg.init and (state is None or "mean" not in state):
        init = read_checkpoint(cfg.init, map_location=device)
    # the normalisation: the resumed run's, else the one --init's weights were trained
    # under, else the data's own (a pass over it, made only then)
    if state is not None and "mean" in state:
        mean, std = tuple(state["mean"]), tuple(state["std"])
    elif init is not None:
        mean, std = tuple(init["card"]["mean"]), tuple(init["card"]["std"])
    else:
        mean, std = channel_stats(train_set)
    aug = Augmented(train_set, Compose([RandomHorizontalFlip()]), seed=cfg.seed)
    train_loader = _loader(aug, cfg, dist, shuffle=True)
    val_loader = _loader(val_set, cfg, _Dist(), shuffle=False)
    steps = len(train_loader)
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)

    model = _build_model(cfg, len(classes), mean, std).to(device)
    opt, sched = make_optimizer(model, cfg.recipe, cfg.recipe.epochs * steps)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler(enabled=use_amp)
    lipschitz = _lipschitz(model, cfg.recipe)
    start_epoch, history, elapsed = 0, [], 0.0
    if init is not None and state is None:
        try:
            load_grown(model, init["state_dict"])
        except RuntimeError as exc:  # another architecture, or other arch kwargs
            raise UserError(f"--init {cfg.init}: {exc}") from None
    out.mkdir(parents=True, exist_ok=True)  # once the model builds: no empty run folder
    if state is not None:
        _check_same_classes(last, state.get("classes"), classes)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:  # an older last.pt of other settings left in --out
            raise UserError(
                f"{last} (resumed) does not fit --arch {cfg.arch} with these arguments "
                f"({first_problem(exc)}); use a new --out"
            ) from None
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        aim_cosine(sched, cfg.recipe.epochs * steps)  # --epochs may change on resume
        start_epoch, history, elapsed = state["epoch"], state["history"], state["elapsed"]
        if cfg.progress:
            tqdm.write(f"resuming {last} after epoch {start_epoch} of {cfg.recipe.epochs}")
    net: nn.Module = model
    if dist.world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    for epoch in range(start_epoch, cfg.recipe.epochs):
        t0 = time.perf_counter()
        aug.set_epoch(epoch)
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        net.train()
        total, count = 0.0, 0
        bar = tqdm(
            total=steps,
            desc=f"epoch {epoch + 1}/{cfg.recipe.epochs}",
            disable=not (cfg.progress and dist.main),
            leave=False,
        )
        for step, (images, labels) in enumerate(train_loader):
            if step >= steps:
                break
            images, labels = images.to(device), labels.to(device)
            if cfg.noise_sigma > 0:
                images = images + cfg.noise_sigma * torch.randn_like(images)
            loss = train_step(
                net, images, labels, cfg.recipe, lipschitz, opt, sched, scaler, amp=use_amp
            )
            total, count = total + loss, count + 1
            bar.set_postfix(loss=f"{total / count:.4f}")
            bar.update()
        bar.close()
        elapsed += time.perf_counter() - t0
        if dist.main:
            model.eval()
            row = {"epoch": epoch + 1, "loss": total / max(count, 1), "seconds": elapsed}
            row["lr"] = float(sched.get_last_lr()[0])  # where the cosine stands after it
            row |= validate(model, val_loader, len(classes), cfg.eps, device)
            history.append(row)
            if cfg.progress:
                tqdm.write(json.dumps({k: round(v, 4) for k, v in row.items()}))
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "epoch": epoch + 1,
                    "history": history,
                    "elapsed": elapsed,
                    "config": asdict(cfg),
                    "classes": classes,
                    "mean": list(mean),  # a resume needs no --init file for them
                    "std": list(std),
                },
                last,
            )
        if dist.world > 1:
            torch.distributed.barrier()

    final = out / "model.pt"
    if dist.main:
        card = ModelCard(
            name=cfg.name or f"{cfg.arch}-{cfg.data}",
            arch=cfg.arch,
            num_classes=len(classes),
            classes=classes,
            palette=palette,
            mean=mean,
            std=std,
            input_size=cfg.size,
            pad_multiple=_pad_multiple(model),
            default_eps=cfg.eps,
            arch_kwargs=cfg.arch_kwargs,
            training={
                "data": cfg.data,
                "num_images": len(train_set),
                "recipe": asdict(cfg.recipe),
                "batch_size": cfg.batch_size,
                "seed": cfg.seed,
                "world_size": dist.world,
                "noise_sigma": cfg.noise_sigma,
                "init": cfg.init,
                "device": device.type,
                "seconds": round(elapsed, 1),
                "final": history[-1] if history else {},
            },
        )
        save_checkpoint(final, model.cpu(), card)
        (out / "card.json").write_text(card.to_json())
        (out / "history.json").write_text(json.dumps(history, indent=1))
        if history:
            plot_curves(history, out / "curves.png")
    if dist.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return final


def _pad_multiple(model: nn.Module) -> int:
    """Product of the strides along the network: inputs are padded to a multiple of it."""
    mult = 1
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.stride[0] > 1:
            mult *= m.stride[0]
    return mult
