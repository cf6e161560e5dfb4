"""The normative tracekit format specs and JSON Schemas, installed as ``tracekit.schemas``.

The files live at the top of the repository (``schemas/``) and are mapped into the package by
``pyproject.toml``, so wheels and editable installs both find them with importlib.resources.
"""
