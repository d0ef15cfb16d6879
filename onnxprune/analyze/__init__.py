"""Channel-dependency analysis: op rules, channel maps and coupled groups."""

from .graph import Analysis, Group, analyze

__all__ = ["Analysis", "Group", "analyze"]
