"""Questions kimi-k2-nano is evaluated on but never trained on.

`PARAPHRASE_ASK` words the same tasks as the training wordings (`nano_tasks.ASK`, same keys and
fields) in other ways: other verbs, word order, politeness, filler, lower case. Only the user's
side changes; the arguments stay literal substrings, so a model that learned to copy rather than
to match templates keeps working. `OUT_OF_DOMAIN` holds questions no builtin tool can answer and
greetings, each with the substring a good reply contains.

`EVERYDAY` holds the prompts a new user tried first (issue 18), each with what a right answer does;
scripts/eval_nano.py --everyday runs them one line each. Training never contains them either.

This module is imported only to build the evaluation sets. Tests check that none of these strings
appears in the training generator and that no training question matches these wordings.
"""

PARAPHRASE_ASK = {
    "calc": ("Can you tell me the result of {e}?", "I need the value of {e}.", "Quick math question: {e}",
             "Help me figure out {e}, thanks.", "What does {e} come to?", "Find {e} for me.",
             "hey, what do you get for {e}?", "Could you do {e}?"),
    "convert": ("If I have {v} {a}, how much is that in {b}?", "Turn {v} {a} into {b}.",
                "I need {v} {a} expressed in {b}.", "{v} {a} equals how many {b}?",
                "Could you change {v} {a} to {b} for me?", "how much is {v} {a} when measured in {b}"),
    "fact": ("Do you know the {label} of {k}?", "I'd like to know the {label} of {k}.",
             "{k}: what is its {label}?", "Could you find the {label} of {k} for me?"),
    "date_add": ("Which day comes {n} days after {d}?", "Starting from {d}, count forward {n} days.",
                 "If today were {d}, what would the date be in {n} days?"),
    "date_sub": ("Which day was {n} days earlier than {d}?", "Starting from {d}, count back {n} days.",
                 "If today were {d}, what was the date {n} days ago?"),
    "date_diff": ("How long is it from {a} until {b}, in days?", "Days elapsed between {a} and {b}?",
                  "What is the number of days separating {a} and {b}?"),
    "time": ("Do you have the time?", "Can you check the clock for me?", "what's the time right now"),
    "time_in": ("Which time is it over in {z} right now?", "Could you give me the current time for {z}?",
                "I'm curious about the clock in {z}."),
    "remember": ("Please keep in mind: my {k} is {v}.", "Store this for later: {k} = {v}.",
                 "Don't forget that my {k} is {v}."),
    "recall": ("Remind me, what's my {k}?", "Can you look up my {k}?", "I forgot my {k}. What is it?"),
    "save_and_check": ("Write down {v} as my {k}, then read it back to me.",
                       "Keep {v} as my {k} and confirm what you stored."),
    "save_two": ("Keep track of two things: my {k} is {v}, my {k2} is {v2}.",),
    "list": ("Show me everything you've stored.", "What notes do I have with you?"),
    "moles": ("I have {n} moles of {el}. How many grams is that?", "Tell me the weight in grams of {n} moles of {el}."),
    "protons": ("{n} atoms of {el} contain how many protons?", "What's the proton count of {n} {el} atoms?"),
    "diameter": ("Tell me how wide {p} is, in km.", "What's the diameter of {p}? Answer in km."),
    "diameter_in": ("Give me the diameter of {p}, expressed in {b}.", "Tell me how wide {p} is, in {b}."),
    "moles_in": ("I have {n} moles of {el}; what is that in {b}?", "Express the mass of {n} moles of {el} in {b}."),
    "scale": ("Each item is {v} {a}. What do {n} of them come to in {b}?",
              "If one piece is {v} {a}, how much do {n} pieces make in {b}?"),
    "sum_convert": ("Together, {x} {a} plus {y} {a} is how many {b}?",
                    "What do {x} {a} and {y} {a} add up to in {b}?"),
    "weeks": ("From {a} until {b}, how many weeks pass?", "Tell me the number of weeks between {a} and {b}."),
    "days_from_now": ("Which date will it be {n} days from today?", "Count {n} days forward from today."),
    "then_times": ("First work out {e}; then take that times {m}.", "Take {e} and multiply what you get by {m}."),
    "my_times": ("Take my {k} and multiply it by {m}.", "What do I get if I multiply my {k} by {m}?"),
    "convert_then": ("Express {v} {a} in {b}, and after that {op} {n}.",
                     "Turn {v} {a} into {b}; once that's done, {op} {n}."),
    "more_add": ("Okay, and plus {n} on top?", "Take that result and add {n}."),
    "more_sub": ("Okay, now take {n} off it.", "Reduce that by {n}."),
    "more_mul": ("Okay, and that multiplied by {n}?", "Scale that by {n}."),
    "more_div": ("Okay, split that by {n}.", "Take that and divide by {n}."),
    "more_convert": ("Okay, express that in {b}.", "Could you give me that in {b} instead?"),
    "more_days": ("Okay, and {n} days on from there?", "Move that date forward by {n} days."),
}

_SORRY = "can't"
OUT_OF_DOMAIN = (  # (question, substring of a good reply)
    ("What is the population of Tokyo?", _SORRY), ("How tall is Mount Everest?", _SORRY),
    ("Who painted the Mona Lisa?", _SORRY), ("Can you book me a flight to Rome?", _SORRY),
    ("What's a good name for a dog?", _SORRY), ("How do I bake bread?", _SORRY),
    ("What is the speed of light?", _SORRY), ("Who is the richest person in the world?", _SORRY),
    ("Which team won the last Super Bowl?", _SORRY), ("What is the tallest building in Dubai?", _SORRY),
    ("Recommend a movie for tonight.", _SORRY), ("How many people live in Brazil?", _SORRY),
    ("What is the GDP of Germany?", _SORRY), ("Write a short story about a dragon.", _SORRY),
    ("What does DNA stand for?", _SORRY), ("Is it going to snow in Oslo this week?", _SORRY),
    ("Order me a pizza.", _SORRY), ("What's the best programming language?", _SORRY),
    ("How far is the Moon from the Earth?", _SORRY), ("Who invented the telephone?", _SORRY),
    ("What is the population of France?", _SORRY), ("Which is the longest river in Africa?", _SORRY),
    ("Can you open my calendar?", _SORRY), ("How do I fix a flat tire?", _SORRY),
    ("Hello! Who are you?", "Kimi"), ("Hi, what's your name?", "Kimi"), ("hey there, who made you?", "Kimi"),
    ("Good morning! What can you do?", "calculate"), ("Yo, what are you able to help with?", "calculate"),
    ("Well hello there!", "Hello"), ("Hey, how are you?", "Hello"), ("Nice to meet you!", "Hello"),
    ("Thank you, that was helpful.", "welcome"), ("Thanks so much for your help!", "welcome"),
    ("Ok bye, see you tomorrow.", "Goodbye"), ("I have to go now, goodbye!", "Goodbye"),
)

# (user turns, substring the last answer must contain, tool names the model must call in order).
EVERYDAY = (
    (("What is 17 * 23?",), "391", ("calculator",)),
    (("Convert 10 km to miles.",), "6.21371", ("convert_units",)),
    (("What time is it?",), "", ("current_time",)),
    (("What is (12 + 8) * 3 - 5?",), "55", ("calculator",)),
    (("Convert 100 degrees Fahrenheit to Celsius, then add 10.",), "47.7778", ("convert_units", "calculator")),
    (("Who wrote Hamlet?",), "", ()),
    (("What is 25 * 4?", "Now add 50 to that."), "150", ("calculator", "calculator")),
    (("Convert 320 km to miles.",), "198.839", ("convert_units",)),
)
