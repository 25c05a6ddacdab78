"""Library errors name the Python argument (`shard_size='lots'`); the command line shows its flag
(`--shard-size lots`), with the table argument -> flag read from the parser."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import yaml

from mergelab.cli import build_parser, main
from mergelab.cli_errors import as_flags, flags
from mergelab.errors import OutputError, RecipeError
from mergelab.merging import merge
from tests.helpers import make_family


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli_errors")
    fam = make_family(root / "m", ["a"], layers=2)
    path = root / "linear.yaml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(fam["a"]), "parameters": {"weight": 1.0}}]}))
    return path


def test_python_caller_sees_the_argument(recipe: Path, tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match=r"^shard_size='lots': not a size") as info:
        merge(recipe, tmp_path / "out", shard_size="lots", progress=False)
    assert info.value.arguments == ("shard_size",)
    with pytest.raises(RecipeError, match=r"^memory='0GB': must be positive"):
        merge(recipe, tmp_path / "out", memory="0GB", progress=False)


def test_command_line_sees_its_flags(recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-q", "merge", str(recipe), str(tmp_path / "out"), "--shard-size", "lots"]) == 2
    assert capsys.readouterr().err == "mergelab: error: --shard-size lots: not a size; use e.g. 5GB, 500MB, 2GiB\n"
    assert main(["-q", "merge", str(recipe), str(tmp_path / "out")]) == 0
    assert main(["-q", "merge", str(recipe), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.endswith("already exists; pass --overwrite to replace it\n")


def test_each_spelling_becomes_the_flag() -> None:
    table = {"device": "--device", "overwrite": "--overwrite", "max_rank": "--max-rank", "rank": "--rank"}
    cases = {
        ("device='cuda:9': no CUDA device; use device='cpu'", ("device",)): "--device cuda:9: no CUDA device; use --device cpu",
        ("out: exists; pass overwrite=True to replace it", ("overwrite",)): "out: exists; pass --overwrite to replace it",
        ("max_rank: must be a positive integer, got 0", ("max_rank",)): "--max-rank: must be a positive integer, got 0",
        ("rank=0: must be a positive integer", ("rank",)): "--rank 0: must be a positive integer",
        # a longer key, a quoted word, an argument the error does not list: left as written
        ("options.rank: bad; 'rank': bad; max_rank=0", ("rank",)): "options.rank: bad; 'rank': bad; max_rank=0",
        ("device='x': bad", ()): "device='x': bad",
    }
    for (message, arguments), shown in cases.items():
        assert as_flags(RecipeError(message, arguments=arguments), table) == shown


def test_table_is_read_from_the_parser() -> None:
    table = flags(build_parser())
    assert table["shard_size"] == "--shard-size" and table["budget"] == "--budget" and table["resume"] == "--resume"
    assert table["allow_crimes"] == "--allow-crimes"  # not its --no- form
    assert table["max_rank"] == "--max-rank"  # extract-lora's --max-rank / --rank


def test_arguments_survive_pickling() -> None:
    """Errors cross process boundaries (Ray workers) with the arguments they name."""
    err = pickle.loads(pickle.dumps(OutputError("run: pass resume=True", arguments=("resume",))))
    assert isinstance(err, OSError) and str(err) == "run: pass resume=True" and err.arguments == ("resume",)
