"""Dataset preparation: read a source file, run the `prepare` steps, write JSONL splits and a profile.

Pure data code, with no DVC inside: `llmops.providers.datasets` wraps `llmops.data.stage` in a
DVC stage. Modules:
  io       read JSONL / CSV / Parquet into rows (dicts), write JSONL deterministically
  minhash  MinHash signatures and LSH banding for near-duplicate detection
  steps    the prepare steps (dedupe, filter, map, split) and `run_steps`
  profile  row counts, duplicate counts, null rates and length statistics
  report   the HTML report with SVG histograms
  stage    `python -m llmops.data.stage SPEC_JSON`, the entry point DVC runs
"""
