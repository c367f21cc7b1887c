"""Helpers shared by the test modules: tiny projects, scratch git+DVC repos, local servers."""
