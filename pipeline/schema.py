"""The output table, its columns named once: fixed columns first, then the input's pass-through
columns. Code that writes or reads a column uses these names; the files keep these exact
names, order and types, so that a folder written before stays readable and resumable."""
from __future__ import annotations

import pyarrow as pa

ID = "id"  # the input's id column, else a hash of image and question; may repeat
INPUT_ROW = "input_row"  # the row's number in the input, kept across runs: what resume tracks
SOURCE_FILE = "source_file"  # the file it came from, relative to the input
SOURCE_ROW = "source_row"  # its row within that file (0-based)
QUESTION = "question"  # as given; the default prompt where the input had none
ANSWER = "answer"  # null on error
ERROR = "error"  # null on success
MODEL = "model"
METHOD = "method"
KEEP = "keep"  # the budget applied to this row (never more than its image tokens); null unpruned
PRUNE_LAYER = "prune_layer"
IMAGE_TOKENS = "image_tokens"
IMAGE_TOKENS_KEPT = "image_tokens_kept"
PROMPT_TOKENS = "prompt_tokens"
PROMPT_TOKENS_KEPT = "prompt_tokens_kept"
GENERATED_TOKENS = "generated_tokens"
FRAMES = "frames"  # video frames the model saw; 0 for an image
NOTE = "note"  # a remark on a row that was answered (e.g. a clip shorter than asked)
FLOPS_VISION = "flops_vision"
FLOPS_PREFILL = "flops_prefill"
FLOPS_DECODE = "flops_decode"
FLOPS_TOTAL = "flops_total"
FLOPS_TOTAL_UNPRUNED = "flops_total_unpruned"
PAPER_PREFILL_FLOPS = "paper_prefill_flops"  # the paper's convention: LLM prefill only, F(n) per layer
PAPER_PREFILL_FLOPS_UNPRUNED = "paper_prefill_flops_unpruned"
SECONDS = "seconds"  # its batch's time in the model actor, shared evenly among the batch's rows
PREPROCESS_SECONDS = "preprocess_seconds"  # the row's share of its batch's CPU time in preprocessing

OUTPUT_SCHEMA = pa.schema([
    (ID, pa.string()), (INPUT_ROW, pa.int64()), (SOURCE_FILE, pa.string()), (SOURCE_ROW, pa.int64()),
    (QUESTION, pa.string()), (ANSWER, pa.string()), (ERROR, pa.string()),
    (MODEL, pa.string()), (METHOD, pa.string()), (KEEP, pa.int32()), (PRUNE_LAYER, pa.int32()),
    (IMAGE_TOKENS, pa.int32()), (IMAGE_TOKENS_KEPT, pa.int32()), (PROMPT_TOKENS, pa.int32()),
    (PROMPT_TOKENS_KEPT, pa.int32()), (GENERATED_TOKENS, pa.int32()), (FRAMES, pa.int32()), (NOTE, pa.string()),
    (FLOPS_VISION, pa.int64()), (FLOPS_PREFILL, pa.int64()), (FLOPS_DECODE, pa.int64()),
    (FLOPS_TOTAL, pa.int64()), (FLOPS_TOTAL_UNPRUNED, pa.int64()),
    (PAPER_PREFILL_FLOPS, pa.int64()), (PAPER_PREFILL_FLOPS_UNPRUNED, pa.int64()),
    (SECONDS, pa.float64()), (PREPROCESS_SECONDS, pa.float64()),
])
OUTPUT_COLUMNS = OUTPUT_SCHEMA.names

# Columns a stage adds for a later one; never written. A reader may set PREP_ERROR first (a
# damaged shard's last row), and the CPU stage keeps it.
PREPARED = "_prepared"  # safetensors bytes of the preprocessed sample, null when it failed
PREP_ERROR = "_error"  # why the row cannot be answered
PREP_NOTE = "_note"
PREP_SECONDS = "_preprocess_seconds"


def output_table(rows: dict[str, list], passthrough: pa.Table) -> pa.Table:
    """Fixed columns from `rows` (lists aligned with `passthrough`), then the pass-through."""
    columns = [pa.array(rows[f.name], type=f.type) for f in OUTPUT_SCHEMA]
    table = pa.Table.from_arrays(columns, schema=OUTPUT_SCHEMA)
    for name in passthrough.column_names:
        if name not in OUTPUT_COLUMNS:
            table = table.append_column(passthrough.schema.field(name), passthrough.column(name))
    return table
