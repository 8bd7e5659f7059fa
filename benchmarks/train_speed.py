"""Training throughput: our trainer against the reference loop, same model, batch and optimizer.

    python benchmarks/train_speed.py configs/ddpm_fashion.yaml                     # GPU: 20 + 200 steps each
    python benchmarks/train_speed.py configs/ddpm_fashion.yaml --steps 400 --warmup 40 train.compile=true
    python benchmarks/train_speed.py configs/ddpm_fashion_tiny.yaml --steps 2 --warmup 1 --device cpu

Both loops train the config's model, from the same initial weights, with the config's global
batch, AdamW settings, LR schedule and gradient clipping, for ``--warmup`` untimed steps and then
``--steps`` timed ones:

  reference  the loop of the book chapter and of diffusers' ``train_unconditional.py``: a torch
             ``Dataset`` that makes a PIL image per example and applies torchvision transforms,
             a ``DataLoader``, fp32 eager, ``DDPMScheduler.add_noise``, MSE, ``loss.item()`` every
             step, and diffusers' ``EMAModel`` (a Python loop over the parameters) every step.
  ours       ``train.py``: the uint8 dataset on the device, batches gathered by index,
             augmentation on the device, bf16 autocast on GPUs, fused AdamW, a foreach EMA, and
             the host waiting for the device only at log steps. Its images/s are read from the
             run's metrics.jsonl, log windows after warm-up only (so the final checkpoint and
             preview grid are not timed).

Model FLOPs per image are counted once with ``torch.utils.flop_counter.FlopCounterMode`` over a
forward and backward pass of the batch (matmuls, convolutions and attention: the usual MFU
convention), and MFU = FLOPs/image x images/s / the device's dense bf16 peak, for both loops.
Extra ``section.key=value`` arguments override the config for both loops. The output is
Markdown, to paste into benchmarks/RESULTS.md as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so that `ddpm` imports when run as a script

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers.optimization import get_scheduler  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision import transforms  # noqa: E402

import yaml  # noqa: E402

from ddpm.config import apply_overrides, read_yaml  # noqa: E402
from ddpm.errors import UserError, cli_errors  # noqa: E402
from ddpm.flops import training_flops  # noqa: E402
from ddpm.plots import read_metrics  # noqa: E402
from ddpm.provenance import provenance  # noqa: E402
from ddpm.runs import load_config  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, matched against torch.cuda.get_device_name()
# in this order ("H100 PCIe" before "H100"). Pass --peak-tflops for anything else.
PEAK_BF16_FLOPS = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("A100", 312e12),
]


# -- the reference loop -----------------------------------------------------------------


class PILFashionMNIST(Dataset):
    """Fashion-MNIST the textbook way: one PIL image and a torchvision pipeline per example.

    images: uint8 N x 28 x 28; labels: int64 N. An item is (float 1 x 32 x 32 in [-1, 1], int).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, flip: bool = True):
        self.images, self.labels = images.numpy(), labels.numpy()
        self.transform = transforms.Compose([
            transforms.Pad(2),  # 28 -> 32 with black, as ddpm.data.to_model_space does
            transforms.RandomHorizontalFlip(0.5 if flip else 0.0),
            transforms.ToTensor(),  # [0, 255] -> [0, 1]
            transforms.Normalize([0.5], [0.5]),  # -> [-1, 1]
        ])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = Image.fromarray(self.images[i], mode="L")
        return self.transform(image), int(self.labels[i])


def reference_loss(model, scheduler, x0, noise, timesteps, labels) -> torch.Tensor:
    """The plain DDPM loss: noise x0 (B x 1 x 32 x 32) to timesteps (B), predict, MSE to the target."""
    noisy = scheduler.add_noise(x0, noise, timesteps)
    prediction = model(noisy, timesteps, class_labels=labels).sample
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = scheduler.get_velocity(x0, noise, timesteps)
    return F.mse_loss(prediction.float(), target.float())


class ReferenceLoop:
    """The training loop as the book chapter and diffusers' ``train_unconditional.py`` write it."""

    def __init__(self, stage, cfg, data: dict, device: torch.device, total_steps: int):
        """data: what ``stage.load_data()`` returns, uint8 images N x 28 x 28 and int64 labels N."""
        self.stage, self.cfg, self.device = stage, cfg, device
        dataset = PILFashionMNIST(data["images"], data["labels"], flip=stage.config.data.flip)
        self.loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, num_workers=0, drop_last=True)
        torch.manual_seed(cfg.seed)  # the same initial weights as our trainer
        self.model = stage.build_model().to(device).train()
        self.ema = EMAModel(self.model.parameters(), decay=cfg.ema_decay)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=cfg.adam_betas,
                                           weight_decay=cfg.weight_decay)
        schedule = cfg.lr_schedule if cfg.lr_schedule != "constant" else "constant_with_warmup"
        self.lr_schedule = get_scheduler(schedule, self.optimizer, num_warmup_steps=cfg.warmup_steps,
                                         num_training_steps=total_steps)

    def batches(self):
        """(images B x 1 x 32 x 32, labels B) forever, reshuffled every epoch."""
        while True:
            yield from self.loader

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        x0, labels = images.to(self.device), labels.to(self.device)
        dropped = torch.rand(len(labels), device=self.device) < self.stage.config.diffusion.p_uncond
        labels = torch.where(dropped, self.stage.condition.null_label, labels)  # label dropout, for CFG
        noise = torch.randn_like(x0)
        timesteps = torch.randint(0, self.stage.scheduler.config.num_train_timesteps, (len(x0),),
                                  device=self.device)
        loss = reference_loss(self.model, self.stage.scheduler, x0, noise, timesteps, labels)
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad()
        self.ema.step(self.model.parameters())
        return loss.item()  # a host-device sync every step, as the textbook loop logs it


def measure_reference(stage, cfg, data: dict, device: torch.device, warmup: int, steps: int) -> float:
    """Images/s of the reference loop over ``steps`` steps after ``warmup`` untimed ones."""
    torch.set_float32_matmul_precision("highest")  # what a plain script gets: fp32 matmuls
    loop = ReferenceLoop(stage, cfg, data, device, total_steps=warmup + steps)
    batches = loop.batches()
    for _ in range(warmup):
        loop.step(*next(batches))
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        loop.step(*next(batches))
    synchronize(device)
    return steps * cfg.batch_size / (time.perf_counter() - start)


# -- our trainer ------------------------------------------------------------------------


def measure_ours(raw: dict, batch_size: int, warmup: int, steps: int, output_dir: Path
                 ) -> tuple[float, int, str]:
    """Images/s of ``train.py`` (run as a command) over its log windows after ``warmup`` steps,
    log_every, and its peak memory. log_every divides both warmup and steps, so no window straddles
    the end of warm-up.
    """
    log_every = math.gcd(warmup, steps)
    raw = apply_overrides(copy.deepcopy(raw), [
        f"train.output_dir={output_dir}", f"train.max_steps={warmup + steps}", f"train.log_every={log_every}",
        "train.checkpoint_every=0", "train.sample_every=0", "train.eval_every=0", "train.trackers=[]",
        "train.resume=null", "sample.n_per_class=1",  # a small final preview grid: it is not timed anyway
    ])
    config = output_dir.parent / "config.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), str(config)], capture_output=True, text=True)
    sys.stderr.write(done.stdout)  # the trainer's messages: stdout is for the report
    if done.returncode:
        raise UserError(f"train.py failed on {config} (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    run_dir = output_dir
    windows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "images_per_s" in r and r["step"] > warmup]
    assert len(windows) * log_every == steps, f"expected {steps // log_every} log windows, got {len(windows)}"
    seconds = sum(log_every * batch_size / r["images_per_s"] for r in windows)
    peak = max((r["peak_memory_gib"] for r in windows if "peak_memory_gib" in r), default=None)
    return steps * batch_size / seconds, log_every, "n/a (CPU)" if peak is None else f"{peak:.2f} GiB"


# -- FLOPs, peaks and memory ------------------------------------------------------------


def peak_flops(device: torch.device, peak_tflops: float | None) -> tuple[float | None, str]:
    """(peak FLOP/s or None, where it came from) for MFU."""
    if peak_tflops:
        return peak_tflops * 1e12, "--peak-tflops"
    if device.type != "cuda":
        return None, "unknown for CPUs; pass --peak-tflops"
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops, f"dense bf16 peak of {key}"
    return None, f"{name} is not in the table; pass --peak-tflops"


@contextlib.contextmanager
def accelerate_on(device: torch.device):
    """Make Accelerate (so train.py) use the CPU when asked to, even on a machine with a GPU."""
    if device.type != "cpu" or not torch.cuda.is_available():
        yield
        return
    old = os.environ.get("ACCELERATE_USE_CPU")
    os.environ["ACCELERATE_USE_CPU"] = "true"
    try:
        yield
    finally:
        del os.environ["ACCELERATE_USE_CPU"]
        if old is not None:
            os.environ["ACCELERATE_USE_CPU"] = old


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a (CPU)"
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"


# -- the report -------------------------------------------------------------------------


def table_row(name: str, precision: str, images_per_s: float, flops_per_image: float,
              peak: float | None, memory: str) -> str:
    achieved = images_per_s * flops_per_image
    mfu = f"{achieved / peak:.1%}" if peak else "n/a"
    return f"| {name} | {precision} | {images_per_s:,.1f} | {achieved / 1e12:.3f} | {mfu} | {memory} |"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a YAML config, e.g. configs/ddpm_fashion.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value, applied for both loops")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per loop (a multiple of --warmup)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps before timing")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s for MFU (default: table)")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    if args.steps <= 0 or args.warmup < 0:
        parser.error("--steps must be > 0 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no GPU")
    return args


@cli_errors
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = torch.device(args.device)
    raw = apply_overrides(read_yaml(args.config), args.overrides)
    precision = raw.get("train", {}).get("mixed_precision", "auto")
    if precision == "auto":  # resolved as train.py does, but for the device asked for
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
        raw.setdefault("train", {})["mixed_precision"] = precision  # not an override: YAML reads "no" as False
    stage, cfg, _ = load_config(copy.deepcopy(raw))
    data = stage.load_data()
    n_params, flops = training_flops(stage, data, device, cfg.batch_size)
    peak, peak_source = peak_flops(device, args.peak_tflops)

    reset_peak_memory(device)
    reference_ips = measure_reference(stage, cfg, data, device, args.warmup, args.steps)
    reference_memory = peak_memory(device)

    with tempfile.TemporaryDirectory(prefix="train_speed-") as tmp, accelerate_on(device):
        ours_ips, log_every, ours_memory = measure_ours(raw, cfg.batch_size, args.warmup, args.steps,
                                                        Path(tmp) / "run")

    ours_extras = ", compiled" if cfg.compile else ""
    lines = [
        f"### train_speed: {args.config}",
        "",
        provenance(["python", "benchmarks/train_speed.py", *argv], device),
        f"model: {n_params / 1e6:.2f}M parameters; global batch {cfg.batch_size}; {args.warmup} warm-up + "
        f"{args.steps} timed steps per loop (ours logs every {log_every})  ",
        f"training FLOPs/image (forward + backward, FlopCounterMode): {flops / 1e9:.3f} GFLOP  ",
        f"peak for MFU: {f'{peak / 1e12:g} TFLOP/s' if peak else 'n/a'} ({peak_source})",
        "",
        "| loop | precision | images/s | TFLOP/s | MFU | peak memory |",
        "|---|---|---:|---:|---:|---|",
        table_row("reference (PIL + DataLoader, EMAModel)", "fp32", reference_ips, flops, peak, reference_memory),
        table_row(f"ours (train.py{ours_extras})", precision if precision != "no" else "fp32", ours_ips, flops,
                  peak, ours_memory),
        "",
        f"ours / reference: **{ours_ips / reference_ips:.2f}x**",
    ]
    if device.type == "cuda":
        lines.append("\nThe reference runs with PyTorch's defaults: fp32 matmuls, cuDNN convolutions allowed "
                     "to use TF32.")
    if stage.config.diffusion.snr_gamma is not None:
        lines.append("\nOurs weights the loss by min-SNR as the config asks; the reference uses plain MSE "
                     "(the weighting costs nothing measurable).")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
