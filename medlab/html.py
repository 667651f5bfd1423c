"""HTML pages from the Jinja2 templates in ``medlab/templates/``, autoescaped.

Autoescaping means a run name, class name or file name that contains markup
(``<script>``, quotes) is shown as text and never executed by the browser.
"""

from __future__ import annotations

from functools import cache

import jinja2


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("medlab", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def render(template: str, **context) -> str:
    """The template ``medlab/templates/<template>`` filled with ``context``, every value escaped."""
    return _environment().get_template(template).render(**context)
