"""`--resume`: what a saved output must share with the run that continues it.

A GGUF output records its run in `imatrix.resume.*` keys (llama.cpp ignores keys it does not know): the
SHA-256 of the calibration text as read, a fingerprint of the model's files, `--chunk`,
`--parse-special` and `--process-output`; `-c` is `imatrix.chunk_size`. A resume that differs in any of
them is refused, whatever the paths are called. A `.dat` output, or a GGUF that another tool wrote or
that merged files, holds no such record: then only the chunk size (GGUF) and the text's name are checked,
with a warning.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from imatrix.errors import ImatrixError, ImatrixWarning, shown
from imatrix.formats.gguf_file import KEY_RUN_PREFIX
from imatrix.matrix import ImportanceMatrix

# a model is fingerprinted by samples, not read whole: a resume must not cost a pass over 100 GB
SAMPLE_BYTES = 1 << 16
SAMPLES_PER_FILE = 16
MODEL_FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".json", ".model")


@dataclass(frozen=True)
class RunRecord:
    """What a collection's result depends on besides the number of chunks and the batch size."""

    text_sha256: str
    model: str  # `model_fingerprint`; "" when the model was not given as a path
    from_chunk: int
    parse_special: bool
    process_output: bool

    def metadata(self) -> dict[str, str | int]:
        return {KEY_RUN_PREFIX + "text_sha256": self.text_sha256, KEY_RUN_PREFIX + "model": self.model,
                KEY_RUN_PREFIX + "from_chunk": self.from_chunk,
                KEY_RUN_PREFIX + "parse_special": int(self.parse_special),
                KEY_RUN_PREFIX + "process_output": int(self.process_output)}

    @classmethod
    def from_metadata(cls, keys: dict[str, str | int]) -> RunRecord | None:
        """The record in a file's keys; None if it has none, or one this version does not read."""
        values = {key[len(KEY_RUN_PREFIX):]: value for key, value in keys.items() if key.startswith(KEY_RUN_PREFIX)}
        try:
            return cls(str(values["text_sha256"]), str(values["model"]), int(values["from_chunk"]),
                       bool(values["parse_special"]), bool(values["process_output"]))
        except (KeyError, TypeError, ValueError):
            return None


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def model_fingerprint(path: Path) -> str:
    """SHA-256 over a model's files (a GGUF, or a checkpoint folder's weights, configs and tokenizer): each
    file's name, size and `SAMPLES_PER_FILE` samples spread over it, the first at its start (a GGUF's header).
    Another model, another quantization or other weights change it; a copy or a move does not."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file()
                                                 and p.suffix in MODEL_FILE_SUFFIXES and not p.name.startswith("."))
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name if file != path else ''}\0{size}\0".encode())
        with open(file, "rb") as handle:
            for at in sorted({size * index // SAMPLES_PER_FILE for index in range(SAMPLES_PER_FILE)}):
                digest.update(os.pread(handle.fileno(), SAMPLE_BYTES, at))
    return digest.hexdigest()


def check_resumable(saved: ImportanceMatrix, record: RunRecord, output: Path, dataset: str,
                    text_path: str | Path) -> None:
    """Raise unless `saved` (the output to continue) was collected by a run like this one."""
    recorded = RunRecord.from_metadata(saved.run_keys)
    if recorded is None:
        _check_unrecorded(saved, output, dataset, text_path)
        return
    differences = [
        f"another text (SHA-256 {recorded.text_sha256[:12]}…, not {record.text_sha256[:12]}…)"
        if recorded.text_sha256 != record.text_sha256 else "",
        "another model" if recorded.model and record.model and recorded.model != record.model else "",
        f"--chunk {recorded.from_chunk}, not {record.from_chunk}" if recorded.from_chunk != record.from_chunk else "",
        _flag_difference("--parse-special", recorded.parse_special, record.parse_special),
        _flag_difference("--process-output", recorded.process_output, record.process_output),
    ]
    differences = [text for text in differences if text]
    if differences:
        raise ImatrixError(f"{output}: cannot resume: it was collected with {'; '.join(differences)}")


def _flag_difference(flag: str, recorded: bool, now: bool) -> str:
    if recorded == now:
        return ""
    return f"{flag}, this run without it" if recorded else f"no {flag}, this run with it"


def _check_unrecorded(saved: ImportanceMatrix, output: Path, dataset: str, text_path: str | Path) -> None:
    """An output without a run record: the text's name (or the same file under another name) is all there is."""
    warnings.warn(f"{output}: holds no record of the run that wrote it (a .dat, or a file another tool wrote): "
                  "--resume can check only the text's name, not its content, --chunk or the model",
                  ImatrixWarning, stacklevel=4)
    if not saved.datasets or saved.datasets[-1] == dataset or _same_file(saved.datasets[-1], text_path):
        return
    raise ImatrixError(f"{output}: cannot resume: it was collected on {shown(saved.datasets[-1])}, "
                       f"not {shown(dataset)}")


def _same_file(recorded: str, text_path: str | Path) -> bool:
    try:
        return os.path.samefile(recorded, text_path)
    except (OSError, ValueError):
        return False
