import pytest

from deftune.config import Recipe, field_docs, load_recipe, recipe_from_dict
from deftune.errors import DeftuneError


def test_default_recipe_loads_and_validates():
    recipe = load_recipe()
    assert isinstance(recipe, Recipe)
    assert recipe.data.template == "seed"
    assert recipe.model.path == "default"


def test_overrides_fill_nested_keys_with_types():
    recipe = load_recipe(None, ["model=/tmp/m", "data.train=x.jsonl", "data.eval=y.jsonl", "train.max_steps=7",
                                "train.lr=3e-4", "output_dir=/tmp/run", "adapter.layers=top:4",
                                "train.gradient_checkpointing=true"])
    assert recipe.model.path == "/tmp/m"
    assert recipe.data.train == "x.jsonl" and recipe.data.eval == "y.jsonl"
    assert recipe.train.max_steps == 7 and isinstance(recipe.train.max_steps, int)
    assert recipe.train.lr == pytest.approx(3e-4)
    assert recipe.output_dir == "/tmp/run"
    assert recipe.adapter.layers == "top:4"
    assert recipe.train.gradient_checkpointing is True


def test_unknown_key_lists_close_matches():
    with pytest.raises(DeftuneError, match=r"Unknown recipe key 'train.learning_rat'.*") as info:
        load_recipe(None, ["train.learning_rat=1"])
    with pytest.raises(DeftuneError, match="Did you mean: train.max_steps"):
        load_recipe(None, ["train.max_step=1"])
    assert "train.lr" in str(info.value)


def test_wrong_type_names_key_and_type():
    with pytest.raises(DeftuneError, match="train.max_steps: expected an integer"):
        load_recipe(None, ["train.max_steps=many"])
    with pytest.raises(DeftuneError, match="train.lr: expected a number"):
        recipe_from_dict({"train": {"lr": "fast"}})
    with pytest.raises(DeftuneError, match="data.packing: expected a boolean"):
        recipe_from_dict({"data": {"packing": "maybe"}})


def test_invalid_values_are_refused():
    with pytest.raises(DeftuneError, match="method must be one of lora, full, esft, expert-lora"):
        recipe_from_dict({"method": "dora"})
    with pytest.raises(DeftuneError, match="train.schedule"):
        recipe_from_dict({"train": {"schedule": "step"}})
    with pytest.raises(DeftuneError, match="not of the form key=value"):
        load_recipe(None, ["train.lr"])


def test_missing_recipe_file(tmp_path):
    with pytest.raises(DeftuneError, match="Recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_every_bundled_recipe_validates():
    from pathlib import Path

    import deftune

    recipes = sorted((Path(deftune.__file__).parent / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# Run with:"), f"{path.name} must start with the command that runs it"
        load_recipe(path)


def test_every_key_is_documented_in_the_key_reference():
    from pathlib import Path

    docs = field_docs()
    assert "train.lr" in docs and docs["train.lr"]
    assert all(docs.values()), [k for k, v in docs.items() if not v]
    root = Path(__file__).parents[1]
    reference = (root / "docs" / "keys.md").read_text()
    missing = [key for key in docs if f"`{key}`" not in reference]
    assert not missing, f"docs/keys.md lacks recipe keys: {missing}"
    assert "docs/keys.md" in (root / "README.md").read_text()  # the README points at the full reference
