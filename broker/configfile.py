"""The configuration as a command reads it: the file, with the loaded plugins' tables.

Apart from :mod:`broker.config`, which the plugin manager imports (a plugin's tables are
:class:`broker.config.ConfigTable` values), so that the configuration's parser does not
import the plugin manager back.
"""

from __future__ import annotations

from pathlib import Path

from broker import plugins
from broker.config import Config, find_config, load_config


def read_config(path: Path | None) -> Config:
    """The configuration a command reads: the file :func:`~broker.config.find_config`
    picks for *path* (else the embedded defaults), with the tables of the plugins that
    load (:class:`broker.plugins.PluginError` when they cannot be loaded)."""
    return load_config(find_config(path), plugins.PluginManager().config_tables)
