"""Tests for the layer-name pattern rules."""

import threading

import pytest

from gnorm._src import naming


@pytest.mark.parametrize("name,expected", [
    (None, False), ("gn", False), ("fc-1", False), ("", False),
    ("gn{}", True), ("{}", True), ("gn{0}", True), ("fc-{:>03d}", True),
    ("fc-{:<03d}", True), ("block{:d}_norm", True), ("n{:x}", True),
])
def test_is_pattern(name, expected):
  assert naming.is_pattern(name) is expected


@pytest.mark.parametrize("pattern,index,expected", [
    ("gn{}", 1, "gn1"), ("gn{}", 12, "gn12"), ("fc-{:>03d}", 1, "fc-001"),
    ("fc-{:03d}", 7, "fc-007"), ("fc-{:<03d}", 1, "fc-100"),  # Python, not the seed
    ("{}_norm", 2, "2_norm"),
])
def test_fill(pattern, index, expected):
  assert naming.fill(pattern, index) == expected


@pytest.mark.parametrize("name,error,match", [
    ("a{}{}", ValueError, r"'a\{\}\{\}' has 2 replacement fields"),
    ("{}-{}-{}", ValueError, "3 replacement fields"),
    ("{name}", ValueError, "positional field"),
    ("{1}", ValueError, "positional field"),
    ("{!s}", ValueError, "positional field"),
    ("{:{}}", ValueError, "positional field|2 replacement fields"),
    ("x{", ValueError, "not a valid format pattern"),
    ("x}", ValueError, "not a valid format pattern"),
    ("{:q}", ValueError, "cannot be filled with an integer"),
    ("a{{b}}", ValueError, "literal braces"),
    (7, TypeError, r"name must be a str or None, got 7 \(type int\)"),
    (b"gn", TypeError, "name must be a str"),
])
def test_bad_names(name, error, match):
  with pytest.raises(error, match=match):
    naming.is_pattern(name)


def test_global_counters_count_per_pattern_from_one():
  counters = naming.GlobalCounters()
  assert [counters.next("a{}") for _ in range(3)] == [1, 2, 3]
  assert counters.next("b{}") == 1
  counters.reset()
  assert counters.next("a{}") == 1


def test_global_counters_are_thread_safe():
  counters = naming.GlobalCounters()
  seen = []
  lock = threading.Lock()

  def work():
    got = [counters.next("t{}") for _ in range(200)]
    with lock:
      seen.extend(got)

  threads = [threading.Thread(target=work) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert sorted(seen) == list(range(1, 801))
