"""Callbacks: the base class and the built-ins users expect."""

from nnh.callbacks.base import HOOKS, Callback, CallbackList

__all__ = ["HOOKS", "Callback", "CallbackList"]
