"""The packed-weight cache: a model quantized at load time is kept under `--cache-dir`/weights, so that a restart
reads the packed tensors back instead of quantizing again (ChatGLM2-6B `--quantize int4`: 83 s of quantizing).
docs/chatglm2.md#restarts-the-packed-weight-cache says which loads go through it.

An entry is one directory, `<cache>/weights/<checkpoint>-<quantize>-<dtype>-<device>-<digest>`, holding

* `weights.pt`: every parameter and buffer of the loaded model (`torch.save`, read back with
  `torch.load(weights_only=True)`): the packed buffers of `Int4Linear` / `Int8Linear`, their scales and biases,
  the embedding, norms and rotary tables (non-persistent buffers included). Dense copies of packed layers
  (`DenseCopy`, made for prefills and laid out by `block_dense` at run time) are derived, never kept: a model
  holding one is not cached.
* `manifest.json`: the key, the module that each packed or linear layer is (class, sizes, kernel), every module's
  class, every tensor's name, shape and dtype, and a CRC-32 per 64 MiB chunk of `weights.pt` with its size.

The key (`CacheKey`) is what decides the bytes: the checkpoint's resolved path and each of its weight files' name,
size and mtime (no hashing of gigabytes: a changed file changes its mtime), the loader, the quantization mode,
the dtype, the device type, `PACKED_LAYOUT_VERSION` (bumped with any change of the packed layouts), the int4
group, whether our own CPU kernels are in use (their layout differs from torch's) and the torch version. Its
SHA-256 names the entry, and the manifest repeats it in full.

Nothing read is trusted: a manifest whose key differs, a data file of another size or with a chunk whose CRC
differs (truncated, flipped bytes), a file torch cannot read, tensors of other names, shapes or dtypes, or a
rebuilt model whose modules differ, is logged as a warning, the entry deleted, and the model quantized again and
written anew. CRC-32 sums ~3 GB/s a thread here (SHA-256 1.1 GB/s), so the chunks are checked from a memory map
on up to four threads. Only then are the tensors memory-mapped from the file (a damaged zip record could point
past its end): a CPU model's weights are the page cache's pages, read from the disk once.

An entry is written into a `.partial-*` directory and renamed into place once complete, so a start killed while
writing leaves no entry that looks valid (a later store deletes the leftover); a power loss before the data
reached the disk shows as a CRC mismatch. The cache is always on: where its directory is not writable the server
logs a warning and runs uncached. Writing an entry deletes the entries of the same checkpoint path and settings
whose files have changed since (they can no longer be read); `rm -rf <cache-dir>/weights` clears it all.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import logging
import mmap
import os
import re
import shutil
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from service.config import Quantization
from service.models.quant import kernels
from service.models.quant.int4 import PACKED_LAYOUT_VERSION, DenseCopy, Int4Linear, Kernel
from service.models.quant.quantize import INT4_GROUP, Int8Linear

log = logging.getLogger(__name__)

FORMAT = 1  # this module's own entry layout: the manifest's fields and the file names
FOLDER = "weights"  # under --cache-dir
DATA_FILE = "weights.pt"
MANIFEST_FILE = "manifest.json"
PARTIAL_PREFIX = ".partial-"  # an entry being written (or deleted)
LOCK_SUFFIX = ".lock"  # beside a partial entry, flock-ed by its writer while it lives
STALE_PARTIAL_SECONDS = 3600  # a partial entry without a lock file this old is a leftover
CHUNK_BYTES = 64 << 20  # the data file's CRC-32 is kept per chunk of this many bytes, so chunks check in parallel
CHECK_THREADS = 4
#: The files of a checkpoint directory whose identity goes into the key (the tokenizer is read anew each start).
KEY_FILE_PATTERN = re.compile(r"config\.json|.*\.(safetensors|bin|pt|pth|gguf|index\.json)")
META = torch.device("meta")


class InvalidEntry(Exception):
    """A cache entry that does not hold what its key and manifest say."""


@dataclass(frozen=True)
class CacheKey:
    """What decides the cached bytes. Equal keys, equal weights."""

    checkpoint: str  # the resolved path of the checkpoint (directory or file)
    files: tuple[tuple[str, int, int], ...]  # each weight / config file: name, size, mtime in ns
    loader: str  # which loader built the model ("chatglm2", "transformers", "gguf-llama")
    quantize: str
    dtype: str
    device: str  # the device type: "cpu", "cuda"
    own_kernels: bool  # our CPU kernels' layout (Kernel.OWN) where they fit, else torch's
    layout: int = PACKED_LAYOUT_VERSION
    int4_group: int = INT4_GROUP
    torch: str = torch.__version__
    format: int = FORMAT

    def as_json(self) -> dict[str, Any]:
        """The key as the manifest stores it (lists for tuples)."""
        return {**asdict(self), "files": [list(f) for f in self.files]}

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_json(), sort_keys=True).encode()).hexdigest()

    @property
    def entry_name(self) -> str:
        """A readable directory name: the checkpoint, the settings and 16 hex digits of the digest."""
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(self.checkpoint).name)[:64]
        return f"{stem}-{self.quantize}-{self.dtype}-{self.device}-{self.digest[:16]}"


def key_files(path: Path) -> list[Path]:
    """The files whose identity a checkpoint's key holds: a file itself; in a directory, config.json, the shard
    indexes and the weight files."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and KEY_FILE_PATTERN.fullmatch(p.name))


def cache_key(path: Path, loader: str, quantize: Quantization, dtype: torch.dtype,
              device: torch.device) -> CacheKey:
    """The key of `path` loaded by `loader` with these settings; cheap: names, sizes and mtimes, nothing read."""
    path = Path(path).resolve()
    files = []
    for file in key_files(path):
        stat = file.stat()
        files.append((file.name, stat.st_size, stat.st_mtime_ns))
    device = torch.device(device)
    return CacheKey(checkpoint=str(path), files=tuple(files), loader=loader, quantize=Quantization(quantize).value,
                    dtype=str(dtype).removeprefix("torch."), device=device.type,
                    own_kernels=device.type == "cpu" and kernels.available())


# ---------------------------------------------------------------- what a model is made of


def describe(module: nn.Module) -> dict[str, Any] | None:
    """How to rebuild `module` empty, for the layers loading replaces (packed and linear); None for the others,
    which the skeleton the loader builds already holds."""
    kind = type(module)
    if kind is Int4Linear:
        return {"class": "Int4Linear", "in_features": module.in_features, "out_features": module.out_features,
                "group_size": module.group_size, "kernel": module.kernel.value, "bias": module.bias is not None}
    if kind is Int8Linear:
        return {"class": "Int8Linear", "in_features": module.in_features, "out_features": module.out_features,
                "kernel": module.kernel.value, "bias": module.bias is not None}
    if kind is nn.Linear:
        return {"class": "Linear", "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
    return None


def empty_module(spec: dict[str, Any]) -> nn.Module:
    """A module as `describe` described it, its tensors placeholders on the meta device (`restore` fills them)."""
    placeholder = torch.empty(0, device=META)
    bias = placeholder if spec["bias"] else None
    if spec["class"] == "Int4Linear":
        return Int4Linear(placeholder, placeholder, spec["in_features"], spec["out_features"], spec["group_size"],
                          bias, Kernel(spec["kernel"]))
    if spec["class"] == "Int8Linear":
        return Int8Linear.from_packed(placeholder, placeholder, spec["in_features"], spec["out_features"], bias,
                                      Kernel(spec["kernel"]))
    if spec["class"] == "Linear":
        with torch.device(META):
            return nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"])
    raise InvalidEntry(f"unknown module class {spec['class']!r}")


def module_types(model: nn.Module) -> list[list[str]]:
    """[name, class] of every module: what the rebuilt model must equal."""
    return [[name, f"{type(m).__module__}.{type(m).__qualname__}"] for name, m in model.named_modules()]


def tensors_of(model: nn.Module) -> Iterator[tuple[str, Tensor, bool]]:
    """(name, tensor, is a parameter) of every parameter and buffer, non-persistent ones (rotary tables) included,
    each name of a shared one."""
    for name, param in model.named_parameters(remove_duplicate=False):
        yield name, param, True
    for name, buffer in model.named_buffers(remove_duplicate=False):
        yield name, buffer, False


def packed_layers(model: nn.Module) -> int:
    return sum(isinstance(m, Int4Linear | Int8Linear) for m in model.modules())


def own_storage(tensor: Tensor) -> Tensor:
    """`tensor` alone in a contiguous storage, so that saving it writes its bytes only (not the whole checkpoint
    shard a view may point into)."""
    tensor = tensor.detach()
    whole = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    if tensor.is_contiguous() and tensor.storage_offset() == 0 and whole:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def gather(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors to save, each once, and {other name: saved name} for the shared ones (a tied LM head)."""
    state: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, tensor, _ in tensors_of(model):
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
            continue
        first[id(tensor)] = name
        state[name] = own_storage(tensor)
    return state, aliases


def restore(model: nn.Module, state: dict[str, Tensor], manifest: dict[str, Any]) -> nn.Module:
    """Fill the skeleton `model` (the loader's empty model, on the meta device) with the entry's modules and
    tensors; InvalidEntry where they do not make up the model the entry was written from."""
    for name, spec in manifest["modules"].items():
        model.set_submodule(name, empty_module(spec))
    if module_types(model) != manifest["types"]:
        raise InvalidEntry("its modules differ from the model the loader builds")
    aliases: dict[str, str] = manifest["aliases"]
    names = {name for name, _, _ in tensors_of(model)}
    wanted = set(state) | set(aliases)
    if names != wanted:
        raise InvalidEntry(f"tensors it lacks: {sorted(names - wanted)[:4]}; tensors the model lacks: "
                           f"{sorted(wanted - names)[:4]}")
    params: dict[str, nn.Parameter] = {}
    for name in [*state, *aliases]:
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        saved = aliases.get(name, name)
        if leaf in owner._parameters:
            if saved not in params:
                params[saved] = nn.Parameter(state[saved], requires_grad=False)
            owner._parameters[leaf] = params[saved]
        else:
            owner._buffers[leaf] = state[saved]
    for module in model.modules():  # nothing of the skeleton may be left unfilled
        for name, value in [*module._parameters.items(), *module._buffers.items(), *vars(module).items()]:
            if isinstance(value, Tensor) and value.is_meta:
                raise InvalidEntry(f"{type(module).__name__}.{name} is left unfilled")
    if "tie_word_embeddings" in manifest and getattr(model, "config", None) is not None:
        model.config.tie_word_embeddings = manifest["tie_word_embeddings"]
    return model.requires_grad_(False).eval()


# ---------------------------------------------------------------- checksums


def chunk_crcs(path: Path, size: int) -> list[int]:
    """CRC-32 of each CHUNK_BYTES of the file's first `size` bytes, on up to CHECK_THREADS threads (zlib.crc32
    releases the GIL), straight from the file's pages: a memory map, not reads into fresh buffers (3x slower
    here, as every 64 MiB buffer is new memory to fault in)."""
    count = -(-size // CHUNK_BYTES)
    if count == 0:
        return []
    threads = max(1, min(CHECK_THREADS, os.cpu_count() or 1, count))
    with open(path, "rb") as file, mmap.mmap(file.fileno(), size, access=mmap.ACCESS_READ) as mapped:
        if hasattr(mapped, "madvise"):
            mapped.madvise(mmap.MADV_WILLNEED)  # read ahead from the disk while the first chunks are summed
        view = memoryview(mapped)

        def crc(index: int) -> int:
            start = index * CHUNK_BYTES
            value = zlib.crc32(view[start:start + CHUNK_BYTES])
            if hasattr(mapped, "madvise"):  # out of this process's RSS again; the page cache keeps them
                mapped.madvise(mmap.MADV_DONTNEED, start, min(CHUNK_BYTES, size - start))
            return value

        try:
            with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="weight-cache-crc") as pool:
                return list(pool.map(crc, range(count)))
        finally:
            view.release()


def check_data(path: Path, data: dict[str, Any]) -> None:
    """InvalidEntry where the data file is not the one the manifest describes: its size, then each chunk's CRC."""
    size = path.stat().st_size
    if size != data["size"]:
        raise InvalidEntry(f"{path.name} is {size} bytes, the manifest says {data['size']} (truncated?)")
    if data["chunk"] != CHUNK_BYTES:
        raise InvalidEntry(f"checksummed in chunks of {data['chunk']} bytes, not {CHUNK_BYTES}")
    for index, (got, want) in enumerate(zip(chunk_crcs(path, size), data["crc32"], strict=True)):
        if got != want:
            raise InvalidEntry(f"{path.name}: the CRC-32 of its chunk at byte {index * CHUNK_BYTES} is {got:08x}, "
                               f"the manifest says {want:08x} (corrupt)")


def check_tensors(state: Any, described: dict[str, dict[str, Any]]) -> None:
    """InvalidEntry where the loaded tensors are not the manifest's, by name, shape and dtype."""
    if not isinstance(state, dict) or not all(isinstance(t, Tensor) for t in state.values()):
        raise InvalidEntry(f"{DATA_FILE} holds no dict of tensors")
    if set(state) != set(described):
        raise InvalidEntry(f"{DATA_FILE} holds other tensors than the manifest lists "
                           f"({sorted(set(state) ^ set(described))[:4]})")
    for name, tensor in state.items():
        want = described[name]
        if list(tensor.shape) != want["shape"] or str(tensor.dtype) != want["dtype"]:
            raise InvalidEntry(f"{name} is {str(tensor.dtype)} {list(tensor.shape)}, the manifest says "
                               f"{want['dtype']} {want['shape']}")


# ---------------------------------------------------------------- the cache


class WeightCache:
    """The entries under `<root>/weights`; see the module's docstring."""

    def __init__(self, root: Path):
        self.folder = Path(root).expanduser() / FOLDER

    def entry(self, key: CacheKey) -> Path:
        return self.folder / key.entry_name

    def load(self, key: CacheKey, skeleton: Callable[[], nn.Module], device: torch.device) -> nn.Module | None:
        """The model of `key`'s entry, rebuilt on `skeleton()` with its tensors read onto `device`; None where there
        is no entry or it is not valid (then it is deleted, with a warning saying why)."""
        entry = self.entry(key)
        if not (entry / MANIFEST_FILE).is_file():
            log.debug("no packed weights in cache %s", entry)
            return None
        started = time.monotonic()
        try:
            model = self._read(entry, key, skeleton, torch.device(device))
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as err:  # corrupt in any way: never trusted, rebuilt
            reason = f"{type(err).__name__}: {err}" if not isinstance(err, InvalidEntry) else str(err)
            log.warning("packed-weight cache entry %s is not valid (%s); deleting it and loading the checkpoint "
                        "again", entry, reason.strip().splitlines()[0] if reason.strip() else type(err).__name__)
            self.delete(entry)
            return None
        log.info("loaded packed weights from cache %s in %.1f s", entry, time.monotonic() - started)
        return model

    def _read(self, entry: Path, key: CacheKey, skeleton: Callable[[], nn.Module], device: torch.device) -> nn.Module:
        try:
            manifest = json.loads((entry / MANIFEST_FILE).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InvalidEntry(f"{MANIFEST_FILE} does not parse ({err})") from err
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise InvalidEntry(f"entry format {manifest.get('format') if isinstance(manifest, dict) else None}, "
                               f"this server reads {FORMAT}")
        if manifest.get("key") != key.as_json():
            stored = manifest.get("key") if isinstance(manifest.get("key"), dict) else {}
            fields = [f for f, v in key.as_json().items() if stored.get(f) != v]
            raise InvalidEntry(f"its key differs in {', '.join(fields) or 'its fields'}")
        data = entry / DATA_FILE
        check_data(data, manifest["data"])  # reads it once, leaving it in the page cache
        # memory-mapped: on a CPU the tensors stay the file's (page-cache) pages, not a copy of them; only once the
        # bytes are known to be the ones written, as a damaged zip record could point past the end of the file
        state = torch.load(data, map_location=device, weights_only=True, mmap=True)
        check_tensors(state, manifest["tensors"])
        return restore(skeleton(), state, manifest)

    def store(self, key: CacheKey, model: nn.Module) -> Path | None:
        """Write `model`'s packed weights as `key`'s entry; None (with a log line saying why) where nothing was
        written. Never raises for the cache's sake: a full disk or a read-only directory only costs the next
        start its quantizing."""
        if not packed_layers(model):
            log.info("nothing packed to keep in the weight cache (no int4 / int8 layers on this device)")
            return None
        if any(isinstance(m, DenseCopy) and m.has_dense for m in model.modules()):
            log.info("not keeping packed weights in the cache: the model holds dense copies, which are made at "
                     "load")
            return None
        entry = self.entry(key)
        started = time.monotonic()
        partial = self.folder / f"{PARTIAL_PREFIX}{entry.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        lock = partial.with_name(partial.name + LOCK_SUFFIX)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._delete_leftovers()
            with open(lock, "w") as held:
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
                partial.mkdir()
                size = self._write(partial, key, model)
                try:
                    os.rename(partial, entry)
                except OSError:
                    if not (entry / MANIFEST_FILE).is_file():
                        raise
                    log.info("packed weights for %s were written by another process meanwhile", entry)
                    shutil.rmtree(partial, ignore_errors=True)
                lock.unlink(missing_ok=True)
        except (OSError, RuntimeError) as err:  # torch.save reports a failed write as a RuntimeError
            log.warning("could not write packed weights to cache %s (%s); continuing without caching them", entry,
                        str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__)
            shutil.rmtree(partial, ignore_errors=True)
            with contextlib.suppress(OSError):
                lock.unlink(missing_ok=True)
            return None
        log.info("wrote packed weights to cache %s (%.2f GB) in %.1f s", entry, size / 1e9,
                 time.monotonic() - started)
        self._delete_replaced(key)
        return entry

    def _write(self, folder: Path, key: CacheKey, model: nn.Module) -> int:
        """weights.pt and manifest.json of `model` into `folder`; the data file's size."""
        state, aliases = gather(model)
        data = folder / DATA_FILE
        torch.save(state, data)
        size = data.stat().st_size
        manifest = {
            "format": FORMAT,
            "key": key.as_json(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "data": {"file": DATA_FILE, "size": size, "chunk": CHUNK_BYTES, "crc32": chunk_crcs(data, size)},
            "tensors": {name: {"shape": list(t.shape), "dtype": str(t.dtype)} for name, t in state.items()},
            "aliases": aliases,
            "modules": {name: spec for name, m in model.named_modules() if (spec := describe(m)) is not None},
            "types": module_types(model),
        }
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "tie_word_embeddings"):
            manifest["tie_word_embeddings"] = bool(config.tie_word_embeddings)
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        return size

    def delete(self, entry: Path) -> None:
        """Remove an entry: renamed out of the way first, so no reader finds it half deleted."""
        doomed = entry.with_name(f"{PARTIAL_PREFIX}deleted-{entry.name}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(entry, doomed)
            shutil.rmtree(doomed)
        except FileNotFoundError:
            pass
        except OSError as err:
            log.warning("could not delete the cache entry %s: %s", entry, err)

    def _delete_leftovers(self) -> None:
        """Partial entries whose writer is gone: its lock is free, or there is none and it is old."""
        for path in self.folder.glob(f"{PARTIAL_PREFIX}*"):
            if path.name.endswith(LOCK_SUFFIX) or not path.is_dir():
                continue
            lock = path.with_name(path.name + LOCK_SUFFIX)
            try:
                if lock.exists():
                    with open(lock) as held:
                        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError while its writer lives
                        shutil.rmtree(path, ignore_errors=True)
                        lock.unlink(missing_ok=True)
                elif time.time() - path.stat().st_mtime > STALE_PARTIAL_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    continue
            except OSError:
                continue
            log.info("deleted %s, left by a start that did not finish writing it", path)

    def _delete_replaced(self, key: CacheKey) -> None:
        """Entries of the same checkpoint and settings whose weight files have changed since: never read again."""
        mine = key.as_json()
        same = ("checkpoint", "loader", "quantize", "dtype", "device")
        for manifest_file in self.folder.glob(f"*/{MANIFEST_FILE}"):
            entry = manifest_file.parent
            if entry.name.startswith(PARTIAL_PREFIX) or entry.name == key.entry_name:
                continue
            try:
                other = json.loads(manifest_file.read_text(encoding="utf-8"))["key"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if isinstance(other, dict) and all(other.get(f) == mine[f] for f in same) \
                    and other.get("files") != mine["files"]:
                self.delete(entry)
                log.info("deleted the cache entry %s of an earlier version of %s", entry, key.checkpoint)
