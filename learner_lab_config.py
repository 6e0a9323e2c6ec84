"""Jupyter server config for the learners' lab (`make lab` passes it with --config).

The lab serves notebooks/, which also holds notebooks/source/: the instructor sources with
solutions and hidden tests. Learners should not find them one click away from the exercises, so
the lab hides them: not listed in the file browser and not served by the contents or files API
(404, as for dotfiles). The repository itself stays open; see docs/instructors.md.

This is a Python config file, not command-line options, for two reasons: a list option on the
command line replaces jupyter_server's default hide_globs (__pycache__, *.pyc, ...) instead of
extending them, and jupyter_server's hide_globs only filter listings; blocking access needs the
small contents manager below.
"""
from jupyter_server.files.handlers import FilesHandler
from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager
from traitlets import default

c = get_config()  # noqa: F821 (defined by the config loader)


class LearnerContentsManager(AsyncLargeFileManager):
    """A path with a part that hide_globs matches is hidden: not listed, and not served either."""

    async def is_hidden(self, path):
        parts = path.strip("/").split("/")
        return not all(map(self.should_list, parts)) or await super().is_hidden(path)

    @default("files_handler_class")
    def _files_handler_class_default(self):
        # /files/ (downloads, "open in new tab") through is_hidden above; the default handler
        # reads the disk directly and hides only dotfiles.
        return FilesHandler


c.ServerApp.contents_manager_class = LearnerContentsManager
c.ContentsManager.hide_globs.append("source")
