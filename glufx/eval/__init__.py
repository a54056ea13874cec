"""Evaluation: perplexity on token windows, and zero-shot tasks through lm-evaluation-harness (optional lm-eval)."""
from .harness import DATA_LAYOUT, TASKS, markdown_table, write_results, zero_shot
from .perplexity import perplexity, perplexity_windows, wikitext2_windows, wikitext_perplexity

__all__ = ["perplexity", "perplexity_windows", "wikitext2_windows", "wikitext_perplexity", "zero_shot", "TASKS",
           "DATA_LAYOUT", "write_results", "markdown_table"]
