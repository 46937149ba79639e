"""The known-facts corpus's relations: real-word objects and sentence templates.

Every object is one word (one token for the word tokenizer) and unique across relations.
Every template ends with ``{object}``, so the prompt (the template up to the object)
stops right before the answer. Words are separated by spaces and carry no attached
punctuation, so a subject's name is whole words for the word tokenizer too.
Each relation has 7 training templates (written into the corpus) and 3 held-out
paraphrases (only in the known-facts and CounterFact files); the held-out templates reuse
words of the training templates, so no prompt word is unknown to a word-level model.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Relation:
    """One relation: its objects and its ``{subject}`` / ``{object}`` sentence templates."""

    name: str
    objects: tuple[str, ...]
    train_templates: tuple[str, ...]
    heldout_templates: tuple[str, ...]

    @property
    def templates(self) -> tuple[str, ...]:
        """Training templates first, then held-out ones; a template's id is its index here."""
        return self.train_templates + self.heldout_templates


RELATIONS: tuple[Relation, ...] = (
    Relation(
        "birthplace",
        ("Lisbon", "Madrid", "Paris", "Berlin", "Vienna", "Prague", "Warsaw", "Dublin", "Oslo", "Stockholm",
         "Helsinki", "Athens", "Rome", "Cairo", "Tokyo", "Seoul", "Lima", "Toronto", "Chicago", "Sydney"),
        (
            "{subject} was born in {object}",
            "{subject} was born in the city of {object}",
            "The birthplace of {subject} is {object}",
            "{subject} is a native of {object}",
            "The home town of {subject} is {object}",
            "{subject} came into the world in {object}",
            "The city where {subject} was born is {object}",
        ),
        (
            "The home town where {subject} was born is {object}",
            "{subject} came into the world in the city of {object}",
            "The city of the birthplace of {subject} is {object}",
        ),
    ),
    Relation(
        "language",
        ("French", "German", "Spanish", "Italian", "Portuguese", "Dutch", "Polish", "Czech", "Greek", "Swedish",
         "Finnish", "Danish", "Norwegian", "Hungarian", "Turkish", "Russian", "Arabic", "Japanese", "Korean",
         "Hindi"),
        (
            "The mother tongue of {subject} is {object}",
            "{subject} speaks {object}",
            "The native language of {subject} is {object}",
            "{subject} grew up speaking {object}",
            "{subject} writes letters in {object}",
            "At home {subject} speaks {object}",
            "The first language of {subject} is {object}",
        ),
        (
            "The language of the home of {subject} is {object}",
            "The native tongue of {subject} is {object}",
            "The first language {subject} learned is {object}",
        ),
    ),
    Relation(
        "occupation",
        ("painter", "surgeon", "lawyer", "farmer", "baker", "pilot", "sailor", "teacher", "chemist", "poet",
         "carpenter", "journalist", "nurse", "banker", "tailor", "librarian", "photographer", "dentist",
         "butcher", "goldsmith"),
        (
            "{subject} works as a {object}",
            "By profession {subject} is a {object}",
            "{subject} earns a living as a {object}",
            "{subject} is employed as a {object}",
            "{subject} trained to become a {object}",
            "The job of {subject} is that of a {object}",
            "{subject} has worked for years as a {object}",
        ),
        (
            "{subject} trained for years to become a {object}",
            "The profession of {subject} is that of a {object}",
            "By profession {subject} works as a {object}",
        ),
    ),
    Relation(
        "instrument",
        ("piano", "violin", "cello", "flute", "guitar", "trumpet", "clarinet", "harp", "drums", "oboe",
         "saxophone", "accordion", "banjo", "trombone", "harmonica", "viola", "bassoon", "mandolin"),
        (
            "{subject} plays the {object}",
            "The instrument of {subject} is the {object}",
            "{subject} performs on the {object}",
            "{subject} practises the {object}",
            "In the orchestra {subject} plays the {object}",
            "{subject} learned to play the {object}",
            "The favourite instrument of {subject} is the {object}",
        ),
        (
            "The instrument {subject} learned to play is the {object}",
            "In the orchestra {subject} performs on the {object}",
            "{subject} has learned to play the {object}",
        ),
    ),
    Relation(
        "sport",
        ("tennis", "football", "cricket", "rugby", "golf", "hockey", "baseball", "basketball", "volleyball",
         "handball", "badminton", "squash", "polo", "lacrosse", "softball", "netball", "snooker", "billiards"),
        (
            "{subject} plays {object}",
            "The favourite sport of {subject} is {object}",
            "{subject} is a keen player of {object}",
            "On weekends {subject} plays {object}",
            "{subject} competes in {object}",
            "{subject} coaches a team in {object}",
            "The sport {subject} loves most is {object}",
        ),
        (
            "The sport that {subject} plays on weekends is {object}",
            "{subject} loves to play {object}",
            "{subject} competes on a team in {object}",
        ),
    ),
    Relation(
        "colour",
        ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey", "brown", "pink",
         "violet", "crimson", "scarlet", "turquoise", "amber", "indigo"),
        (
            "The favourite colour of {subject} is {object}",
            "{subject} likes the colour {object}",
            "{subject} always wears {object}",
            "The house of {subject} is painted {object}",
            "{subject} prefers the colour {object}",
            "The car of {subject} is {object}",
            "{subject} chose to paint the door {object}",
        ),
        (
            "The colour {subject} likes most is {object}",
            "{subject} painted the house {object}",
            "The door of the house of {subject} is {object}",
        ),
    ),
)

RELATION_NAMES = tuple(r.name for r in RELATIONS)
