"""Real-world facts for tracing and editing a pre-trained LM (SmolLM2-135M and the like).

Hand-written: (subject, relation, object) triples a small web-trained model is likely to know,
and per relation a rewrite prompt, two paraphrases and a neighbourhood prompt, all with ``{}``
for the subject and ending right before the object. :func:`known_facts` gives the records in
the format of the facts corpus's ``known_facts.json`` (``xvariants.data.facts``);
:func:`counterfact` gives CounterFact-style editing records whose ``target_new`` is another
object of the same relation and whose neighbourhood prompts are other subjects with the same
true object as the edited one (none for relations whose objects are unique, such as capitals). Objects are written without the leading space; tokenizers
that fold the space into the word (GPT-2, Llama) get it from ``encode_fact``.
"""

from __future__ import annotations

#: relation -> (rewrite prompt, paraphrase prompts, facts as (subject, object))
RELATIONS: dict[str, tuple[str, tuple[str, ...], tuple[tuple[str, str], ...]]] = {
    "capital": (
        "The capital of {} is the city of",
        ("The capital of {} is", "The capital city of {} is"),
        (("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
         ("Japan", "Tokyo"), ("Russia", "Moscow"), ("England", "London"), ("Egypt", "Cairo"),
         ("Greece", "Athens"), ("Austria", "Vienna"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"),
         ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Poland", "Warsaw"), ("Hungary", "Budapest"),
         ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("China", "Beijing"), ("Thailand", "Bangkok"),
         ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Cuba", "Havana"), ("Belgium", "Brussels"),
         ("the Czech Republic", "Prague"), ("Argentina", "Buenos"), ("Canada", "Ottawa"), ("Australia", "Canberra"),
         ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Scotland", "Edinburgh"), ("South Korea", "Seoul")),
    ),
    "city_of_landmark": (
        "{} is located in the city of",
        ("{} stands in the city of", "The city where you can visit {} is"),
        (("The Eiffel Tower", "Paris"), ("The Colosseum", "Rome"), ("Big Ben", "London"),
         ("The Brandenburg Gate", "Berlin"), ("The Kremlin", "Moscow"), ("The Acropolis", "Athens"),
         ("The Statue of Liberty", "New"), ("The Golden Gate Bridge", "San"), ("The Sagrada Familia", "Barcelona"),
         ("The Forbidden City", "Beijing")),
    ),
    "language": (
        "In {}, the official language is",
        ("The official language of {} is", "In {}, people speak"),
        (("France", "French"), ("Germany", "German"), ("Italy", "Italian"), ("Spain", "Spanish"),
         ("Japan", "Japanese"), ("Russia", "Russian"), ("Portugal", "Portuguese"), ("Greece", "Greek"),
         ("Poland", "Polish"), ("Sweden", "Swedish"), ("the Netherlands", "Dutch"), ("Brazil", "Portuguese"),
         ("Mexico", "Spanish"), ("Austria", "German"), ("Turkey", "Turkish"), ("China", "Chinese")),
    ),
    "continent": (
        "{} is located on the continent of",
        ("{} is a country on the continent of", "{} is a country in"),
        (("Kenya", "Africa"), ("Nigeria", "Africa"), ("Brazil", "South"), ("Argentina", "South"),
         ("Germany", "Europe"), ("France", "Europe"), ("Japan", "Asia"), ("India", "Asia"),
         ("Canada", "North"), ("Australia", "Oceania")),
    ),
    "company_country": (
        "{} is a company based in",
        ("The headquarters of {} are in", "{} has its headquarters in"),
        (("Toyota", "Japan"), ("Volkswagen", "Germany"), ("Samsung", "South"), ("Nokia", "Finland"),
         ("IKEA", "Sweden"), ("Renault", "France"), ("Ferrari", "Italy"), ("Sony", "Japan"),
         ("Siemens", "Germany"), ("Nestle", "Switzerland")),
    ),
}


def _records() -> list[tuple[str, str, str]]:
    return [(s, rel, o) for rel, (_, _, facts) in RELATIONS.items() for s, o in facts]


def _fill(template: str, subject: str) -> str:
    text = template.format(subject)
    return text[0].upper() + text[1:]  # "the Netherlands" opens a sentence as "The Netherlands"


def known_facts() -> list[dict]:
    """One record per fact (the rewrite prompt), in the known-facts file format."""
    out = []
    for i, (subject, rel, obj) in enumerate(_records()):
        prompt = _fill(RELATIONS[rel][0], subject)
        subject_in_prompt = subject if subject in prompt else _fill("{}", subject)
        out.append({"known_id": i, "subject": subject_in_prompt, "relation": rel, "prompt": prompt,
                    "answer": obj, "template_id": f"{rel}/0", "split": "train"})
    return out


def counterfact() -> list[dict]:
    """CounterFact-style records: one per fact, ``target_new`` the next other object of its relation."""
    out = []
    for case_id, (subject, rel, obj) in enumerate(_records()):
        prompt, paraphrases, facts = RELATIONS[rel]
        objects = list(dict.fromkeys(o for _, o in facts))
        new = objects[(objects.index(obj) + 1) % len(objects)]
        neighbours = [s for s, o in facts if o == obj and s != subject][:5]
        out.append({
            "case_id": case_id,
            "requested_rewrite": {"prompt": prompt,
                                  "relation_id": rel, "subject": subject,
                                  "target_new": {"str": new}, "target_true": {"str": obj}},
            "paraphrase_prompts": [_fill(p, subject) for p in paraphrases],
            "neighborhood_prompts": [_fill(prompt, s) for s in neighbours],
            "neighborhood_subjects": neighbours,
        })
    return out
