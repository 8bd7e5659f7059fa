"""The shared trainer: every stage trains here, under Hugging Face Accelerate.

    python train.py configs/ddpm_fashion_quick.yaml [section.key=value ...]
    accelerate launch --num_processes 2 train.py configs/ddpm_fashion.yaml train.batch_size=512

The loop knows nothing about images or UNets: the config's ``stage`` names a class (see
``ddpm/runs.py``) that supplies the data, the model, the loss and the sample grids, as the
stage contract (``ddpm/contract.py``) says. The trainer
adds what every stage needs: processes and devices, mixed precision, gradient accumulation,
AdamW with warm-up and decay, gradient clipping, an EMA of the weights (and, for post-hoc EMA,
snapshots of two more: ``ddpm/posthoc_ema.py``), logging,
checkpoints and exact resume, and a clean stop on SIGTERM, SIGINT or SIGUSR1: the step is
finished and checkpointed, and the command exits 75 (``ddpm/preemption.py``).

Randomness: the data order of epoch e is a permutation seeded by (seed, e), and everything
random in the batch of step s (augmentation, condition dropout, timesteps, noise) comes from
a generator seeded by (seed, s). So nothing but the step count is needed to resume exactly,
and N processes draw the same global batch and each trains on its own slice of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from PIL import Image
from tqdm.auto import tqdm

from ddpm.checkpoint import (
    checkpoint_name,
    latest_good_checkpoint,
    load_tensors,
    load_torch_state,
    save_checkpoint,
    save_tensors,
    verify_checkpoint,
    weights_file,
)
from ddpm.config import TrainConfig, apply_overrides, read_yaml
from ddpm.ema import EMA, PowerEMA
from ddpm.errors import UserError, cli_errors
from ddpm.plots import append_metrics, plot_metrics, read_metrics
from ddpm.posthoc_ema import load_profiles, profile_tensors, write_snapshot
from ddpm.preemption import EXIT_PREEMPTED, Preempted, StopSignals, ignore_stop_signals
from ddpm.runs import load_config

def step_seed(seed: int, *keys) -> int:
    """A 63-bit seed for one (seed, key...) stream, e.g. (seed, "step", 1234)."""
    digest = hashlib.blake2b(repr((seed, *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class BatchOrder:
    """Which examples form the global batch of each step: a new permutation every epoch,
    the last incomplete batch of an epoch dropped."""

    def __init__(self, n: int, batch_size: int, seed: int, device: torch.device):
        if n < batch_size:
            raise UserError(f"the dataset has {n} examples, fewer than train.batch_size={batch_size}")
        self.n, self.batch_size, self.seed, self.device = n, batch_size, seed, device
        self.steps_per_epoch = n // batch_size
        self._epoch, self._perm = None, None

    def indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(step_seed(self.seed, "epoch", epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).to(self.device)
        return self._perm[i * self.batch_size : (i + 1) * self.batch_size]


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's parameter groups: weight decay on weight matrices and kernels (2+ dimensions);
    none on biases, norm gains and learnt scalars such as CLIP's temperature."""
    params = [p for p in model.parameters() if p.requires_grad]
    if weight_decay == 0:
        return [{"params": params, "weight_decay": 0.0}]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


# -- the training loop ------------------------------------------------------------------


def train(raw_config: dict) -> Path:
    """Train the stage a config names; returns the run directory."""
    stage, cfg, resolved = load_config(raw_config)
    run_dir = Path(cfg.output_dir)
    mixed_precision = cfg.mixed_precision
    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        # Accelerate would quietly train in fp32: fp16 autocast and its loss scaling need a GPU
        raise UserError("train.mixed_precision=fp16 needs a GPU (fp16 autocast with loss scaling); "
                        "on a CPU use 'no' or 'bf16'")
    # Several processes but no GPU: without cpu=True, Accelerate would run them as independent
    # single-process runs, each believing it is the main one.
    multi_cpu = int(os.environ.get("WORLD_SIZE", 1)) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=cfg.grad_accum_steps,
                              log_with=cfg.trackers or None, project_dir=str(run_dir), cpu=multi_cpu)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    is_main = accelerator.is_main_process
    say = tqdm.write if is_main else (lambda *a, **k: None)
    if cfg.batch_size % (world * cfg.grad_accum_steps):
        raise UserError(f"train.batch_size={cfg.batch_size} must divide evenly over {world} processes x "
                        f"{cfg.grad_accum_steps} accumulation steps")
    per_process = cfg.batch_size // world
    micro = per_process // cfg.grad_accum_steps
    torch.set_float32_matmul_precision("high" if cfg.allow_tf32 else "highest")

    checkpoints_dir = run_dir / "checkpoints"
    resume_from = _resume_point(cfg, run_dir, checkpoints_dir, say)

    data = {k: v.to(device) for k, v in stage.load_data().items()}
    order = BatchOrder(len(next(iter(data.values()))), cfg.batch_size, cfg.seed, device)
    total_steps = cfg.total_steps(order.n)

    set_seed(cfg.seed)  # the initial weights
    model = stage.build_model()
    # before prepare(): the EMA must copy the plain model
    ema = (EMA(model, cfg.ema_decay, cfg.ema_warmup_power) if cfg.ema_sigma_rel is None
           else PowerEMA(model, cfg.ema_sigma_rel))
    # for post-hoc EMA, if asked; the profile as wide as the trainer's own power EMA is that EMA
    profiles = [ema if sigma_rel == cfg.ema_sigma_rel else PowerEMA(model, sigma_rel) for sigma_rel in cfg.posthoc_ema]
    averages = list(dict.fromkeys([ema, *profiles]))  # every EMA once
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.adam_betas,
                                  fused=device.type == "cuda")
    lr_schedule = get_scheduler(cfg.lr_schedule if cfg.lr_schedule != "constant" else "constant_with_warmup",
                                optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps)
    if cfg.compile:
        model.compile()
    model, optimizer = accelerator.prepare(model, optimizer)
    for average in averages:
        average.model.to(device)

    start_step = 0
    if resume_from is not None:
        start_step = _load_checkpoint(resume_from, stage.name, accelerator, model, ema, profiles, optimizer,
                                      lr_schedule)
        say(f"resumed from {resume_from} at step {start_step}")
    metrics_path = run_dir / "metrics.jsonl"
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        _truncate_metrics(metrics_path, after_step=start_step)
    if cfg.trackers:  # their files go in the run directory too (TensorBoard: project_dir above)
        accelerator.init_trackers(run_dir.name, config=_flatten(resolved),
                                  init_kwargs={"wandb": {"dir": str(run_dir.resolve())}})

    n_params = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    say(f"{stage.name}: {n_params / 1e6:.2f}M parameters" + (f" ({frozen / 1e6:.2f}M frozen)" if frozen else "")
        + f", {total_steps} steps of {cfg.batch_size} "
        f"({order.steps_per_epoch} steps/epoch), {world} process(es) on {device}, precision {mixed_precision}")
    generator = torch.Generator(device)
    my_slice = slice(rank * per_process, (rank + 1) * per_process)
    running: dict[str, torch.Tensor] = {}  # the loss (and any named parts of it) summed over the window
    window_steps, window_start = 0, time.perf_counter()
    clock_start = window_start - _elapsed_before(metrics_path, start_step)
    stopping = False
    bar = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, disable=not is_main,
               desc="train", dynamic_ncols=True)
    with StopSignals(world) as stop, _out_of_memory_hint(cfg, micro, world, checkpoints_dir):
        for step in bar:
            generator.manual_seed(step_seed(cfg.seed, "step", step))
            batch = stage.make_batch({k: v[order.indices(step)] for k, v in data.items()}, generator, step)
            mine = {k: v[my_slice] for k, v in batch.items()}
            model.train()
            for m in range(cfg.grad_accum_steps):
                micro_batch = {k: v[m * micro : (m + 1) * micro] for k, v in mine.items()}
                with accelerator.accumulate(model):
                    parts = stage.loss(model, micro_batch)
                    parts = parts if isinstance(parts, dict) else {"loss": parts}
                    loss = parts["loss"]
                    accelerator.backward(loss)  # divides by grad_accum_steps; syncs on the last micro-batch
                    if accelerator.sync_gradients and cfg.grad_clip:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for name, value in parts.items():
                    running[name] = running.get(name, 0) + value.detach() / cfg.grad_accum_steps
            lr_schedule.step()
            for average in averages:
                average.update(accelerator.unwrap_model(model))
            window_steps += 1
            done = step + 1
            stopping = stop.requested() and done < total_steps  # a stop signal: checkpoint and leave
            checkpoint_due = (stopping or done == total_steps
                              or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done in cfg.keep_steps)

            if done % cfg.log_every == 0 or checkpoint_due:  # the only place the host waits for the GPU
                means = {k: accelerator.reduce(v, reduction="mean").item() / window_steps for k, v in running.items()}
                mean_loss = means["loss"]
                if not math.isfinite(mean_loss):
                    raise UserError(f"loss became {mean_loss} at step {done} (in steps {done - window_steps + 1}.."
                                    f"{done}); the last good checkpoint is kept in {checkpoints_dir}; lower "
                                    f"train.lr or set train.grad_clip, then resume with train.resume=latest")
                elapsed = time.perf_counter() - window_start
                record = {"step": done, "epoch": round(done / order.steps_per_epoch, 4), **means,
                          "lr": lr_schedule.get_last_lr()[0], "images_per_s": window_steps * cfg.batch_size / elapsed,
                          "elapsed_s": round(time.perf_counter() - clock_start, 2)}
                if device.type == "cuda":
                    record["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                _log(accelerator, metrics_path, record)
                bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{record['images_per_s']:.0f}")
                running.clear()
                window_steps = 0

            if checkpoint_due:
                if is_main:
                    save_checkpoint(checkpoints_dir, done, lambda folder: _write_checkpoint(
                        folder, stage.name, done, accelerator, model, ema, profiles, optimizer, lr_schedule),
                        cfg.keep_last, cfg.keep_steps)
                accelerator.wait_for_everyone()
            if profiles and is_main and (done % cfg.posthoc_every == 0 or done == total_steps):
                write_snapshot(run_dir, profiles)
            if stopping:
                break
            if cfg.sample_every and done % cfg.sample_every == 0 and is_main:
                grid = stage.preview(ema.model, run_dir / "samples" / f"step-{done:08d}.png", title=f"EMA, step {done}")
                _log_grid(accelerator, grid, done)
            if cfg.eval_every and done % cfg.eval_every == 0 and stage.capabilities.evaluates:
                if is_main:
                    _log(accelerator, metrics_path, {"step": done, **stage.evaluate(ema.model, cfg.eval_n)})
                accelerator.wait_for_everyone()
            if window_steps == 0:  # a window starts after logging, previews, evaluation and checkpoints
                window_start = time.perf_counter()

        if stopping:  # inside the with: a further signal is only acknowledged while the trackers close
            accelerator.end_training()
            launcher = f"accelerate launch --num_processes {world}" if world > 1 else "python"
            raise Preempted(f"stopped by {stop.received or 'a signal to another process'} after step {done} of "
                            f"{total_steps}: checkpoint {checkpoints_dir / checkpoint_name(done)}; continue with "
                            f"{launcher} train.py {run_dir / 'config.yaml'} train.resume=latest")

    if is_main:
        final = run_dir / "final"
        tmp = run_dir / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        stage.save_final(ema.model, tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        grid = stage.preview(ema.model, run_dir / "samples" / "final.png", title="")
        _log_grid(accelerator, grid, total_steps, "final")
        plot_metrics(metrics_path, run_dir / "metrics.png")
        say(f"done: model in {final}, samples in {grid}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


@contextlib.contextmanager
def _out_of_memory_hint(cfg: TrainConfig, micro: int, world: int, checkpoints_dir: Path):
    """Out of GPU memory in the loop: one line that names the batch and the keys that shrink it."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"out of GPU memory with train.batch_size={cfg.batch_size} (micro-batches of {micro} on "
                        f"each of {world} process(es)); lower train.batch_size or raise train.grad_accum_steps "
                        f"(now {cfg.grad_accum_steps}), then resume with train.resume=latest from the last good "
                        f"checkpoint in {checkpoints_dir}") from None


def _resume_point(cfg: TrainConfig, run_dir: Path, checkpoints_dir: Path, say) -> Path | None:
    if cfg.resume is None:
        if any(checkpoints_dir.glob("step-*")):
            raise UserError(f"{run_dir} already has checkpoints; continue it with train.resume=latest "
                            f"or start afresh in another train.output_dir")
        return None
    if cfg.resume == "latest":
        found = latest_good_checkpoint(checkpoints_dir, warn=say)
        if found is None:
            say(f"no checkpoint in {checkpoints_dir} yet: starting from step 0")
        return found
    folder = Path(cfg.resume)
    verify_checkpoint(folder)
    return folder


def _write_checkpoint(folder, stage_name, step, accelerator, model, ema, profiles, optimizer, lr_schedule):
    save_tensors(accelerator.unwrap_model(model).state_dict(), folder / "model.safetensors")
    ema.model.save_pretrained(folder / "ema")
    if profiles:
        tensors, metadata = profile_tensors(profiles)
        save_tensors(tensors, folder / "posthoc_ema.safetensors", metadata)
    scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
    torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler}, folder / "optimizer.pt")
    state = {"stage": stage_name, "step": step, "ema_step": ema.step, "lr_schedule": lr_schedule.state_dict()}
    (folder / "trainer_state.json").write_text(json.dumps(state, indent=1))


def _load_checkpoint(folder, stage_name, accelerator, model, ema, profiles, optimizer, lr_schedule) -> int:
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"{folder}/trainer_state.json is missing or corrupt") from None
    if state.get("stage") != stage_name:
        raise UserError(f"{folder} is a checkpoint of stage {state.get('stage')!r}, not {stage_name!r}")
    device = accelerator.device
    try:
        accelerator.unwrap_model(model).load_state_dict(load_tensors(folder / "model.safetensors", device))
        ema.model.load_state_dict(load_tensors(weights_file(folder / "ema"), device))
    except RuntimeError as e:
        raise UserError(f"{folder} does not fit this model (was the model config, data.channels or data.image_size "
                        f"changed?): "
                        f"{str(e).splitlines()[0]}") from None
    saved = load_torch_state(folder / "optimizer.pt")
    optimizer.load_state_dict(saved["optimizer"])
    if saved["scaler"] is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(saved["scaler"])
    lr_schedule.load_state_dict(state["lr_schedule"])
    ema.step = state["ema_step"]
    if profiles:
        if not (folder / "posthoc_ema.safetensors").is_file():
            raise UserError(f"{folder} was written without train.posthoc_ema; resume it without it")
        load_profiles(profiles, folder / "posthoc_ema.safetensors", state["ema_step"])
    return state["step"]


def _log(accelerator, metrics_path: Path, record: dict) -> None:
    """Append one record to metrics.jsonl (main process) and to any trackers."""
    if accelerator.is_main_process:
        append_metrics(metrics_path, record)
    if accelerator.trackers:
        accelerator.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                        step=record["step"])


def _log_grid(accelerator, png: Path, step: int, name: str = "samples") -> None:
    """Show a preview grid in every tracker, as the image ``name`` at ``step`` (main process)."""
    if not accelerator.trackers:
        return
    image = np.asarray(Image.open(png).convert("RGB"))[None]  # 1 x H x W x 3
    for tracker in accelerator.trackers:
        options = {"dataformats": "NHWC"} if tracker.name == "tensorboard" else {}
        tracker.log_images({name: image}, step=step, **options)


def _elapsed_before(metrics_path: Path, start_step: int) -> float:
    """Seconds the run had trained before ``start_step`` (resuming), from its last log record."""
    times = [r["elapsed_s"] for r in read_metrics(metrics_path) if "elapsed_s" in r and r["step"] <= start_step]
    return times[-1] if start_step and times else 0.0


def _truncate_metrics(path: Path, after_step: int) -> None:
    """On resume, forget what a crashed run logged after the checkpoint we resume from."""
    kept = [r for r in read_metrics(path) if r["step"] <= after_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


@cli_errors
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip().split("\n\n")[1])
        return 0 if argv else 2
    try:
        train(apply_overrides(read_yaml(argv[0]), argv[1:]))
    except Preempted as stopped:
        ignore_stop_signals()  # while the interpreter exits: the checkpoint is whole, say nothing more
        if PartialState().is_main_process:
            print(stopped, file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:  # before the first step: there is nothing to save yet
        print("interrupted; continue with train.resume=latest", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
