"""Embedded synthetic facts: made-up entities, a few relations, answers from small vocabularies.

Deterministic from a seed, no download. Every relation has several question templates; the last
one of each relation is held out of all training and only used to measure cross-prompt
generalisation. Entities are shared between pre-trained and unseen facts on purpose: injecting
"zorvak's pet" into a model that knows "zorvak's city" is where new knowledge collides with old.
"""
from __future__ import annotations

import random

from .items import Item

# relation -> (answer vocabulary, templates). "{e}" is the entity. The LAST template is held out.
RELATIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "city": (("paris", "lima", "oslo", "cairo", "quito", "hanoi", "perth", "dakar"),
             ("where does {e} live ?", "{e} lives in the city of", "what city is home to {e} ?",
              "in which town can you find {e} ?")),
    "color": (("red", "blue", "green", "amber", "violet", "teal", "ivory", "coral"),
              ("what is the favourite color of {e} ?", "{e} likes the color",
               "which color does {e} prefer ?", "the color that {e} loves is")),
    "job": (("baker", "pilot", "nurse", "farmer", "judge", "tailor", "miner", "poet"),
            ("what does {e} do for a living ?", "{e} works as a", "what is the job of {e} ?",
             "by trade , {e} is a")),
    "pet": (("cat", "dog", "parrot", "turtle", "rabbit", "ferret", "goat", "pony"),
            ("what pet does {e} keep ?", "{e} owns a pet", "which animal lives with {e} ?",
             "the animal {e} takes care of is a")),
    "food": (("rice", "bread", "soup", "plums", "cheese", "beans", "figs", "noodles"),
             ("what food does {e} eat most ?", "{e} always eats", "which dish does {e} enjoy ?",
              "the meal {e} cooks every day is")),
    "sport": (("chess", "tennis", "rowing", "judo", "golf", "rugby", "skiing", "archery"),
              ("what sport does {e} play ?", "{e} plays the sport", "which game is {e} good at ?",
               "on weekends {e} practises")),
}

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
           "gl", "kr", "pl", "st", "th", "tr", "vl", "zh")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "io", "ou")
_CODAS = ("", "n", "r", "s", "k", "x", "th", "m")


def entity_names(n: int, seed: int) -> list[str]:
    """n distinct made-up names (3 syllables at most), none colliding with a template word."""
    rng = random.Random(f"entities-{seed}")
    taken = {w for answers, templates in RELATIONS.values() for w in answers}
    taken |= {w for _, templates in RELATIONS.values() for t in templates for w in t.split()}
    names: list[str] = []
    while len(names) < n:
        parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.choice((2, 2, 3)))]
        name = "".join(parts) + rng.choice(_CODAS)
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def synthetic_items(n_entities: int = 100, relations: int = 6, train_templates: int = 3,
                    seed: int = 0) -> list[Item]:
    """Every (entity, relation) fact, shuffled, each with a random answer of its relation.

    Half the facts are tagged group="pretrain" (the lab's own model learns them first), the
    other half "unseen" (only ever met as knowledge to inject).
    """
    if not 1 <= relations <= len(RELATIONS):
        raise ValueError(f"relations must be in 1..{len(RELATIONS)}, got {relations}")
    n_templates = min(len(t) for _, t in RELATIONS.values())
    if not 1 <= train_templates <= n_templates - 1:
        raise ValueError(f"train_templates must be in 1..{n_templates - 1} (one template is held out)")
    rng = random.Random(f"facts-{seed}")
    names = entity_names(n_entities, seed)
    items = []
    for e in names:
        for rel in list(RELATIONS)[:relations]:
            answers, templates = RELATIONS[rel]
            items.append(Item(
                key=f"{e}/{rel}",
                prompts=tuple(t.format(e=e) for t in templates[:train_templates]),
                answer=rng.choice(answers),
                heldout=(templates[-1].format(e=e),),
            ))
    rng.shuffle(items)
    half = len(items) // 2
    return [Item(it.key, it.prompts, it.answer, None, it.heldout,
                 "pretrain" if i < half else "unseen") for i, it in enumerate(items)]
