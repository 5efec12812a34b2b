"""A plugin that fails on import: the registry must warn, naming it, and keep working."""

import this_module_does_not_exist  # noqa: F401
