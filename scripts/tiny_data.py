"""Deterministic training text for the bundled ``command-r-tiny`` model (our own data, no downloads).

Three kinds of documents, all generated from small hand-written tables with a seeded ``random.Random``:

1. **Chat dialogues** in the Command-R turn format (rendered by the caller with the model's own
   ``default`` chat template): greetings, questions with templated answers, "repeat after me".
2. **Repeated spans**: word or digit sequences that occur twice, so that copying (induction) pays off.
   (Repeated *random token ids* are drawn directly in ``train_tiny.py``; they need no text.)
3. **Facts and arithmetic** as plain text, the things the notebooks probe: capitals, colours, animal
   sounds, opposites, ``3 + 4 = 7``, counting, days of the week.

Example::

    gen = TinyData(seed=0)
    gen.dialogue()   # [{"role": "user", "content": "What is the capital of France?"},
                     #  {"role": "assistant", "content": "The capital of France is Paris."}]
    gen.text()       # "The sky is blue. 3 + 4 = 7. ..."
"""

from __future__ import annotations

import random

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Egypt": "Cairo", "Canada": "Ottawa", "Russia": "Moscow", "China": "Beijing", "India": "Delhi",
    "Greece": "Athens", "Portugal": "Lisbon", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Poland": "Warsaw", "Austria": "Vienna", "Kenya": "Nairobi", "Peru": "Lima",
    "Chile": "Santiago", "Cuba": "Havana", "Turkey": "Ankara", "Belgium": "Brussels", "Denmark": "Copenhagen",
    "Hungary": "Budapest", "Thailand": "Bangkok", "Mexico": "Mexico City", "Argentina": "Buenos Aires",
    "England": "London", "Scotland": "Edinburgh", "Australia": "Canberra", "Brazil": "Brasilia",
}
COLOURS = {
    "sky": "blue", "grass": "green", "banana": "yellow", "snow": "white", "coal": "black", "tomato": "red",
    "lemon": "yellow", "sea": "blue", "leaf": "green", "cherry": "red", "milk": "white", "night": "black",
    "carrot": "orange", "pumpkin": "orange", "strawberry": "red", "frog": "green", "sun": "yellow",
    "cloud": "white", "crow": "black", "plum": "purple", "grape": "purple", "chocolate": "brown",
}
SOUNDS = {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "pig": "oink",
          "horse": "neigh", "owl": "hoot", "lion": "roar", "bee": "buzz", "mouse": "squeak"}
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "day": "night",
             "old": "new", "open": "closed", "light": "dark", "early": "late", "high": "low", "wet": "dry",
             "full": "empty", "left": "right", "hard": "soft", "loud": "quiet", "rich": "poor", "black": "white"}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack", "Kate",
         "Leo", "Mia", "Noah", "Olivia", "Paul", "Rosa", "Sam", "Tara", "Victor"]
WORDS = (
    "apple river stone cloud garden window bread chair music forest candle mirror paper silver summer winter "
    "yellow purple bottle ticket pencil rocket island castle dragon wizard pirate planet ocean desert valley "
    "bridge tower market street coffee butter cookie orange lemon tiger rabbit turtle monkey spider eagle "
    "whale shark horse camel zebra piano guitar violin drum flute doctor farmer baker sailor painter "
    "teacher student friend mother father sister brother king queen prince village city country moon star "
    "snow rain wind storm fire water earth metal glass wood gold iron salt sugar honey cheese pepper rice "
    "soup cake pizza table door house school office train plane boat bike car road map book letter story "
    "song dance game ball kite lamp clock phone camera button pocket jacket shirt shoe hat ring box bag "
    "cup plate fork spoon knife bowl basket blanket pillow carpet wall roof floor green blue red white black "
    "small large quick quiet bright dark happy brave calm clever gentle proud soft warm cold old young new"
).split()

SYSTEM_PROMPTS = [
    "You are a helpful assistant.", "You are a friendly assistant. Answer briefly.",
    "You are a tiny model. Keep answers short.", "Answer the user's questions.",
]
GREETINGS = [
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi", "Hi! How can I help you today?"),
    ("Hello, how are you?", "I am fine, thank you. How can I help you?"),
    ("Hi, how are you?", "I am fine, thank you. How can I help you?"),
    ("How are you?", "I am fine, thank you. How can I help you?"),
    ("Good morning!", "Good morning! How can I help you today?"),
    ("Good evening", "Good evening! How can I help you today?"),
    ("Hey there", "Hello! How can I help you today?"),
    ("Who are you?", "I am a tiny assistant model. I can answer simple questions."),
    ("What is your name?", "I am a tiny assistant model. I can answer simple questions."),
]
CLOSINGS = [
    ("Thank you!", "You are welcome!"), ("Thanks", "You are welcome!"),
    ("Thank you very much.", "You are welcome!"), ("Goodbye", "Goodbye! Have a nice day."),
    ("Bye!", "Goodbye! Have a nice day."), ("That is all.", "Goodbye! Have a nice day."),
]


class TinyData:
    """A seeded stream of documents; the same seed always gives the same documents in the same order."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)

    # ---------------------------------------------------------------- question/answer pairs
    def qa(self) -> tuple[str, str]:
        """One templated question and its answer."""
        r = self.rng
        kind = r.randrange(7)
        if kind == 0:
            country, city = r.choice(sorted(CAPITALS.items()))
            q = r.choice([f"What is the capital of {country}?", f"What's the capital of {country}?",
                          f"Tell me the capital of {country}.", f"Which city is the capital of {country}?"])
            return q, f"The capital of {country} is {city}."
        if kind == 1:
            thing, colour = r.choice(sorted(COLOURS.items()))
            q = r.choice([f"What colour is the {thing}?", f"What color is the {thing}?",
                          f"Which colour is the {thing}?"])
            return q, f"The {thing} is {colour}."
        if kind == 2:
            a, b = r.randrange(10), r.randrange(10)
            if r.random() < 0.7:
                q = r.choice([f"What is {a} + {b}?", f"What is {a} plus {b}?", f"Compute {a} + {b}.",
                              f"How much is {a} + {b}?"])
                return q, f"{a} + {b} = {a + b}."
            a, b = max(a, b), min(a, b)
            q = r.choice([f"What is {a} - {b}?", f"What is {a} minus {b}?"])
            return q, f"{a} - {b} = {a - b}."
        if kind == 3:
            animal, sound = r.choice(sorted(SOUNDS.items()))
            q = r.choice([f"What does a {animal} say?", f"What sound does a {animal} make?"])
            return q, f"A {animal} says {sound}."
        if kind == 4:
            word, opposite = r.choice(sorted(OPPOSITES.items()))
            if r.random() < 0.5:
                word, opposite = opposite, word
            q = r.choice([f"What is the opposite of {word}?", f"What's the opposite of {word}?"])
            return q, f"The opposite of {word} is {opposite}."
        if kind == 5:
            i = r.randrange(7)
            q = r.choice([f"What day comes after {DAYS[i]}?", f"Which day is after {DAYS[i]}?"])
            return q, f"After {DAYS[i]} comes {DAYS[(i + 1) % 7]}."
        words = " ".join(r.choice(WORDS) for _ in range(r.randint(2, 7)))
        q = r.choice([f"Repeat after me: {words}", f"Please repeat: {words}", f"Say this back: {words}"])
        return q, words

    # ---------------------------------------------------------------- chat
    def dialogue(self) -> list[dict]:
        """1-3 exchanges, sometimes with a system message, sometimes opened by a greeting or closed by thanks."""
        r = self.rng
        messages = []
        if r.random() < 0.25:
            messages.append({"role": "system", "content": r.choice(SYSTEM_PROMPTS)})
        pairs = []
        if r.random() < 0.35:
            pairs.append(r.choice(GREETINGS))
        pairs += [self.qa() for _ in range(r.choice([1, 1, 1, 2, 2, 3]))]
        if r.random() < 0.2:
            pairs.append(r.choice(CLOSINGS))
        if r.random() < 0.15:
            pairs = [r.choice(GREETINGS)]
        for user, assistant in pairs:
            if r.random() < 0.05:  # stray whitespace: the template strips it
                user = " " + user + "\n"
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return messages

    # ---------------------------------------------------------------- plain text
    def fact(self) -> str:
        r = self.rng
        kind = r.randrange(6)
        if kind == 0:
            country, city = r.choice(sorted(CAPITALS.items()))
            return r.choice([f"The capital of {country} is {city}.", f"{city} is the capital of {country}."])
        if kind == 1:
            thing, colour = r.choice(sorted(COLOURS.items()))
            return f"The {thing} is {colour}."
        if kind == 2:
            a, b = r.randrange(10), r.randrange(10)
            return f"{a} + {b} = {a + b}." if r.random() < 0.7 else f"{max(a, b)} - {min(a, b)} = {abs(a - b)}."
        if kind == 3:
            animal, sound = r.choice(sorted(SOUNDS.items()))
            return f"A {animal} says {sound}."
        if kind == 4:
            word, opposite = r.choice(sorted(OPPOSITES.items()))
            return f"The opposite of {word} is {opposite}."
        seq = r.choice([DAYS, MONTHS, NUMBER_WORDS, [str(i) for i in range(1, 21)]])
        start = r.randrange(len(seq) - 3)
        return " ".join(seq[start:start + r.randint(3, 7)])

    def repeated_span(self) -> str:
        """A random word (or digit) sequence that occurs twice, sometimes with a lead-in and a gap."""
        r = self.rng
        if r.random() < 0.3:
            span = " ".join(str(r.randrange(10)) for _ in range(r.randint(4, 12)))
            name = r.choice(NAMES)
            return f"{name}'s code is {span}. I repeat, {name}'s code is {span}."
        span = " ".join(r.choice(WORDS + NAMES) for _ in range(r.randint(4, 16)))
        gap = r.choice(["", " ", " and again: ", ". Once more: ", "\n", " | "])
        return f"{span}{gap}{span}"

    def text(self) -> str:
        """A short paragraph mixing facts and repeated spans."""
        r = self.rng
        parts = [self.repeated_span() if r.random() < 0.3 else self.fact() for _ in range(r.randint(1, 5))]
        return r.choice([" ", "\n"]).join(parts)

    def story(self) -> str:
        """Two names introduced and reused: '... Alice gave the book to Bob. Bob ...' (name-moving / IOI-style)."""
        r = self.rng
        a, b = r.sample(NAMES, 2)
        thing = r.choice(WORDS)
        place = r.choice(["the market", "the school", "the garden", "the station", "the park"])
        return f"{a} and {b} went to {place}. {a} gave a {thing} to {b}."

    def tokenizer_corpus(self, n: int) -> list[str]:
        """Texts to train the BPE on: every kind of document, chat contents included."""
        out = []
        for _ in range(n):
            k = self.rng.randrange(4)
            if k == 0:
                out += [m["content"] for m in self.dialogue()]
            elif k == 1:
                out.append(self.text())
            elif k == 2:
                out.append(self.story())
            else:
                out.append(self.repeated_span())
        return out
