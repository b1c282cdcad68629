"""Corpora built from what a fresh machine has (this Python installation), for the demo and benchmarks."""

from streaming_mads.corpora.demo import build_demo_text
from streaming_mads.corpora.packages import build_collab_text, build_packages_text

__all__ = ['build_demo_text', 'build_packages_text', 'build_collab_text']
