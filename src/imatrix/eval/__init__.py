"""llama-perplexity as consumers of the pipeline: perplexity (`perplexity`, which also writes the base
log-probabilities of `logits_file`), KL divergence from them (`kld`), and llama.cpp's CPU matmul inputs
(`cpu_matmul`)."""
