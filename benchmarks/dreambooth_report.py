"""DreamBooth fine-tunes measured against the run they started from, as one Markdown table for
benchmarks/RESULTS.md (``conditioning.finetune.dreambooth.dreambooth_report``: the paper's subject fidelity,
prompt fidelity and prior preservation, our judge standing in for DINO and our CLIP for CLIP).

    python benchmarks/dreambooth_report.py runs/dreambooth_fashion_quick --clip runs/clip_fashion_quick
    python benchmarks/dreambooth_report.py runs/dreambooth_fashion_quick runs/dreambooth_fashion_lora_quick \
        --clip runs/clip_fashion_quick --out report.json

The first row is the subject's own pictures (the ceiling), the second the starting run (``init_from``) asked
the same prompts with the same seeds, then one row per run: its trainable parameters, training minutes, the
MB it saved, and the report.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so that the project imports when run as a script

from conditioning.finetune.dreambooth import DreamBoothLDM, dreambooth_report, subject_likeness  # noqa: E402
from conditioning.finetune.start import starting_model  # noqa: E402
from conditioning.finetune.lora import WEIGHTS_NAME  # noqa: E402
from conditioning.text.encoder import LEARNED_EMBEDS  # noqa: E402
from ddpm.checkpoint import load_tensors, weights_file  # noqa: E402
from ddpm.errors import UserError, cli_errors  # noqa: E402
from ddpm.evaluate import markdown_table  # noqa: E402
from ddpm.plots import training_minutes  # noqa: E402
from ddpm.provenance import provenance  # noqa: E402
from ddpm.runs import load_for_sampling, load_run, load_scorer  # noqa: E402


def training_cost(run_dir: Path, model) -> dict[str, float]:
    """Trainable parameters, training minutes (from metrics.jsonl) and the MB of weights a run saved."""
    final = run_dir / "final"
    lora = (final / WEIGHTS_NAME)
    saved = lora if lora.is_file() else weights_file(final / "unet")
    trainable = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name or not lora.is_file())
    if (final / LEARNED_EMBEDS).is_file():  # the identifier's word embedding trained too
        trainable += sum(v.numel() for v in load_tensors(final / LEARNED_EMBEDS).values())
    return {"trainable_parameters": trainable, "minutes": training_minutes(run_dir),
            "saved_mb": saved.stat().st_size / 2**20}


@cli_errors
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="DreamBooth run directories (with the same init_from and subject)")
    parser.add_argument("--clip", default="runs/clip_fashion_quick", help="our CLIP run, for CLIP-I and the CLIP score")
    parser.add_argument("--n", type=int, default=200, help="samples per prompt set")
    parser.add_argument("--n-classes", type=int, default=1000, help="samples over every class's prompts")
    parser.add_argument("--out", default=None, help="also write the numbers as JSON here")
    args = parser.parse_args(argv)
    scorer = load_scorer(args.clip)
    rows = {}
    for i, run in enumerate(args.runs):
        stage, model, _ = load_for_sampling(run)
        if not isinstance(stage, DreamBoothLDM):
            raise UserError(f"{run} is a '{stage.name}' run, not a DreamBooth run")
        if i == 0:  # the starting model, asked the same prompts by a stage that has learnt no words
            likeness = subject_likeness(stage, scorer)
            rows["subject pictures (ceiling)"] = likeness.ceiling()
            start = load_run(run)[0]
            before = dreambooth_report(start, starting_model(start).eval(), likeness, args.n, args.n_classes)
            rows[f"before: {stage.config.init_from}"] = before
        rows[run] = training_cost(Path(run), model) | dreambooth_report(stage, model, likeness, args.n, args.n_classes)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"### DreamBooth\n\n{provenance(['python', 'benchmarks/dreambooth_report.py', *argv])}")
    print_report(rows)
    return 0


COLUMNS = [  # (heading, key, format)
    ("trainable params", "trainable_parameters", "{:,.0f}"), ("minutes", "minutes", "{:.1f}"),
    ("saved MB", "saved_mb", "{:.2f}"),
    ("subject: judge", "judge_subject", "{:.3f}"), ("rest of class: judge", "judge_rest", "{:.3f}"),
    ("subject rate", "subject_rate", "{:.3f}"),
    ("subject: CLIP", "clip_subject", "{:.3f}"), ("rest: CLIP", "clip_rest", "{:.3f}"),
    ("rephrased: subject judge", "rephrased_judge_subject", "{:.3f}"),
    ("rephrased: CLIP score", "rephrased_clip_score", "{:.2f}"),
    ("class prompt: subject judge", "class_prompt_subject_judge", "{:.3f}"),
    ("class prompt: subject rate", "class_prompt_subject_rate", "{:.3f}"),
    ("judge acc, subject prompt", "subject_accuracy", "{:.3f}"),
    ("judge acc, other classes", "other_classes_accuracy", "{:.3f}"), ("diversity", "diversity", "{:.2f}"),
]


def print_report(rows: dict[str, dict]) -> None:
    cells = [[name, *(f.format(r[k]) if k in r else "" for _, k, f in COLUMNS)] for name, r in rows.items()]
    print(markdown_table(["model", *(h for h, _, _ in COLUMNS)], cells))


if __name__ == "__main__":
    sys.exit(main())
