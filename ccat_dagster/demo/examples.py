"""The example pipelines and reduction software that ship inside the package (``ccat_dagster/examples``).

In a checkout ``ccat_dagster/examples`` is a link to the repository's ``examples/``; a built wheel carries
the files themselves. They are found through ``importlib.resources``, never relative to ``site-packages``.
The example software is bind-mounted into containers, so it must be a real directory on disk (it is for
every regular and editable install; a zipped install is refused with a clear message).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ccat_dagster.errors import CcatError

DEFAULT_PIPELINE = "chai_ngc253_co43"


class ExampleNotFound(CcatError, FileNotFoundError):
    """A pipeline given to ``demo run`` is neither a file nor one of the bundled examples."""


def examples_dir() -> Path:
    """The directory holding ``pipelines/`` and ``software/`` of the installed package."""
    path = Path(str(resources.files("ccat_dagster") / "examples"))
    if not (path / "pipelines").is_dir():
        raise CcatError(
            f"{path} holds no example pipelines: the ccat-dagster installation is incomplete or zipped; "
            "reinstall it with `pip install --force-reinstall ccat-dagster`"
        )
    return path


def bundled_pipelines() -> list[str]:
    return sorted(p.stem for p in (examples_dir() / "pipelines").glob("*.yaml"))


def example_pipeline(name_or_path: str | Path | None = None) -> Path:
    """A pipeline YAML: an existing file as given, else the bundled example of that name (``.yaml`` optional)."""
    if name_or_path is None:
        name_or_path = DEFAULT_PIPELINE
    given = Path(name_or_path).expanduser()
    if given.is_file():
        return given.resolve()
    stem = given.name.removesuffix(".yaml").removesuffix(".yml")
    bundled = examples_dir() / "pipelines" / f"{stem}.yaml"
    if given.parent == Path(".") and bundled.is_file():
        return bundled.resolve()
    raise ExampleNotFound(
        f"--pipeline {name_or_path}: no such file and no bundled example of that name "
        f"(bundled: {', '.join(bundled_pipelines()) or 'none'})"
    )
