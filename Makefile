# The two commands that work on a fresh Debian 12 machine as root: `make demo` and `make test`.
.PHONY: setup lint test test-slow test-fast demo clean-demo bench bench-footprint

PY := .venv/bin

setup:
	bash scripts/setup.sh

lint:
	bash scripts/setup.sh --venv-only
	$(PY)/ruff check daemon tests scripts bench
	$(PY)/ruff format --check daemon tests scripts bench
	$(PY)/mypy

# Three workers on two cores: guest tests also wait (a guest's boot, a daemon's window, an
# agent's reply); with two the suite took 18 min. Four were tried (2026-12-03, fresh clones:
# parallel phase 11:05 and 12:33 and 12:59 against 11:48 with three): no steady gain, more
# contention on the Debian tests, and a spinning guest judged idle once. Three phases:
# the guest tests; then the tests that kill libvirtd (one after another, on one worker),
# beside the unit tests, which never use it; last, alone, the Debian live test, whose bar is
# the guest's own stalls.
GUEST_TESTS := guest and not restarts_libvirtd and not serial and not slow
test: setup lint
	$(PY)/pytest -n 3 --dist loadgroup -m "$(GUEST_TESTS)"
	$(PY)/pytest -n 3 --dist loadgroup -m "not ($(GUEST_TESTS)) and not serial and not slow"
	$(PY)/pytest -m "serial and not slow"

# The slow tier (about 15 min): live jobs killed at random moments, 20 times on the busybox
# guest instead of make test's 5, and 5 times on the Debian guest; the daemon killed at 5
# random moments of its live jobs; live jobs killed before each step; Debian's zero-fill;
# the whole demo.
test-slow: setup
	VR_RANDOM_KILLS=20 $(PY)/pytest tests/integration/test_live.py -k "random_moments and not daemon"
	$(PY)/pytest -m slow

# Everything but the tests that boot guests (a few minutes; about 2.5 with -n 2).
test-fast: lint
	$(PY)/pytest -m "not guest"

demo: setup
	$(PY)/python scripts/demo.py

clean-demo:
	$(PY)/python scripts/demo.py --remove

# Run by hand, not in CI: the rewrite benchmark (a few minutes).
bench: setup
	$(PY)/python bench/rewrite.py

# The daemon with 500 test-driver domains: memory, one stats sample, CPU while idle (~1.5 min).
bench-footprint: setup
	$(PY)/python bench/footprint.py
