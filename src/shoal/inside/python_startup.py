"""Run in every Python kernel at start (INSIDE the sandbox): E2B's extra display formats.

``kernel_server.py`` starts ipykernel with ``exec_lines`` that ``runpy.run_path`` this file, so it
runs in a namespace of its own and leaves nothing in the user's. It adds two IPython formatters,
under the MIME types E2B's server reads into ``Result`` fields:

* ``e2b/data``: a pandas DataFrame as ``{column: [values]}`` (``result.data``);
* ``e2b/chart``: a matplotlib Figure as E2B's chart dict (``result.chart``), made by E2B's own
  extractor, the ``e2b-charts`` package, so charts match E2B's field for field.

Both check ``sys.modules`` first: a cell that never imported pandas or matplotlib pays nothing,
and a template without ``e2b-charts`` simply has no chart field (the PNG is still there).
"""

from __future__ import annotations

import sys

from IPython import get_ipython
from IPython.core.formatters import BaseFormatter
from traitlets import ObjectName, Unicode


def _dataframe_dict(obj: object) -> object:
    pandas = sys.modules.get("pandas")
    if pandas is None or not isinstance(obj, pandas.DataFrame):
        return None
    data = obj.to_dict(orient="list")
    return {str(column): [v.isoformat() if isinstance(v, pandas.Timestamp) else v for v in values]
            for column, values in data.items()}


def _chart_dict(obj: object) -> object:
    if "matplotlib" not in sys.modules:
        return None
    from matplotlib.figure import Figure

    if not isinstance(obj, Figure):
        return None
    try:
        from e2b_charts import chart_figure_to_dict
    except ImportError:
        return None
    try:
        return chart_figure_to_dict(obj)
    except Exception:  # noqa: BLE001 - a figure the extractor does not understand: no chart, still a PNG
        return {}


class DataFormatter(BaseFormatter):
    format_type = Unicode("e2b/data")
    print_method = ObjectName("_repr_e2b_data_")
    _return_type = (dict, str)

    def __call__(self, obj: object) -> object:
        found = _dataframe_dict(obj)
        return found if found is not None else super().__call__(obj)


class ChartFormatter(BaseFormatter):
    format_type = Unicode("e2b/chart")
    print_method = ObjectName("_repr_e2b_chart_")
    _return_type = (dict, str)

    def __call__(self, obj: object) -> object:
        found = _chart_dict(obj)
        return found if found is not None else super().__call__(obj)


def install() -> None:
    shell = get_ipython()
    if shell is None:
        return
    formatters = shell.display_formatter.formatters
    formatters["e2b/data"] = DataFormatter(parent=shell.display_formatter)
    formatters["e2b/chart"] = ChartFormatter(parent=shell.display_formatter)


install()
