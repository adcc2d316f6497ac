"""The restricted reader of torch.distributed.checkpoint's `.metadata` index refuses crafted files.

Each crafted payload, if it were executed, would create a marker file: the tests check both that the
reader refuses and that the marker never appears.
"""
from __future__ import annotations

import pickle
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from megatron_selfjudge.megatron import dcp_metadata as dm


@pytest.fixture(scope="module")
def real_index(tmp_path_factory) -> Path:
    """A genuine index written by torch.distributed.checkpoint (one process, no process group)."""
    folder = tmp_path_factory.mktemp("dcp")
    state = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.zeros(5, dtype=torch.bfloat16), "step": 3,
             "blob": {"a": [1, 2]}}
    dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    return folder


def _global(module: str, name: str) -> bytes:
    """Protocol-4 GLOBAL opcode: protocol 4 resolves dotted names through attributes."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _call(module: str, name: str, *args) -> bytes:
    """A pickle that calls module.name(*args) when loaded."""
    arg_ops = pickle.dumps(tuple(args), protocol=2)[2:-1]  # tuple-building opcodes without header / STOP
    return b"\x80\x04" + _global(module, name) + arg_ops + b"R."


def _assert_not_run(marker: Path) -> None:
    time.sleep(0.3)  # a spawned shell would have written by now
    assert not marker.exists(), "the crafted index was executed"


def test_genuine_index_is_accepted_and_equal_to_torchs_reading(real_index):
    ours = dm.read_metadata_file(real_index)
    theirs = pickle.loads((real_index / ".metadata").read_bytes())
    assert ours == theirs
    assert set(ours.state_dict_metadata) >= {"w", "b", "step"}


def test_dotted_name_through_an_allowed_module_is_refused(tmp_path):
    """The hole: `torch.distributed.checkpoint.metadata` + "torch...subprocess.Popen" resolved to Popen."""
    marker = tmp_path / "pwned"
    dotted = "torch._strobelight.cli_function_profiler.subprocess.Popen"
    obj = __import__("torch.distributed.checkpoint.metadata", fromlist=["x"])
    for part in dotted.split("."):  # the path exists in this torch: the attack was real
        obj = getattr(obj, part)
    assert obj is subprocess.Popen
    payload = _call("torch.distributed.checkpoint.metadata", dotted, ["sh", "-c", f"echo x > {marker}"])
    with pytest.raises(dm.UnsafeMetadataError, match="disallowed object"):
        dm.parse_metadata(payload, "crafted")
    _assert_not_run(marker)


@pytest.mark.parametrize("module,name", [
    ("os", "system"), ("posix", "system"), ("builtins", "eval"), ("subprocess", "Popen"),
    ("torch.distributed.checkpoint.metadata", "os.system"),
    ("torch.distributed.checkpoint.filesystem", "os.system"),
    ("torch.distributed.checkpoint.planner", "Metadata.__init__"),
    ("torch", "load"), ("torch.serialization", "load"), ("collections", "namedtuple"),
])
def test_callables_outside_the_exact_list_are_refused(tmp_path, module, name):
    marker = tmp_path / "pwned"
    with pytest.raises(dm.UnsafeMetadataError, match="disallowed object"):
        dm.parse_metadata(_call(module, name, f"echo x > {marker}"), "crafted")
    _assert_not_run(marker)


def test_build_on_a_class_is_refused():
    """BUILD with a class on the stack would set attributes of that class for the whole process."""
    from torch.distributed.checkpoint.metadata import Metadata

    payload = (b"\x80\x04" + _global("torch.distributed.checkpoint.metadata", "Metadata")
               + pickle.dumps((None, {"version": "patched"}), protocol=2)[2:-1] + b"b.")
    before = getattr(Metadata, "version", None)
    with pytest.raises(dm.UnsafeMetadataError, match="class Metadata"):
        dm.parse_metadata(payload, "crafted")
    assert getattr(Metadata, "version", None) == before


def test_result_type_and_contents_are_checked(real_index):
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    with pytest.raises(dm.UnsafeMetadataError, match="not torch's checkpoint Metadata"):
        dm.parse_metadata(pickle.dumps({"state_dict_metadata": {}}), "a dict")
    good = pickle.loads((real_index / ".metadata").read_bytes())
    index = next(iter(good.storage_data))
    good.storage_data[index] = _StorageInfo(relative_path="../../etc/passwd", offset=0, length=10)
    with pytest.raises(dm.UnsafeMetadataError, match="not a shard file"):
        dm.parse_metadata(pickle.dumps(good), "escaping path")
    good.storage_data[index] = _StorageInfo(relative_path="__0_0.distcp", offset=-1, length=10)
    with pytest.raises(dm.UnsafeMetadataError, match="offset -1"):
        dm.parse_metadata(pickle.dumps(good), "negative offset")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_damaged_bytes_give_one_error_naming_the_file(real_index, tmp_path, damage):
    data = (real_index / ".metadata").read_bytes()
    bad = {"garbage": b"\x00\xffnot a pickle" * 20, "truncated": data[: len(data) // 2], "empty": b""}[damage]
    (tmp_path / ".metadata").write_bytes(bad)
    with pytest.raises(dm.UnsafeMetadataError) as info:
        dm.read_metadata_file(tmp_path)
    assert str(tmp_path / ".metadata") in str(info.value) and "\n" not in str(info.value)


def test_readers_get_the_checked_object_and_never_reread_the_file(real_index, tmp_path):
    """While active, FileSystemReader.read_metadata returns the checked object: swapping the file
    after the check (time-of-check to time-of-use) changes nothing, and reading stops afterwards."""
    from torch.distributed.checkpoint import FileSystemReader

    folder = tmp_path / "ckpt"
    folder.mkdir()
    for f in real_index.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    checked = dm.read_metadata_file(folder)
    marker = tmp_path / "pwned"
    (folder / ".metadata").write_bytes(_call("posix", "system", f"echo x > {marker}"))
    other = tmp_path / "other"
    other.mkdir()
    (other / ".metadata").write_bytes(_call("posix", "system", f"echo x > {marker}"))
    original = FileSystemReader.read_metadata
    with dm.reading_metadata(folder, checked):
        got = FileSystemReader(str(folder)).read_metadata()
        assert got.state_dict_metadata == checked.state_dict_metadata
        assert got is not checked  # each reader may write its load id into its own copy
        with pytest.raises(dm.UnsafeMetadataError):  # any other folder: the restricted reader too
            FileSystemReader(str(other)).read_metadata()
    assert FileSystemReader.read_metadata is original
    _assert_not_run(marker)


def test_build_on_a_function_or_enum_is_refused_and_changes_nothing():
    """BUILD on an allowed function or enum member would change process-wide objects (found in review)."""
    from torch.distributed.checkpoint.planner import WriteItemType
    from torch.serialization import _get_layout

    for module, name in (("torch.serialization", "_get_layout"),):
        payload = (b"\x80\x04" + _global(module, name)
                   + pickle.dumps({"cache": {"torch.strided": "POISON"}}, protocol=2)[2:-1] + b"b.")
        with pytest.raises(dm.UnsafeMetadataError, match="set attributes of a function"):
            dm.parse_metadata(payload, "crafted")
    assert _get_layout("torch.strided") is torch.strided
    member = (b"\x80\x04" + _global("torch.distributed.checkpoint.planner", "WriteItemType")
              + pickle.dumps((WriteItemType.TENSOR.value,), protocol=2)[2:-1] + b"R" + pickle.dumps({"_name_": "HACKED"}, protocol=2)[2:-1]
              + b"b.")
    with pytest.raises(dm.UnsafeMetadataError, match="set attributes of a WriteItemType"):
        dm.parse_metadata(member, "crafted")
    assert WriteItemType.TENSOR.name == "TENSOR"


def test_shared_objects_are_checked_once_and_extra_attributes_refused(real_index):
    import time as _time

    good = pickle.loads((real_index / ".metadata").read_bytes())
    chain: list = []
    for _ in range(60):  # 2**60 paths through 60 shared lists: a naive walk never ends
        chain = [chain, chain]
    good.planner_data = chain
    start = _time.perf_counter()
    dm.parse_metadata(pickle.dumps(good), "shared lists")
    assert _time.perf_counter() - start < 5
    good.planner_data = None
    good.smuggled = "extra"  # an attribute that is not a field
    with pytest.raises(dm.UnsafeMetadataError, match=r"attributes \['smuggled'\] beyond its fields"):
        dm.parse_metadata(pickle.dumps(good), "extra attribute")
