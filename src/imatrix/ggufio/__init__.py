"""GGUF files, read and written: the bottom layer, which imports nothing else of the project (but its error type).

`reader` opens a model or imatrix file (mmap) through `header`'s checked parser; `types` knows every tensor
type a file may hold; `writer` writes GGUF files with gguf-py's writer.
"""
