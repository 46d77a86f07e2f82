"""Tracing and channel dependencies."""
from .graph import DependencyGraph, Group, Member
from .trace import TraceError

__all__ = ["DependencyGraph", "Group", "Member", "TraceError"]
