"""The project's built-in demo: a procedural spatial-VQA dataset and a small trained LLaVA model.

Both ship with the package so the first README command runs offline: real images, a real
trained VLM, answers that can be checked.
"""

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
MODEL_DIR = DEMO_DIR / "model"  # LlavaForConditionalGeneration / AutoProcessor .from_pretrained(MODEL_DIR)
EVAL_PARQUET = DEMO_DIR / "data" / "eval.parquet"  # ~1000 rows: id, image (PNG), question, answer_gt, question_type
