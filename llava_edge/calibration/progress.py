"""Progress bars (terminal) and plain progress lines (redirected output): see llava_edge/progress.py."""

from ..progress import progress_iter

__all__ = ["progress_iter"]
