"""The Python blocks of docs/inference.md run as written, in a Python without txformer, against a tiny trained
∞-former folder standing in for the Hub repository."""

import json
import re
import shutil
import textwrap
from pathlib import Path

from conftest import run_without_txformer
from inference_helpers import train_tiny_folder

from txformer.data import EventVocabulary, build_customer_dataset, generate_synthetic_data
from txformer.pipeline_txformer import read_csv_rows


ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "inference.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
# The README's section of the same name shows the first steps; its blocks run here too.
README_SECTION = re.compile(r"^## From the Hub\n(.*?)^## ", re.MULTILINE | re.DOTALL)

RUNNER = textwrap.dedent(
    """
    import json, sys, traceback
    outcomes = []
    for block in json.loads(open(sys.argv[1]).read()):
        try:
            exec(compile(block, "<docs/inference.md>", "exec"), {"__name__": "__main__"})
            outcomes.append(None)
        except Exception:
            outcomes.append(traceback.format_exc())
    print(json.dumps(outcomes))
    """
)


def python_blocks(repository: str) -> list[str]:
    """The Python blocks of the doc and of the README's "From the Hub" section, with the placeholder repository and
    revision replaced."""
    readme_section = README_SECTION.search((ROOT / "README.md").read_text()).group(1)
    blocks = BLOCK.findall(DOC.read_text()) + BLOCK.findall(readme_section)
    return [block.replace("<user>/<name>", repository).replace("<commit hash>", "main") for block in blocks]


def test_the_python_blocks_of_the_inference_doc_run_without_txformer(tmp_path, monkeypatch):
    generate_synthetic_data(tmp_path / "data", num_customers=12, seed=3)
    customers = build_customer_dataset(tmp_path / "data" / "transactions.csv", tmp_path / "data" / "gender_train.csv")
    vocabulary = EventVocabulary.fit(customers, min_count=2)
    folder = train_tiny_folder(
        tmp_path / "model", "infinity", vocabulary, customers, max_length=None, segment_length=32
    )
    # The files the blocks read: all transactions; each customer's history but its last two rows; those rows.
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(tmp_path / "data" / "transactions.csv", work / "transactions.csv")
    rows, _ = read_csv_rows(work / "transactions.csv")

    def time_of(item: tuple[int, dict]) -> tuple[int, str]:
        day, clock = item[1]["tr_datetime"].split()
        return int(day), clock

    in_time_order = {}
    for index, row in sorted(enumerate(rows), key=time_of):
        in_time_order.setdefault(row["customer_id"], []).append(index)
    new = {index for indices in in_time_order.values() for index in indices[-2:]}
    for name, keep in (("history.csv", lambda index: index not in new), ("new_transactions.csv", new.__contains__)):
        lines = [",".join(row.values()) for index, row in enumerate(rows) if keep(index)]
        (work / name).write_text("\n".join([",".join(rows[0]), *lines]) + "\n")

    blocks = python_blocks(str(folder))
    assert len(blocks) >= 4
    (work / "blocks.json").write_text(json.dumps(blocks))
    monkeypatch.chdir(work)
    outcomes = json.loads(run_without_txformer(RUNNER, [str(work / "blocks.json")], work))
    failures = [(block, outcome) for block, outcome in zip(blocks, outcomes, strict=True) if outcome is not None]
    assert failures == []
