"""docs/ agrees with the code: the defaults table is the generated one, every dotted config key the
docs name exists, and the calibration check values are what calibrate() computes."""
import re
from pathlib import Path

import pytest

from megatron_selfjudge import docs_table
from megatron_selfjudge.config import Config, leaf_items
from megatron_selfjudge.rewards.judge import calibrate

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"
DOCUMENTS = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
SECTIONS = tuple(Config.__dataclass_fields__)
FILE_SUFFIXES = {"py", "md", "yaml", "yml", "json", "jsonl", "sh", "txt", "parquet", "pt", "bin", "safetensors"}


def test_defaults_table_is_generated_from_the_dataclasses():
    text = METHOD.read_text(encoding="utf-8")
    start, end = text.index(docs_table.BEGIN) + len(docs_table.BEGIN), text.index(docs_table.END)
    assert text[start:end].strip() == docs_table.defaults_table(), (
        "docs/method.md's defaults table is stale: run python -m megatron_selfjudge.docs_table --write docs/method.md")


def test_table_has_every_leaf_with_its_default_and_a_meaning():
    rows = docs_table.defaults_table().splitlines()[2:]
    leaves = list(leaf_items(Config()))
    assert len(rows) == len(leaves)
    for row, (key, value) in zip(rows, leaves):
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]]
        assert cells[0] == f"`{key}`" and cells[1] == docs_table.format_value(value)
        assert cells[3], f"{key} has no comment in config.py to explain it"


def _documented_keys(text: str) -> set[str]:
    """Dotted config keys in backticks: `loss.beta_kl`, `reward.mode=majority`, `a.b` / `a.c`."""
    keys = set()
    for span in re.findall(r"`([^`\n]+)`", text):
        for m in re.finditer(r"(?<![\w./-])((?:%s)(?:\.[a-z_][a-z0-9_]*)+)" % "|".join(SECTIONS), span):
            if m.group(1).rsplit(".", 1)[1] not in FILE_SUFFIXES:
                keys.add(m.group(1))
    return keys


def test_every_documented_key_exists():
    leaves = {key for key, _ in leaf_items(Config())}
    groups = {key.rsplit(".", 1)[0] for key in leaves if key.count(".") > 1}  # e.g. reward.calibration
    checked = 0
    for doc in DOCUMENTS:
        keys = _documented_keys(doc.read_text(encoding="utf-8"))
        unknown = sorted(k for k in keys if k not in leaves and k not in groups)
        assert not unknown, f"{doc.relative_to(ROOT)} names config keys that do not exist: {unknown}"
        checked += len(keys)
    assert checked >= 40  # the docs do name keys: the pattern is not silently matching nothing


def test_key_pattern_sees_keys_and_skips_file_names():
    text = "`loss.beta_kl=0.02` `trainer.py` `reward.calibration.*` `megatron_selfjudge.data.synthetic` `x.y`"
    assert _documented_keys(text) == {"loss.beta_kl", "reward.calibration"}


def test_calibration_check_values():
    text = METHOD.read_text(encoding="utf-8")
    table = text[text.index("<!-- calibration check values -->"):].split("\n\n")[0]
    rows = re.findall(r"^\| ([0-9.]+) \| ([0-9.]+) \|$", table, flags=re.M)
    assert len(rows) == 5
    for s, g in rows:
        digits = len(g.split(".")[1])
        assert round(calibrate(float(s)), digits) == float(g), (s, g)


def test_readme_sends_readers_to_the_repository_docs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "../shared" not in readme and "docs/method.md" in readme


def test_write_replaces_only_the_table(tmp_path):
    doc = tmp_path / "m.md"
    doc.write_text(f"before\n{docs_table.BEGIN}\nold rows\n{docs_table.END}\nafter\n")
    assert docs_table.main(["--write", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith(f"before\n{docs_table.BEGIN}\n| key |") and text.endswith(f"{docs_table.END}\nafter\n")
    assert "old rows" not in text
    with pytest.raises(ValueError, match="markers"):
        docs_table.replace_table("no markers", "table")
