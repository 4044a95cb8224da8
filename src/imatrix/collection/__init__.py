"""llama-imatrix's collection as a consumer of the pipeline (`run`): what is measured (`hooks`, `moe`,
`targets`), its perplexity (`scoring`), its save schedule (`saves`) and `--resume` (`resume`)."""
