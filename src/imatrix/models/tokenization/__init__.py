"""The parts of a llama.cpp-exact GGUF tokenizer; `imatrix.models.tokenizer` puts them together."""
