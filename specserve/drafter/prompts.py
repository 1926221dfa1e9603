"""Synthetic chat prompts for self-distillation (none come from the benchmark sets).

Prompts are built programmatically: topics x instruction templates over several
categories (writing, roleplay, reasoning, math word problems with random numbers,
coding, extraction, STEM, humanities, translation, summarisation of docstrings
shipped with installed Python modules, QA). Deterministic for a given seed.
"""

from __future__ import annotations

import importlib
import random

TOPICS = """the water cycle; photosynthesis; black holes; the French Revolution; climate change; machine learning;
the human heart; volcanoes; the Roman Empire; renewable energy; coffee; chess; the stock market; vaccines;
the internet; honeybees; the moon landing; electric cars; meditation; the printing press; quantum computing;
rainforests; inflation; the Great Wall of China; sleep; jazz music; plate tectonics; democracy; recycling;
the immune system; ancient Egypt; social media; time management; the solar system; DNA; earthquakes;
the Industrial Revolution; friendship; public transport; volunteering; marathon training; gardening; bread baking;
cybersecurity; the ocean; dinosaurs; the Renaissance; smartphones; healthy eating; remote work; hiking safety;
the history of mathematics; artificial intelligence ethics; space exploration; coral reefs; the Olympic Games;
learning a new language; budgeting; the camera; electricity; magnetism; gravity; antibiotics; urban planning;
the Silk Road; wolves; tea ceremonies; origami; video games; minimalism; public speaking; the theory of evolution;
nuclear power; the Amazon river; penguins; the piano; mountain climbing; cloud computing; blockchain; painting;
poetry; the Cold War; bicycles; desert ecosystems; migration of birds; the periodic table; rainbows; tsunamis;
job interviews; customer service; small business marketing; the history of writing; libraries; robots;
self-driving cars; wind turbines; the brain; memory; habits; happiness; volunteering abroad; pets; cats; dogs;
the Moon; Mars; Jupiter; the Sun; glaciers; soil; agriculture; fast fashion; architecture; bridges; trains;
airplanes; submarines; the human skeleton; nutrition; vitamins; exercise; yoga; stress; teamwork; leadership""".replace(
    "\n", " "
)

TEMPLATES = {
    "writing": [
        "Write a short blog post about {t}.",
        "Write a persuasive essay arguing why people should learn about {t}.",
        "Write a poem about {t}.",
        "Write a short story that involves {t}.",
        "Write a product description for a fictional gadget related to {t}.",
        "Draft an email to a friend telling them what you learned about {t}.",
        "Write a speech for a school assembly about {t}.",
        "Write a haiku and then explain it, on the subject of {t}.",
    ],
    "roleplay": [
        "Pretend you are a tour guide. Describe {t} to a group of tourists.",
        "You are a teacher. Explain {t} to a class of ten-year-olds.",
        "Act as a news reporter giving a breaking-news report about {t}.",
        "Imagine you are a scientist being interviewed about {t}. Answer the first question: why does it matter?",
        "You are a pirate captain. Tell your crew about {t}.",
    ],
    "explain": [
        "Explain {t} in simple terms.",
        "What are the main facts everyone should know about {t}?",
        "Give me a list of five interesting facts about {t}.",
        "What are the advantages and disadvantages of {t}?",
        "How does {t} affect everyday life?",
        "Summarize the history of {t} in a few paragraphs.",
        "What is {t}? Give a clear definition and an example.",
        "Compare {t} with {u}. How are they similar and different?",
        "What are common misconceptions about {t}?",
        "Write a step-by-step guide for a beginner who wants to learn about {t}.",
        "Create a quiz with three questions about {t}, with answers.",
        "Give me tips for teaching children about {t}.",
    ],
    "reasoning": [
        "If {t} suddenly disappeared, what would happen? Think step by step.",
        "Why might someone disagree with the importance of {t}? Give reasons.",
        "What questions would you ask an expert on {t}?",
        "Make a plan for a one-week project on {t}.",
    ],
}

CODE_TASKS = """reverses a string; checks whether a number is prime; computes the factorial of n; returns the n-th Fibonacci number;
sorts a list with bubble sort; finds the maximum value in a list; counts the vowels in a string; checks if a string is a palindrome;
merges two sorted lists; removes duplicates from a list; computes the average of a list of numbers; converts Celsius to Fahrenheit;
finds the greatest common divisor of two numbers; flattens a nested list; counts word frequencies in a text; implements binary search;
checks whether two strings are anagrams; returns the sum of the digits of a number; transposes a matrix; validates an email address;
reads a CSV file and prints each row; generates all permutations of a list; computes the square root with Newton's method;
implements a stack class with push and pop; finds the second largest number in a list; converts a decimal number to binary;
capitalizes the first letter of each word; finds common elements of two lists; computes the power set of a set;
parses a date string and returns the weekday; implements a simple queue; calculates compound interest""".replace("\n", " ")
LANGS = ["Python", "Python", "Python", "JavaScript", "C", "Java", "Rust", "Go", "C++", "SQL"]
CODE_TEMPLATES = [
    "Write a {lang} function that {task}.",
    "Write a {lang} function that {task}. Include comments.",
    "How do I write a program in {lang} that {task}? Explain the code.",
    "Write a {lang} function that {task}, and give an example of using it.",
]

NAMES = ["Tom", "Maria", "Ali", "Sara", "John", "Mei", "Lucas", "Priya", "Omar", "Emma", "Kenji", "Zoe"]
ITEMS = ["apples", "books", "pencils", "marbles", "cookies", "stickers", "cards", "eggs", "flowers", "coins"]


def math_problem(rng: random.Random) -> str:
    a, b, c = rng.randint(2, 60), rng.randint(2, 40), rng.randint(2, 12)
    n1, n2 = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    price = rng.randint(2, 25)
    forms = [
        f"{n1} has {a} {item}. {n2} gives {n1} {b} more, then {n1} gives away {c}. How many {item} does {n1} have now?",
        f"A shop sells {item} for ${price} each. {n1} buys {c} and pays with a ${price * c + b} bill. How much change does {n1} get?",
        f"{n1} reads {c} pages a day. How many days does it take to read a book with {a * c} pages?",
        f"A train travels at {a} km per hour for {c} hours. How far does it travel?",
        f"{n1} saves ${b} every week. How much money does {n1} have after {c} weeks if {n1} started with ${a}?",
        f"There are {a} students in a class and {b}% of them wear glasses. About how many students wear glasses?",
        f"A rectangle is {a} cm long and {b} cm wide. What are its area and perimeter?",
        f"Solve for x: {c}x + {a} = {c * b + a}.",
        f"What is {a} times {b}, plus {c}? Show your work.",
        f"{n1} and {n2} share {a * 2} {item} equally. Then {n2} eats {min(c, a)} of them. How many does {n2} have left?",
    ]
    return rng.choice(forms) + rng.choice(["", " Explain step by step.", " Think step by step."])


def docstring_texts(rng: random.Random, limit: int = 400) -> list[str]:
    """Docstrings of standard-library modules and functions installed on this machine."""
    texts: list[str] = []
    for name in ["json", "random", "os", "re", "math", "collections", "itertools", "functools", "pathlib", "string",
                 "datetime", "statistics", "textwrap", "heapq", "bisect", "shutil", "csv", "argparse", "logging",
                 "subprocess", "threading", "urllib.parse", "http.client", "email", "sqlite3", "decimal", "fractions"]:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        for obj in [mod, *[getattr(mod, a, None) for a in dir(mod) if not a.startswith("_")]]:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and 200 <= len(doc) <= 1500 and doc not in texts:
                texts.append(doc.strip())
    rng.shuffle(texts)
    return texts[:limit]


DOC_TEMPLATES = [
    "Summarize the following text in two sentences:\n\n{d}",
    "Explain what this documentation means in plain English:\n\n{d}",
    "Extract the key points from this text as a bulleted list:\n\n{d}",
    "Write three questions a student might ask about this text:\n\n{d}",
]

SENTENCES = ["The weather is beautiful today.", "Where is the nearest train station?", "I would like a cup of coffee, please.",
             "Learning new things every day keeps the mind sharp.", "The meeting has been moved to Thursday afternoon.",
             "My brother plays the guitar in a small band.", "Please remember to turn off the lights.",
             "The museum is closed on Mondays.", "We are going to the beach this weekend.", "This book changed my life."]
TARGET_LANGS = ["French", "Spanish", "German", "Italian", "Portuguese"]

SHORT_QA = ["What is the capital of {c}?", "Tell me about the culture of {c}.", "What is the population of {c} roughly?",
            "What are famous foods from {c}?", "What language is spoken in {c}?"]
COUNTRIES = ["France", "Japan", "Brazil", "Kenya", "Canada", "India", "Egypt", "Mexico", "Germany", "Australia", "Peru",
             "Norway", "Vietnam", "Italy", "Spain", "Morocco", "Chile", "Greece", "Turkey", "Thailand"]


def make_prompts(n: int, seed: int = 0) -> list[str]:
    """n distinct prompts, mixed across categories."""
    rng = random.Random(seed)
    topics = [t.strip() for t in TOPICS.split(";") if t.strip()]
    tasks = [t.strip() for t in CODE_TASKS.split(";") if t.strip()]
    docs = docstring_texts(rng)
    makers = [
        (30, lambda: rng.choice(TEMPLATES["writing"] + TEMPLATES["roleplay"]).format(t=rng.choice(topics))),
        (35, lambda: rng.choice(TEMPLATES["explain"] + TEMPLATES["reasoning"]).format(t=rng.choice(topics), u=rng.choice(topics))),
        (12, lambda: math_problem(rng)),
        (12, lambda: rng.choice(CODE_TEMPLATES).format(lang=rng.choice(LANGS), task=rng.choice(tasks))),
        (5, lambda: rng.choice(DOC_TEMPLATES).format(d=rng.choice(docs)) if docs else math_problem(rng)),
        (3, lambda: f"Translate into {rng.choice(TARGET_LANGS)}: {rng.choice(SENTENCES)}"),
        (3, lambda: rng.choice(SHORT_QA).format(c=rng.choice(COUNTRIES))),
    ]
    weights = [w for w, _ in makers]
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        prompt = rng.choices(makers, weights)[0][1]()
        if prompt not in seen:
            seen.add(prompt)
            out.append(prompt)
    return out


def heldout_prompts() -> list[str]:
    """20 hand-written evaluation prompts (not generated above, not from any benchmark)."""
    return [
        "What are three good habits for staying healthy while working from home?",
        "Write a short letter thanking a neighbour for watering my plants.",
        "Explain how a refrigerator keeps food cold.",
        "Give me a recipe for a simple vegetable soup.",
        "Write a Python function that returns the list of even numbers from a list.",
        "What is the difference between weather and climate?",
        "Describe a sunset over the sea in a few sentences.",
        "A farmer has 17 sheep and buys 8 more, then sells 5. How many sheep does he have?",
        "Why do leaves change colour in autumn?",
        "Write a story about a robot who learns to paint.",
        "What should I pack for a three-day camping trip?",
        "Explain what a variable is in programming to a beginner.",
        "List some tips for writing a good resume.",
        "How do airplanes stay in the air?",
        "Write a JavaScript function that counts how many times a letter appears in a string.",
        "What were the main causes of the First World War?",
        "Suggest a name for a bakery and explain why it is a good name.",
        "How can I improve my sleep quality?",
        "Explain the rules of football (soccer) briefly.",
        "What are the benefits of reading books?",
    ]
