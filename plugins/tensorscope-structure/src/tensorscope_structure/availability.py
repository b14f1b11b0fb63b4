"""Whether another plugin is loaded in this process, for a need that is optional (the head graph).

The plugin API does not expose the registry, so this reads what the core reads: the installed
entry points of the group ``tensorscope`` and ``TENSORSCOPE_LOAD_PLUGINS`` (unset: all; else a
comma-separated list of entry-point or distribution names).
"""

from __future__ import annotations

import os
from importlib import metadata

GROUP = "tensorscope"
LOAD_ENV = "TENSORSCOPE_LOAD_PLUGINS"


def plugin_loaded(entry_point: str) -> bool:
    """True when an installed plugin with this entry-point name is selected for loading."""
    found = metadata.entry_points(group=GROUP, name=entry_point)
    wanted = os.environ.get(LOAD_ENV)
    if wanted is None:
        return bool(found)
    names = {n.strip() for n in wanted.split(",") if n.strip()}
    return any(ep.name in names or (ep.dist is not None and ep.dist.metadata["Name"] in names) for ep in found)
