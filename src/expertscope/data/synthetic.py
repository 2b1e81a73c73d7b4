"""A seeded synthetic three-domain benchmark mirroring the paper's domains (§3.1.2).

* ``emotion`` (EmotionLines-style, classification): short dialogues ``"Speaker: line"``; the last line is
  labelled with one of :data:`EMOTION_LABELS`. The label comes from one of four rules, so no single word
  decides it: a cue word from a per-emotion lexicon (several words per label); a *negated* cue word
  (``"not happy"`` is sadness, any other negated emotion is neutral); a generic reaction (``"Really?"``)
  whose label is the emotion of the event the *previous* speaker reported; or a plain neutral statement.
  Cued lines may follow an unrelated emotional event, which must then be ignored.
* ``knowledge`` (MMLU-style, multiple choice): four-choice questions (A–D) about a fixed invented world
  (:func:`knowledge_base`) covering geography, history, medicine and law; the three distractors are other
  values of the same relation, i.e. from the same subject.
* ``math`` (GSM8K-style): word problems with 1–3 operations (+, −, ×, ÷) on small whole numbers; the
  worked solution writes every operation out and ends in ``#### <number>``.

Splits. Every item has a *content key* that leaves out the cosmetic parts (speaker names, the order of
the choices, the people and objects of a word problem). A key's split is a fixed hash of the key alone
(70 % train, 15 % validation, 15 % test), independent of the seed, so the splits share no item by
construction for every seed. What this means per domain:

* emotion: a test dialogue never has the same (context, utterance) content as a training one;
* knowledge: the key is (fact, question template). All facts are known from training text
  (:func:`knowledge_statements`, included in the demo's training corpus) but a test question asks about a
  fact with a question template that the training split never paired with that fact;
* math: the key is (start number, operations, operands), so a test problem is new arithmetic.

The knowledge base is the same for every seed (the world is fixed); the seed only changes sampling.

The ``shifted`` corpus (``synthetic:math@shifted``) is a second confirmation corpus that is not the
discovery distribution: items whose content keys fall in the *test* bucket (so never a training or
validation item), drawn from their own seeded stream and reworded (:func:`shift`): other speakers, people,
objects and verbs, new lead-ins for events, and each knowledge question framed as a quiz item.
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from ..errors import ConfigError, DataError
from .types import Domain, Example, TaskName

EMOTION_LABELS: tuple[str, ...] = ("neutral", "joy", "sadness", "anger", "fear", "disgust", "surprise")
DOMAINS: tuple[str, ...] = ("emotion", "knowledge", "math")
DOMAIN_TASKS: dict[str, TaskName] = {
    "emotion": "classification",
    "knowledge": "multiple_choice",
    "math": "math",
}
SPLITS: tuple[str, ...] = ("train", "validation", "test")
#: Corpora beyond the splits: ``shifted`` rewords test-bucket items (a second confirmation corpus).
CORPORA: tuple[str, ...] = (*SPLITS, "shifted")
Split = Literal["train", "validation", "test"]
# Cumulative percentage bounds of the hash buckets: [0, 70) train, [70, 85) validation, [85, 100) test.
_SPLIT_BOUNDS: dict[str, tuple[int, int]] = {"train": (0, 70), "validation": (70, 85), "test": (85, 100)}
# Rejection sampling gives up after this many candidates per requested item (the space is exhausted).
_MAX_TRIES_PER_ITEM = 200

# --------------------------------------------------------------------------------------------- splits


def split_of(key: str) -> str:
    """The split a content key belongs to: a seed-free hash bucket, so splits never overlap."""
    bucket = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % 100
    for name, (lo, hi) in _SPLIT_BOUNDS.items():
        if lo <= bucket < hi:
            return name
    raise AssertionError("unreachable")  # pragma: no cover


def _short_hash(s: str) -> str:
    return hashlib.blake2b(s.encode(), digest_size=5).hexdigest()


# -------------------------------------------------------------------------------------------- emotion

_SPEAKERS = ("Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jo", "Kim", "Leo")
_TOPICS = ("trip", "party", "exam", "game", "job", "news", "dinner", "movie", "wedding", "test results")
_INTENSIFIERS = ("", "really ", "so ", "very ")
_CUES: dict[str, tuple[str, ...]] = {
    "joy": ("happy", "glad", "thrilled", "delighted", "excited", "cheerful"),
    "sadness": ("sad", "heartbroken", "miserable", "gloomy", "unhappy", "depressed"),
    "anger": ("angry", "furious", "annoyed", "livid", "outraged", "irritated"),
    "fear": ("scared", "afraid", "terrified", "nervous", "frightened", "anxious"),
    "disgust": ("disgusted", "sickened", "revolted", "nauseated", "repulsed", "appalled"),
    "surprise": ("surprised", "amazed", "shocked", "astonished", "stunned", "startled"),
}
_CUE_TEMPLATES = (
    "I am {i}{c} about the {t}.",
    "Honestly, I feel {i}{c} right now.",
    "The {t} made me {i}{c}.",
    "I'm {i}{c}!",
    "After the {t} I was {i}{c}.",
)
_NEG_TEMPLATES = (
    "I am not {c} about the {t}.",
    "Honestly, I don't feel {c} at all.",
    "The {t} did not make me {c}.",
    "I'm not {c}, really.",
    "After the {t} I was never {c}.",
)
# A negated joy cue reads as sadness; any other negated emotion reads as neutral.
_NEGATION_LABEL = {"joy": "sadness"}
_EVENTS: dict[str, tuple[str, ...]] = {
    "joy": (
        "I got the job",
        "we won the cup final",
        "my sister had a healthy baby",
        "they gave me a raise",
        "our team finally won",
    ),
    "sadness": (
        "my grandfather passed away",
        "the old dog died last night",
        "I failed the exam again",
        "she moved away for good",
        "nobody came to my birthday",
    ),
    "anger": (
        "someone scratched my car on purpose",
        "they cheated us out of our pay",
        "he lied to my face",
        "the landlord kept our deposit",
        "they cut in line again",
    ),
    "fear": (
        "there is someone outside the window",
        "the bridge is cracking under us",
        "the doctor called about my scan",
        "a bear is near the tent",
        "the brakes just failed",
    ),
    "disgust": (
        "there is a hair in my soup",
        "the fridge is full of rotten fish",
        "he licked the floor for money",
        "the toilet overflowed in the kitchen",
        "there are worms in the bread",
    ),
    "surprise": (
        "my cousin showed up from abroad unannounced",
        "the shy guy proposed in public",
        "it snowed in July",
        "the old shop reopened overnight",
        "we got a letter from the king",
    ),
    "neutral": (
        "the meeting moved to Tuesday",
        "I bought some bread",
        "the bus comes at nine",
        "the printer needs paper",
        "I parked on the left side",
    ),
}
_REACTIONS = ("Really?", "Oh.", "I can't believe it.", "Tell me more.", "Wow.", "Are you sure?")
_NEUTRAL_LINES = (
    "I will bring the {t} notes tomorrow.",
    "Can you pass me the salt?",
    "The {t} starts at {n} o'clock.",
    "Let me check my calendar for the {t}.",
    "I think the {t} is on the second floor.",
    "We should talk about the {t} later.",
)


def _gen_emotion(rng: random.Random) -> tuple[str, Example]:
    """One dialogue (content key, example)."""
    a, b = rng.sample(_SPEAKERS, 2)
    kind = rng.choices(("cue", "negated", "reaction", "neutral"), weights=(40, 20, 25, 15))[0]
    context: tuple[str, ...] = ()
    if kind == "reaction":
        label = rng.choice(EMOTION_LABELS)
        event, line = rng.choice(_EVENTS[label]), rng.choice(_REACTIONS)
        context, key = (f"{a}: Guess what, {event}.",), f"r|{event}|{line}"
    elif kind in ("cue", "negated"):
        emo = rng.choice(tuple(_CUES))
        cue, topic = rng.choice(_CUES[emo]), rng.choice(_TOPICS)
        if kind == "cue":
            tmpl, inten = rng.choice(_CUE_TEMPLATES), rng.choice(_INTENSIFIERS)
            line, label = tmpl.format(i=inten, c=cue, t=topic), emo
        else:
            tmpl = rng.choice(_NEG_TEMPLATES)
            line, label = tmpl.format(c=cue, t=topic), _NEGATION_LABEL.get(emo, "neutral")
        key = f"{kind[0]}|{line}"
        if rng.random() < 0.5:  # an unrelated emotional event the label must not follow
            ev_label = rng.choice(EMOTION_LABELS)
            event = rng.choice(_EVENTS[ev_label])
            context, key = (f"{a}: Guess what, {event}.",), f"{key}|{event}"
    else:
        line = rng.choice(_NEUTRAL_LINES).format(t=rng.choice(_TOPICS), n=rng.randint(1, 12))
        label, key = "neutral", f"n|{line}"
        if rng.random() < 0.3:
            event = rng.choice(_EVENTS["neutral"])
            context, key = (f"{a}: Guess what, {event}.",), f"{key}|{event}"
    return key, Example(text=f"{b}: {line}", label=label, context=context or None, meta={"rule": kind})


# ----------------------------------------------------------------------------------------- emotion v2
#
# EmotionLines-like dialogues. The last utterance's label is drawn from a distribution that depends on its
# rule and on the context (annotators disagree), so even the Bayes-optimal classifier is wrong on about a
# quarter of the items. ``meta["label_probs"]`` keeps that distribution and ``meta["bayes_label"]`` its mode.

# Label priors used for the emotion of cues, events and annotator noise: neutral is kept most frequent
# through the neutral rules; among emotions joy and surprise are common, fear and disgust rare.
_V2_EMOTION_PRIOR: dict[str, float] = {
    "joy": 0.28, "surprise": 0.2, "sadness": 0.15, "anger": 0.15, "fear": 0.11, "disgust": 0.11,
}
_V2_SPEAKERS = (
    "Ross", "Rachel", "Monica", "Chandler", "Joey", "Phoebe", "Mike", "Janice", "Carol", "Emily",
    "Frank", "Gunther", "Susan", "Richard",
)
_V2_CUES: dict[str, tuple[str, ...]] = {
    "joy": ("happy", "glad", "thrilled", "delighted", "overjoyed", "so pleased", "over the moon"),
    "sadness": ("sad", "heartbroken", "miserable", "down", "crushed", "gutted", "devastated"),
    "anger": ("angry", "furious", "mad", "livid", "fed up", "pissed off", "sick of this"),
    "fear": ("scared", "afraid", "terrified", "nervous", "freaked out", "worried sick", "panicking"),
    "disgust": ("disgusted", "grossed out", "sickened", "revolted", "nauseous", "repulsed", "appalled"),
    "surprise": ("surprised", "amazed", "shocked", "stunned", "speechless", "blown away", "floored"),
}
_V2_CUE_FORMS = (
    "I'm {c}.", "Honestly, I'm {c}.", "I am {c} about {t}.", "That makes me {c}.", "Man, I'm {c} right now.",
    "I was {c} when I heard about {t}.", "You know what? I'm {c}.",
)
_V2_NEG_FORMS = (
    "I'm not {c}.", "I'm not {c} about {t}, okay?", "Honestly, I'm not {c} at all.", "It doesn't make me {c}.",
    "I wouldn't say I'm {c}.",
)
_V2_TOPICS = (
    "the apartment", "the wedding", "the new job", "the trip to Vegas", "your sister", "the baby", "the dinner",
    "the interview", "the museum", "the coffee house", "the date", "the lease", "the audition", "the party",
)
_V2_EVENTS: dict[str, tuple[str, ...]] = {
    "joy": (
        "I got the part in the play", "we're getting married", "I passed the bar exam", "they promoted me today",
        "my mom finally said yes", "we won the lottery pool at work", "the adoption went through",
    ),
    "sadness": (
        "my grandmother died this morning", "she broke up with me", "I didn't get the job", "my dog is sick",
        "nobody came to my show", "they're selling the old house", "he's moving to London for good",
    ),
    "anger": (
        "my landlord doubled the rent", "he read my diary", "they gave my table away", "someone stole my bike",
        "my boss took credit for my work", "the guy cut in front of me and smirked", "she lied to me again",
    ),
    "fear": (
        "there's someone in the hallway", "the doctor wants more tests", "the plane is shaking",
        "I think someone is following me", "the smoke alarm went off upstairs", "I have to give a speech tomorrow",
        "the ice is cracking",
    ),
    "disgust": (
        "there's a hair in my sandwich", "he picks his toes at the table", "the fridge smells like dead fish",
        "I stepped in something warm", "the bathroom at the bar was flooded", "she licked the spoon and put it back",
        "there are bugs in the cereal",
    ),
    "surprise": (
        "my brother showed up from Alaska", "Ross is the father", "they closed the coffee house overnight",
        "I'm actually twenty years older than I look", "Joey read a book", "the quiet guy from accounting quit",
        "we have a twin we never knew about",
    ),
}
_V2_NEUTRAL_EVENTS = (
    "the dry cleaner closes at six", "I moved the couch", "the meeting is at ten", "I bought more milk",
    "the train was on time", "I'm taking the car tomorrow", "the cable guy comes Thursday",
)
_V2_FILLERS = (
    "Hey, how's it going?", "Did you get the mail?", "I'll grab us some coffee.", "Is that your jacket?",
    "Where's everyone?", "Okay, sit down.", "So, what happened?", "Hi.", "You got a minute?",
    "I was just at {t}.", "Are you coming to {t}?", "Can we talk about {t}?",
)
_V2_NEUTRAL_LINES = (
    "I'll call you later.", "Do you want some coffee?", "It's on the table.", "We should get going.",
    "What time is it?", "I think it starts at eight.", "Let me get my coat.", "Okay, see you tomorrow.",
    "Did you call {p}?", "Who's going to {t}?", "I'll take care of {t}.", "Is {p} coming?",
)
_V2_REACTIONS = ("Really?", "Oh.", "Wow.", "Seriously?", "Oh my God.", "No way.", "Are you kidding me?", "Huh.")
# Praise said after a bad event reads as sarcasm (the event's emotion); after a good event it is joy.
_V2_SARCASM = (
    "Oh, great.", "Wonderful. Just wonderful.", "Well, that's just perfect.", "Fantastic.", "Oh, lovely.",
    "Yeah, this is the best day ever.",
)


def _v2_mix(probs: dict[str, float]) -> dict[str, float]:
    """Normalise a label distribution over :data:`EMOTION_LABELS` (missing labels get 0)."""
    total = sum(probs.values())
    return {lab: probs.get(lab, 0.0) / total for lab in EMOTION_LABELS}


def _v2_noisy(main: dict[str, float], noise: float) -> dict[str, float]:
    """``main`` with ``noise`` of its mass spread over all labels by the prior (annotator disagreement)."""
    prior = _v2_mix({"neutral": 0.3, **_V2_EMOTION_PRIOR})
    main = _v2_mix(main)
    return {lab: (1 - noise) * main[lab] + noise * prior[lab] for lab in EMOTION_LABELS}


def _v2_emotion(rng: random.Random, exclude: str | None = None) -> str:
    labs = [lab for lab in _V2_EMOTION_PRIOR if lab != exclude]
    return rng.choices(labs, weights=[_V2_EMOTION_PRIOR[lab] for lab in labs])[0]


_V2_RULES = ("cue", "negated", "reaction", "sarcasm", "neutral")
_V2_RULE_WEIGHTS = (26, 10, 24, 10, 30)


def _gen_emotion_v2(rng: random.Random) -> tuple[str, Example]:
    """One multi-turn dialogue whose last line is labelled: (content key, example).

    Rules for the last line (by speaker ``b``; the other speaker ``a`` talks before):

    * ``cue``: an emotion word ("I'm furious."): mostly that emotion, even after an event of another one
      (a conflicting cue the label must not follow);
    * ``negated``: "I'm not <cue>": a negated joy is mostly sadness, other negations mostly neutral;
    * ``reaction``: a generic reaction ("Really?") to the event ``a`` just reported: mostly that event's
      emotion, often surprise; an earlier event of another emotion may come before it;
    * ``sarcasm``: praise ("Oh, great.") after ``a``'s event: the event's emotion when the event is bad,
      joy when it is good;
    * ``neutral``: a plain line, possibly after an emotional event that it ignores.
    """
    a, b = rng.sample(_V2_SPEAKERS, 2)
    rule = rng.choices(_V2_RULES, weights=_V2_RULE_WEIGHTS)[0]
    topic = rng.choice(_V2_TOPICS)
    turns: list[tuple[str, str]] = []  # (speaker, line) before the last line
    key_parts: list[str] = [rule]

    def filler() -> None:
        for _ in range(rng.randint(0, 2)):
            who = rng.choice((a, b))
            turns.append((who, rng.choice(_V2_FILLERS).format(t=rng.choice(_V2_TOPICS))))

    def event(emotion: str | None) -> str:
        text = rng.choice(_V2_NEUTRAL_EVENTS) if emotion is None else rng.choice(_V2_EVENTS[emotion])
        lead = rng.choice(("Guess what, {e}.", "So {e}.", "I just found out {e}.", "You won't believe it, {e}.",
                           "{E}."))
        turns.append((a, lead.format(e=text, E=_sentence_case(text))))
        key_parts.append(text)
        return text

    filler()
    if rule in ("cue", "negated"):
        emo = _v2_emotion(rng)
        if rng.random() < 0.6:  # an event before it, of another emotion (or none): a conflicting cue
            event(rng.choice((None, _v2_emotion(rng, exclude=emo))))
        cue = rng.choice(_V2_CUES[emo])
        forms = _V2_CUE_FORMS if rule == "cue" else _V2_NEG_FORMS
        line = rng.choice(forms).format(c=cue, t=topic)
        if rule == "cue":
            probs = _v2_noisy({emo: 0.9, "neutral": 0.1}, 0.1)
        elif emo == "joy":
            probs = _v2_noisy({"sadness": 0.6, "neutral": 0.4}, 0.1)
        else:
            probs = _v2_noisy({"neutral": 0.7, emo: 0.3}, 0.1)
    elif rule in ("reaction", "sarcasm"):
        if rng.random() < 0.4:  # an earlier event of another emotion: the reaction is to the latest one
            event(_v2_emotion(rng))
            if rng.random() < 0.5:
                turns.append((b, rng.choice(_V2_FILLERS).format(t=rng.choice(_V2_TOPICS))))
        emo = _v2_emotion(rng)
        event(emo)
        if rule == "reaction":
            line = rng.choice(_V2_REACTIONS)
            probs = _v2_noisy({emo: 0.6, "surprise": 0.25, "neutral": 0.15}, 0.1)
        else:
            line = rng.choice(_V2_SARCASM)
            main = {"joy": 0.8, "surprise": 0.2} if emo in ("joy", "surprise") else {emo: 0.65, "joy": 0.35}
            probs = _v2_noisy(main, 0.1)
    else:
        if rng.random() < 0.5:
            event(rng.choice((None, _v2_emotion(rng))))
        line = rng.choice(_V2_NEUTRAL_LINES).format(t=topic, p=rng.choice(_V2_SPEAKERS))
        probs = _v2_noisy({"neutral": 1.0}, 0.12)
    label = rng.choices(EMOTION_LABELS, weights=[probs[lab] for lab in EMOTION_LABELS])[0]
    bayes = max(EMOTION_LABELS, key=lambda lab: probs[lab])
    key = "v2|" + "|".join([*key_parts, line])
    context = tuple(f"{who}: {text}" for who, text in turns)
    return key, Example(
        text=f"{b}: {line}",
        label=label,
        context=context or None,
        meta={"rule": rule, "bayes_label": bayes, "label_probs": {k: round(v, 4) for k, v in probs.items()}},
    )


# ------------------------------------------------------------------------------------------ knowledge

_SYL_A = ("va", "tor", "mel", "ka", "ri", "dun", "sel", "bra", "o", "fen", "gal", "mir", "ze", "lo", "quen")
_SYL_B = ("ra", "vi", "len", "do", "sa", "mon", "ta", "ri", "go", "ne", "ba", "the", "ku", "li", "ro")
_SYL_C = (
    "mora",
    "th",
    "dia",
    "nor",
    "via",
    "sk",
    "land",
    "ria",
    "vel",
    "mar",
    "dor",
    "ne",
    "tis",
    "x",
    "gard",
)


@dataclass(frozen=True)
class Fact:
    """One knowledge-base fact: ``entity`` has ``value`` for ``relation`` (of ``subject``)."""

    subject: str
    relation: str
    entity: str
    value: str


@dataclass(frozen=True)
class _Relation:
    subject: str
    name: str
    statements: tuple[str, ...]  # templates with {e} and {v}
    questions: tuple[str, ...]  # templates with {e}


_RELATIONS: tuple[_Relation, ...] = (
    _Relation(
        "geography",
        "capital",
        ("The capital of {e} is {v}.", "{v} is the capital city of {e}."),
        (
            "What is the capital of {e}?",
            "Which city is the capital of {e}?",
            "{e} is governed from which city?",
            "Where is the seat of government of {e}?",
        ),
    ),
    _Relation(
        "geography",
        "continent",
        ("{e} lies on the continent of {v}.", "The land of {e} is part of {v}."),
        (
            "On which continent does {e} lie?",
            "Which continent is {e} part of?",
            "{e} is found on which continent?",
            "Where on the map is {e}?",
        ),
    ),
    _Relation(
        "history",
        "founder",
        ("The {e} dynasty was founded by {v}.", "{v} founded the {e} dynasty."),
        (
            "Who founded the {e} dynasty?",
            "The {e} dynasty was started by whom?",
            "Which ruler began the {e} dynasty?",
            "Name the founder of the {e} dynasty.",
        ),
    ),
    _Relation(
        "history",
        "seat",
        ("The {e} dynasty ruled from {v}.", "{v} was the seat of the {e} dynasty."),
        (
            "From which city did the {e} dynasty rule?",
            "Where was the seat of the {e} dynasty?",
            "The {e} dynasty had its court in which city?",
            "Which city did the {e} dynasty rule from?",
        ),
    ),
    _Relation(
        "medicine",
        "cure",
        ("{e} is treated with {v}.", "Healers give {v} against {e}."),
        (
            "What is the remedy for {e}?",
            "Which herb treats {e}?",
            "Healers use which plant against {e}?",
            "How is {e} cured?",
        ),
    ),
    _Relation(
        "medicine",
        "organ",
        ("{e} attacks the {v}.", "The {v} is the organ harmed by {e}."),
        (
            "Which organ does {e} attack?",
            "What part of the body is harmed by {e}?",
            "{e} damages which organ?",
            "Where in the body does {e} strike?",
        ),
    ),
    _Relation(
        "law",
        "penalty",
        ("The penalty for {e} is {v}.", "Anyone guilty of {e} faces {v}."),
        (
            "What is the penalty for {e}?",
            "What punishment follows {e}?",
            "Someone guilty of {e} receives what penalty?",
            "How is {e} punished?",
        ),
    ),
    _Relation(
        "law",
        "court",
        ("Cases of {e} are heard by {v}.", "{v} judges cases of {e}."),
        (
            "Which court hears cases of {e}?",
            "Who judges cases of {e}?",
            "Cases of {e} go before which court?",
            "Where are cases of {e} tried?",
        ),
    ),
)
_ORGANS = ("heart", "lungs", "liver", "kidneys", "skin", "eyes", "bones", "stomach")
_PENALTIES = (
    "exile",
    "a fine of ten coins",
    "a year in prison",
    "a public apology",
    "loss of land",
    "forced labour",
    "a fine of fifty coins",
    "banishment from the city",
)
_CRIME_VERBS = ("stealing", "burning", "selling", "poisoning", "hiding", "smuggling")
_CRIME_OBJECTS = ("horses", "grain", "salt", "boats", "wells")
_ENTITIES_PER_SUBJECT = 30


def _names(rng: random.Random, k: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < k:
        name = (rng.choice(_SYL_A) + rng.choice(_SYL_B) + rng.choice(_SYL_C)).capitalize()
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


@lru_cache(maxsize=1)
def knowledge_base() -> tuple[Fact, ...]:
    """The fixed invented world: 4 subjects × 30 entities × 2 relations = 240 facts (seed-free)."""
    rng = random.Random("expertscope-world-v1")
    taken: set[str] = set()
    n = _ENTITIES_PER_SUBJECT
    countries, cities, continents = _names(rng, n, taken), _names(rng, n, taken), _names(rng, 6, taken)
    dynasties, seats = _names(rng, n, taken), _names(rng, n, taken)
    founders = [f"{rng.choice(('King', 'Queen'))} {x}" for x in _names(rng, n, taken)]
    diseases = [f"{x} {rng.choice(('fever', 'pox', 'cough', 'rot'))}" for x in _names(rng, n, taken)]
    herbs = [f"{x}{rng.choice(('root', 'leaf', 'moss', 'bark'))}".capitalize() for x in _names(rng, n, taken)]
    crimes = [f"{v} {o}" for v in _CRIME_VERBS for o in _CRIME_OBJECTS][:n]
    courts = [f"the {x} Court" for x in _names(rng, 8, taken)]
    facts: list[Fact] = []
    for i in range(n):
        facts += [
            Fact("geography", "capital", countries[i], cities[i]),
            Fact("geography", "continent", countries[i], rng.choice(continents)),
            Fact("history", "founder", dynasties[i], founders[i]),
            Fact("history", "seat", dynasties[i], seats[i]),
            Fact("medicine", "cure", diseases[i], herbs[i]),
            Fact("medicine", "organ", diseases[i], rng.choice(_ORGANS)),
            Fact("law", "penalty", crimes[i], rng.choice(_PENALTIES)),
            Fact("law", "court", crimes[i], rng.choice(courts)),
        ]
    return tuple(facts)


def _relation(name: str) -> _Relation:
    return next(r for r in _RELATIONS if r.name == name)


def _sentence_case(s: str) -> str:
    return s[:1].upper() + s[1:]


def knowledge_statements() -> list[str]:
    """Every fact of :func:`knowledge_base` in every statement template: the world's 'textbook'.

    The demo trains on these so that all facts, including those asked about in test, are learnable.
    """
    out = []
    for f in knowledge_base():
        for tmpl in _relation(f.relation).statements:
            out.append(_sentence_case(tmpl.format(e=f.entity, v=f.value)))
    return out


def _gen_knowledge(rng: random.Random) -> tuple[str, str, Example]:
    """One question: (split key, unique key, example)."""
    facts = knowledge_base()
    fact = rng.choice(facts)
    rel = _relation(fact.relation)
    t = rng.randrange(len(rel.questions))
    pool = sorted({f.value for f in facts if f.relation == fact.relation and f.value != fact.value})
    options = [fact.value, *rng.sample(pool, 3)]
    rng.shuffle(options)
    letter = "ABCD"[options.index(fact.value)]
    split_key = f"{fact.relation}|{fact.entity}|q{t}"
    ex = Example(
        text=_sentence_case(rel.questions[t].format(e=fact.entity)),
        label=letter,
        choices=tuple(options),
        meta={"subject": fact.subject, "relation": fact.relation},
    )
    return split_key, f"{split_key}|{'|'.join(options)}", ex


# ----------------------------------------------------------------------------------------------- math

_PEOPLE = ("Tom", "Mia", "Raj", "Lena", "Omar", "Sofia", "Kai", "Nora", "Yuki", "Paul")
_OBJECTS = ("apples", "marbles", "stickers", "pencils", "cookies", "coins", "books", "shells")


def _math_step(rng: random.Random, x: int, name: str, obj: str) -> tuple[str, str, int, str] | None:
    """One operation on the running amount ``x``: (sentence, key part, new amount, worked step)."""
    op = rng.choice("+-*/")
    friend = rng.choice([p for p in _PEOPLE if p != name])
    if op == "+":
        n = rng.randint(1, 20)
        if x + n > 99:
            return None
        text = rng.choice(
            (
                f"{name} buys {n} more {obj}.",
                f"{name} finds {n} more {obj}.",
                f"{friend} gives {name} {n} {obj}.",
            )
        )
        return text, f"+{n}", x + n, f"{x} + {n} = {x + n}."
    if op == "-":
        if x < 2:
            return None
        n = rng.randint(1, min(x - 1, 20))
        text = rng.choice(
            (
                f"{name} gives {n} {obj} to {friend}.",
                f"{name} loses {n} {obj}.",
                f"{name} sells {n} of the {obj}.",
            )
        )
        return text, f"-{n}", x - n, f"{x} - {n} = {x - n}."
    if op == "*":
        k = rng.randint(2, 4)
        if x * k > 99:
            return None
        text = rng.choice(
            (
                f"Then the number of {obj} becomes {k} times as large.",
                f"{name} ends up with {k} times as many {obj}.",
            )
        )
        return text, f"*{k}", x * k, f"{x} * {k} = {x * k}."
    divisors = [k for k in (2, 3, 4, 5) if x % k == 0]
    if not divisors:
        return None
    k = rng.choice(divisors)
    text = rng.choice(
        (
            f"{name} splits the {obj} into {k} equal piles and keeps one pile.",
            f"{name} shares the {obj} equally with {k - 1} {'friend' if k == 2 else 'friends'} "
            "and keeps one share.",
        )
    )
    return text, f"/{k}", x // k, f"{x} / {k} = {x // k}."


def _gen_math(rng: random.Random) -> tuple[str, Example]:
    """One word problem with 1–3 operations: (content key, example)."""
    name, obj = rng.choice(_PEOPLE), rng.choice(_OBJECTS)
    n_ops = rng.randint(1, 3)
    x = start = rng.randint(2, 30)
    sentences, keys, steps = [f"{name} has {x} {obj}."], [str(start)], []
    for _ in range(n_ops):
        step = None
        while step is None:  # redraw operations that would leave 1..99 or not divide evenly
            step = _math_step(rng, x, name, obj)
        text, key, x, worked = step
        sentences.append(text)
        keys.append(key)
        steps.append(worked)
    sentences.append(f"How many {obj} does {name} have now?")
    solution = " ".join([*steps, f"#### {x}"])
    return "m|" + "".join(keys), Example(
        text=" ".join(sentences), answer=str(x), solution=solution, meta={"n_ops": n_ops}
    )


# -------------------------------------------------------------------------------------- shifted corpus

_SHIFT_WORDS: dict[str, dict[str, str]] = {
    "emotion": {
        **dict(zip(_V2_SPEAKERS, ("Aria", "Bruno", "Celia", "Dario", "Elsa", "Fabio", "Greta", "Hugo", "Iris",
                                  "Jonas", "Karla", "Lukas", "Marta", "Nico"), strict=True)),
        "Guess what,": "Listen,", "So ": "Well, ", "I just found out": "I have just heard",
        "You won't believe it,": "Get this,", "really": "truly", "very": "extremely",
    },
    "knowledge": {"What is": "Name", "Which": "What", "Where": "In which place"},
    "math": {
        **dict(zip(_PEOPLE, ("Zara", "Ali", "Bea", "Cyrus", "Dina", "Emil", "Femi", "Gia", "Hal", "Ines"),
                   strict=True)),
        **dict(zip(_OBJECTS, ("pears", "buttons", "cards", "crayons", "muffins", "tokens", "comics", "pebbles"),
                   strict=True)),
        "buys": "purchases", "finds": "picks up", "gives": "hands", "loses": "misplaces", "sells": "trades away",
        "splits": "divides", "shares": "divides", "ends up with": "finishes with",
        "becomes": "turns into", "How many": "What number of", "have now?": "hold at the end?",
    },
}


def _replace_words(text: str, words: dict[str, str]) -> str:
    import re

    if not words:
        return text
    pattern = re.compile("|".join(rf"(?<!\w){re.escape(k)}(?!\w)" if k[-1].isalnum() else
                                  rf"(?<!\w){re.escape(k)}" for k in sorted(words, key=len, reverse=True)))
    return pattern.sub(lambda m: words[m.group(0)], text)


def shift(domain: str, ex: Example) -> Example:
    """``ex`` reworded for the shifted corpus: the same content (label, answer, worked numbers), other words."""
    words = _SHIFT_WORDS.get(_LEGACY_NAMES.get(domain, domain), {})
    text = _replace_words(ex.text, words)
    if domain == "knowledge":
        text = f"Quiz item: {text}"
    context = tuple(_replace_words(c, words) for c in ex.context) if ex.context else ex.context
    return Example(text=text, label=ex.label, answer=ex.answer, choices=ex.choices, solution=ex.solution,
                   context=context, id=ex.id, meta=ex.meta)


# -------------------------------------------------------------------------------------------- the API


def _sample_emotion_v1(rng: random.Random) -> tuple[str, str, Example]:
    key, ex = _gen_emotion(rng)
    # Unique per rendered dialogue (speakers included); the split is decided by the content key only.
    return key, f"{key}|{ex.text}|{'|'.join(ex.context or ())}", ex


def _sample_emotion(rng: random.Random) -> tuple[str, str, Example]:
    key, ex = _gen_emotion_v2(rng)
    return key, f"{key}|{ex.text}|{'|'.join(ex.context or ())}", ex


def _sample_math(rng: random.Random) -> tuple[str, str, Example]:
    key, ex = _gen_math(rng)
    return key, f"{key}|{ex.text}", ex


def _sampler(domain: str) -> Callable[[random.Random], tuple[str, str, Example]]:
    """The candidate sampler of ``domain``: rng -> (split key, unique key, example)."""
    samplers = {
        "emotion": _sample_emotion,
        "knowledge": _gen_knowledge,
        "math": _sample_math,
        "emotion_v1": _sample_emotion_v1,
    }
    if domain in samplers:
        return samplers[domain]
    raise ConfigError(f"unknown synthetic domain {domain!r}: use one of {', '.join(DOMAINS)}")


_LEGACY_NAMES = {"emotion_v1": "emotion"}


class _Stream:
    """The examples of one ``(domain, split, seed)`` in order, drawn on demand and kept: a later, larger request
    continues the same RNG instead of starting over (a study asks for the same split several times)."""

    def __init__(self, domain: str, split: str, seed: int) -> None:
        self.domain, self.split = domain, split
        self.sample = _sampler(domain)
        # emotion_v1 (the first demo's emotion data, kept to reproduce its training) hashes as "emotion".
        self.name = _LEGACY_NAMES.get(domain, domain)
        self.rng = random.Random(f"expertscope-synth|{self.name}|{split}|{seed}")
        self.seen: set[str] = set()
        self.examples: list[Example] = []
        self.tries = 0
        self.lock = threading.Lock()

    def take(self, n: int) -> list[Example]:
        with self.lock:
            while len(self.examples) < n:
                self.tries += 1
                if self.tries > _MAX_TRIES_PER_ITEM * max(n, 1) + 10_000:
                    raise DataError(f"only {len(self.examples)} distinct {self.domain} {self.split} items found: "
                                    "ask for fewer examples")
                split_key, unique_key, ex = self.sample(self.rng)
                bucket = "test" if self.split == "shifted" else self.split
                if split_of(f"{self.name}|{split_key}") != bucket or unique_key in self.seen:
                    continue
                self.seen.add(unique_key)
                ex_id = f"{self.name}-{self.split}-{_short_hash(unique_key)}"
                ex = Example(text=ex.text, label=ex.label, answer=ex.answer, choices=ex.choices,
                             solution=ex.solution, context=ex.context, id=ex_id,
                             meta={**ex.meta, "split": self.split, "key": split_key})
                self.examples.append(shift(self.domain, ex) if self.split == "shifted" else ex)
            return self.examples[:n]


@lru_cache(maxsize=32)
def _stream(domain: str, split: str, seed: int) -> _Stream:
    return _Stream(domain, split, seed)


def generate(domain: str, n: int, seed: int = 0, split: str = "train") -> Domain:
    """``n`` distinct examples of ``domain`` from ``split``, deterministic in (domain, n, seed, split).

    Candidates are sampled from a RNG seeded by ``(domain, split, seed)`` and kept only when their content
    key hashes into ``split`` (see the module docstring), so two splits never share an item whatever the
    seeds. The first ``k`` examples of ``generate(d, n, s)`` equal ``generate(d, k, s)``: the examples drawn
    so far are kept per ``(domain, split, seed)`` (the 32 most recent) and a larger ``n`` draws on from there.
    """
    if split not in CORPORA:
        raise ConfigError(f"unknown split {split!r}: use one of {', '.join(CORPORA)}")
    if n < 0:
        raise ConfigError(f"negative example count {n}: pass n >= 0")
    _sampler(domain)  # an unknown domain fails here, before it takes a cache slot
    stream = _stream(domain, split, seed)
    return Domain(stream.name, stream.take(n), DOMAIN_TASKS[stream.name], f"synthetic:{domain}:{split}:seed={seed}")


DEFAULT_SIZES: dict[str, int] = {"train": 2000, "validation": 300, "test": 300}


def splits(domain: str, sizes: dict[str, int] | None = None, seed: int = 0) -> dict[str, Domain]:
    """Train, validation and test :class:`Domain` of ``domain`` (sizes default to 2000/300/300)."""
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    return {s: generate(domain, sizes[s], seed=seed, split=s) for s in SPLITS}


def knowledge_open_questions(split: str = "train") -> list[tuple[str, str]]:
    """Open-form ``(question, answer value)`` pairs for every (fact, template) pair in ``split``.

    Used as extra training text for the demo: they teach answering each question form for the training
    split's pairs only, so test questions still pair a fact with a template unseen for it.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    out = []
    for fact in knowledge_base():
        rel = _relation(fact.relation)
        for t, tmpl in enumerate(rel.questions):
            if split_of(f"knowledge|{fact.relation}|{fact.entity}|q{t}") == split:
                out.append((_sentence_case(tmpl.format(e=fact.entity)), fact.value))
    return out
