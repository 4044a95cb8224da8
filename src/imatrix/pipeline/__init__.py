"""How the model runs, for every forward pass (collection, perplexity, KL divergence): `executors` (the whole
model in memory, or `sequential`, one layer at a time), chunks in flight (`in_flight`), ranks
(`distributed`), the plan of batches and windows (`windows`), and the `runner` that feeds a consumer.
The text becomes chunks in `chunks`."""
