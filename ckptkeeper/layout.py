"""The paths a command is given (root, state directory, archive) and the rules between them.

Checked once, before anything runs, by every entry point (plan, prune, watch and library callers alike):
a bad combination is a `LayoutError` naming both paths, and nothing runs. The archive's targets are
checked again at each archive (`actions._target_problem`), since what lies below the archive can change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptkeeper.paths import Place, Relation, checkpoint_component, place_of, read_mounts, relation
from ckptkeeper.state import STATE_DIR_NAME, ownership_problem
from ckptkeeper.urls import is_url, url_problem


class LayoutError(ValueError):
    """The root, state directory and archive given cannot be used together; the message names them."""


def default_state_dir(root: Path) -> Path:
    return root / STATE_DIR_NAME


@dataclass(frozen=True)
class Layout:
    root: Path
    state_dir: Path
    archive_dir: Path | None = None  # a local archive directory
    archive_url: str | None = None  # or an object store (destination.ObjectStore): no identity to compare
    archive_options: tuple[tuple[str, Any], ...] = ()  # fsspec storage options of archive_url

    @property
    def archive(self) -> Path | str | None:
        """Where removed checkpoints go, as the user named it: a path, a URL, or None (they are deleted)."""
        return self.archive_url if self.archive_url is not None else self.archive_dir

    @classmethod
    def checked(
        cls,
        root: Path,
        state_dir: Path | None = None,
        archive_to: Path | str | None = None,
        archive_options: tuple[tuple[str, Any], ...] = (),
    ) -> Layout:
        """The layout, after every rule between the paths holds; else LayoutError. `root` must exist. An
        `archive_to` that is a URL is an object store: only its form is checked here (nothing is imported)."""
        if isinstance(archive_to, str) and is_url(archive_to):
            problem = url_problem(archive_to)
            if problem:
                raise LayoutError(f"--archive-to {archive_to}: {problem}")
            local = cls.checked(root, state_dir)
            return cls(local.root, local.state_dir, None, archive_to, archive_options)
        if archive_options:
            raise LayoutError("--archive-option is for an object store archive (--archive-to s3://...) only")
        archive_to = Path(archive_to) if archive_to is not None else None
        root = Path(os.path.realpath(root))
        state = state_dir if state_dir is not None else default_state_dir(root)
        mounts = read_mounts()
        root_place = place_of(root, mounts)
        _check_root(root, root_place)
        state_place = place_of(state, mounts)
        _check_state(root, root_place, state, state_place)
        if archive_to is not None:
            archive_place = place_of(archive_to, mounts)
            _check_archive(root, root_place, archive_to, archive_place)
            _check_apart(f"--archive-to {archive_to}", archive_place, f"the state directory {state}", state_place)
        return cls(
            root,
            Path(os.path.abspath(state)),
            Path(os.path.abspath(archive_to)) if archive_to is not None else None,
        )


def _check_root(root: Path, root_place: Place) -> None:
    inside = checkpoint_component(root_place)
    if inside is not None:
        raise LayoutError(
            f"ROOT {root} is a checkpoint directory or inside one ({inside}): give the directory that holds "
            "the checkpoint-N directories (ckptkeeper never writes inside a checkpoint)"
        )


def _check_state(root: Path, root_place: Place, state: Path, state_place: Place) -> None:
    name = f"the state directory {state}"
    found = relation(state_place, root_place)
    if found is Relation.SAME:
        raise LayoutError(f"{name} is the root {root} itself: name a directory of its own")
    if found is Relation.CONTAINS:
        raise LayoutError(f"{name} contains the root {root}: ckptkeeper empties its trash; name another directory")
    inside = checkpoint_component(state_place)
    if inside is not None:
        raise LayoutError(f"{name} is inside a checkpoint ({inside}): ckptkeeper never writes inside a checkpoint")
    problem = ownership_problem(state)
    if problem:
        raise LayoutError(f"{name} {problem}")


def _check_archive(root: Path, root_place: Place, archive: Path, archive_place: Place) -> None:
    found = relation(archive_place, root_place)
    if found is Relation.SAME:
        raise LayoutError(
            f"--archive-to {archive} is the root {root} (the same directory, reached another way: a link or a "
            "second mount): archiving there would delete each checkpoint it claims to keep"
        )
    if found is Relation.INSIDE:
        raise LayoutError(
            f"--archive-to {archive} is inside the root {root}: choose a directory outside it, or ckptkeeper "
            "would later see the archive as runs and prune it"
        )
    if found is Relation.CONTAINS:
        raise LayoutError(f"--archive-to {archive} contains the root {root}: choose a directory apart from it")
    inside = checkpoint_component(archive_place)
    if inside is not None:
        raise LayoutError(
            f"--archive-to {archive} is inside a checkpoint ({inside}): the archive would go when that checkpoint "
            "is removed"
        )
    absolute = Path(os.path.abspath(archive))
    existing = next((p for p in (absolute, *absolute.parents) if os.path.lexists(p)), None)
    if existing is not None and not existing.is_dir():
        raise LayoutError(f"--archive-to {archive}: {existing} is not a directory")


def _check_apart(a_name: str, a: Place, b_name: str, b: Place) -> None:
    found = relation(a, b)
    if found is not None:
        raise LayoutError(f"{a_name} {found.value} {b_name}: they must be apart")
