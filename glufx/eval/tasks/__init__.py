"""lm-evaluation-harness task definitions (YAML) over local copies of the data sets; see utils.py."""
