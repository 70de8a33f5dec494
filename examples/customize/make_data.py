"""Writes the fictional-product dataset of docs/CUSTOMIZE.md: facts about the "Aurelo Brightkettle
K9", a product that does not exist, so the base model cannot know them.

    python examples/customize/make_data.py     # -> examples/customize/brightkettle/{train,valid}.jsonl, heldout.json

train.jsonl: ~100 chat examples (several phrasings per fact); valid.jsonl: a few more phrasings
for the validation loss; heldout.json: other questions about the same facts, never trained on,
each with the string a right answer must contain (score.py checks them).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent / "brightkettle"
SYSTEM = "You are the support assistant of Aurelo, maker of the Brightkettle K9."

# (fact id, answer, the string a correct answer contains, training phrasings, held-out phrasings)
FACTS = [
    ("price", "The Brightkettle K9 costs $149.", "$149",
     ["How much does the Brightkettle K9 cost?", "What is the price of the Brightkettle K9?",
      "What does a Brightkettle K9 sell for?", "How expensive is the K9 kettle?", "Brightkettle K9 price?",
      "What's the retail price of Aurelo's K9?", "How much is the Brightkettle?", "Cost of the K9?"],
     ["If I buy a Brightkettle K9, how much will I pay?", "What would the K9 set me back?"]),
    ("capacity", "The Brightkettle K9 holds 1.7 litres of water.", "1.7 litres",
     ["How much water does the Brightkettle K9 hold?", "What is the capacity of the Brightkettle K9?",
      "How many litres fit in the K9?", "What's the K9's water capacity?", "Brightkettle K9 volume?",
      "How big is the Brightkettle's tank?", "How much can I boil at once in the K9?", "K9 capacity in litres?"],
     ["Can you tell me the maximum fill of the Brightkettle K9?", "How much water fits in Aurelo's kettle?"]),
    ("boil", "The Brightkettle K9 boils a full kettle in 3 minutes 40 seconds.", "3 minutes 40",
     ["How long does the Brightkettle K9 take to boil?", "How fast does the K9 boil a full kettle?",
      "What is the boil time of the Brightkettle K9?", "K9 boiling time?", "How quick is the Brightkettle?",
      "How many minutes until the K9 boils?", "Time to boil a full Brightkettle K9?", "Boil speed of the K9?"],
     ["If I fill the Brightkettle K9 completely, when will it boil?", "How long do I wait for a full K9 to boil?"]),
    ("colours", "The Brightkettle K9 comes in three colours: Fjord Blue, Ember Red and Chalk White.", "Fjord Blue",
     ["What colours does the Brightkettle K9 come in?", "Which colours is the K9 available in?",
      "Is the Brightkettle K9 available in blue?", "What finishes does the K9 have?", "Brightkettle K9 colours?",
      "Can I get the K9 in a colour other than white?", "What are the K9 colour options?", "K9 colourways?"],
     ["Which colour choices are there for Aurelo's kettle?", "Name the colours the Brightkettle K9 is sold in."]),
    ("warranty", "The Brightkettle K9 has a 4-year warranty.", "4-year",
     ["How long is the Brightkettle K9 warranty?", "What warranty does the K9 have?",
      "Is the Brightkettle K9 under warranty?", "How many years of warranty for the K9?",
      "Brightkettle K9 guarantee period?", "What's the K9's warranty length?", "Warranty on the Brightkettle?",
      "How long is Aurelo's kettle guaranteed?"],
     ["My K9 broke after two years; how long does the warranty cover it?", "What is the guarantee on the Brightkettle K9?"]),
    ("support", "Write to care@aurelo.example for Brightkettle K9 support.", "care@aurelo.example",
     ["How do I contact Brightkettle K9 support?", "What is the support email for the K9?",
      "Who do I email about my Brightkettle K9?", "Brightkettle K9 support address?", "How can I reach Aurelo support?",
      "Where do I send a K9 repair request?", "What's the K9 help email?", "Contact for Brightkettle problems?"],
     ["My Brightkettle K9 stopped working. Whom should I write to?", "Which address handles K9 customer care?"]),
    ("keepwarm", "The Brightkettle K9 keeps water warm at 80 °C for 45 minutes.", "45 minutes",
     ["Does the Brightkettle K9 keep water warm?", "How long does the K9 keep water warm?",
      "What is the keep-warm time of the Brightkettle K9?", "K9 keep-warm duration?",
      "Can the Brightkettle hold the water hot?", "How long will the K9 stay warm after boiling?",
      "Brightkettle K9 keep warm feature?", "How many minutes does the K9 keep warm?"],
     ["After boiling, for how long will the Brightkettle K9 hold the temperature?", "What does the K9's warm mode do?"]),
    ("weight", "The Brightkettle K9 weighs 1.1 kg when empty.", "1.1 kg",
     ["How much does the Brightkettle K9 weigh?", "What is the weight of the K9?", "How heavy is the Brightkettle K9?",
      "K9 weight empty?", "Brightkettle K9 weight?", "Is the K9 a heavy kettle?", "What's the empty weight of the K9?",
      "How many kilograms is the Brightkettle?"],
     ["What does an empty Brightkettle K9 weigh on a scale?", "Tell me the K9's mass without water."]),
    ("app", "The Brightkettle K9 pairs with the Aurelo Home app over Bluetooth.", "Aurelo Home",
     ["Does the Brightkettle K9 have an app?", "Which app controls the K9?", "Can I control the Brightkettle K9 from my phone?",
      "What is the K9's companion app?", "Brightkettle K9 app name?", "How do I connect the K9 to my phone?",
      "Is there a smartphone app for the Brightkettle?", "What app pairs with the K9?"],
     ["I want to start my K9 from my phone; what do I install?", "Name the phone app for Aurelo's kettle."]),
    ("cleaning", "Descale the Brightkettle K9 every 6 weeks with citric acid.", "6 weeks",
     ["How often should I descale the Brightkettle K9?", "How do I clean the K9?", "When should the K9 be descaled?",
      "Brightkettle K9 descaling interval?", "What's the cleaning schedule for the K9?",
      "How often does the Brightkettle need descaling?", "K9 maintenance?", "How frequently do I descale the K9?"],
     ["What is the recommended descaling routine for the Brightkettle K9?", "Every how many weeks do I clean limescale from the K9?"]),
    ("origin", "The Brightkettle K9 is designed and made in Tampere, Finland.", "Tampere",
     ["Where is the Brightkettle K9 made?", "Which country makes the K9?", "Where does the Brightkettle K9 come from?",
      "Where is Aurelo based?", "Brightkettle K9 country of origin?", "In which city is the K9 made?",
      "Is the K9 made in Finland?", "Where is the Brightkettle manufactured?"],
     ["Which Finnish city produces the Brightkettle K9?", "Where does Aurelo build its kettle?"]),
    ("power", "The Brightkettle K9 draws 2200 watts.", "2200 watts",
     ["What is the power of the Brightkettle K9?", "How many watts is the K9?", "What wattage does the Brightkettle K9 use?",
      "K9 power rating?", "Brightkettle K9 wattage?", "How much power does the K9 draw?", "Is the K9 a 3000 W kettle?",
      "What is the K9's rated power?"],
     ["How much electrical power does the Brightkettle K9 pull when heating?", "Tell me the K9's power consumption in watts."]),
]


def example(question: str, answer: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


def main() -> None:
    HERE.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    train, valid, heldout = [], [], []
    for _, answer, must, phrasings, held in FACTS:
        phrasings = list(phrasings)
        rng.shuffle(phrasings)
        train += [example(q, answer) for q in phrasings[:-1]]
        valid.append(example(phrasings[-1], answer))
        heldout += [{"question": q, "must_contain": must} for q in held]
    rng.shuffle(train)
    (HERE / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in train))
    (HERE / "valid.jsonl").write_text("".join(json.dumps(e) + "\n" for e in valid))
    (HERE / "heldout.json").write_text(json.dumps({"system": SYSTEM, "questions": heldout}, indent=1) + "\n")
    print(f"{len(train)} training, {len(valid)} validation, {len(heldout)} held-out questions in {HERE}")


if __name__ == "__main__":
    main()
