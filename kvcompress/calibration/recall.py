"""Calibration sequences with facts that are asked for later, so that retention labels see recall.

Prose alone rarely asks for a token again hundreds of tokens later, so gates calibrated on it learn
what prose attends to and drop a stated fact that the text never mentions again (measured on the
pass-key task, see the README). Each sequence built here is prose with a few short statements
("The locker code is 4711.") spliced in at random places and, at its end, questions that make the
model recall them ("What is the locker code? The locker code is 4711."). The frozen model's
attention while it answers is what labels the statements as worth keeping.

The statements come in several wordings and formats (`TEMPLATES`): gates that saw one kind of sentence
keep that kind, and miss a number given in a list or a quote (docs/methods.md, recall wordings). None
is the evaluation's pass-key wording or one of its held-out wordings (`evaluation.tasks.PHRASINGS`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

SUBJECTS = (
    "locker code", "room number", "invoice number", "serial number", "order number", "ticket number",
    "account PIN", "phone extension", "batch code", "flight number", "seat number", "badge number",
    "gate code", "parcel number", "case number", "member number",
)
QUESTION = "What is the {subject}? The {subject} is {value}."
TEMPLATES = (  # (statement, the question that recalls it): sentences, a list item, an assignment, a quote, the number first
    ("The {subject} is {value}.", QUESTION),
    ("Note: the {subject} is {value}.", QUESTION),
    ("For the record, the {subject} is {value}.", QUESTION),
    ("{value} -- that is the {subject}.", "Which number was the {subject}? It was {value}."),
    ("- {subject}: {value}", "The {subject} listed above: {value}."),
    ("He wrote the {subject} ({value}) on a slip of paper.", "What did he write on the slip? The {subject}, {value}."),
    ("{subject} = {value}", "Recall the value: {subject} = {value}."),
    ("Remember this {subject}: {value}.", "The {subject} to remember was {value}."),
    ('I was told the {subject} is "{value}".', "What was I told? The {subject} is {value}."),
)


@dataclass
class RecallSequences:
    token_ids: torch.Tensor  # [sequences * sequence_length], the sequences concatenated
    statements: torch.Tensor  # [same], True at the tokens of a spliced-in statement


def recall_sequences(
    token_ids: torch.Tensor, tokenizer, sequence_length: int = 1024, facts: int = 2, answer_room: int = 96, min_distance: int = 128, seed: int = 0,
) -> RecallSequences:
    """Cut `token_ids` (a prose stream) into sequences of `sequence_length` tokens, each with `facts`
    statements spliced in at random places at least `min_distance` tokens before the questions that
    recall them, which fill its last `answer_room` tokens."""
    if facts < 1:
        raise ValueError(f"facts must be at least 1 statement per sequence, got {facts!r}.")
    rng = random.Random(seed)
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    sequences, flags, cursor = [], [], 0
    while True:
        chosen = rng.sample(SUBJECTS, facts)
        values = [str(rng.randint(10 ** (digits - 1), 10**digits - 1)) for digits in (rng.randint(3, 7) for _ in chosen)]
        templates = [rng.choice(TEMPLATES) for _ in chosen]
        statements = [encode(" " + statement.format(subject=s, value=v) + " ") for (statement, _), s, v in zip(templates, chosen, values)]
        questions = encode("\n\n" + " ".join(question.format(subject=s, value=v) for (_, question), s, v in zip(templates, chosen, values)))
        if len(questions) > answer_room:
            raise ValueError(f"{facts} recall questions take {len(questions)} tokens, more than answer_room={answer_room}; ask for fewer facts.")
        statement_tokens = sum(map(len, statements))
        prose_length = sequence_length - len(questions) - statement_tokens
        if cursor + prose_length > len(token_ids):
            break
        prose = token_ids[cursor : cursor + prose_length].tolist()
        cursor += prose_length
        body_end = sequence_length - answer_room - statement_tokens - min_distance
        cuts = sorted(rng.sample(range(16, body_end), facts))
        pieces, marks, last = [], [], 0
        for cut, statement in zip(cuts, statements):
            pieces += prose[last:cut] + statement
            marks += [False] * (cut - last) + [True] * len(statement)
            last = cut
        sequences.append(torch.tensor(pieces + prose[last:] + questions))
        flags.append(torch.tensor(marks + [False] * (len(prose) - last + len(questions))))
    if not sequences:
        raise ValueError(
            f"Too little calibration text for recall sequences of {sequence_length} tokens; the text has {len(token_ids)} tokens. Give more "
            "text, or calibrate without recall statements (recall_facts=0; --recall-facts 0)."
        )
    return RecallSequences(torch.cat(sequences), torch.cat(flags))
