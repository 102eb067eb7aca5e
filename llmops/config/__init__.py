"""llmops.yaml: the document with source positions, targets, references, the schema and validation.
"""
