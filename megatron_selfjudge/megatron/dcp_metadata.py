"""Restricted reading of torch.distributed.checkpoint's ``.metadata`` index.

torch's `FileSystemReader.read_metadata` reads that file with plain `pickle.load`, so a crafted
checkpoint could run any callable on resume. Here the file is read once by an unpickler that
  - admits only the exact (module, name) pairs that torch 2.x writes into the index: no dotted
    names (pickle resolves "a.b" through attributes, which reached arbitrary callables through an
    allowed module), no module-level wildcards;
  - allows the BUILD opcode (set an object's state) only on instances of the allowed dataclasses:
    on a class, a function or an enum member it would change process-wide objects;
  - checks the result: a `Metadata` whose every reachable object is of an expected type, whose
    storage entries name plain shard files of the checkpoint folder (no paths).
`reading_metadata(dist_dir, metadata)` then hands that one checked object to every
`read_metadata` call made while it is active (megatron calls it several times during a load),
so the file is never read a second time by the unrestricted reader. Other folders read during
that time go through the same restricted unpickler.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import enum
import importlib
import io
import pickle
import re
import threading
from pathlib import Path, PurePath
from typing import Any, Iterator, Optional

import torch

METADATA_FILE = ".metadata"
_MAX_BYTES = 1 << 30  # an index describes shards; a GiB of it is not an index

_DCP = "torch.distributed.checkpoint"
_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    [(f"{_DCP}.metadata", n) for n in ("Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                        "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                        "StorageMeta", "_MEM_FORMAT_ENCODING")]
    + [(f"{_DCP}.planner", n) for n in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData",
                                         "BytesIOWriteData")]
    + [(f"{_DCP}.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
       ("collections", "OrderedDict"),
       # torch's own dcp.save stores the checkpoint id as a path; constructing one has no side effects.
       ("pathlib", "PosixPath")]
    # torch.float32 and friends pickle as globals of the torch module.
    + [("torch", n) for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)])

# Leaves the checked index may hold besides the allowed classes' instances.
_PLAIN = (str, int, float, bool, type(None), bytes, torch.dtype, torch.layout, torch.memory_format, torch.Size,
          PurePath)
# Attributes an allowed dataclass may carry beyond its fields: megatron's saver attaches every
# rank's save plan to the index (dist_checkpointing/strategies/state_dict_saver.py).
_EXTRA_ATTRIBUTES = {"Metadata": {"all_local_plans"}}
# dist_checkpointing names shard files "__<rank>_<n>.distcp".
_SHARD_FILE = re.compile(r"^__\d+_\d+\.distcp$")


class UnsafeMetadataError(pickle.UnpicklingError):
    """The index references something other than torch's checkpoint metadata, or is malformed."""


class _RestrictedUnpickler(pickle._Unpickler):  # the Python implementation: its opcodes can be overridden
    """Unpickler admitting exactly the classes of `_ALLOWED` and refusing BUILD on classes."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, source: str):
        super().__init__(io.BytesIO(data))
        self.source = source
        self.buildable = tuple(t for t in _allowed_types() if dataclasses.is_dataclass(t))

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:  # exact pairs: "a.b" names never match
            raise UnsafeMetadataError(f"{self.source} references a disallowed object {module}.{name}")
        return getattr(importlib.import_module(module), name)

    def load_build(self) -> None:
        target = self.stack[-2]
        if type(target) not in self.buildable:
            what = f"the class {target.__name__}" if isinstance(target, type) else f"a {type(target).__name__}"
            raise UnsafeMetadataError(f"{self.source} tries to set attributes of {what}")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def _allowed_types() -> tuple[type, ...]:
    """The classes among `_ALLOWED` (the rest are dtype objects and torch's layout lookup)."""
    found = (getattr(importlib.import_module(m), n) for m, n in _ALLOWED)
    return tuple(obj for obj in found if isinstance(obj, type))


def _check_graph(obj: Any, source: str, allowed: tuple[type, ...], depth: int = 0,
                 seen: Optional[set] = None) -> None:
    """Every object reachable from the index is a plain value, a container, or an allowed dataclass
    holding only its fields. Each object is visited once (a crafted file may share one object many times)."""
    seen = set() if seen is None else seen
    if depth > 64:
        raise UnsafeMetadataError(f"{source} nests deeper than any checkpoint index does")
    if isinstance(obj, _PLAIN) or isinstance(obj, enum.Enum):
        return
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        children = [x for item in obj.items() for x in item]
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    elif type(obj) in allowed and dataclasses.is_dataclass(obj):
        names = {f.name for f in dataclasses.fields(obj)} | _EXTRA_ATTRIBUTES.get(type(obj).__name__, set())
        extra = sorted(set(vars(obj)) - names)
        if extra:
            raise UnsafeMetadataError(f"{source}: a {type(obj).__name__} carries attributes {extra[:3]} beyond its fields")
        children = [getattr(obj, name, None) for name in names]
    else:
        raise UnsafeMetadataError(f"{source} holds an unexpected {type(obj).__module__}.{type(obj).__qualname__}")
    for child in children:
        _check_graph(child, source, allowed, depth + 1, seen)


def parse_metadata(data: bytes, source: str) -> Any:
    """Unpickle and check an index; raises UnsafeMetadataError naming `source` when it is not one."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, Metadata, MetadataIndex,
                                                       TensorStorageMetadata)

    try:
        obj = _RestrictedUnpickler(data, source).load()
    except UnsafeMetadataError:
        raise
    except Exception as exc:  # truncated or garbage bytes: any of pickle's many errors
        raise UnsafeMetadataError(f"{source} is not a readable checkpoint index ({type(exc).__name__}: {exc})") \
            from None
    if type(obj) is not Metadata:
        raise UnsafeMetadataError(f"{source} holds a {type(obj).__name__}, not torch's checkpoint Metadata")
    _check_graph(obj, source, _allowed_types())
    if not isinstance(obj.state_dict_metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, (TensorStorageMetadata, BytesStorageMetadata))
            for k, v in obj.state_dict_metadata.items()):
        raise UnsafeMetadataError(f"{source}: state_dict_metadata is not a map of names to storage metadata")
    if not isinstance(obj.storage_data, dict):
        raise UnsafeMetadataError(f"{source}: storage_data is not a map")
    for index, info in obj.storage_data.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise UnsafeMetadataError(f"{source}: storage_data holds {type(index).__name__} -> {type(info).__name__}")
        name, offset, length = info.relative_path, info.offset, info.length
        if not (isinstance(name, str) and _SHARD_FILE.match(name)):
            raise UnsafeMetadataError(f"{source}: storage entry {index.fqn!r} names {name!r}, not a shard file")
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (offset, length)):
            raise UnsafeMetadataError(f"{source}: storage entry {index.fqn!r} has offset {offset!r}, length {length!r}")
    return obj


def read_metadata_file(dist_dir: Path) -> Any:
    """The checked index of a dist_checkpointing folder (raises UnsafeMetadataError or FileNotFoundError)."""
    path = Path(dist_dir) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint index {path} is missing: incomplete or not a megatron dist checkpoint")
    with open(path, "rb") as f:
        data = f.read(_MAX_BYTES + 1)
    if len(data) > _MAX_BYTES:
        raise UnsafeMetadataError(f"{path} is larger than {_MAX_BYTES} bytes")
    return parse_metadata(data, str(path))


_patch_lock = threading.Lock()


@contextlib.contextmanager
def reading_metadata(dist_dir: Path, metadata: Any) -> Iterator[None]:
    """Make every `FileSystemReader.read_metadata` return (a copy of) the checked `metadata` of `dist_dir`."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    expected = Path(dist_dir).resolve()
    original = FileSystemReader.read_metadata

    def checked_read_metadata(self: FileSystemReader, *args: Any, **kwargs: Any) -> Any:
        folder = Path(self.path).resolve()
        # A copy per call: the reader writes its load id into the object it returns.
        result = copy.deepcopy(metadata) if folder == expected else read_metadata_file(folder)
        if getattr(result, "storage_meta", None) is None:
            result.storage_meta = StorageMeta()
        result.storage_meta.load_id = self.load_id
        return result

    with _patch_lock:
        FileSystemReader.read_metadata = checked_read_metadata
        try:
            yield
        finally:
            FileSystemReader.read_metadata = original
