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


# Each bad value and the key its error must name. Every numeric key is checked where it is defined.
BAD_VALUES = [
    ("train.lr", "nan"), ("train.lr", "inf"), ("train.lr", 0), ("train.lr", -1e-4),
    ("train.betas", [5, 7]), ("train.betas", [0.9, 1.0]), ("train.betas", [-0.1, 0.9]), ("train.betas", [0.9]),
    ("train.betas", ["a", 0.9]), ("train.betas", [0.9, float("nan")]),
    ("train.weight_decay", -0.1), ("train.weight_decay", "nan"), ("train.warmup", -1), ("train.warmup", "nan"),
    ("train.min_lr_ratio", 1.5), ("train.min_lr_ratio", -0.1), ("train.clip_grad", -1),
    ("train.clip_grad", "inf"), ("train.micro_batch", 0), ("train.grad_accum", 0), ("train.epochs", -1),
    ("train.epochs", 0), ("train.epochs", "nan"), ("train.max_steps", -1), ("train.log_every", 0),
    ("train.save_every", -1), ("train.keep_last", 0), ("train.threads", -2), ("train.checkpoint_skip", -1),
    ("data.max_length", 0), ("data.eval_fraction", 1.0), ("data.eval_fraction", -0.1),
    ("data.eval_fraction", "nan"), ("data.augment_fraction", 1.5), ("data.max_train_records", -1),
    ("data.max_eval_records", -1),
    ("adapter.rank", 0), ("adapter.alpha", -8), ("adapter.alpha", 0), ("adapter.alpha", "nan"),
    ("adapter.dropout", 1.0), ("adapter.dropout", -0.1), ("adapter.sensitivity", 2),
    ("adapter.param_budget", -1), ("adapter.rank_reallocate_every", -1), ("adapter.stage_warmup", -1),
    ("adapter.rank_window", [0.5, 0.2]), ("adapter.rank_window", ["a", "b"]),
    ("adapter.stages", [{"targets": "attention", "steps": 0}, {"targets": "mlp"}]),
    ("mask.fisher_keep", 1.5), ("mask.fisher_keep", "nan"), ("mask.fisher_batches", 0),
    ("eval.every", -1), ("eval.samples", -1), ("eval.final_samples", -1), ("eval.max_new_tokens", 0),
    ("eval.early_stop_patience", -1), ("eval.show_examples", -1), ("eval.plateau_min_scale", 2),
    ("eval.plateau_factor", 1.0), ("eval.plateau_patience", 0),
    ("monitor.heatmap_every", -1), ("monitor.ineffective_fraction", -0.5), ("monitor.guard_sigma", "nan"),
    ("monitor.guard_sigma", 0), ("monitor.max_nonfinite", 0),
]


@pytest.mark.parametrize("key,value", BAD_VALUES, ids=[f"{k}={v}" for k, v in BAD_VALUES])
def test_bad_value_is_refused_naming_the_key(key, value):
    tree: dict = {}
    section, name = key.split(".")
    tree[section] = {name: value}
    with pytest.raises(DeftuneError) as info:
        recipe_from_dict(tree)
    assert key in str(info.value)
    # The same value from the command line (text parsed as YAML) is refused the same way.
    text = value if isinstance(value, str) else str(value).replace("'", "")
    with pytest.raises(DeftuneError, match=key.replace(".", r"\.")):
        load_recipe(None, [f"{key}={text}"])


def test_boundary_values_are_accepted():
    recipe = recipe_from_dict({
        "train": {"weight_decay": 0, "betas": [0, 0.999], "warmup": 0, "min_lr_ratio": 1, "clip_grad": 0,
                  "save_every": 0, "threads": 0, "max_steps": 3, "epochs": 0.5},
        "data": {"eval_fraction": 0, "max_train_records": 0},
        "adapter": {"dropout": 0, "alpha": 0.5, "param_budget": 0},
        "eval": {"every": 0, "samples": 0, "show_examples": 0},
        "monitor": {"heatmap_every": 0},
    })
    assert recipe.train.betas == [0, 0.999] and recipe.adapter.alpha == 0.5 and recipe.train.epochs == 0.5
