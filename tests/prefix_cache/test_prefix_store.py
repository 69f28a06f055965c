"""Keys of the frozen-prefix cache: the same example padded on the right to any length finds its entry, any change
of its content (another tokenization, another mask, another padding on the left) does not."""

import torch

from hf_freeze.prefix_cache.store import PrefixStore, row_keys


def _keys(input_ids, attention_mask=None, **others):
    inputs = {"input_ids": torch.tensor(input_ids)}
    if attention_mask is not None:
        inputs["attention_mask"] = torch.tensor(attention_mask)
    inputs.update({name: torch.tensor(value) for name, value in others.items()})
    return row_keys(inputs, *inputs["input_ids"].shape)


def test_right_padding_is_ignored_and_content_is_not():
    short, kept_short = _keys([[5, 6, 7, 0]], [[1, 1, 1, 0]])
    long, kept_long = _keys([[5, 6, 7, 0, 0, 0]], [[1, 1, 1, 0, 0, 0]])
    unpadded, _ = _keys([[5, 6, 7]], [[1, 1, 1]])
    assert short == long == unpadded and kept_short == kept_long == [3]
    assert _keys([[5, 6, 8, 0]], [[1, 1, 1, 0]])[0] != short  # another token
    assert _keys([[5, 6, 7, 0]], [[1, 1, 0, 0]])[0] != short  # another mask
    assert _keys([[5, 6, 7, 0]], [[1, 1, 1, 0]], token_type_ids=[[0, 1, 1, 0]])[0] != short  # another input


def test_left_padding_and_no_mask_keep_every_position():
    left, kept = _keys([[0, 5, 6, 7]], [[0, 1, 1, 1]])
    assert kept == [4]
    assert _keys([[0, 0, 5, 6, 7]], [[0, 0, 1, 1, 1]])[0] != left
    assert _keys([[5, 6, 7]])[0] != _keys([[5, 6, 7, 0]])[0]


def test_store_spills_to_disk_past_its_budget_and_reads_back(tmp_path):
    store = PrefixStore(str(tmp_path / "cache"), "print", torch.float32, memory_bytes=3 * 4 * 4)
    first, second = torch.randn(3, 4), torch.randn(2, 4)
    batch = torch.stack([torch.randn(3, 4), torch.randn(3, 4)])
    store.put(b"a", first)
    store.put(b"b", second)  # over the budget: to the file
    store.put(b"c", batch[0, :2])
    assert store.bytes_in_memory == 48 and store.bytes_on_disk == 64
    assert torch.equal(store.get(b"a"), first) and torch.equal(store.get(b"b"), second)
    assert torch.equal(store.get(b"c"), batch[0, :2])
    store.close()
    assert not (tmp_path / "cache").exists() and len(store) == 0
