"""laplace_kron.io against real files: round trips, poisoned / malformed files, atomic writes."""

import math
import os
import re
import zipfile

import pytest
import torch

from laplace_kron import io
from laplace_kron.constants import (
    CHECKPOINT_FORMAT,
    FILE_FORMATS,
    ONLINE_FORMAT,
    POSTERIOR_FORMAT,
)

FMT = POSTERIOR_FORMAT


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "mean": torch.randn(5, generator=g),
        "blocks": [
            {"G": torch.randn(3, 3, generator=g), "A": None, "coefs": [1.0, 0.5]},
            {"G": torch.eye(2), "A": torch.ones(2, 2, dtype=torch.float32)},
        ],
        "counts": torch.arange(4),
        "nested": {"deeper": {"x": torch.zeros(1, dtype=torch.float16), "s": "text"}},
        "empty": [],
        "number": 2.5,
        "flag": True,
        "nothing": None,
        "generator_state": torch.Generator().get_state(),
    }


def _assert_same(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def _refused(path, fmt=FMT, match: str = "") -> ValueError:
    """``load_file`` raises a ValueError that names the file (and ``match``)."""
    with pytest.raises(ValueError) as info:
        io.load_file(path, fmt)
    msg = str(info.value)
    assert str(path) in msg, msg
    assert re.search(match, msg), msg
    return info.value


# ----------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("fmt", sorted(FILE_FORMATS))
def test_round_trip_nested_state(tmp_path, fmt):
    path = tmp_path / "state.pt"
    state = _state()
    io.save_file(path, state, fmt)
    loaded = io.load_file(path, fmt)
    assert loaded.pop("format") == fmt and loaded.pop("version") == FILE_FORMATS[fmt]
    _assert_same(state, loaded)
    # the file is an ordinary weights_only torch file
    assert torch.load(path, weights_only=True)["format"] == fmt
    assert os.listdir(tmp_path) == ["state.pt"]


def test_round_trip_accepts_str_path_and_overwrites(tmp_path):
    path = str(tmp_path / "state.pt")
    io.save_file(path, {"x": torch.ones(2)}, FMT)
    io.save_file(path, {"x": torch.zeros(3)}, FMT)
    assert torch.equal(io.load_file(path, FMT)["x"], torch.zeros(3))


def test_save_refuses_unknown_format_and_directory(tmp_path):
    with pytest.raises(ValueError, match="unknown file format"):
        io.save_file(tmp_path / "x.pt", {}, "laplace_kron.Other")
    with pytest.raises(ValueError, match="unknown file format"):
        io.load_file(tmp_path / "x.pt", "pickle")
    with pytest.raises(ValueError, match="directory"):
        io.save_file(tmp_path, {}, FMT)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- poisoned
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_inf_in_nested_tensor_refused(tmp_path, bad):
    state = _state()
    state["blocks"][1]["A"][0, 1] = bad
    path = tmp_path / "poisoned.pt"
    io.save_file(path, state, FMT)
    _refused(path, match=r"blocks\[1\]\.A.*NaN or Inf")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_inf_in_plain_float_refused(tmp_path, bad):
    state = _state()
    state["blocks"][0]["coefs"][1] = bad
    path = tmp_path / "poisoned.pt"
    io.save_file(path, state, FMT)
    _refused(path, match=r"blocks\[0\]\.coefs\[1\] is")


def test_nan_in_half_and_complex_tensors_refused(tmp_path):
    for name, t in [
        ("half", torch.tensor([1.0, math.nan], dtype=torch.float16)),
        ("complex", torch.tensor([complex(1, math.inf)])),
    ]:
        path = tmp_path / f"{name}.pt"
        io.save_file(path, {"deep": {name: t}}, FMT)
        _refused(path, match=f"deep.{name}")


def test_check_finite_names_the_key_path_and_ignores_integers():
    io.check_finite({"a": [torch.arange(3), 1, "x", None, True]}, "s")
    with pytest.raises(ValueError, match=r"'s' is corrupted: a\[1\]\.b holds NaN"):
        io.check_finite({"a": [0, {"b": torch.tensor([math.nan])}]}, "s")
    with pytest.raises(ValueError, match="the state is nan"):
        io.check_finite(math.nan, "s")


# ----------------------------------------------------------------------------- malformed
def _valid_bytes(tmp_path) -> bytes:
    path = tmp_path / "valid.pt"
    io.save_file(path, _state(), FMT)
    return path.read_bytes()


def test_truncated_file_refused(tmp_path):
    data = _valid_bytes(tmp_path)
    n = len(data)
    cuts = sorted(
        {1, 2, 10, 64, n // 8, n // 4, n // 3, n // 2, 2 * n // 3, n - 100, n - 22, n - 1}
    )
    for cut in cuts:
        path = tmp_path / f"cut{cut}.pt"
        path.write_bytes(data[:cut])
        _refused(path, match="cannot read.*truncated or corrupted")


def test_empty_file_refused(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    _refused(path, match="cannot read")


@pytest.mark.parametrize("seed", range(24))
def test_random_bytes_refused(tmp_path, seed):
    g = torch.Generator().manual_seed(seed)
    sizes = (
        [0, 1, 7, 64, 511, 4096] if seed == 0 else [int(torch.randint(0, 4097, (1,), generator=g))]
    )
    for size in sizes:
        path = tmp_path / f"random{seed}_{size}.pt"
        path.write_bytes(bytes(torch.randint(0, 256, (size,), generator=g, dtype=torch.uint8)))
        _refused(path)


@pytest.mark.parametrize("seed", range(8))
def test_random_bytes_after_a_zip_header_refused(tmp_path, seed):
    """A zip magic number followed by garbage (looks like a torch file to a sniffing reader)."""
    g = torch.Generator().manual_seed(seed)
    body = bytes(
        torch.randint(
            0,
            256,
            (int(torch.randint(1, 4096, (1,), generator=g)),),
            generator=g,
            dtype=torch.uint8,
        )
    )
    path = tmp_path / "zip_garbage.pt"
    path.write_bytes(b"PK\x03\x04" + body)
    _refused(path)


@pytest.mark.parametrize("seed", range(10))
def test_flipped_bytes_give_a_dict_or_a_value_error(tmp_path, seed):
    """Corrupting bytes inside a valid file: never any error but ValueError (a flip inside raw
    tensor data can stay undetected, but whatever loads is finite and a dict)."""
    data = bytearray(_valid_bytes(tmp_path))
    g = torch.Generator().manual_seed(seed)
    for pos in torch.randint(0, len(data), (8,), generator=g).tolist():
        data[pos] ^= 0xFF
    path = tmp_path / "flipped.pt"
    path.write_bytes(bytes(data))
    try:
        state = io.load_file(path, FMT)
    except ValueError as e:
        assert str(path) in str(e)
    else:
        assert isinstance(state, dict) and state["format"] == FMT


class _Payload:
    """Unpickling this would create a marker file: loading must never execute it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("where", ["top", "nested"])
def test_pickled_object_refused_and_not_executed(tmp_path, where):
    marker = tmp_path / "executed"
    payload = _Payload(str(marker))
    obj = payload if where == "top" else {"format": FMT, "version": 1, "x": [payload]}
    path = tmp_path / "evil.pt"
    torch.save(obj, path)
    _refused(path, match="refusing to load.*nothing was executed")
    assert not marker.exists()


class _Plain:
    pass


def test_custom_class_instance_refused(tmp_path):
    path = tmp_path / "custom.pt"
    torch.save({"format": FMT, "version": 1, "obj": _Plain()}, path)
    _refused(path, match="refusing to load.*_Plain.*nothing was executed")


def test_wrong_version_refused(tmp_path):
    path = tmp_path / "v99.pt"
    torch.save({"format": FMT, "version": 99}, path)
    _refused(path, match="version 99")
    torch.save({"format": FMT}, path)
    _refused(path, match="version None")


def test_another_laplace_kron_format_refused(tmp_path):
    path = tmp_path / "posterior.pt"
    io.save_file(path, {"mean": torch.zeros(2)}, POSTERIOR_FORMAT)
    for other in (ONLINE_FORMAT, CHECKPOINT_FORMAT):
        _refused(path, other, match=r"is not a laplace_kron .* but a KronLaplace posterior")


def test_foreign_dict_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    _refused(path, match="is not a laplace_kron KronLaplace posterior .*its 'format' is None")
    torch.save({"format": "something.else", "version": 1}, path)
    _refused(path, match="its 'format' is 'something.else'")


@pytest.mark.parametrize("obj", [[1, 2], torch.zeros(3), "text", None, (FMT, 1)])
def test_not_a_dict_refused(tmp_path, obj):
    path = tmp_path / "notdict.pt"
    torch.save(obj, path)
    _refused(path, match="not a dict")


def test_a_zip_that_is_not_a_torch_file_refused(tmp_path):
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("hello.txt", "not a tensor archive")
    _refused(path, match="cannot read")


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        io.load_file(tmp_path / "absent.pt", FMT)


def test_a_directory_is_refused(tmp_path):
    _refused(tmp_path, match="directory")


# ----------------------------------------------------------------------------- atomic writes
def test_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    io.save_file(path, {"x": torch.ones(3)}, FMT)
    before = path.read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.seek(0)
        f.truncate(17)  # half a file reached the disk when the writer died
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_file(path, {"x": torch.zeros(1000)}, FMT)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert torch.equal(io.load_file(path, FMT)["x"], torch.ones(3))
    assert os.listdir(tmp_path) == ["state.pt"]


def test_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_file(tmp_path / "new.pt", {"x": torch.ones(1)}, FMT)
    assert os.listdir(tmp_path) == []


def test_remove_file_also_removes_stale_temp_files(tmp_path):
    path = tmp_path / "ck[1].pt"  # glob characters in the name are taken literally
    io.save_file(path, {}, CHECKPOINT_FORMAT)
    (tmp_path / "ck[1].pt.tmp-123").write_bytes(b"half")
    (tmp_path / "ck1.pt.tmp-5").write_bytes(b"other")
    io.remove_file(path)
    assert os.listdir(tmp_path) == ["ck1.pt.tmp-5"]
    io.remove_file(path)  # nothing left: no error


# ----------------------------------------------------------------------------- reading
@pytest.mark.parametrize(
    "error",
    [KeyError("coefs"), TypeError("bad type"), IndexError("list index"), AttributeError("x")],
)
def test_reading_turns_parse_errors_into_value_errors(error):
    with pytest.raises(
        ValueError, match=rf"'my state' is malformed \({type(error).__name__}"
    ) as info:
        with io.reading("my state"):
            raise error
    assert info.value.__cause__ is error


def test_reading_lets_other_errors_through():
    with pytest.raises(ValueError, match="^own message$"):
        with io.reading("s"):
            raise ValueError("own message")
    with pytest.raises(ZeroDivisionError):
        with io.reading("s"):
            print(1 / 0)
    with io.reading("s"):
        value = {"a": 1}["a"]
    assert value == 1


def test_reading_a_real_malformed_state(tmp_path):
    path = tmp_path / "state.pt"
    io.save_file(path, {"blocks": [{"G": torch.eye(2)}]}, FMT)
    state = io.load_file(path, FMT)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*KeyError.*'A'"):
        with io.reading(str(path)):
            state["blocks"][0]["A"]
    with pytest.raises(ValueError, match="IndexError"):
        with io.reading(str(path)):
            state["blocks"][3]
