"""Build ro-chat: a small Romanian instruction/chat set written for glotkit (CC0).

The facts below were written for this data set; the script turns them into conversations with
varied phrasing (seeded), a third or more of them multi-turn, and writes train.jsonl and
test.jsonl (split by conversation, seeded).  Run it from anywhere:

    python recipes/data/ro-chat/build.py

The output is committed; rerunning it gives the same files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = "Ești un asistent care răspunde în limba română, scurt și exact."

COUNTIES = {
    "Alba": "Alba Iulia", "Arad": "Arad", "Argeș": "Pitești", "Bacău": "Bacău", "Bihor": "Oradea",
    "Bistrița-Năsăud": "Bistrița", "Botoșani": "Botoșani", "Brașov": "Brașov", "Brăila": "Brăila",
    "Buzău": "Buzău", "Caraș-Severin": "Reșița", "Călărași": "Călărași", "Cluj": "Cluj-Napoca",
    "Constanța": "Constanța", "Covasna": "Sfântu Gheorghe", "Dâmbovița": "Târgoviște", "Dolj": "Craiova",
    "Galați": "Galați", "Giurgiu": "Giurgiu", "Gorj": "Târgu Jiu", "Harghita": "Miercurea Ciuc",
    "Hunedoara": "Deva", "Ialomița": "Slobozia", "Iași": "Iași", "Maramureș": "Baia Mare",
    "Mehedinți": "Drobeta-Turnu Severin", "Mureș": "Târgu Mureș", "Neamț": "Piatra Neamț", "Olt": "Slatina",
    "Prahova": "Ploiești", "Satu Mare": "Satu Mare", "Sălaj": "Zalău", "Sibiu": "Sibiu", "Suceava": "Suceava",
    "Teleorman": "Alexandria", "Timiș": "Timișoara", "Tulcea": "Tulcea", "Vaslui": "Vaslui",
    "Vâlcea": "Râmnicu Vâlcea", "Vrancea": "Focșani",
}
CAPITALS = {
    "Franța": "Paris", "Germania": "Berlin", "Italia": "Roma", "Spania": "Madrid", "Portugalia": "Lisabona",
    "Polonia": "Varșovia", "Ungaria": "Budapesta", "Bulgaria": "Sofia", "Grecia": "Atena", "Austria": "Viena",
    "Cehia": "Praga", "Slovacia": "Bratislava", "Serbia": "Belgrad", "Croația": "Zagreb", "Belgia": "Bruxelles",
    "Suedia": "Stockholm", "Norvegia": "Oslo", "Danemarca": "Copenhaga", "Finlanda": "Helsinki",
    "Irlanda": "Dublin", "Elveția": "Berna", "Republica Moldova": "Chișinău", "Turcia": "Ankara",
    "Lituania": "Vilnius", "Letonia": "Riga", "Estonia": "Tallinn", "Slovenia": "Ljubljana", "Albania": "Tirana",
    "România": "București",
}
WORDS = {
    "câine": "dog", "pisică": "cat", "casă": "house", "apă": "water", "carte": "book", "masă": "table",
    "soare": "sun", "lună": "moon", "pâine": "bread", "măr": "apple", "floare": "flower", "copil": "child",
    "prieten": "friend", "școală": "school", "drum": "road", "munte": "mountain", "râu": "river", "cer": "sky",
    "zăpadă": "snow", "ploaie": "rain", "vânt": "wind", "foc": "fire", "oraș": "city", "sat": "village",
    "fereastră": "window", "ușă": "door", "scaun": "chair", "lapte": "milk", "frate": "brother",
    "soră": "sister", "mamă": "mother", "tată": "father", "ochi": "eye", "inimă": "heart", "pădure": "forest",
    "lac": "lake", "stea": "star", "vară": "summer", "iarnă": "winter", "cheie": "key",
}
OPPOSITES = {
    "mare": "mic", "cald": "rece", "sus": "jos", "zi": "noapte", "bun": "rău", "lung": "scurt", "greu": "ușor",
    "vechi": "nou", "plin": "gol", "repede": "încet", "deschis": "închis", "alb": "negru", "tânăr": "bătrân",
    "bogat": "sărac", "aproape": "departe", "început": "sfârșit", "vesel": "trist", "înalt": "scund",
    "gros": "subțire", "intrare": "ieșire",
}
PLURALS = {
    "carte": "cărți", "copil": "copii", "casă": "case", "om": "oameni", "floare": "flori", "școală": "școli",
    "masă": "mese", "oraș": "orașe", "munte": "munți", "râu": "râuri", "drum": "drumuri", "prieten": "prieteni",
    "fată": "fete", "băiat": "băieți", "pisică": "pisici", "câine": "câini", "stea": "stele", "zi": "zile",
    "noapte": "nopți", "mână": "mâini",
}
DAYS = ["luni", "marți", "miercuri", "joi", "vineri", "sâmbătă", "duminică"]
MONTHS = ["ianuarie", "februarie", "martie", "aprilie", "mai", "iunie", "iulie", "august", "septembrie",
          "octombrie", "noiembrie", "decembrie"]

# (first question, follow-up question, answer) per kind; {x} is the item asked about, {y} the answer
ASK = {
    "county": (["Care este reședința județului {x}?", "Care e orașul de reședință al județului {x}?",
                "Ce oraș este reședința județului {x}?"],
               ["Dar a județului {x}?", "Și a județului {x}?", "Și pentru județul {x}?"], "{y}."),
    "capital": (["Care este capitala țării {x}?", "Ce oraș este capitala țării {x}?", "Spune-mi capitala țării {x}."],
                ["Dar capitala țării {x}?", "Și a țării {x}?", "Și capitala țării {x}?"], "{y}."),
    "word": (["Cum se spune „{x}” în engleză?", "Tradu în engleză cuvântul „{x}”.", "Ce înseamnă „{x}” în engleză?"],
             ["Dar „{x}”?", "Și „{x}”?", "Și cuvântul „{x}”?"], "{y}"),
    "opposite": (["Care este antonimul cuvântului „{x}”?", "Spune-mi contrariul lui „{x}”.",
                  "Ce cuvânt înseamnă opusul lui „{x}”?"],
                 ["Dar al lui „{x}”?", "Și pentru „{x}”?", "Și contrariul lui „{x}”?"], "{y}"),
    "plural": (["Care este pluralul cuvântului „{x}”?", "Cum se spune la plural „{x}”?", "Pune la plural: {x}."],
               ["Dar „{x}”?", "Și „{x}”?", "Și pluralul lui „{x}”?"], "{y}"),
    "day": (["Ce zi a săptămânii urmează după {x}?", "Ce zi vine după {x}?"],
            ["Dar după {x}?", "Și după {x}?"], "{Y}."),
    "month": (["Ce lună urmează după {x}?", "Ce lună vine după {x}?"],
              ["Dar după {x}?", "Și după {x}?"], "{Y}."),
    "sum": (["Cât fac {x}?", "Calculează: {x}.", "Cât este {x}?"], ["Dar {x}?", "Și {x}?"], "{y}"),
}


def facts(rng: random.Random) -> dict[str, list[tuple[str, str]]]:
    out = {"county": list(COUNTIES.items()), "capital": list(CAPITALS.items()), "word": list(WORDS.items()),
           "opposite": list(OPPOSITES.items()), "plural": list(PLURALS.items()),
           "day": [(d, DAYS[(i + 1) % 7]) for i, d in enumerate(DAYS)],
           "month": [(m, MONTHS[(i + 1) % 12]) for i, m in enumerate(MONTHS)]}
    sums = []
    for _ in range(60):
        a, b = rng.randint(2, 49), rng.randint(2, 49)
        sums.append((f"{a} plus {b}", str(a + b)) if rng.random() < 0.6 else
                    (f"{max(a, b)} minus {min(a, b)}", str(max(a, b) - min(a, b))))
    out["sum"] = sums
    return out


def answer(kind: str, x: str, y: str) -> str:
    return ASK[kind][2].format(x=x, y=y, Y=y[:1].upper() + y[1:])


def conversations(seed: int = 2026) -> list[dict]:
    rng = random.Random(seed)
    convs: list[dict] = []
    for kind, items in facts(rng).items():
        items = items[:]
        rng.shuffle(items)
        # 55 % of each kind's facts go into multi-turn conversations of 2-3 turns
        n_multi = round(len(items) * 0.55)
        multi, single = items[:n_multi], items[n_multi:]
        for x, y in single:
            q = rng.choice(ASK[kind][0]).format(x=x)
            convs.append({"kind": kind, "messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": answer(kind, x, y)}]})
        i = 0
        while i < len(multi):
            k = min(len(multi) - i, 3 if rng.random() < 0.3 else 2)
            if len(multi) - i - k == 1:
                k += 1
            msgs = []
            for j, (x, y) in enumerate(multi[i: i + k]):
                q = rng.choice(ASK[kind][0] if j == 0 else ASK[kind][1]).format(x=x)
                msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": answer(kind, x, y)}]
            convs.append({"kind": kind, "messages": msgs})
            i += k
    rng.shuffle(convs)
    out = []
    for n, c in enumerate(convs):
        out.append({"id": f"ro-chat-{n:03d}", "kind": c["kind"],
                    "messages": [{"role": "system", "content": SYSTEM}] + c["messages"]})
    return out


def main() -> None:
    here = Path(__file__).resolve().parent
    convs = conversations()
    rng = random.Random(7)
    order = list(range(len(convs)))
    rng.shuffle(order)
    test_ids = set(order[: round(len(convs) * 0.2)])
    for name, part in (("train", [c for i, c in enumerate(convs) if i not in test_ids]),
                       ("test", [c for i, c in enumerate(convs) if i in test_ids])):
        with (here / f"{name}.jsonl").open("w", encoding="utf-8") as fh:
            for c in part:
                fh.write(json.dumps(c, ensure_ascii=False) + "\n")
        multi = sum(1 for c in part if sum(m["role"] == "assistant" for m in c["messages"]) > 1)
        print(f"{name}.jsonl: {len(part)} conversations, {multi} multi-turn")


if __name__ == "__main__":
    main()
