"""Long-context tasks generated from real prose: statements hidden in a haystack, a question after it.

Every task hides short statements at relative depths of a haystack of held-out prose; the context
is fed (and compressed) *before* the question arrives, so a cache cannot know which statements will
be asked for. A prompt is scored by the share of its expected answers that the greedy answer
contains.

* ``passkey``: one five-digit pass key (the evaluator's task, `calibration.evaluate.passkey_context`).
* ``passkey_heldout``: one number in other wordings and formats (`PHRASINGS`): a door code, an account
  number in a form, a JSON record, a quoted confirmation code. Neither the evaluator's wording nor the
  recall statements that calibrate the gates (`kvcompress.calibration.recall`): a cache that only
  learned one phrasing fails here.
* ``multikey``: several "special magic numbers", each for its own word, spread over the context;
  the question asks for one of them, so the others are distractors (RULER's multi-key needle).
* ``variables``: a chain of assignments ``VAR A = 12345``, ``VAR B = VAR A``, ... spread over the
  context; the question asks for every variable that holds the value, which are only found by
  following each link (RULER's variable tracking; scored by the share of names the answer lists).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

TASKS = ("passkey", "passkey_heldout", "multikey", "variables")
PHRASINGS = (  # (intro, statement, question) with {value}: wordings and formats that calibration and tuning never saw
    ("Below is a long text. A door code is mentioned somewhere in it.\n\n",
     "\n\nTo open the back door of the museum, type {value} on the keypad.\n\n",
     "\n\nWhich number opens the back door of the museum? The keypad code is"),
    ("Here is a document. Read it carefully.\n\n",
     "\n\nCustomer form -- Name: Ada Fischer; Account no.: {value}; Status: active.\n\n",
     "\n\nQuestion: what is Ada Fischer's account number? Answer: Ada Fischer's account number is"),
    ("The following text contains a data record.\n\n",
     '\n\n{{"shipment": "north-17", "tracking": "{value}", "carrier": "rail"}}\n\n',
     "\n\nLook up the record above. The tracking value of shipment north-17 is"),
    ("Read the text below; someone reads out a confirmation number in it.\n\n",
     '\n\nThe clerk said: "Your confirmation number is {value}, please keep it safe."\n\n',
     "\n\nWhat confirmation number did the clerk read out? The clerk read out"),
)
WORDS = ("apple", "river", "candle", "forest", "violin", "harbor", "pepper", "saddle", "lantern", "meadow", "copper", "falcon")


@dataclass(frozen=True)
class Prompt:
    task: str
    context: str
    question: str
    answers: tuple[str, ...]
    depth: float | None = None  # where the (first) statement sits, for tasks with one


def score(prompt: Prompt, answer: str) -> float:
    """Share of the prompt's expected answers that the generated answer contains."""
    return sum(expected in answer for expected in prompt.answers) / len(prompt.answers)


def hide(tokenizer, haystack_ids: list[int], context_tokens: int, intro: str, statements: list[tuple[float, str]], question: str, offset: int = 0) -> str:
    """`intro`, then about `context_tokens - len(question)` tokens of prose with each (depth, statement) inserted at its depth."""
    fixed = len(tokenizer(intro + "".join(text for _, text in statements) + question).input_ids)
    room = context_tokens - fixed
    if room <= 0 or offset + room > len(haystack_ids):
        raise ValueError(f"Cannot build a {context_tokens}-token prompt from {len(haystack_ids)} haystack tokens at offset {offset}.")
    hay = haystack_ids[offset : offset + room]
    pieces, start = [intro], 0
    for depth, text in sorted(statements):
        cut = int(len(hay) * depth)
        pieces += [tokenizer.decode(hay[start:cut]), text]
        start = cut
    return "".join(pieces + [tokenizer.decode(hay[start:])])


def heldout_passkey_prompts(tokenizer, haystack_ids: list[int], context_tokens: int, depths: tuple[float, ...], seed: int = 0) -> list[Prompt]:
    """One prompt per (phrasing of `PHRASINGS`, depth): a five- to seven-digit number stated once, asked for at the end."""
    rng = random.Random(seed + 2)
    prompts = []
    for intro, statement, question in PHRASINGS:
        for depth in depths:
            value = str(rng.randint(10_000, 9_999_999))
            offset = len(prompts) * context_tokens % max(1, len(haystack_ids) - context_tokens)
            context = hide(tokenizer, haystack_ids, context_tokens, intro, [(depth, statement.format(value=value))], question, offset=offset)
            prompts.append(Prompt("passkey_heldout", context, question, (value,), depth))
    return prompts


def multikey_prompts(tokenizer, haystack_ids: list[int], context_tokens: int, trials: int, keys: int = 4, seed: int = 0) -> list[Prompt]:
    """`trials` prompts with `keys` word/number statements each; trial t asks for key t mod `keys`."""
    rng = random.Random(seed)
    intro = "Below is a long text with some special magic numbers hidden in it. Memorize them; you will be asked about one of them.\n\n"
    prompts = []
    for trial in range(trials):
        words = rng.sample(WORDS, keys)
        numbers = [str(rng.randint(1_000_000, 9_999_999)) for _ in words]
        depths = [(index + 0.5) / keys for index in range(keys)]
        statements = [(depth, f"\n\nOne of the special magic numbers for {word} is: {number}.\n\n") for depth, word, number in zip(depths, words, numbers)]
        asked = trial % keys
        question = f"\n\nWhat is the special magic number for {words[asked]} mentioned in the text above? The special magic number for {words[asked]} is:"
        context = hide(tokenizer, haystack_ids, context_tokens, intro, statements, question, offset=trial * context_tokens % max(1, len(haystack_ids) - context_tokens))
        prompts.append(Prompt("multikey", context, question, (numbers[asked],), depths[asked]))
    return prompts


def variables_prompts(tokenizer, haystack_ids: list[int], context_tokens: int, trials: int, hops: int = 2, seed: int = 0) -> list[Prompt]:
    """`trials` prompts, each a chain of `hops` assignments starting from a five-digit value; the answers are the variables."""
    rng = random.Random(seed + 1)
    intro = "Below is a long text with variable assignments hidden in it. Keep track of every variable; you will be asked for a value.\n\n"
    prompts = []
    for trial in range(trials):
        names = ["".join(rng.choices(string.ascii_uppercase, k=5)) for _ in range(hops)]
        value = str(rng.randint(10000, 99999))
        links = [f"VAR {names[0]} = {value}."] + [f"VAR {name} = VAR {previous}." for previous, name in zip(names, names[1:])]
        depths = [0.1 + 0.8 * index / max(1, hops - 1) for index in range(hops)]
        statements = [(depth, f"\n\n{link}\n\n") for depth, link in zip(depths, links)]
        question = (
            f"\n\nQuestion: find all variables that are assigned the value {value} in the text above. Answer: according to the chain of "
            f"variable assignments in the text above, {hops} variables are assigned the value {value}, they are: VAR"
        )
        context = hide(tokenizer, haystack_ids, context_tokens, intro, statements, question, offset=trial * context_tokens % max(1, len(haystack_ids) - context_tokens))
        prompts.append(Prompt("variables", context, question, tuple(names), depths[0]))
    return prompts
