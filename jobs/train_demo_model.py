"""Train the demo LLaVA-1.5-shaped model from scratch on generated scenes, on CPU.

The model is defined in `pipeline.demo.modeling` and trained by `pipeline.demo.train`, whose
docstring says why the recipe is what it is: a vision-only warm-up on per-patch labels, then
question answering with many questions per image and background image tokens dropped at first.

The committed model: vision tower and projector from the previous checkpoint (300 vision-only
steps and 1,050 QA steps of a recipe without background dropping), then a fresh LLM trained
with ``--vision-from <that model> --warmup-steps 0 --steps 1800``, resumed at step 1100 with
``--steps 1500`` (the defaults otherwise). The defaults do both stages from scratch in one run
(not yet run end to end: its vision stage gets 300 steps, where the committed tower had 1,350).
``--resume`` with a different ``--steps`` rescales the remaining cosine schedule.

    python jobs/train_demo_model.py                 # fresh run, state in runs/demo_train/
    python jobs/train_demo_model.py --resume        # continue from runs/demo_train/
    python jobs/train_demo_model.py --vision-from pipeline/demo/model --warmup-steps 0 --steps 1800
    python jobs/train_demo_model.py --eval-only     # full eval split, per question type

Whenever the eval accuracy improves the model is written to pipeline/demo/model/ (atomically);
the learning curve goes to runs/demo_train_curve.jsonl.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.demo.train import TrainConfig, run  # noqa: E402


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    d = TrainConfig
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steps", type=int, default=d.steps, help="total steps incl. warm-up (sets the lr schedule)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="vision-only patch-label steps")
    p.add_argument("--curriculum", type=int, default=d.curriculum, help="QA steps per extra object")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--warmup-batch", type=int, default=d.warmup_batch)
    p.add_argument("--turns", type=int, default=d.turns)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--patch-loss", type=float, default=d.patch_loss, help="weight of the patch loss in the QA stage")
    p.add_argument("--extra-images", type=int, default=d.extra_images,
                   help="images per QA step for the patch loss only")
    p.add_argument("--keep-start", type=float, default=d.keep_start,
                   help="fraction of the 576 image tokens the QA stage starts with (objects always kept)")
    p.add_argument("--keep-hold", type=int, default=d.keep_hold, help="QA steps at --keep-start")
    p.add_argument("--keep-ramp", type=int, default=d.keep_ramp, help="QA steps over which that then grows to all 576")
    p.add_argument("--vision-from", type=Path, help="fresh LLM, vision tower and projector from a saved model dir")
    p.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction, default=d.freeze_vision,
                   help="QA stage: train only projector and LLM (default: %(default)s)")
    p.add_argument("--vision-width", type=int, default=d.vision_width)
    p.add_argument("--vision-layers", type=int, default=d.vision_layers)
    p.add_argument("--llm-width", type=int, default=d.llm_width)
    p.add_argument("--llm-layers", type=int, default=d.llm_layers)
    p.add_argument("--rope-theta", type=float, default=d.rope_theta)
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between evals on --eval-rows rows")
    p.add_argument("--eval-rows", type=int, default=d.eval_rows)
    p.add_argument("--save-every", type=int, default=d.save_every, help="steps between resumable state saves")
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast (bf16 is ~4x faster on AVX512-BF16 CPUs)")
    p.add_argument("--state", type=Path, default=d.state)
    p.add_argument("--out", type=Path, default=d.out)
    p.add_argument("--resume", action="store_true", help="continue from --state")
    p.add_argument("--init-from", type=Path, help="start from a saved model dir (fresh optimizer and schedule)")
    p.add_argument("--eval-only", action="store_true", help="evaluate --out on the full eval split and exit")
    return TrainConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
