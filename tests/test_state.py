"""Declared state (state.py): saving, stash-then-apply and pickling follow from one declaration."""

from __future__ import annotations

import pickle
import threading

import pytest
import torch

from lightning_compress.state import DeclaredState


class Component(DeclaredState):
    def __init__(self) -> None:
        self.add_state("count", 0)
        self.add_state("memory", factory=dict)
        self.add_state("scratch", 0.0, persistent=False)
        self.add_transient("lock")
        self.lock = threading.Lock()  # unpicklable, like a process group
        self.add_transient("pending", factory=list)
        self.applied_with: tuple = ()

    def _load_state(self, state, *args, **kwargs):
        super()._load_state(state)
        self.applied_with = args


def test_state_dict_holds_the_persistent_declarations_as_copies():
    c = Component()
    c.count = 3
    c.memory["w"] = torch.ones(2)
    c.scratch = 9.0
    state = c.state_dict()
    assert set(state) == {"count", "memory"}
    c.memory["w"].add_(1.0)
    assert torch.equal(state["memory"]["w"], torch.ones(2))  # a copy, not a view


def test_load_stashes_until_applied():
    c = Component()
    c.load_state_dict({"count": 5, "memory": {"w": torch.zeros(1)}})
    assert c.restore_pending and c.count == 0
    assert c.apply_restored("device") is True
    assert c.count == 5 and c.applied_with == ("device",) and not c.restore_pending
    assert c.apply_restored() is False  # applied once
    with pytest.raises(TypeError, match="Component state must be a dict"):
        c.load_state_dict([1])


def test_pickling_drops_transients_and_keeps_state():
    c = Component()
    c.count = 2
    c.pending.append(object())
    clone = pickle.loads(pickle.dumps(c))
    assert clone.count == 2 and clone.lock is None and clone.pending == []
    assert c.lock is not None and len(c.pending) == 1  # the original is untouched
    clone.pending.append(1)
    assert pickle.loads(pickle.dumps(clone)).pending == []  # fresh defaults, not shared lists


def test_reset_state_restores_defaults():
    c = Component()
    c.count, c.memory = 4, {"a": 1}
    c.reset_state("count")
    assert c.count == 0 and c.memory == {"a": 1}
    c.reset_state()
    assert c.memory == {} and c.lock is None
