"""The stateful shell: :class:`NNHandler` and the modules it delegates to.

:mod:`~nnh.handler.nnhandler` holds the class; each capability lives in its own module:
epoch loops (:mod:`~nnh.handler.training`), saving (:mod:`~nnh.handler.persistence`,
:mod:`~nnh.handler.saving`, :mod:`~nnh.handler.autosaver`), loading
(:mod:`~nnh.handler.loading`), generation (:mod:`~nnh.handler.generation`), argument checks
(:mod:`~nnh.handler.validation`), data loaders (:mod:`~nnh.handler.data`), metrics objects
(:mod:`~nnh.handler.metric_objects`), history, logs, plots and the summary.

Example:
    >>> from nnh.handler import NNHandler
    >>> NNHandler.ModelType.from_string("regression").value
    'regression'
"""

from nnh.handler.nnhandler import NNHandler

__all__ = ["NNHandler"]
