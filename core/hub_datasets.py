"""Hub datasets as prompt sources: ``hf:ORG/NAME`` (``hf:ORG/NAME/DIR`` for one data directory).

Read through ``datasets`` from the Hub, or offline from a cache (docs/prompts.md has the
layout). ``datasets`` and ``huggingface_hub`` are imported only when a Hub source is read.
"""

from __future__ import annotations

from pathlib import Path

HUB_PREFIX = "hf:"


class HubSourceError(ValueError):
    """A Hub source cannot be read: a malformed id, not found, offline and not cached."""


def is_hub_source(source: str | Path) -> bool:
    return isinstance(source, str) and source.startswith(HUB_PREFIX)


def hub_dataset(source: str, split: str):
    """The ``split`` of the Hub dataset ``hf:ORG/NAME[/DIR]`` as a ``datasets.Dataset``.

    Online: ``datasets.load_dataset`` from the Hub. Offline (``HF_HUB_OFFLINE=1``), or when the
    Hub cannot be reached: the snapshot in the Hub cache (``$HF_HUB_CACHE``, filled by
    ``hf download REPO --repo-type dataset`` or an earlier online load; the commit ``refs/main``
    names) read as a local dataset, since datasets 5 does not look there by itself when offline;
    without one, what datasets prepared in its own cache before (docs/prompts.md). The snapshot
    comes first offline because datasets' fallback returns its latest prepared copy of the
    repository whatever ``DIR`` asks for."""
    import datasets
    from huggingface_hub import constants

    repo, data_dir = _hub_id(source)
    try:
        snapshot = _cached_snapshot(repo) if constants.HF_HUB_OFFLINE else None
        try:
            return datasets.load_dataset(snapshot or repo, data_dir=data_dir, split=split)
        except ConnectionError as unreachable:
            snapshot = snapshot or _cached_snapshot(repo)
            if snapshot is None:
                raise HubSourceError(
                    f"cannot load {source}: the Hub cannot be reached ({unreachable}) and the Hub cache "
                    f"{constants.HF_HUB_CACHE} holds no snapshot of {repo} (hf download {repo} --repo-type "
                    "dataset, where there is network)") from None
            return datasets.load_dataset(snapshot, data_dir=data_dir, split=split)
    except HubSourceError:
        raise
    except (OSError, ValueError) as exc:  # not found, gated, unknown split, no data files
        raise HubSourceError(f"cannot load {source} (split {split!r}): {type(exc).__name__}: {exc}") from exc


def _hub_id(source: str) -> tuple[str, str | None]:
    parts = [p for p in source[len(HUB_PREFIX):].strip().split("/") if p]
    if len(parts) < 2:
        raise HubSourceError(f"{source!r}: a Hub dataset is hf:ORG/NAME (or hf:ORG/NAME/DIR for one data directory)")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None


def _cached_snapshot(repo: str) -> str | None:
    """The folder of the Hub cache's snapshot of ``repo`` (``refs/main``), or None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo, repo_type="dataset", local_files_only=True)
    except LocalEntryNotFoundError:
        return None
