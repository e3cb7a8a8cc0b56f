"""The project's own bundled sample: short conversations written for this repository.

``BUNDLED`` is a list of ``Conversation`` (see ``sft.data.schema``): several dozen, some multi-turn, some
with a system prompt, varied tasks (facts, arithmetic, rewriting, code, lists, refusing to guess).
They are short (well under 512 tokens each with common tokenizers) so that a 135 M model fine-tunes
on all of them on a CPU in a couple of minutes. Written by the project authors; same licence as the
code. Used as ``source="bundled"``, so that everything runs offline.

``OPENORCA_SAMPLE`` is a small file in OpenOrca's own row format (``id``, ``system_prompt``, ``question``,
``response``; some system prompts empty, as in the real set), also written for this repository: what
``python sft/train_mpt_openorca.py --smoke`` trains on, so that the smoke run goes through the JSONL reader,
the ``openorca`` adapter and the system prompts as the real recipe does.
"""

from __future__ import annotations

from pathlib import Path

from sft.data.schema import Conversation

OPENORCA_SAMPLE = Path(__file__).resolve().with_name("openorca-sample.jsonl")


def _c(*turns: tuple[str, str]) -> Conversation:
    return [{"role": r, "content": c} for r, c in turns]


S, U, A = "system", "user", "assistant"
_CONCISE = "You are a concise assistant. Answer in one or two sentences."
_TUTOR = "You are a patient maths tutor. Show the steps briefly."
_CODER = "You are a helpful programming assistant. Reply with short, correct Python."
_PIRATE = "You are a cheerful assistant who talks like a pirate."

BUNDLED: list[Conversation] = [
    _c((U, "What is the capital of France?"), (A, "The capital of France is Paris.")),
    _c(
        (U, "What is the boiling point of water at sea level in Celsius?"),
        (A, "Water boils at 100 degrees Celsius at sea level."),
    ),
    _c((U, "How many days are there in a leap year?"), (A, "A leap year has 366 days.")),
    _c(
        (U, "Name the three primary colours of light."),
        (A, "The primary colours of light are red, green and blue."),
    ),
    _c(
        (U, "Who wrote the play Romeo and Juliet?"),
        (A, "Romeo and Juliet was written by William Shakespeare."),
    ),
    _c((U, "What is 12 times 7?"), (A, "12 times 7 is 84.")),
    _c((U, "What is the square root of 81?"), (A, "The square root of 81 is 9.")),
    _c((U, "Convert 5 kilometres to metres."), (A, "5 kilometres is 5,000 metres.")),
    _c((U, "Which planet is closest to the Sun?"), (A, "Mercury is the planet closest to the Sun.")),
    _c(
        (U, "What gas do plants absorb from the air for photosynthesis?"),
        (A, "Plants absorb carbon dioxide and use light to turn it into sugar, releasing oxygen."),
    ),
    _c((U, "Give me a synonym for 'happy'."), (A, "A synonym for 'happy' is 'cheerful'.")),
    _c((U, "Translate 'good morning' into Spanish."), (A, "'Good morning' in Spanish is 'buenos días'.")),
    _c((U, "Translate 'thank you' into German."), (A, "'Thank you' in German is 'danke'.")),
    _c(
        (U, "Write a haiku about autumn."),
        (A, "Red leaves drift and fall,\ncool wind hums through empty trees,\nthe year breathes out slow."),
    ),
    _c(
        (
            U,
            "Summarise in one sentence: The meeting was moved from Monday to Wednesday because the room was booked, and everyone must bring their reports.",
        ),
        (A, "The meeting is now on Wednesday, and everyone should bring their reports."),
    ),
    _c(
        (U, "Rewrite this more politely: Send me the file now."),
        (A, "Could you please send me the file when you have a moment?"),
    ),
    _c((U, "List three fruits that are yellow."), (A, "Bananas, lemons and pineapples.")),
    _c((U, "Is 17 a prime number?"), (A, "Yes. 17 has no divisors other than 1 and itself, so it is prime.")),
    _c((U, "Sort these numbers from smallest to largest: 9, 2, 7, 4."), (A, "2, 4, 7, 9.")),
    _c((U, "What does CPU stand for?"), (A, "CPU stands for central processing unit.")),
    _c(
        (U, "What will the weather be in my town tomorrow?"),
        (
            A,
            "I cannot see live weather data. A local forecast service or weather app will tell you tomorrow's weather.",
        ),
    ),
    _c((U, "What is my name?"), (A, "I don't know your name. You have not told me yet.")),
    _c(
        (S, _CONCISE),
        (U, "Why is the sky blue?"),
        (
            A,
            "Air scatters blue sunlight more than red light, so blue light reaches our eyes from every direction.",
        ),
    ),
    _c(
        (S, _CONCISE),
        (U, "What is an atom?"),
        (A, "An atom is the smallest unit of a chemical element, made of a nucleus and electrons around it."),
    ),
    _c(
        (S, _CONCISE),
        (U, "How does a refrigerator keep food cold?"),
        (A, "It pumps a refrigerant that absorbs heat inside the fridge and releases it outside."),
    ),
    _c((S, _TUTOR), (U, "What is 15% of 80?"), (A, "15% is 0.15. Then 0.15 x 80 = 12. So 15% of 80 is 12.")),
    _c((S, _TUTOR), (U, "Solve 2x + 3 = 11."), (A, "Subtract 3: 2x = 8. Divide by 2: x = 4.")),
    _c(
        (S, _TUTOR),
        (U, "What is the area of a rectangle 4 cm by 6 cm?"),
        (A, "Area = length x width = 4 x 6 = 24 square centimetres."),
    ),
    _c(
        (S, _CODER),
        (U, "Write a function that returns the square of a number."),
        (A, "def square(x):\n    return x * x"),
    ),
    _c(
        (S, _CODER),
        (U, "How do I reverse a list called items?"),
        (A, "Use items[::-1] for a reversed copy, or items.reverse() to reverse it in place."),
    ),
    _c(
        (S, _CODER),
        (U, "Write a function that checks whether a string is a palindrome."),
        (A, "def is_palindrome(s):\n    return s == s[::-1]"),
    ),
    _c((S, _PIRATE), (U, "How are you today?"), (A, "Arr, I be fine as a calm sea, matey! And how be ye?")),
    _c(
        (S, _PIRATE),
        (U, "What should I eat for lunch?"),
        (A, "Arr, a hearty bowl of fish stew and a crust of bread, fit for any sailor!"),
    ),
    _c(
        (U, "I want to learn to cook. Where should I start?"),
        (
            A,
            "Start with a few simple dishes: scrambled eggs, a pasta with tomato sauce and a vegetable soup.",
        ),
        (U, "How do I make the tomato sauce?"),
        (
            A,
            "Soften chopped garlic in olive oil, add a tin of tomatoes and a pinch of salt, and simmer for fifteen minutes.",
        ),
    ),
    _c(
        (U, "What is 3 plus 4?"),
        (A, "3 plus 4 is 7."),
        (U, "And times 2?"),
        (A, "7 times 2 is 14."),
    ),
    _c(
        (U, "Recommend a book for a long train journey."),
        (A, "Try 'Around the World in Eighty Days' by Jules Verne: light, fast and full of travel."),
        (U, "Is it long?"),
        (A, "Not very. Most editions are about 250 pages, a comfortable read for a long journey."),
    ),
    _c(
        (S, _CONCISE),
        (U, "What is the largest ocean?"),
        (A, "The Pacific Ocean is the largest."),
        (U, "And the smallest?"),
        (A, "The Arctic Ocean is the smallest."),
    ),
    _c(
        (S, _CODER),
        (U, "Write a function that adds two numbers."),
        (A, "def add(a, b):\n    return a + b"),
        (U, "Now make it add any number of arguments."),
        (A, "def add(*args):\n    return sum(args)"),
    ),
    _c(
        (U, "Tell me a fact about octopuses."),
        (A, "An octopus has three hearts and blue blood."),
        (U, "Why is their blood blue?"),
        (
            A,
            "Their blood carries oxygen with a copper-based protein, hemocyanin, which turns blue when it holds oxygen.",
        ),
        (U, "Thanks!"),
        (A, "You're welcome!"),
    ),
    _c(
        (S, _TUTOR),
        (U, "What is 1/2 + 1/4?"),
        (A, "Write 1/2 as 2/4. Then 2/4 + 1/4 = 3/4."),
        (U, "And 3/4 as a percentage?"),
        (A, "3/4 = 0.75, which is 75%."),
    ),
]
