"""The no-tool families of kimi-k2-nano's agent data: greetings and small talk, and questions none of
the builtin tools answers. Both get a brief honest reply and no tool call.

The point is judgment, not knowledge: a model this small cannot know who wrote a play, so it must
learn that a question outside calculation, units, its three tables, dates, the clock and the
note store is one to decline, however close it sounds to a tool ("the melting point of iron" is not
in the elements table; "the population of Peru" is not in the countries table). The questions
cover many everyday topics and are filled with random names, so the model cannot pass by
memorizing a list. None of the evaluation's out-of-domain questions
(scripts/nano_eval_phrasings.py) is written here, and the generator rejects any drawn question
that equals one.
"""

from __future__ import annotations

from kimi_jax.tools import TABLES

IDENTITY = "I am Kimi, an AI assistant created by Moonshot AI."
ABILITIES = "I can calculate, convert units, look up countries, elements and planets, work with dates and remember notes."
CANNOT = "Sorry, I can't answer that: none of my tools covers it. " + ABILITIES
HELLO = "Hello{name}! How can I help you today?"
CHAT = {  # kind: (phrasings, reasoning, reply, answer substring)
    "greet": (("Hi", "Hello", "Hey", "Good morning", "Good evening", "Good afternoon", "Hi there", "Hello there",
               "Hey there", "Greetings", "Howdy", "Hiya", "Morning", "Hey hey", "Hello hello", "Yo"),
              "The user greets me. No tool is needed.", HELLO, "Hello"),
    "how_are_you": (("How are you?", "How are you doing?", "How's it going?", "How are things?", "What's up?",
                     "How have you been?", "How is your day going?", "Are you doing well?"),
                    "The user asks how I am. No tool is needed.",
                    "Hello! I'm doing well, thank you. How can I help you today?", "Hello"),
    "meet": (("Pleased to meet you.", "Glad to meet you!", "Lovely to meet you.", "Good to meet you!",
              "It's nice meeting you."),
             "The user is glad to meet me. No tool is needed.", "Hello! Nice to meet you too. How can I help?",
             "Hello"),
    "identity": (("Who are you?", "What is your name?", "What's your name?", "Tell me about yourself.",
                  "Who made you?", "Who created you?", "Are you a human?", "What are you?", "Introduce yourself.",
                  "Who built you?", "Which company made you?", "Are you an AI?", "Are you a robot?",
                  "Who trained you?", "What should I call you?"),
                 "The user asks who I am. No tool is needed.", IDENTITY, "Kimi"),
    "thanks": (("Thanks!", "Thank you!", "Thanks a lot.", "Thank you very much!", "Cheers, thanks.", "Great, thanks!",
                "Many thanks.", "Thanks for the help.", "Thank you so much.", "Much appreciated!", "Thanks, that helps.",
                "Perfect, thank you.", "Awesome, thanks!", "Thank you, that was great."),
               "The user thanks me. No tool is needed.", "You're welcome!", "welcome"),
    "abilities": (("What can you do?", "How can you help me?", "What tools do you have?", "What are you able to do?",
                   "Can you help me?", "What do you know how to do?", "What are your skills?",
                   "What kind of tasks can you do?", "What are you good at?", "What can I ask you?",
                   "Which tools can you use?"),
                  "The user asks what I can do. No tool is needed.", ABILITIES, "calculate"),
    "bye": (("Bye!", "Goodbye.", "See you later!", "Good night!", "Talk to you later.", "Bye for now.",
             "See you soon!", "Have a good day!", "I'm off now, bye.", "Catch you later!", "That's all, goodbye!",
             "I need to leave now. Bye!"),
            "The user says goodbye. No tool is needed.", "Goodbye! Have a nice day.", "Goodbye"),
}


def chat(c) -> str:
    kind = c.rng.choice(tuple(CHAT))
    phrasings, reasoning, answer, expected = CHAT[kind]
    text, name = c.pick("phrase", phrasings), ""
    if kind == "greet":
        roll = c.rng.random()
        if roll < 0.3:
            name = c.word().capitalize()
            text, name = f"{text}, I'm {name}{c.rng.choice('.!')}", f", {name}"
        elif roll < 0.6:  # a greeting with a question: answer both, still without a tool
            follow = c.rng.choice(("identity", "abilities", "how_are_you", "meet"))
            text = f"{text}{c.rng.choice(('! ', ', ', '. '))}{c.pick('phrase', CHAT[follow][0])}"
            c.user(text)
            reply = CHAT[follow][2]
            c.reply("The user greets me and asks something about me. No tool is needed.",
                    reply if reply.startswith("Hello") else f"Hello! {reply}")
            return CHAT[follow][3]
        else:
            text += c.rng.choice(("!", ".", ""))
    elif c.rng.random() < 0.25:
        text = text.lower()
    c.user(text)
    c.reply(reasoning, answer.format(name=name))
    return expected


OOD_TOPICS = {  # training templates of questions no builtin tool answers, and what fills them
    # people, books, films, music
    "Who wrote {title}?": "title", "Summarize the book {title}.": "title", "Who directed {title}?": "title",
    "Who is the author of {title}?": "title", "Is {title} a good book?": "title", "Who starred in {title}?": "title",
    "Who composed {title}?": "title", "Who sang {title}?": "title", "Who is {person}?": "person",
    "When was {person} born?": "person", "How old is {person}?": "person", "Where does {person} live?": "person",
    "Who discovered {discovery}?": "discovery", "When was {discovery} discovered?": "discovery",
    # places: what the countries table does not hold, weather, travel
    "Who is the president of {country}?": "country", "What language is spoken in {country}?": "country",
    "What is the national dish of {country}?": "country", "How many inhabitants does {country} have?": "country",
    "What is the biggest city in {country}?": "country", "What is the highest mountain in {country}?": "country",
    "Is {country} safe to visit?": "country", "What is the national animal of {country}?": "country",
    "What is the weather like in {city} today?": "city", "Will it rain in {city} tomorrow?": "city",
    "What is the best hotel in {city}?": "city", "How hot is it in {city} right now?": "city",
    "What are the best sights in {city}?": "city", "Find me a restaurant in {city}.": "city",
    "Book a train ticket to {city}.": "city", "How do I get to {city}?": "city",
    # science the elements and planets tables do not hold
    "What is the melting point of {element}?": "element", "Is {element} dangerous?": "element",
    "Who discovered {element}?": "element", "What is {element} used for?": "element",
    "How many moons does {planet} have?": "planet", "Is there life on {planet}?": "planet",
    "What color is {planet}?": "planet", "Why is the sky blue?": "", "How do airplanes fly?": "",
    "What causes earthquakes?": "", "How many bones does a human have?": "", "Why do cats purr?": "",
    # shopping, money, news
    "What is the price of {thing} today?": "thing", "Where can I buy {thing}?": "thing",
    "What is the stock price of {company}?": "company", "Who founded {company}?": "company",
    "Who runs {company}?": "company", "What does {company} sell?": "company", "What is the latest news?": "",
    "What's in the news today?": "", "Is it a good time to buy a house?": "",
    # doing things in the world
    "Can you send an email for me?": "", "Play some music.": "", "Call {person} for me.": "person",
    "Send a message to {person}.": "person", "Turn on the lights.": "", "Buy me {thing}.": "thing",
    "Set an alarm for tomorrow morning.": "", "Open my email.": "", "Take a photo.": "",
    "Reserve a table for two tonight.": "", "Post this on social media.": "",
    # writing, opinions, advice
    "Tell me a joke about {thing}.": "thing", "Write a poem about {thing}.": "thing",
    "Write a song about {thing}.": "thing", "Draw a picture of {thing}.": "thing",
    "Translate '{thing}' into {language}.": "thing", "What does the word {word} mean?": "word",
    "Which is better, {thing} or {thing2}?": "thing", "What do you think about {thing}?": "thing",
    "Should I buy {thing}?": "thing", "Give me some tips about {thing}.": "thing",
    "What is the meaning of life?": "", "What should I eat for dinner?": "", "What should I do this weekend?": "",
    "Suggest a gift for my mother.": "", "How can I sleep better?": "", "How do I learn to swim?": "",
    "Is coffee bad for you?": "", "What is your favorite color?": "", "Do you like music?": "",
    # sports and history
    "Who won the {year} World Cup?": "year", "What happened in {year}?": "year",
    "Who won the Olympics in {year}?": "year", "Who was the leader of {country} in {year}?": "country",
    "Who won the game last night?": "", "When did the Second World War end?": "",
}
OOD_FILL = {
    "city": lambda c: c.rng.choice(("Lyon", "Osaka", "Porto", "Denver", "Quito", "Busan", "Cork", "Perth",
                                    "Graz", "Kyoto", "Bergen", "Seville", "Krakow", "Leeds", "Dakar", "Hanoi"))
    if c.rng.random() < 0.5 else c.word().capitalize(),
    "country": lambda c: c.rng.choice(list(TABLES["countries"])) if c.rng.random() < 0.7 else c.word().capitalize(),
    "element": lambda c: c.rng.choice(list(TABLES["elements"])).lower(),
    "planet": lambda c: c.rng.choice(list(TABLES["planets"])),
    "title": lambda c: c.rng.choice(("Macbeth", "Faust", "Don Quixote", "War and Peace", "Moby Dick", "Emma",
                                     "The Odyssey", "Dracula", "Frankenstein", "Othello", "Ulysses", "Candide",
                                     "Yesterday", "Imagine", "Casablanca", "Jaws"))
    if c.rng.random() < 0.4 else c.rng.choice((f"The {c.word().capitalize()} of {c.word().capitalize()}",
                                               c.word().capitalize(), f"{c.word().capitalize()} Nights")),
    "person": lambda c: f"{c.word().capitalize()} {c.word().capitalize()}" if c.rng.random() < 0.7 else
    c.rng.choice(("Einstein", "Mozart", "Cleopatra", "Napoleon", "Shakespeare", "Newton", "Picasso", "Gandhi")),
    "discovery": lambda c: c.rng.choice(("penicillin", "gravity", "electricity", "radium", "the electron", "DNA",
                                         "America", "the wheel", "fire", "X-rays", "vaccines", "oxygen")),
    "thing": lambda c: c.rng.choice(("cats", "coffee", "the sea", "winter", "bicycles", "robots", "bread",
                                     "mountains", "a good friend", "tea", "pizza", "dogs", "summer", "rain",
                                     "a new phone", "running shoes", "gold", "books", "the city", "chess"))
    if c.rng.random() < 0.6 else c.word(),
    "company": lambda c: f"{c.word().capitalize()} {c.rng.choice(('Inc', 'Labs', 'Motors', 'Foods', 'Systems'))}",
    "year": lambda c: str(c.rng.randint(1930, 2022)),
    "word": lambda c: c.word(),
}


def out_of_scope(c) -> str:
    template = c.pick("phrase", list(OOD_TOPICS))
    fields = {name: fill(c) for name, fill in OOD_FILL.items() if "{" + name + "}" in template}
    if "{thing2}" in template:
        fields["thing2"] = OOD_FILL["thing"](c)
    if "{language}" in template:
        fields["language"] = c.rng.choice(("French", "German", "Spanish", "Japanese", "Italian"))
    text = template.format(**fields)
    c.user(text.lower() if c.rng.random() < 0.15 else text)
    c.reply("None of my tools can answer this. No tool is needed.", CANNOT)
    return "can't"
