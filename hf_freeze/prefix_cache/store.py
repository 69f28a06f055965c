"""Where `FrozenPrefixCache` keeps the hidden states: in memory up to a budget, then in a memory-mapped file.

An entry is one training example's hidden states at the first trainable layer, ``(tokens, hidden size)``, under a
key made from the example's content (`row_keys`). The folder carries a fingerprint of what the states depend on
(the model's configuration, the frozen prefix's weights, the storage precision, the tokenizer): a folder written for
anything else is never read, it is emptied and filled again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch

from ..logs import get_logger

__all__ = ["PrefixStore", "fingerprint", "row_keys"]

logger = get_logger(__name__)

FORMAT_VERSION = 1
META_FILE, STATES_FILE, INDEX_FILE = "cache_meta.json", "hidden_states.bin", "cache_index.json"
_NUMPY_VIEW = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16, torch.float64: np.float64}


def row_keys(inputs: Dict[str, torch.Tensor], batch_size: int, length: int) -> Tuple[List[bytes], List[int]]:
    """One key per example from its input tensors, and how many leading positions its entry keeps.

    A row padded on the right (attention mask ones, then zeros) is keyed and stored without its padding, so that the
    same example padded to another length in another batch finds its entry: its real tokens see the same positions
    and, through the mask, nothing of the padding. Any other row (left padding, no mask) is keyed with every
    position, so it matches only the same row padded the same way.
    """
    mask = inputs.get("attention_mask")
    kept, trimmed = [length] * batch_size, [False] * batch_size
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape == (batch_size, length):
        real = mask.ne(0)
        counts = real.sum(dim=1)
        right_padded = real.eq(torch.arange(length, device=mask.device)[None, :] < counts[:, None]).all(dim=1)
        trimmed = right_padded.tolist()
        kept = [int(count) if right else length for count, right in zip(counts.tolist(), trimmed)]
    rows = {name: tensor.detach().cpu() for name, tensor in sorted(inputs.items())}
    keys = []
    for index in range(batch_size):
        digest = hashlib.blake2b(digest_size=16)
        digest.update(b"trimmed" if trimmed[index] else f"full/{length}".encode())
        for name, tensor in rows.items():
            row = tensor[index]
            if row.dim() >= 1 and row.shape[0] == length:
                row = row[: kept[index]]
            digest.update(name.encode())
            digest.update(str(tuple(row.shape)).encode() + str(row.dtype).encode())
            digest.update(row.contiguous().numpy().tobytes())
        keys.append(digest.digest())
    return keys, kept


def fingerprint(parts: Dict[str, object], parameters: Iterable[Tuple[str, torch.Tensor]]) -> str:
    """A digest of what the cached states depend on: ``parts`` (JSON-safe) and the frozen prefix's weights."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str).encode())
    for name, parameter in parameters:
        data = parameter.detach().cpu().contiguous()
        digest.update(name.encode() + str(tuple(data.shape)).encode() + str(data.dtype).encode())
        digest.update(data.view(torch.uint8).reshape(-1).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


class PrefixStore:
    """Hidden states by key: in memory up to ``memory_bytes``, appended to a memory-mapped file beyond.

    Args:
        directory: The folder for the file (created when the first entry goes to disk); ``None``: a temporary one.
        fingerprint: `fingerprint` of this run: a folder holding another one is emptied, not read.
        dtype: Storage precision (``torch.float16`` halves the size; the states are cast back when read).
        memory_bytes: How much of the states to keep in memory.
        keep: Leave the folder (with an index) at `close`, for a later run with the same fingerprint.
        root: The folder that holds ``directory`` (one per process) in a multi-process run: removed too when it is
            empty at `close`.
    """

    def __init__(
        self,
        directory: Optional[str],
        fingerprint: str,
        dtype: torch.dtype,
        memory_bytes: float,
        keep: bool = False,
        root: Optional[str] = None,
    ):
        self.directory, self.fingerprint, self.dtype = directory, fingerprint, dtype
        self.memory_bytes, self.keep = memory_bytes, keep
        self.memory: Dict[bytes, torch.Tensor] = {}
        self.on_disk: Dict[bytes, Tuple[int, int, int]] = {}  # key -> (byte offset, tokens, hidden size)
        self.bytes_in_memory = 0
        self.bytes_on_disk = 0
        self._writer = None
        self._mapped: Optional[np.memmap] = None
        self._temporary = directory is None
        self.root = root
        self._created: List[str] = []  # the folders this store made, deepest first: removed when empty
        self.reused = 0
        if directory is not None and os.path.isdir(directory):
            self._open_existing()

    def __len__(self) -> int:
        return len(self.memory) + len(self.on_disk)

    def __contains__(self, key: bytes) -> bool:
        return key in self.memory or key in self.on_disk

    @property
    def total_bytes(self) -> int:
        return self.bytes_in_memory + self.bytes_on_disk

    def put(self, key: bytes, states: torch.Tensor) -> None:
        # A copy: a view would keep the whole padded batch it was cut from alive.
        states = states.detach().to(device="cpu", dtype=self.dtype).clone(memory_format=torch.contiguous_format)
        size = states.numel() * states.element_size()
        if self.bytes_in_memory + size <= self.memory_bytes:
            self.memory[key] = states
            self.bytes_in_memory += size
            return
        self._write(key, states)

    def get(self, key: bytes) -> torch.Tensor:
        states = self.memory.get(key)
        if states is not None:
            return states
        offset, tokens, hidden = self.on_disk[key]
        end = offset + tokens * hidden * _itemsize(self.dtype)
        if self._mapped is None or end > len(self._mapped):
            self._writer.flush()
            self._mapped = np.memmap(self._path(STATES_FILE), dtype=np.uint8, mode="c")
        array = np.frombuffer(self._mapped, dtype=_NUMPY_VIEW[self.dtype], count=tokens * hidden, offset=offset)
        return torch.from_numpy(array).view(self.dtype).view(tokens, hidden)

    def close(self) -> None:
        """Write the index and keep the folder (``keep``), or delete what this store wrote; then start empty."""
        if self.keep and len(self):
            for key, states in list(self.memory.items()):
                self._write(key, states)
            self._writer.flush()
            with open(self._path(INDEX_FILE), "w") as handle:
                json.dump({key.hex(): list(place) for key, place in self.on_disk.items()}, handle)
            logger.info(f"Frozen-prefix cache kept in {self.directory} ({len(self.on_disk)} examples, {self.bytes_on_disk / 2**20:.1f} MiB).")
        if self._writer is not None:
            self._writer.close()
        self._writer, self._mapped = None, None
        if not self.keep:
            self._delete_files()
        self.memory, self.on_disk = {}, {}
        self.bytes_in_memory = self.bytes_on_disk = 0

    # -- internals ------------------------------------------------------------------------------------------------

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def _write(self, key: bytes, states: torch.Tensor) -> None:
        if self._writer is None:
            if self.directory is None:
                self.directory = tempfile.mkdtemp(prefix="hf_freeze_prefix_cache_")
            self._created = _missing_folders(self.directory, self.root or self.directory)
            os.makedirs(self.directory, exist_ok=True)
            with open(self._path(META_FILE), "w") as handle:
                json.dump({"fingerprint": self.fingerprint, "format": FORMAT_VERSION, "dtype": str(self.dtype)}, handle)
            self._writer = open(self._path(STATES_FILE), "ab")
        offset = self._writer.tell()
        data = states.view(torch.uint8) if states.dtype != torch.uint8 else states
        self._writer.write(data.reshape(-1).numpy().tobytes())
        self.on_disk[key] = (offset, states.shape[0], states.shape[1])
        self.bytes_on_disk += states.numel() * states.element_size()

    def _open_existing(self) -> None:
        meta_path, index_path = self._path(META_FILE), self._path(INDEX_FILE)
        if not os.path.exists(meta_path):
            return
        try:
            with open(meta_path) as handle:
                meta = json.load(handle)
            with open(index_path) as handle:
                index = json.load(handle)
        except (OSError, ValueError):
            meta, index = {}, None
        if meta.get("fingerprint") != self.fingerprint or index is None:
            reason = "it was written for another model, frozen prefix, storage precision or tokenizer" if index is not None else "it is incomplete"
            logger.warning(f"Frozen-prefix cache folder {self.directory} is not reused: {reason}. It is rebuilt.")
            self._delete_files()
            return
        self.on_disk = {bytes.fromhex(key): tuple(place) for key, place in index.items()}
        self.bytes_on_disk = sum(tokens * hidden * _itemsize(self.dtype) for _, tokens, hidden in self.on_disk.values())
        self._writer = open(self._path(STATES_FILE), "ab")
        os.remove(index_path)  # rewritten at close; a crash in between must not leave a stale index
        self.reused = len(self.on_disk)
        logger.info(f"Frozen-prefix cache: reusing {self.reused} examples from {self.directory}.")

    def _delete_files(self) -> None:
        if self.directory is None or not os.path.isdir(self.directory):
            return
        for name in (META_FILE, STATES_FILE, INDEX_FILE):
            if os.path.exists(self._path(name)):
                os.remove(self._path(name))
        # The processes of a multi-process run share the root: whichever empties it last removes it.
        shared = [os.path.abspath(self.root)] if self.root and os.path.abspath(self.root) != os.path.abspath(self.directory) else []
        for folder in [os.path.abspath(self.directory)] + self._created + shared:
            try:
                os.rmdir(folder)  # only when empty; another process may have removed it (or still use it) already
            except OSError:
                pass
        if self._temporary:
            self.directory = None


def _missing_folders(directory: str, root: str) -> List[str]:
    """The folders between ``root`` and ``directory`` (both included) that do not exist yet, deepest first."""
    folders, folder, root = [], os.path.abspath(directory), os.path.abspath(root)
    while not os.path.exists(folder) and (folder == root or folder.startswith(root + os.sep)):
        folders.append(folder)
        folder = os.path.dirname(folder)
    return folders


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
