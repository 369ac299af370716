"""Metal bodies compiled as C++ on the CPU (see harness.py)."""
