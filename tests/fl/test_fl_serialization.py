"""The engine's tensor container (training/fl/serialization.py): safetensors written
deterministically, read strictly, and files in the earlier FLT1 format still read.

Plain pytest, no database.
"""

import json
import pickle

import pytest
import safetensors.torch
import torch

from training.fl.serialization import (
    LEGACY_MAGIC,
    MAX_HEADER_BYTES,
    MalformedTensorFile,
    pack_tensors,
    sha256_hex,
    state_dict_digest,
    state_to_cpu_float,
    unpack_tensors,
)


def _all_dtypes():
    gen = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 4, generator=gen),
        "f64": torch.randn(5, generator=gen, dtype=torch.float64),
        "f16": torch.randn(2, 2, generator=gen).half(),
        "bf16": torch.randn(7, generator=gen).bfloat16(),
        "i64": torch.tensor([-(2**62), 0, 2**62 - 1]),
        "i32": torch.tensor([[-5, 7]], dtype=torch.int32),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "special": torch.tensor([float("nan"), float("inf"), -0.0]),
        "layer.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),  # not contiguous
        "grad": torch.ones(2, requires_grad=True),
        "naïve\nname": torch.ones(1, dtype=torch.float16),  # non-ASCII and a control character
    }


def _assert_same(back, tensors):
    assert sorted(back) == sorted(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype, name
        assert back[name].shape == tensor.shape, name
        assert back[name].device.type == "cpu"
        # Bitwise equality (NaN payloads and -0.0 included).
        a = tensor.detach().contiguous().reshape(-1)
        b = back[name].reshape(-1)
        if a.numel():
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name


# --- Writing and reading back ------------------------------------------------------------


def test_round_trip_is_exact_for_every_dtype():
    tensors = _all_dtypes()
    back = unpack_tensors(pack_tensors(tensors))
    _assert_same(back, tensors)
    assert list(back) == sorted(tensors)
    # The unpacked tensors are writable and independent of the input bytes and of each other.
    back["f32"].add_(1)
    back["bool"][0] = False
    assert torch.equal(unpack_tensors(pack_tensors(tensors))["f32"], tensors["f32"])


def test_the_file_is_safetensors_read_by_the_library_itself():
    tensors = _all_dtypes()
    data = pack_tensors(tensors)
    _assert_same(safetensors.torch.load(data), tensors)
    # And what the library writes (with metadata, which is read and ignored) reads here.
    contiguous = {name: t.detach().contiguous() for name, t in tensors.items()}
    theirs = safetensors.torch.save(contiguous, metadata={"format": "pt"})
    _assert_same(unpack_tensors(theirs), tensors)
    # The reference writer makes the same choices as ours today (order, padding): no metadata,
    # same bytes. Our digests never depend on that (pack_tensors writes the bytes itself).
    assert safetensors.torch.save(contiguous) == data


def test_packing_is_deterministic_whatever_the_order_or_layout():
    tensors = _all_dtypes()
    data = pack_tensors(tensors)
    reordered = dict(reversed(list(tensors.items())))
    relaid = {name: t.detach().clone().contiguous() for name, t in tensors.items()}
    assert data == pack_tensors(tensors) == pack_tensors(reordered) == pack_tensors(relaid)
    assert sha256_hex(data) == state_dict_digest(reordered)
    head_len = int.from_bytes(data[:8], "little")
    assert head_len % 8 == 0 and data[8:9] == b"{"
    header = json.loads(data[8 : 8 + head_len])
    assert "__metadata__" not in header
    # Largest elements first (each tensor aligned for readers that map the file), then by name.
    offsets = [header[name]["data_offsets"][0] for name in header]
    assert offsets == sorted(offsets)
    sizes = [torch.empty(0, dtype=tensors[name].dtype).element_size() for name in header]
    assert sizes == sorted(sizes, reverse=True)
    for name, entry in header.items():
        assert entry["data_offsets"][0] % tensors[name].element_size() == 0, name
    changed = dict(tensors, f32=tensors["f32"] + 1)
    assert pack_tensors(changed) != data


# A fixed state and the SHA-256 its file had when this format was adopted. The digest is a
# content address in the ledger: if this test fails, the writer changed the bytes of an
# unchanged state, and every recomputed digest with them. Do not update the constant lightly.
FIXED_STATE = {
    "w": torch.tensor([[1.5, -2.0], [0.25, 3.0]]),
    "n": torch.tensor(7),
    "m": torch.tensor([True, False]),
    "h": torch.tensor([1.0, -0.5], dtype=torch.bfloat16),
}
FIXED_DIGEST = "36fd3bfa51e4b76400eceb566a4b8d9938d61400b92cb1506c5de8ba312b4843"


def test_the_digest_of_a_fixed_state_never_changes():
    assert state_dict_digest(FIXED_STATE) == FIXED_DIGEST


def test_pack_refuses_what_it_cannot_store():
    with pytest.raises(TypeError, match="dtype"):
        pack_tensors({"c": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(TypeError, match="dtype"):
        pack_tensors({"u": torch.zeros(2, dtype=torch.uint8)})
    with pytest.raises(TypeError, match="not a tensor"):
        pack_tensors({"a": [1, 2]})
    with pytest.raises(TypeError, match="names must be strings"):
        pack_tensors({1: torch.ones(1)})
    with pytest.raises(ValueError, match="reserved by safetensors"):
        pack_tensors({"__metadata__": torch.ones(1)})
    with pytest.raises(ValueError, match="not valid UTF-8"):
        pack_tensors({"\ud800": torch.ones(1)})
    with pytest.raises(TypeError, match="needs a dict"):
        pack_tensors([torch.ones(1)])


def test_state_to_cpu_float():
    state = {"w": torch.ones(2, dtype=torch.float64), "n": torch.tensor(3)}
    out = state_to_cpu_float(state)
    assert out["w"].dtype == torch.float32 and out["n"].dtype == torch.int64
    out["w"].add_(1)
    assert state["w"][0] == 1


# --- Files stored before: FLT1 -----------------------------------------------------------

# FIXED_STATE as the engine packed it before safetensors (FLT1), and that file's SHA-256: the
# digest recorded in the ledger and the artifact store for such a file.
LEGACY_FILE = bytes.fromhex(
    "464c5431e8000000000000007b2268223a7b226474797065223a2262666c6f61743136222c226c656e677468"
    "223a342c226f6666736574223a302c227368617065223a5b325d7d2c226d223a7b226474797065223a2262"
    "6f6f6c222c226c656e677468223a322c226f6666736574223a342c227368617065223a5b325d7d2c226e22"
    "3a7b226474797065223a22696e743634222c226c656e677468223a382c226f6666736574223a362c227368"
    "617065223a5b5d7d2c2277223a7b226474797065223a22666c6f61743332222c226c656e677468223a3136"
    "2c226f6666736574223a31342c227368617065223a5b322c325d7d7d803f00bf010007000000000000000000"
    "c03f000000c00000803e00004040"
)
LEGACY_DIGEST = "56791f37b862ec860cbc0a3978aaa311bb8b612ab787800641b776fa2847e113"


def test_a_stored_flt1_file_still_reads_and_its_digest_still_matches():
    assert LEGACY_FILE.startswith(LEGACY_MAGIC)
    assert sha256_hex(LEGACY_FILE) == LEGACY_DIGEST
    back = unpack_tensors(LEGACY_FILE)
    _assert_same(back, FIXED_STATE)
    assert list(back) == sorted(FIXED_STATE)
    # Packed again it is a new (safetensors) artifact: the old one keeps its bytes and digest.
    assert state_dict_digest(back) == FIXED_DIGEST != LEGACY_DIGEST


def _flt1(header, payload=b"", raw_header=None):
    head = raw_header if raw_header is not None else json.dumps(header).encode()
    return LEGACY_MAGIC + len(head).to_bytes(8, "little") + head + payload


A = {"dtype": "float32", "shape": [2], "offset": 0, "length": 8}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"FLT1", "truncated"),
        (LEGACY_FILE[:10], "truncated"),
        (LEGACY_FILE[:20], "truncated: the header claims"),
        (LEGACY_FILE[:-1], "out of range"),
        (_flt1(None, raw_header=b"{not json"), "header is not JSON"),
        (_flt1(None, raw_header=b"\xff\xfe"), "header is not JSON"),
        (_flt1([1, 2]), "header must be a JSON object"),
        (_flt1(None, raw_header=b'{"a":1,"a":2}'), "names 'a' twice"),
        (_flt1({"a": dict(A, dtype="complex64")}, b"\0" * 8), "unknown dtype 'complex64'"),
        (_flt1({"a": dict(A, dtype="object")}, b"\0" * 8), "unknown dtype"),
        (_flt1({"a": dict(A, offset=4)}, b"\0" * 8), "out of range"),
        (_flt1({"a": dict(A, offset=-1)}, b"\0" * 8), "non-negative"),
        (_flt1({"a": dict(A, length=12)}, b"\0" * 12), "does not match shape"),
        (_flt1({"a": dict(A, shape=[2, -1])}, b"\0" * 8), "invalid shape"),
        (_flt1({"a": {"dtype": "float32", "shape": [2]}}, b"\0" * 8), "exactly dtype"),
        (_flt1({"a": A, "b": dict(A, offset=4)}, b"\0" * 12), "overlaps"),
        (_flt1({"a": A, "b": dict(A, offset=12)}, b"\0" * 20), "belong to no tensor"),
        (_flt1({"a": A}, b"\0" * 9), "trailing garbage"),
        (LEGACY_FILE + b"extra", "trailing garbage"),
        (_flt1({"a": dict(A, dtype="bool", length=2)}, b"\x00\x07"), "other than 0 and 1"),
    ],
)
def test_malformed_flt1_files_raise_with_a_clear_message(data, message):
    with pytest.raises(MalformedTensorFile, match=message) as info:
        unpack_tensors(data)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith("malformed tensor file: ")


# --- Malformed safetensors ---------------------------------------------------------------


def _st(header, payload=b"", raw_header=None):
    head = raw_header if raw_header is not None else json.dumps(header).encode()
    return len(head).to_bytes(8, "little") + head + payload


GOOD = pack_tensors({"a": torch.arange(4, dtype=torch.float32), "b": torch.ones(2)})
S = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated: 0 bytes, shorter than safetensors' 8-byte header length"),
        (GOOD[:5], "truncated: 5 bytes"),
        (GOOD[:20], "truncated: the header claims"),
        (GOOD[:-1], "out of range"),
        ((MAX_HEADER_BYTES + 1).to_bytes(8, "little") + b"{}", "over safetensors' limit"),
        (b"\xff" * 16, "not a safetensors"),
        (_st([1, 2]), "the header does not start with '{'"),
        (_st(None, raw_header=b" {}"), "the header does not start with '{'"),
        (_st(None, raw_header=b"{not json"), "header is not JSON"),
        (_st(None, raw_header=b'{"a":\xff}'), "header is not JSON"),
        (_st(None, raw_header=b'{"a":1}'), "entry 'a' must have exactly dtype, shape and data_o"),
        (_st({"a": dict(S, extra=1)}, b"\0" * 8), "must have exactly"),
        (_st({"a": dict(S, dtype="U8", shape=[8])}, b"\0" * 8), "dtype 'U8', which is not allowed"),
        (_st({"a": dict(S, dtype="F8_E4M3", shape=[8])}, b"\0" * 8), "not allowed"),
        (_st({"a": dict(S, dtype="float32")}, b"\0" * 8), "dtype 'float32', which is not allowed"),
        (_st({"a": dict(S, shape=[2, -1])}, b"\0" * 8), "invalid shape"),
        (_st({"a": dict(S, shape=[1] * 33 + [2])}, b"\0" * 8), "invalid shape"),
        (_st({"a": dict(S, shape=[2**49, 0])}, b""), "invalid shape"),
        (_st({"a": dict(S, shape="2")}, b"\0" * 8), "invalid shape"),
        (_st({"a": dict(S, data_offsets=[0])}, b"\0" * 8), "two non-negative integers"),
        (_st({"a": dict(S, data_offsets=[-8, 0])}, b"\0" * 8), "two non-negative integers"),
        (_st({"a": dict(S, data_offsets=[0, 8.0])}, b"\0" * 8), "two non-negative integers"),
        (_st({"a": dict(S, data_offsets=[8, 0])}, b"\0" * 8), "end before they begin"),
        (_st({"a": dict(S, data_offsets=[4, 12])}, b"\0" * 8), "bytes 4..12 are out of range"),
        (_st({"a": dict(S, data_offsets=[0, 12])}, b"\0" * 12), "does not match shape"),
        (_st({"a": S, "b": dict(S, data_offsets=[4, 12])}, b"\0" * 12), "overlaps"),
        (_st({"a": S, "b": dict(S, data_offsets=[12, 20])}, b"\0" * 20), "belong to no tensor"),
        (_st({"a": S}, b"\0" * 9), "trailing garbage: 1 bytes"),
        (GOOD + b"extra", "trailing garbage: 5 bytes"),
        (_st(None, raw_header=b'{"a":1,"a":2}'), "the header names 'a' twice"),
        (_st({"__metadata__": {"k": 1}}), "__metadata__ must be a JSON object of strings"),
        (_st({"__metadata__": []}), "__metadata__ must be a JSON object of strings"),
        (_st({"a": dict(S, dtype="BOOL", data_offsets=[0, 2])}, b"\x00\x07"), "other than 0 and 1"),
    ],
)
def test_malformed_safetensors_raise_with_a_clear_message(data, message):
    with pytest.raises(MalformedTensorFile, match=message) as info:
        unpack_tensors(data)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith("malformed tensor file: ")


def test_what_the_safetensors_library_refuses_is_a_clear_error_too():
    # JSON lets a name be a lone surrogate; safetensors' parser does not. Our checks pass it,
    # the library's refusal must still come out as a MalformedTensorFile.
    data = _st(None, raw_header=b'{"\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}')
    with pytest.raises(MalformedTensorFile, match="the safetensors library refused it") as info:
        unpack_tensors(data + b"\0" * 4)
    assert str(info.value).startswith("malformed tensor file: ")


def test_max_bytes_is_enforced():
    assert set(unpack_tensors(GOOD, max_bytes=len(GOOD))) == {"a", "b"}
    with pytest.raises(MalformedTensorFile, match="over the limit of max_bytes"):
        unpack_tensors(GOOD, max_bytes=len(GOOD) - 1)
    with pytest.raises(MalformedTensorFile, match="over the limit of max_bytes"):
        unpack_tensors(LEGACY_FILE, max_bytes=len(LEGACY_FILE) - 1)


@pytest.mark.parametrize(
    "payload",
    [pickle.dumps({"a": 1}), pickle.dumps({"a": 1}, protocol=2), b"PK\x03\x04 a zip file"],
)
def test_unpack_never_unpickles(payload):
    with pytest.raises(MalformedTensorFile, match="not a safetensors"):
        unpack_tensors(payload)


def test_a_torch_save_file_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"a": torch.ones(2)}, path)
    with pytest.raises(MalformedTensorFile, match="not a safetensors"):
        unpack_tensors(path.read_bytes())
