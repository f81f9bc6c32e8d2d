"""The evaluation harness: streaming perplexity, retrieval tasks, memory and speed of caches on the same text."""
