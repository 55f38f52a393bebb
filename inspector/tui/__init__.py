"""cogsurgeon's terminal UI (Textual): a view over the core; the only package that imports Textual."""

__all__: list[str] = []
