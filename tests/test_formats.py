"""imatrix files against llama.cpp's own: exact reads, byte-identical writes, merges and conversions."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imatrix import ImatrixError, ImportanceMatrix
from imatrix.formats import load_imatrices, load_imatrix, save_imatrix
from imatrix.formats.dat_file import dat_bytes, parse_dat

C512_GGUF = "imatrix/smollm2-f16.c512.n40.imatrix.gguf"
C512_DAT = "imatrix/smollm2-f16.c512.n40.imatrix.dat"
C256_GGUF = "imatrix/smollm2-f16.c256.chunk100.n20.imatrix.gguf"


def test_reads_gguf_values_exactly(golden: Path) -> None:
    path = golden / C512_GGUF
    matrix = load_imatrix(path)
    reader = gguf.GGUFReader(path)
    assert len(matrix) == 210 and len(reader.tensors) == 420
    assert (matrix.chunk_count, matrix.chunk_size, matrix.datasets) == (40, 512, ["corpus/calibration.txt"])
    for tensor in reader.tensors:
        name, _, kind = tensor.name.rpartition(".")
        stored = np.asarray(tensor.data, dtype=np.float32).ravel()
        ours = matrix[name].sums.ravel() if kind == "in_sum2" else matrix[name].counts.astype(np.float32)
        np.testing.assert_array_equal(ours, stored)
    assert all(matrix[name].counts.tolist() == [20480] for name in matrix)


def test_reads_dat_values_exactly(golden: Path) -> None:
    raw = (golden / C512_DAT).read_bytes()
    n_entries = struct.unpack_from("<i", raw)[0]
    parsed = parse_dat(golden / C512_DAT, raw)
    assert n_entries == len(parsed.entries) == 210
    name = "blk.0.attn_k.weight"
    # independent walk to the first entry: name, ncall, nval, floats
    name_len = struct.unpack_from("<i", raw, 4)[0]
    assert raw[8 : 8 + name_len].decode() == name
    ncall, nval = struct.unpack_from("<ii", raw, 8 + name_len)
    values = np.frombuffer(raw, "<f4", nval, 16 + name_len)
    assert parsed.entries[name].ncall == ncall == 40
    np.testing.assert_array_equal(parsed.entries[name].values, values)
    assert parsed.chunk_count == 40 and parsed.dataset == "corpus/calibration.txt"


def test_gguf_round_trip_is_byte_identical(golden: Path, tmp_path: Path) -> None:
    save_imatrix(load_imatrix(golden / C512_GGUF), tmp_path / "copy.gguf")
    assert (tmp_path / "copy.gguf").read_bytes() == (golden / C512_GGUF).read_bytes()


def test_dat_written_like_llama_cpp(golden: Path, tmp_path: Path) -> None:
    save_imatrix(load_imatrix(golden / C512_GGUF), tmp_path / "out.dat", "dat")
    ours = (tmp_path / "out.dat").read_bytes()
    assert ours == (golden / C512_DAT).read_bytes()
    assert ours == (golden / "imatrix/from-gguf.imatrix.dat").read_bytes()


def test_dat_to_gguf_conversion_is_bit_exact(golden: Path, tmp_path: Path) -> None:
    save_imatrix(load_imatrices([golden / C512_DAT]), tmp_path / "from-dat.gguf")
    assert (tmp_path / "from-dat.gguf").read_bytes() == (golden / "imatrix/from-dat.imatrix.gguf").read_bytes()


def test_merge_is_bit_exact(golden: Path, tmp_path: Path) -> None:
    merged = load_imatrices([golden / C512_GGUF, golden / C256_GGUF], chunk_size=512)
    assert merged.chunk_count == 50
    assert merged.datasets == ["corpus/calibration.txt", "corpus/calibration.txt"]
    save_imatrix(merged, tmp_path / "merged.gguf")
    assert (tmp_path / "merged.gguf").read_bytes() == (golden / "imatrix/merged.imatrix.gguf").read_bytes()


def test_gguf_py_reads_our_file(golden: Path, tmp_path: Path) -> None:
    matrix = load_imatrix(golden / C256_GGUF)
    matrix.tensors["blk.0.ffn_up_exps.weight"] = load_imatrix(golden / C256_GGUF)[
        "blk.0.ffn_up.weight"].__class__(np.arange(12, dtype=np.float32).reshape(3, 4), [5, 0, 7])
    save_imatrix(matrix, tmp_path / "ours.gguf")
    reader = gguf.GGUFReader(tmp_path / "ours.gguf")
    assert reader.get_field("general.type").contents() == "imatrix"
    assert reader.get_field("imatrix.chunk_count").contents() == matrix.chunk_count
    assert reader.get_field("imatrix.chunk_size").contents() == 256
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    weight_names = [name.rpartition(".")[0] for name in tensors][::2]
    assert weight_names == sorted(weight_names) == sorted(matrix.names())
    assert all(name.endswith(".in_sum2") for name in list(tensors)[::2])
    experts = tensors["blk.0.ffn_up_exps.weight.in_sum2"]
    assert experts.shape.tolist() == [4, 3]
    assert tensors["blk.0.ffn_up_exps.weight.counts"].shape.tolist() == [1, 3]
    assert tensors["blk.0.attn_q.weight.in_sum2"].shape.tolist() == [576]
    np.testing.assert_array_equal(np.asarray(experts.data).ravel(), np.arange(12))


def test_merge_invariants(golden: Path) -> None:
    a = load_imatrix(golden / C512_GGUF)
    b = load_imatrix(golden / C256_GGUF)
    c = load_imatrices([golden / C512_DAT])
    left, right = a.merge(b).merge(c), a.merge(b.merge(c))
    for name in a:
        assert left[name].counts.tolist() == right[name].counts.tolist() == [20480 + 5120 + 20480]
        np.testing.assert_allclose(left[name].sums, right[name].sums, rtol=1e-6)


def test_merge_rejects_shape_mismatch(golden: Path) -> None:
    a = load_imatrix(golden / C512_GGUF)
    b = a.copy()
    b.tensors["blk.0.attn_q.weight"].sums = np.ones((1, 5), np.float32)
    with pytest.raises(ImatrixError, match="blk.0.attn_q.weight"):
        a.merge(b)


@pytest.mark.parametrize("cut", [3, 10, 2000, -7])
def test_truncated_dat_is_a_clear_error(golden: Path, tmp_path: Path, cut: int) -> None:
    raw = (golden / C512_DAT).read_bytes()
    broken = tmp_path / "broken.dat"
    broken.write_bytes(raw[:cut] if cut > 0 else raw[: len(raw) // 2 + cut])
    with pytest.raises(ImatrixError, match="broken.dat"):
        load_imatrix(broken)


def test_truncated_gguf_is_a_clear_error(golden: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes((golden / C512_GGUF).read_bytes()[:5000])
    with pytest.raises(ImatrixError, match="broken.gguf"):
        load_imatrix(broken)


names = st.from_regex(r"blk\.[0-9]{1,2}\.[a-z_]{1,12}\.weight", fullmatch=True)
stats = st.tuples(st.integers(1, 3), st.integers(1, 8)).flatmap(
    lambda shape: st.tuples(
        st.lists(st.floats(0, 1e6, width=32), min_size=shape[0] * shape[1], max_size=shape[0] * shape[1]),
        st.lists(st.integers(1, 10**6), min_size=shape[0], max_size=shape[0]),
        st.just(shape),
    )
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(names, stats, min_size=1, max_size=5), st.integers(1, 4096))
def test_gguf_write_read_write_is_stable(tmp_path: Path, entries: dict, chunk_size: int) -> None:
    matrix = ImportanceMatrix(chunk_size=chunk_size, datasets=["a.txt"])
    for name, (values, counts, shape) in entries.items():
        matrix.accumulate(name, np.array(values, np.float32).reshape(shape), counts)
    matrix.update_chunk_count()
    first, second = tmp_path / "first.gguf", tmp_path / "second.gguf"
    save_imatrix(matrix, first)
    reread = load_imatrix(first)
    save_imatrix(reread, second)
    assert first.read_bytes() == second.read_bytes()
    for name in matrix:
        np.testing.assert_array_equal(reread[name].sums, matrix[name].sums)
        np.testing.assert_array_equal(reread[name].counts, matrix[name].counts)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_dat_reader_never_crashes_on_garbage(blob: bytes) -> None:
    try:
        parsed = parse_dat(Path("garbage.dat"), blob)
    except ImatrixError as exc:
        assert "garbage.dat" in str(exc)
    else:
        assert all(entry.values.dtype == np.float32 for entry in parsed.entries.values())


positive_floats = st.one_of(st.just(0.0), st.floats(2.0**-60, 1e4, width=32))


@settings(max_examples=30, deadline=None)
@given(st.dictionaries(names, st.lists(positive_floats, min_size=1, max_size=6), min_size=1, max_size=4),
       st.integers(1, 50))
def test_dat_round_trip(entries: dict, ncall: int) -> None:
    matrix = ImportanceMatrix(chunk_size=512, chunk_count=ncall, datasets=["d.txt"])
    for name, values in entries.items():
        matrix.accumulate(name, np.array(values, np.float32).reshape(1, -1) * 512, [ncall * 512])
    parsed = parse_dat(Path("x.dat"), dat_bytes(matrix))
    assert set(parsed.entries) == set(entries) and parsed.dataset == "d.txt" and parsed.chunk_count == ncall
    for name, values in entries.items():
        assert parsed.entries[name].ncall == ncall
        # stored = (sum / count) · ncall = (v·512 / (ncall·512)) · ncall = v
        np.testing.assert_allclose(parsed.entries[name].values, np.array(values, np.float32), rtol=1e-6)


def test_accumulate_copies_the_callers_buffers() -> None:
    matrix = ImportanceMatrix(chunk_size=4)
    buffer, count = np.zeros((1, 3), np.float32), np.zeros(1, np.int64)
    for value in (5.0, 1.0, 1.0):  # a collector refilling one buffer per step
        buffer[:], count[:] = value, 4
        matrix.accumulate("blk.0.attn_q.weight", buffer, count)
    assert matrix["blk.0.attn_q.weight"].sums.tolist() == [[7.0, 7.0, 7.0]]
    assert matrix["blk.0.attn_q.weight"].counts.tolist() == [12]


MOE_GGUF = "moe/tiny-qwen3moe.c256.n8.imatrix.gguf"


def test_moe_gguf_and_its_dat_merge_in_either_order(golden: Path, moe_dat: Path) -> None:
    # llama.cpp's load_imatrix: a .dat expert stack (one count) adds its count to every expert
    moe = load_imatrix(golden / MOE_GGUF, chunk_size=256)
    dat = load_imatrix(moe_dat, chunk_size=256)
    stack = "blk.0.ffn_down_exps.weight"
    assert (dat[stack].n_mat, moe[stack].n_mat) == (1, 8)
    dat_first, gguf_first = dat.merge(moe), moe.merge(dat)
    assert gguf_first.names() == dat_first.names() == moe.names()
    for name in moe:
        np.testing.assert_array_equal(gguf_first[name].sums, dat_first[name].sums)
        np.testing.assert_array_equal(gguf_first[name].counts, dat_first[name].counts)
    assert gguf_first[stack].counts.tolist() == (moe[stack].counts + dat[stack].counts[0]).tolist()


def test_an_empty_matrix_is_not_saved(tmp_path: Path) -> None:
    with pytest.raises(ImatrixError, match="nothing to save"):
        save_imatrix(ImportanceMatrix(), tmp_path / "empty.gguf")
    assert not (tmp_path / "empty.gguf").exists()


def write_raw_imatrix(path: Path, tensors: dict[str, np.ndarray], **metadata: object) -> Path:
    """An imatrix GGUF written by hand with gguf-py, to hold what our writer never would."""
    writer = gguf.GGUFWriter(path, arch="")
    writer.kv_data[0].clear()
    writer.add_string("general.type", "imatrix")
    for key, value in metadata.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_uint32(key, value)
    for name, values in tensors.items():
        writer.add_tensor(name, np.asarray(values, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def one_tensor(sums: object, counts: object) -> dict[str, np.ndarray]:
    return {"blk.0.attn_q.weight.in_sum2": np.asarray(sums), "blk.0.attn_q.weight.counts": np.asarray(counts)}


def test_empty_dataset_list_is_written(tmp_path: Path) -> None:
    # llama.cpp writes imatrix.datasets even empty (a .dat without a dataset name converted), and
    # llama-quantize refuses a file without it; gguf-py's add_array would drop it
    matrix = ImportanceMatrix(chunk_size=512, chunk_count=1)
    matrix.accumulate("blk.0.attn_q.weight", np.ones((1, 4), dtype=np.float32), np.array([512]))
    save_imatrix(matrix, tmp_path / "no-dataset.gguf")
    field = gguf.GGUFReader(tmp_path / "no-dataset.gguf").get_field("imatrix.datasets")
    # an array of strings (item type 8) with no items, as llama.cpp's gguf_set_arr_str writes it
    assert field.types == [gguf.GGUFValueType.ARRAY] and [int(part[0]) for part in field.parts[-2:]] == [8, 0]
    assert load_imatrix(tmp_path / "no-dataset.gguf").datasets == []


def test_dataset_name_in_another_encoding(golden: Path, tmp_path: Path) -> None:
    raw = (golden / C512_GGUF).read_bytes().replace(b"corpus/calibration.txt", b"corpus/calibr\xe9tion.txt")
    latin1 = tmp_path / "latin1.gguf"
    latin1.write_bytes(raw)
    assert load_imatrix(latin1).datasets == ["corpus/calibr\ufffdtion.txt"]


@pytest.mark.parametrize(("tensors", "metadata", "message"), [
    (one_tensor(np.ones(8), np.ones(3)), {}, "1 matrices of sums but 3 counts"),
    (one_tensor(np.ones(576), [512.0, 512.0]), {}, "1 matrices of sums but 2 counts"),
    (one_tensor(np.ones(8), np.zeros(0)), {}, "is empty"),
    (one_tensor(np.ones(8), [-512.0]), {}, "token counts that are negative or too large"),
    (one_tensor(np.ones(8), [np.nan]), {}, "token counts that are not numbers"),
    (one_tensor(np.ones(8), [1e30]), {}, "token counts that are negative or too large"),
    (one_tensor(np.ones(8), [0.4]), {}, "token counts that are not whole numbers"),
    (one_tensor(np.full(8, np.nan), [512.0]), {}, "sums that are NaN or infinite"),
    (one_tensor(np.full(8, np.inf), [512.0]), {}, "sums that are NaN or infinite"),
    (one_tensor(-np.ones(8), [512.0]), {}, "negative sums of squares"),
    (one_tensor(np.ones(8), [512.0]), {"imatrix.chunk_count": "abc"}, "imatrix.chunk_count is not a count"),
])
def test_inconsistent_gguf_is_one_clear_error(tmp_path: Path, tensors: dict, metadata: dict, message: str) -> None:
    path = write_raw_imatrix(tmp_path / "bad.gguf", tensors, **metadata)
    with pytest.raises(ImatrixError, match=rf"bad\.gguf: .*{message}"):
        load_imatrix(path)


def test_datasets_that_are_not_strings_are_ignored(tmp_path: Path) -> None:
    path = write_raw_imatrix(tmp_path / "odd.gguf", one_tensor(np.ones(8), [512.0]), **{"imatrix.datasets": "abc"})
    assert load_imatrix(path).datasets == []


def test_a_model_is_not_an_imatrix(golden: Path) -> None:
    with pytest.raises(ImatrixError, match="tiny-qwen3moe-f16.gguf: a model, not an imatrix"):
        load_imatrix(golden / "moe" / "tiny-qwen3moe-f16.gguf")


def test_merge_error_names_the_file(golden: Path, tmp_path: Path) -> None:
    other = write_raw_imatrix(tmp_path / "narrow.gguf", one_tensor(np.ones(16), [512.0]))
    with pytest.raises(ImatrixError, match=r"narrow\.gguf: cannot merge 'blk\.0\.attn_q\.weight': 576 values vs 16"):
        load_imatrices([golden / C512_GGUF, other])


def test_counts_too_large_for_the_file(tmp_path: Path) -> None:
    matrix = ImportanceMatrix(chunk_size=1, chunk_count=2**32)
    matrix.accumulate("blk.0.attn_q.weight", np.ones((1, 4), dtype=np.float32), np.array([2**32]))
    with pytest.raises(ImatrixError, match=r"big\.gguf: a chunk count of 4294967296 does not fit"):
        save_imatrix(matrix, tmp_path / "big.gguf")
    with pytest.raises(ImatrixError, match=r"big\.dat: .* do not fit the \.dat format's 32 bits"):
        save_imatrix(matrix, tmp_path / "big.dat")
    assert not any(tmp_path.iterdir())
