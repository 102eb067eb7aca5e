"""Model building and training code that runs in-process or inside a training job.

`build` makes tiny random-init base models (a llama config plus a byte-level BPE tokenizer
trained on the project's own text); the LoRA training modules live beside it. Nothing here
is imported by the CLI at startup: torch, transformers and tokenizers are imported inside
the functions that use them.
"""
