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


# ----------------------------------------------------------------------------------------- grounded answering
# Facts about people, one short sentence each, for retrieval-augmented conversations in the ``rag`` template.
# Every value is one token of the tiny tokenizer, so a grounded answer copies it whole.
RAG_ATTRIBUTES = {
    # topic: (values, sentence, questions)
    "home": ([c for c in CAPITALS.values() if " " not in c], "{name} lives in {value}",
             ["Where does {name} live?", "Which city does {name} live in?"]),
    "job": (["doctor", "farmer", "baker", "sailor", "painter", "teacher", "student", "pirate", "wizard",
             "king", "queen", "prince"], "{name} is a {value}",
            ["What is {name}'s job?", "What does {name} do?"]),
    "pet": (["cat", "dog", "duck", "sheep", "pig", "horse", "owl", "lion", "bee", "mouse", "rabbit", "turtle",
             "tiger", "monkey", "spider", "eagle", "camel", "zebra"], "{name} has a pet {value}",
            ["What pet does {name} have?", "Which animal does {name} keep?"]),
    "colour": (sorted(set(COLOURS.values())), "{name} likes the colour {value}",
               ["Which colour does {name} like?", "What is {name}'s favourite colour?"]),
    "food": (["bread", "rice", "soup", "cake", "pizza", "cheese", "honey", "butter", "cookie", "apple", "lemon",
              "sugar", "pepper"], "{name} eats {value} every day",
             ["What does {name} eat?", "What food does {name} eat every day?"]),
    "music": (["piano", "guitar", "violin", "drum", "flute"], "{name} plays the {value}",
              ["What does {name} play?", "Which instrument does {name} play?"]),
}
RAG_ABOUT = ["Tell me about {name}.", "What do you know about {name}?", "Who is {name}?"]


def rag_response(relevant: list[int], claims: list[tuple[str, list[int]]]) -> str:
    """The ``rag`` template's expected reply: relevant and cited document numbers, a plain answer, and a
    grounded answer that wraps each claim in Command-R's citation markup (``<co: 0,2>claim</co: 0,2>``).

    Example::

        rag_response([1], [("Alice lives in Paris", [1])])
        # 'Relevant Documents: 1\\nCited Documents: 1\\nAnswer: Alice lives in Paris.\\n'
        # 'Grounded answer: <co: 1>Alice lives in Paris</co: 1>.'
    """
    docs = ",".join(str(i) for i in relevant) if relevant else "None"
    cited = sorted({i for _, c in claims for i in c})
    cited_s = ",".join(str(i) for i in cited) if cited else "None"
    answer = " ".join(f"{text}." for text, _ in claims)
    grounded = " ".join(f"<co: {','.join(map(str, c))}>{text}</co: {','.join(map(str, c))}>." for text, c in claims)
    return f"Relevant Documents: {docs}\nCited Documents: {cited_s}\nAnswer: {answer}\nGrounded answer: {grounded}"


class RagData:
    """Seeded retrieval-augmented conversations: 3-5 short documents about people, a question whose answer
    is in exactly one document (or two: two facts about the person, or the same fact twice), and the
    grounded reply that copies the fact and cites its document(s).

    Example::

        ex = RagData(seed=0).example()
        ex["messages"]   # [{"role": "user", "content": "Where does Alice live?"}]
        ex["documents"]  # [{"title": "Bob's job", "text": "Bob is a baker."}, {"title": "Alice's home", ...}, ...]
        ex["response"]   # "Relevant Documents: 1\\nCited Documents: 1\\nAnswer: Alice lives in Paris.\\n..."
        ex["sources"]    # [1]: the documents the answer comes from
        ex["facts"]      # ["Paris"]: the copied values
    """

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)

    def _fact(self, name: str, topic: str) -> tuple[str, str]:
        values, sentence, _ = RAG_ATTRIBUTES[topic]
        value = self.rng.choice(values)
        return sentence.format(name=name, value=value), value

    def _document(self, name: str, topics: list[str], facts: dict | None = None) -> tuple[dict, dict]:
        """A document about ``name``: one sentence per topic; ``facts`` fixes values already chosen."""
        facts = dict(facts or {})
        sentences = []
        for topic in topics:
            if topic not in facts:
                facts[topic] = self._fact(name, topic)
            sentences.append(facts[topic][0] + ".")
        title = f"{name}'s {topics[0]}" if self.rng.random() < 0.7 else name
        return {"title": title, "text": " ".join(sentences)}, facts

    def example(self) -> dict:
        r = self.rng
        n_docs = r.randint(3, 5)
        names = r.sample(NAMES, n_docs)
        person, others = names[0], names[1:]
        topics = sorted(RAG_ATTRIBUTES)
        kind = r.random()
        if kind < 0.6:                                     # one document holds the answer
            asked = r.choice(topics)
            extra = [r.choice([t for t in topics if t != asked])] if r.random() < 0.4 else []
            doc, facts = self._document(person, r.sample([asked] + extra, len(extra) + 1))
            slots = [r.randrange(n_docs)]
            target = [(doc, slots)]
            claims = [(facts[asked][0], slots)]
            values = [facts[asked][1]]
            question = r.choice(RAG_ATTRIBUTES[asked][2]).format(name=person)
        elif kind < 0.85:                                  # two documents, one fact each
            t1, t2 = r.sample(topics, 2)
            slots = sorted(r.sample(range(n_docs), 2))
            d1, f1 = self._document(person, [t1])
            d2, f2 = self._document(person, [t2])
            target = [(d1, [slots[0]]), (d2, [slots[1]])]
            claims = [(f1[t1][0], [slots[0]]), (f2[t2][0], [slots[1]])]
            values = [f1[t1][1], f2[t2][1]]
            question = r.choice(RAG_ABOUT).format(name=person)
            others = others[1:] + [r.choice([n for n in NAMES if n not in names])]
        else:                                              # the same fact in two documents
            asked = r.choice(topics)
            slots = sorted(r.sample(range(n_docs), 2))
            d1, f1 = self._document(person, [asked])
            d2, _ = self._document(person, [asked], f1)
            target = [(d1, [slots[0]]), (d2, [slots[1]])]
            claims = [(f1[asked][0], slots)]
            values = [f1[asked][1]]
            question = r.choice(RAG_ATTRIBUTES[asked][2]).format(name=person)
            others = others[1:] + [r.choice([n for n in NAMES if n not in names])]
        documents: list = [None] * n_docs
        for doc, where in target:
            documents[where[0]] = doc
        free = iter(others)
        for i in range(n_docs):
            if documents[i] is None:
                documents[i], _ = self._document(next(free), r.sample(topics, r.choice([1, 1, 2])))
        sources = sorted({i for _, c in claims for i in c})
        return {"messages": [{"role": "user", "content": question}], "documents": documents,
                "response": rag_response(sources, claims), "sources": sources, "facts": values}

    def mini(self) -> tuple[str, str]:
        """A short plain-text drill of the same skill (~100 tokens): numbered one-line documents, then a question,
        the relevant document(s) and the answer copied from them (returned as (documents, rest))."""
        ex = self.example()
        lines = [f"Document: {i}\ntext: {d['text']}" for i, d in enumerate(ex["documents"])]
        answer = ex["response"].split("Answer: ", 1)[1].split("\n", 1)[0]
        docs = ",".join(map(str, ex["sources"]))
        return "\n".join(lines), f"\nQuestion: {ex['messages'][0]['content']}\nRelevant Documents: {docs}\nAnswer: {answer}\n"
