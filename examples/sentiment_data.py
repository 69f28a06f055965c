"""A small synthetic movie-review sentiment task, generated offline so that the examples need no download.

Sentences are built from templates: plain judgements ("the plot was really gripping."), negations ("the acting was
not convincing." is negative), and contrasts ("the cast was charming, but the script was tedious." takes the second
clause's polarity). The validation split uses adjectives that never occur in training for about half of its
sentences, so a model only does well there if its pretrained knowledge of words carries over.

The files use GLUE SST-2's layout: a header line ``label<TAB>sentence``, label 1 positive, 0 negative.

    python examples/sentiment_data.py data/   # writes data/train.tsv and data/dev.tsv
"""

from __future__ import annotations

import os
import random
import sys
from typing import List, Tuple

SUBJECTS = [
    "the film", "this movie", "the plot", "the acting", "the script", "the soundtrack", "the ending", "the cast",
    "the dialogue", "the cinematography", "the story", "this picture", "the pacing", "the characters", "the score",
    "the direction", "the screenplay", "the lead performance", "the final act", "the premise",
]
VERBS = ["is", "was", "felt", "seemed", "turned out to be", "proved"]
INTENSIFIERS = ["", "", "really", "truly", "quite", "remarkably", "rather", "so", "surprisingly", "utterly"]
NEGATED_INTENSIFIERS = ["", "", "really", "very", "particularly", "especially"]
OPENERS = ["", "", "", "honestly, ", "in the end, ", "overall, ", "i thought ", "to be fair, "]

POSITIVE = [
    "good", "great", "wonderful", "delightful", "brilliant", "charming", "moving", "gripping", "superb",
    "enjoyable", "funny", "beautiful", "clever", "touching", "excellent", "engaging", "fresh", "powerful",
    "convincing", "memorable",
]
NEGATIVE = [
    "bad", "boring", "dull", "awful", "terrible", "tedious", "clumsy", "lifeless", "forgettable", "predictable",
    "bland", "weak", "messy", "painful", "pointless", "tiresome", "shallow", "annoying", "unconvincing", "flat",
]
# Only in the validation split.
HELD_OUT_POSITIVE = ["magnificent", "captivating", "heartwarming", "splendid", "stunning", "refreshing", "masterful", "lovely"]
HELD_OUT_NEGATIVE = ["dreadful", "incoherent", "insipid", "abysmal", "sluggish", "lackluster", "laughable", "wretched"]


def _clause(rng: random.Random, adjective: str, negate: bool = False) -> str:
    intensifier = rng.choice(NEGATED_INTENSIFIERS if negate else INTENSIFIERS)
    words = [rng.choice(SUBJECTS), rng.choice(VERBS), "not" if negate else "", intensifier, adjective]
    return " ".join(word for word in words if word)


def make_examples(count: int, seed: int, held_out_share: float = 0.0) -> List[Tuple[int, str]]:
    """``count`` labelled sentences; ``held_out_share`` of them use the validation-only adjectives."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        label = rng.randint(0, 1)
        held_out = rng.random() < held_out_share
        positive = HELD_OUT_POSITIVE if held_out else POSITIVE
        negative = HELD_OUT_NEGATIVE if held_out else NEGATIVE
        kind = rng.random()
        if kind < 0.6:
            sentence = _clause(rng, rng.choice(positive if label else negative))
        elif kind < 0.8:
            sentence = _clause(rng, rng.choice(negative if label else positive), negate=True)
        else:
            first = rng.choice(negative if label else positive)
            second = rng.choice(positive if label else negative)
            sentence = f"{_clause(rng, first)}, but {_clause(rng, second)}"
        examples.append((label, f"{rng.choice(OPENERS)}{sentence} ."))
    return examples


def write_sentiment_data(directory: str, train_size: int = 1000, dev_size: int = 400, seed: int = 0) -> Tuple[str, str]:
    """Write ``train.tsv`` and ``dev.tsv`` into ``directory`` (deterministic for a seed); return their paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for name, size, held_out, offset in (("train", train_size, 0.0, 0), ("dev", dev_size, 0.5, 1)):
        path = os.path.join(directory, f"{name}.tsv")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("label\tsentence\n")
            for label, sentence in make_examples(size, seed * 2 + offset, held_out):
                handle.write(f"{label}\t{sentence}\n")
        paths.append(path)
    return paths[0], paths[1]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", default="data", help="where train.tsv and dev.tsv are written (default: data)")
    print(*write_sentiment_data(parser.parse_args().folder), sep="\n")
