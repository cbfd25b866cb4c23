"""The output table: fixed columns first, then the input's pass-through columns."""
from __future__ import annotations

import pyarrow as pa

OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()),  # the input's id column, else a hash of image and question; may repeat
    ("input_row", pa.int64()),  # the row's number in the input, kept across runs: what resume tracks
    ("source_file", pa.string()),  # the file it came from, relative to the input
    ("source_row", pa.int64()),  # its row within that file (0-based)
    ("question", pa.string()),  # as given; the default prompt where the input had none
    ("answer", pa.string()),  # null on error
    ("error", pa.string()),  # null on success
    ("model", pa.string()),
    ("method", pa.string()),
    ("keep", pa.int32()),  # the budget applied to this row (never more than its image tokens); null unpruned
    ("prune_layer", pa.int32()),
    ("image_tokens", pa.int32()),
    ("image_tokens_kept", pa.int32()),
    ("prompt_tokens", pa.int32()),
    ("prompt_tokens_kept", pa.int32()),
    ("generated_tokens", pa.int32()),
    ("frames", pa.int32()),  # video frames the model saw; 0 for an image
    ("note", pa.string()),  # a remark on a row that was answered (e.g. a clip shorter than asked)
    ("flops_vision", pa.int64()),
    ("flops_prefill", pa.int64()),
    ("flops_decode", pa.int64()),
    ("flops_total", pa.int64()),
    ("flops_total_unpruned", pa.int64()),
    ("paper_prefill_flops", pa.int64()),  # the paper's convention: LLM prefill only, F(n) per layer
    ("paper_prefill_flops_unpruned", pa.int64()),
    ("seconds", pa.float64()),  # its batch's time in the model actor, shared evenly among the batch's rows
    ("preprocess_seconds", pa.float64()),  # the row's share of its batch's CPU time in preprocessing
])
OUTPUT_COLUMNS = OUTPUT_SCHEMA.names

# Columns the CPU stage adds for the model stage; never written.
PREPARED = "_prepared"  # safetensors bytes of the preprocessed sample, null when it failed
ERROR = "_error"
NOTE = "_note"
PREP_SECONDS = "_preprocess_seconds"


def output_table(rows: dict[str, list], passthrough: pa.Table) -> pa.Table:
    """Fixed columns from `rows` (lists aligned with `passthrough`), then the pass-through."""
    columns = [pa.array(rows[f.name], type=f.type) for f in OUTPUT_SCHEMA]
    table = pa.Table.from_arrays(columns, schema=OUTPUT_SCHEMA)
    for name in passthrough.column_names:
        if name not in OUTPUT_COLUMNS:
            table = table.append_column(passthrough.schema.field(name), passthrough.column(name))
    return table
