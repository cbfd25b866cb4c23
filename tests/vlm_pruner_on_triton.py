"""A pytest plugin (`-p vlm_pruner_on_triton`, tests/ on PYTHONPATH, TRITON_INTERPRET=1 on a
CPU): VLM-Pruner's selection defaults to the Triton backend, so that its known-answer tests
check the kernel. tests/test_vlm_pruner_triton.py runs them so in a subprocess."""
from pruner.methods import vlm_pruner

vlm_pruner.select_batch.__kwdefaults__["backend"] = "triton"
