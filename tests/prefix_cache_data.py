"""Data for the frozen-prefix cache tests: sentences of different lengths, padded on the right per batch."""

import torch


class VariableLengthData(torch.utils.data.Dataset):
    """Sentences of 5 to 14 tokens with a learnable label: padded to a different length in every shuffled batch."""

    def __init__(self, size=24, vocab=128, seed=0):
        self.size, self.vocab, self.seed = size, vocab, seed

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(self.seed * 1000 + index)
        length = int(torch.randint(5, 15, (1,), generator=generator))
        input_ids = torch.randint(1, self.vocab, (length,), generator=generator)
        return {"input_ids": input_ids, "labels": int(input_ids[0]) % 2}


def pad_right(examples):
    """The batch padded to its longest sentence, with the attention mask (what `DataCollatorWithPadding` does)."""
    length = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.zeros(len(examples), length, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, example in enumerate(examples):
        input_ids[row, : len(example["input_ids"])] = example["input_ids"]
        mask[row, : len(example["input_ids"])] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor([e["labels"] for e in examples])}
