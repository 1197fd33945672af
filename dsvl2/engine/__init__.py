"""The generation engine: sampling, the step generator of token ids, streaming detokenisation."""
