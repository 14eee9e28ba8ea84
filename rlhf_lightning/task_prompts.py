"""The built-in task's prompts: "say something about X" from templates and subjects (seeded).

A leaf module: the task's data (`data.builtin`) draws its three prompt sets from `all_prompts`, and the
tiny test tokenizers (`models.loading`) learn their vocabulary from `tokenizer_corpus`.
"""

from __future__ import annotations

import random

TEMPLATES = [
    "Write a one-sentence review of {s}.",
    "In one sentence, tell me about your visit to {s}.",
    "Give a short opinion about {s}.",
    "What did you think of {s}? Answer in one sentence.",
    "Describe {s} to a friend in one sentence.",
    "Write a short comment about {s} for a travel blog.",
]
ADJECTIVES = [
    "old", "new", "small", "busy", "quiet", "crowded", "modern", "tiny", "famous", "local", "hidden",
    "noisy", "cheap", "fancy", "rustic", "late-night", "family-run", "seaside", "downtown", "rooftop",
]
NOUNS = [
    "cafe", "bakery", "museum", "hotel", "bookshop", "train station", "park", "cinema", "pizzeria",
    "library", "market", "gym", "restaurant", "hostel", "bar", "zoo", "beach", "theatre", "bike shop",
    "noodle bar", "airport lounge", "campsite", "ferry", "barber shop", "food truck",
]
PLACES = [
    "in Lisbon", "in Osaka", "near the harbour", "on Main Street", "in the old town", "by the river",
    "in Berlin", "next to the university", "in a mountain village", "at the mall", "in Montreal",
    "on the high street",
]

# Sentences in the register the policy answers in: give tiny tokenizers a vocabulary for the task.
_CORPUS_EXTRA = [
    "It was great, friendly and clean, and I would happily go back.",
    "The staff were rude, the food was cold and it was far too expensive.",
    "A lovely little place with wonderful coffee and a warm atmosphere.",
    "Terrible service, dirty tables and a long wait; I would not recommend it.",
    "It was fine, nothing special, but the prices were fair.",
    "You are a helpful assistant. Sure! Here is a short review:",
]


def all_prompts(seed: int) -> list[str]:
    """Every distinct task prompt, in a seeded order."""
    prompts = [t.format(s=f"a {a} {n} {p}") for t in TEMPLATES for a in ADJECTIVES for n in NOUNS for p in PLACES]
    random.Random(seed).shuffle(prompts)
    return prompts


def tokenizer_corpus() -> list[str]:
    """Text that tiny test tokenizers are trained on (prompts of the task plus typical answers)."""
    return all_prompts(0)[:2000] + _CORPUS_EXTRA * 20
