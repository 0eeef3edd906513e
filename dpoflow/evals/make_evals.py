"""Writes the forgetting-check tasks' data (dpoflow/evals/*.jsonl) from the fact tables and templates below.

Every item is written for this project; the answer is right by construction or taken from a small
table of well-known facts. Deterministic: re-running rewrites byte-identical files.
Each line: {"question", "choices", "answer"} (reading adds "passage"), `answer` indexes `choices`.

    python dpoflow/evals/make_evals.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent


def item(rng: random.Random, question: str, correct: str, wrong: list[str], n: int = 4, **extra) -> dict:
    """A shuffled multiple-choice item: the correct answer plus n-1 distinct distractors."""
    distractors = [w for w in dict.fromkeys(wrong) if w != correct]
    choices = [correct] + rng.sample(distractors, n - 1)
    rng.shuffle(choices)
    return {**extra, "question": question, "choices": choices, "answer": choices.index(correct)}


# --- knowledge ---------------------------------------------------------------------------------

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "Egypt": "Cairo", "Kenya": "Nairobi", "Canada": "Ottawa", "Australia": "Canberra",
    "Argentina": "Buenos Aires", "Peru": "Lima", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Austria": "Vienna",
    "Greece": "Athens", "Ireland": "Dublin", "Hungary": "Budapest", "Thailand": "Bangkok",
    "South Korea": "Seoul", "Turkey": "Ankara", "New Zealand": "Wellington", "Cuba": "Havana",
}

# (question, answer, distractors)
UNITS = [
    ("How many centimeters are in one meter?", "100", ["10", "1000", "60", "12"]),
    ("How many grams are in one kilogram?", "1000", ["100", "10", "60", "500"]),
    ("How many meters are in one kilometer?", "1000", ["100", "10", "500", "60"]),
    ("How many milliliters are in one liter?", "1000", ["100", "10", "500", "60"]),
    ("How many millimeters are in one centimeter?", "10", ["100", "1000", "12", "60"]),
    ("How many minutes are in one hour?", "60", ["100", "24", "30", "12"]),
    ("How many seconds are in one minute?", "60", ["100", "24", "30", "10"]),
    ("How many hours are in one day?", "24", ["12", "60", "7", "30"]),
    ("How many days are in one week?", "7", ["5", "10", "12", "24"]),
    ("How many months are in one year?", "12", ["10", "7", "24", "52"]),
    ("How many days are in a leap year?", "366", ["365", "360", "364", "300"]),
    ("How many years are in a decade?", "10", ["100", "12", "5", "1000"]),
    ("How many years are in a century?", "100", ["10", "1000", "50", "60"]),
    ("How many sides does a triangle have?", "3", ["4", "5", "6", "8"]),
    ("How many sides does a hexagon have?", "6", ["5", "7", "8", "4"]),
    ("How many sides does an octagon have?", "8", ["6", "7", "10", "5"]),
    ("How many legs does a spider have?", "8", ["6", "4", "10", "12"]),
    ("How many legs does an insect have?", "6", ["8", "4", "10", "2"]),
]

WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]

COLOR_MIXES = [("blue", "yellow", "green"), ("red", "yellow", "orange"), ("red", "blue", "purple"),
               ("red", "white", "pink"), ("black", "white", "gray")]
COLORS = ["green", "orange", "purple", "pink", "gray", "brown", "red", "blue", "yellow"]

OPPOSITES = {"hot": "cold", "up": "down", "big": "small", "wet": "dry", "early": "late", "open": "closed",
             "fast": "slow", "full": "empty", "old": "young", "happy": "sad", "loud": "quiet",
             "thick": "thin", "strong": "weak", "rich": "poor", "inside": "outside", "hard": "soft"}

SCIENCE = [
    ("At sea level, at what temperature in degrees Celsius does water boil?", "100", ["0", "50", "212"]),
    ("At what temperature in degrees Celsius does water freeze?", "0", ["100", "32", "-10"]),
    ("Which planet is closest to the Sun?", "Mercury", ["Venus", "Earth", "Mars"]),
    ("Which is the largest planet in the solar system?", "Jupiter", ["Saturn", "Earth", "Mars"]),
    ("Which planet is known as the red planet?", "Mars", ["Venus", "Jupiter", "Mercury"]),
    ("What is the chemical symbol for gold?", "Au", ["Ag", "Go", "Gd"]),
    ("What is the chemical symbol for iron?", "Fe", ["Ir", "In", "I"]),
    ("What is the chemical symbol for sodium?", "Na", ["So", "S", "Sd"]),
    ("What is the chemical formula of water?", "H2O", ["CO2", "O2", "NaCl"]),
    ("Which gas do plants take in from the air to make food?", "carbon dioxide", ["oxygen", "helium", "neon"]),
    ("Which is the largest ocean on Earth?", "Pacific", ["Atlantic", "Indian", "Arctic"]),
    ("What is the tallest mountain above sea level?", "Mount Everest", ["Mont Blanc", "Kilimanjaro", "Mount Fuji"]),
    ("Which organ pumps blood through the human body?", "the heart", ["the lungs", "the liver", "the stomach"]),
    ("What is frozen water called?", "ice", ["steam", "sand", "salt"]),
]


def knowledge(rng: random.Random) -> list[dict]:
    items = []
    cities = list(CAPITALS.values())
    for country, city in CAPITALS.items():
        items.append(item(rng, f"What is the capital of {country}?", city, cities))
    for q, a, wrong in UNITS:
        items.append(item(rng, q, a, wrong))
    for i in range(0, 7, 2):
        items.append(item(rng, f"Which day comes after {WEEKDAYS[i]}?", WEEKDAYS[(i + 1) % 7], WEEKDAYS))
    for i in range(1, 12, 3):
        items.append(item(rng, f"Which month comes after {MONTHS[i]}?", MONTHS[(i + 1) % 12], MONTHS))
        items.append(item(rng, f"Which month comes before {MONTHS[i]}?", MONTHS[i - 1], MONTHS))
    for a, b, mix in COLOR_MIXES:
        items.append(item(rng, f"Which color do you get by mixing {a} and {b} paint?", mix,
                          [c for c in COLORS if c not in (a, b)]))
    antonyms = list(OPPOSITES.values())
    for word, opposite in OPPOSITES.items():
        items.append(item(rng, f"What is the opposite of {word}?", opposite, antonyms))
    for q, a, wrong in SCIENCE:
        items.append(item(rng, q, a, wrong))
    return items


# --- arithmetic --------------------------------------------------------------------------------

def arithmetic(rng: random.Random) -> list[dict]:
    items = []
    for k in range(90):
        op = "+" if k % 2 == 0 else "*"
        a, b = (rng.randint(2, 49), rng.randint(2, 49)) if op == "+" else (rng.randint(2, 12), rng.randint(2, 12))
        correct = a + b if op == "+" else a * b
        # Near misses (off by one, off by ten, the other operation) so the answer has to be computed.
        near = {correct + 1, correct - 1, correct + 10, correct - 10, correct + 2, a * b if op == "+" else a + b}
        wrong = [str(n) for n in sorted(near) if n > 0 and n != correct]
        word = "plus" if op == "+" else "times"
        items.append(item(rng, f"What is {a} {word} {b}?", str(correct), wrong))
    return items


# --- reading -----------------------------------------------------------------------------------

NAMES = [("Maria", "she"), ("Tom", "he"), ("Aisha", "she"), ("Kenji", "he"), ("Lena", "she"), ("Omar", "he"),
         ("Sofia", "she"), ("Ravi", "he"), ("Nora", "she"), ("Pablo", "he")]
TOWNS = ["Riverton", "Oakfield", "Millbrook", "Stonehaven", "Lakeside", "Greenwood"]
TRANSPORT = ["bus", "train", "bicycle", "tram"]
SHOPS = [("market", ["apples", "fresh bread", "eggs", "tomatoes"]),
         ("library", ["a book about birds", "a map of the coast", "a book of poems", "a cookbook"])]
PETS = ["cat", "dog", "rabbit", "parrot", "goldfish"]
PET_NAMES = ["Biscuit", "Pepper", "Luna", "Max", "Coco"]


def reading(rng: random.Random) -> list[dict]:
    items = []
    for k, (name, pron) in enumerate(NAMES):
        town, ride = rng.choice(TOWNS), rng.choice(TRANSPORT)
        day = WEEKDAYS[k % 7]
        shop, goods = SHOPS[k % 2]
        thing = rng.choice(goods)
        pet, pet_name, color = rng.choice(PETS), rng.choice(PET_NAMES), rng.choice(COLORS)
        age = rng.randint(7, 15)
        passage = (f"{name} is {age} years old and lives in {town}. Every {day}, {pron} takes the {ride} to "
                   f"the {shop}, where {pron} usually gets {thing}. At home, {name} has a {color} {pet} "
                   f"called {pet_name}.")
        for q, a, wrong in [
            (f"Where does {name} live?", town, TOWNS),
            (f"On which day does {name} go to the {shop}?", day, WEEKDAYS),
            (f"How does {name} travel to the {shop}?", f"by {ride}", [f"by {t}" for t in TRANSPORT]),
            (f"What does {name} usually get at the {shop}?", thing, goods),
            (f"What kind of pet does {name} have?", f"a {pet}", [f"a {p}" for p in PETS]),
            (f"What is the name of {name}'s pet?", pet_name, PET_NAMES),
            (f"What color is {name}'s {pet}?", color, COLORS),
            (f"How old is {name}?", str(age), [str(n) for n in range(6, 17)]),
        ]:
            items.append(item(rng, q, a, wrong, passage=passage))
    return items


# --- instructions ------------------------------------------------------------------------------

WORDS = ["apple", "river", "window", "garden", "pencil", "rocket", "silver", "candle", "forest", "planet"]
ONE_WORD = [("What color is the sky on a clear day?", "Blue.", "The sky on a clear day is usually blue."),
            ("What animal barks?", "Dog.", "The animal that barks is a dog."),
            ("What do bees make?", "Honey.", "Bees make honey, which they store in their hives."),
            ("What is the opposite of day?", "Night.", "The opposite of day is night."),
            ("Which season comes after winter?", "Spring.", "The season that comes after winter is spring.")]
YES_NO = [("Is ice cold?", "Yes", "Yes, ice is cold because it is frozen water."),
          ("Can fish breathe air like people do?", "No", "No, most fish take oxygen from water with gills."),
          ("Is the Sun a star?", "Yes", "Yes, the Sun is the star at the center of our solar system."),
          ("Do cats lay eggs?", "No", "No, cats give birth to live kittens.")]
NUMBER_ONLY = [("How many days are in a week?", "7", "There are seven days in a week."),
               ("How many wheels does a bicycle have?", "2", "A bicycle has two wheels."),
               ("How many months are in a year?", "12", "A year has twelve months.")]
FRUITS = ["apple", "banana", "cherry", "grape", "mango", "pear", "plum", "peach"]


def instructions(rng: random.Random) -> list[dict]:
    items = []
    for q, good, verbose in ONE_WORD:
        items.append(item(rng, f"Answer in one word. {q}", good, [verbose, good.rstrip(".") + ", I think, but I am not sure.",
                                                                   "I cannot answer that."]))
    for q, good, verbose in YES_NO:
        other = "No" if good == "Yes" else "Yes"
        items.append(item(rng, f"Reply with only yes or no. {q}", good, [verbose, f"{good} and {other.lower()}.",
                                                                       "Maybe."]))
    for q, good, verbose in NUMBER_ONLY:
        items.append(item(rng, f"Answer with a number only. {q}", good, [verbose, f"About {good} or so.",
                                                                       "Many."]))
    for w in WORDS:
        items.append(item(rng, f"Write the word '{w}' in capital letters.", w.upper(),
                          [w, w.capitalize(), w.upper() + "!"]))
        items.append(item(rng, f"Repeat the word '{w}' exactly twice, separated by a space.", f"{w} {w}",
                          [w, f"{w} {w} {w}", f"{w}{w}"]))
        items.append(item(rng, f"Spell the word '{w}' backwards.", w[::-1], [w, w[1:] + w[0], w[::-1][1:] + w[-1]]))
        items.append(item(rng, f"Write the word '{w.upper()}' in lowercase letters.", w,
                          [w.upper(), w.capitalize(), w[0] + w[1:].upper()]))
    for k in range(2, 6):
        fruits = rng.sample(FRUITS, 6)
        items.append(item(rng, f"List exactly {k} fruits, separated by commas.", ", ".join(fruits[:k]),
                          [", ".join(fruits[:k - 1]), ", ".join(fruits[:k + 1]), " ".join(fruits[:k])]))
    for w in WORDS[:6]:
        items.append(item(rng, f"Write the word '{w}' followed by a period and nothing else.", f"{w}.",
                          [w, f"{w}!", f"The word is {w}."]))
    return items


TASKS = {"knowledge": knowledge, "arithmetic": arithmetic, "reading": reading, "instructions": instructions}


def write_all(out_dir: Path = HERE) -> dict[str, int]:
    """Write every task's JSONL into out_dir; returns {task: item count}."""
    counts = {}
    for name, build in TASKS.items():
        rows = build(random.Random(f"dpoflow-{name}"))  # a string seed: the same on every Python
        for r in rows:
            assert len(set(r["choices"])) == len(r["choices"]), r
        with open(out_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        counts[name] = len(rows)
    return counts


if __name__ == "__main__":
    for task, n in write_all().items():
        print(f"{task}: {n} items")
