""".env.example lists every setting the code reads, each with the default the code uses."""

from __future__ import annotations

from dotenv import dotenv_values

from runtime.settings import PROJECT_ROOT, Settings

EXAMPLE = PROJECT_ROOT / ".env.example"


def example_values() -> dict[str, str]:
    return {name: value or "" for name, value in dotenv_values(EXAMPLE).items()}


def test_the_example_names_every_setting_and_nothing_else() -> None:
    names = set(example_values())
    settings = {name.upper() for name in Settings.model_fields}
    assert sorted(settings - names) == [], "settings missing from .env.example"
    assert sorted(names - settings) == [], ".env.example names settings the code does not read"


def test_each_example_value_is_the_default_the_code_uses() -> None:
    # Validated from the example alone: neither the environment nor a .env file takes part.
    from_example = Settings.model_validate(
        {name.lower(): value for name, value in example_values().items()}
    )
    defaults = Settings.model_construct()
    differing = {
        name: (getattr(from_example, name), getattr(defaults, name))
        for name in Settings.model_fields
        if getattr(from_example, name) != getattr(defaults, name)
    }
    assert differing == {}, "(.env.example, code default) differ"


def test_the_example_says_it_holds_development_values_only() -> None:
    head = EXAMPLE.read_text().splitlines()[0]
    assert head.startswith("# DEVELOPMENT VALUES ONLY")
