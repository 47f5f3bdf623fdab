"""MkDocs hook: the docstrings' reStructuredText habits shown as Sphinx would show them.

mkdocstrings renders ``:class:`X``` as the text ``:class:`` followed by ``X`` in code: this keeps the
code and, for a ``~`` target, only its last dotted part. A paragraph ending in ``::`` (the literal
block that follows is already code) ends in one colon.
"""

import re

_ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj):<code>(~?)([^<]*)</code>")
_LITERAL = re.compile(r"::</p>")


def on_page_content(html, **kwargs):
    html = _ROLE.sub(lambda m: f"<code>{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}</code>", html)
    return _LITERAL.sub(":</p>", html)
